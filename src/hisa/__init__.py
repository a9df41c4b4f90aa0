"""hisa: long-context LLM inference with a hierarchical sparse KV cache."""

from hisa.config import EngineConfig
from hisa.engine.outputs import RequestOutput
from hisa.engine.sampling_params import SamplingParams
from hisa.errors import HisaError
from hisa.llm import LLM

__all__ = ["LLM", "SamplingParams", "EngineConfig", "RequestOutput", "HisaError"]
__version__ = "0.1.0"
