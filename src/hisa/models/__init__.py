"""Model definitions (Llama family) and weight loading (GGUF, Hugging Face safetensors)."""
