"""The engine loop: requests, scheduling (continuous batching), model execution, sampling."""
