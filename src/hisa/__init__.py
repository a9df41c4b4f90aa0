"""hisa: long-context LLM inference with a hierarchical sparse KV cache.

The public names load lazily, so `import hisa.errors` or `hisa --help` do not import torch.
"""

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "EngineConfig", "SparseConfig", "RequestOutput", "HisaError"]

_LAZY = {
    "LLM": "hisa.llm",
    "SamplingParams": "hisa.engine.sampling_params",
    "EngineConfig": "hisa.config",
    "SparseConfig": "hisa.sparse.config",
    "RequestOutput": "hisa.engine.outputs",
    "HisaError": "hisa.errors",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hisa' has no attribute {name!r}")
