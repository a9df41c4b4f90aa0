"""Engine configuration: one dataclass, validated once at the boundary."""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass

import torch

from hisa.sparse.config import SparseConfig

from hisa.errors import ConfigError, check_int, check_number
from hisa.kvcache.mla_fp8 import LATENT_FORMATS

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass(slots=True)
class EngineConfig:
    """Everything the engine needs to start.

    model: path to a .gguf file or Hugging Face directory, "random:<preset>", or None for the
        embedded SmolLM2-135M-Instruct.
    device: "cpu", "cuda" or "auto" (cuda when available).
    dtype: "auto" (fp32 on CPU, bf16 on CUDA), "float32", "float16" or "bfloat16".
    page_size: tokens per KV page.
    kv_cache_dtype: "auto" (KV in the model's dtype) or "fp8": a DeepSeek-V3.2 (MLA) model's latent rows
        in DeepSeek's FP8 layout, 656 bytes per token and layer instead of 1,152 in bf16, on the device,
        in the host pool and over PCIe, and its indexer keys in FP8 too (144 bytes instead of 256; the
        decode indexer then scores FP8 queries against them on the FP8 tensor cores)
        (`hisa.kvcache.mla_fp8`; lossy: e4m3 with a scale per 128 values). Models without a latent
        cache take only "auto".
    max_num_seqs / max_num_batched_tokens: the batch limits per engine step (continuous batching;
        prompts longer than max_num_batched_tokens are prefilled in chunks).
    max_model_len: longest prompt + output; defaults to the model's context length.
    kv_cache_gb / num_kv_pages: size of the dense KV page pool (num_kv_pages wins when both are set).
        Defaults: 2 GB on CPU; on CUDA, `gpu_memory_utilization` of free memory after the weights.
    sparse: a :class:`hisa.sparse.config.SparseConfig`; prompts of at least its min_prompt_len run
        with the full KV in the host pool and only the selected pages on the device.
    l3: None (off, the default) or an L3 store for prompt pages, `file:PATH`, `redis://HOST:PORT[,HOST:PORT...]` or
        `mooncake://MASTER_HOST:PORT`: dense requests load the full prompt pages it holds instead of
        prefilling them, and store theirs (hisa.engine.l3_prefix).
    l3_gb: the most GB of pages this process keeps in L3 (LRU eviction); None = no bound.
    l3_async: L3 lookups and writes run on a background thread, so a slow store never delays a step
        (the default); False runs them on the engine thread between steps.
    cuda_graphs: on CUDA, steps where every request decodes (all dense, or all sparse) are
        captured in a CUDA graph per (batch size, page-table width bucket) and replayed
        (`hisa.engine.cuda_graph`); False runs every step eagerly. Ignored on the CPU.
    prefix_cache: requests reuse the KV of full prompt pages already in their pool (a shared prefix of
        a running request, or pages kept after their requests finished, evicted LRU when the pool
        needs room) instead of prefilling them: dense and resident sparse requests in the device
        pool, host-backed sparse requests in the host pool (`hisa.engine.prefix_cache`).
    keep_alive_s: with prefix_cache, how long the pages of a finished request that asked for it
        (`SamplingParams.keep_alive`: a turn of an agent session) stay cached ahead of all other
        cached pages; under pressure ordinary cached pages are evicted first, then kept ones, the
        oldest finished request first (with `l3` its pages are in L3 too: the session is parked
        there). Default 300 s.
    cpu_decode_kv_gb: on the CPU, the most GB of fp32 K/V kept contiguous per decoding dense
        request beside the paged cache, so decode attention reads it in place instead of gathering
        pages every step (`hisa.engine.cpu_decode_kv`); requests past it take the paged path; 0 = off.
        Ignored on CUDA.
    overlap: "auto" (on for CUDA, off on the CPU), True or False: while the device runs a decode
        step, the host post-processes the step before and prepares the next (`hisa.engine.overlap`);
        outputs come back one step later, the tokens are the same (unseeded sampled requests may
        differ). Steps it does not cover (prefill, presence/frequency penalties, ...) run synchronously.

    Example::

        EngineConfig(model=None, device="cpu", max_num_seqs=8)
    """

    model: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    page_size: int = 16
    kv_cache_dtype: str = "auto"
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    kv_cache_gb: float | None = None
    num_kv_pages: int | None = None
    gpu_memory_utilization: float = 0.85
    seed: int = 0
    progress: bool = True
    sparse: SparseConfig | None = None  # the hierarchical sparse KV cache for long prompts; None = all dense
    cuda_graphs: bool = True  # capture decode steps in CUDA graphs (CUDA only); False = always eager
    l3: str | None = None  # prefix reuse through an L3 store (file:PATH | redis://HOST:PORT[,...] | mooncake://...)
    l3_gb: float | None = None
    l3_async: bool = True
    prefix_cache: bool = True
    keep_alive_s: float = 300.0
    cpu_decode_kv_gb: float = 1.0
    overlap: bool | str = "auto"

    def __post_init__(self) -> None:
        check_number("keep_alive_s", self.keep_alive_s, low=0)   # (seconds)
        if isinstance(self.device, torch.device):
            self.device = str(self.device)
        if isinstance(self.device, str):
            self.device = self.device.strip().lower()   # "CPU", "Cuda:0" as typed on a command line
        if not isinstance(self.device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"device must be cpu, cuda, cuda:N or auto, got {self.device!r}")
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError("device cuda was asked for but PyTorch sees no CUDA GPU; use --device cpu")
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ConfigError(f"dtype must be one of auto, float32, float16, bfloat16; got {self.dtype!r}")
        if self.kv_cache_dtype not in LATENT_FORMATS:
            raise ConfigError(f"kv_cache_dtype must be {' or '.join(LATENT_FORMATS)}, got {self.kv_cache_dtype!r}")
        for name in ("page_size", "max_num_seqs", "max_num_batched_tokens"):
            check_int(name, getattr(self, name), low=1)
        if self.page_size & (self.page_size - 1):
            raise ConfigError(f"page_size must be a power of two, got {self.page_size}")
        if self.max_model_len is not None:
            check_int("max_model_len", self.max_model_len, low=2)
        if self.kv_cache_gb is not None:
            check_number("kv_cache_gb", self.kv_cache_gb, low=0, open_low=True)
        if self.num_kv_pages is not None:
            check_int("num_kv_pages", self.num_kv_pages, low=1)
        check_int("seed", self.seed, high=2**64 - 1)
        if self.sparse is not None and not isinstance(self.sparse, SparseConfig):
            raise ConfigError("sparse must be a hisa.sparse.config.SparseConfig (or None)")
        if self.sparse is not None:
            self.sparse.budget_pages(self.page_size)  # the budget must fit sinks + window at this page size
        if self.l3 is not None:
            from hisa.kvcache.l3.url import parse_l3_url

            parse_l3_url(self.l3)  # a malformed --l3 fails here, before the model loads
        if self.l3_gb is not None:
            if self.l3 is None:
                raise ConfigError(f"l3_gb needs l3 (--l3), got l3_gb={self.l3_gb!r}, l3=None")
            check_number("l3_gb", self.l3_gb, low=0, open_low=True)
        check_number("cpu_decode_kv_gb", self.cpu_decode_kv_gb, low=0)
        if self.overlap not in (True, False, "auto"):
            raise ConfigError(f"overlap must be True, False or 'auto', got {self.overlap!r}")
        check_number("gpu_memory_utilization", self.gpu_memory_utilization, low=0, open_low=True)
        if self.gpu_memory_utilization > 1.0:
            raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def overlap_on(self) -> bool:
        """Whether decode steps overlap host and device work ("auto": on CUDA)."""
        return self.overlap is True or (self.overlap == "auto" and self.device != "cpu")

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.float32 if self.device == "cpu" else torch.bfloat16
        return _DTYPES[self.dtype]


def fit_sparse_to_context(sparse: SparseConfig, *, max_model_len: int, page_size: int) -> SparseConfig:
    """`sparse` with token_budget capped at the context and the device buffer at the context's pages.

    A request never attends more tokens than its context holds, and its LRU buffer never needs more
    slots than the context has pages: larger values only size the per-request device buffers (an
    over-large --token-budget once asked for 147 GB). Logs one line when it caps something.

    Example::

        fit_sparse_to_context(SparseConfig(token_budget=100_000), max_model_len=8192, page_size=16)
        # -> token_budget=8192, buffer_ratio=1.0
    """
    if sparse.min_prompt_len >= max_model_len:
        logging.getLogger("hisa").warning(
            "min_prompt_len=%d is not below the context of %d tokens: no prompt is long enough to go sparse, "
            "every request runs dense", sparse.min_prompt_len, max_model_len)
    max_pages = -(-max_model_len // page_size)
    budget = min(sparse.token_budget, max_pages * page_size)
    if budget < sparse.token_budget and budget // page_size < sparse.fixed_pages():
        raise ConfigError(
            f"the context of {max_model_len} tokens is shorter than the sparse cache's fixed pages, "
            f"{sparse.fixed_pages_text()} at page_size={page_size}: lower --sink-pages/--recent-pages, or run "
            f"this context dense (no --sparse)")
    ratio = sparse.buffer_ratio
    budget_pages = budget // page_size
    if budget_pages and ratio * budget_pages > max_pages:
        ratio = max(1.0, max_pages / budget_pages)
    if budget == sparse.token_budget and ratio == sparse.buffer_ratio:
        return sparse
    notes = []
    if budget != sparse.token_budget:
        notes.append(f"token_budget {sparse.token_budget} -> {budget}")
    if ratio != sparse.buffer_ratio:
        notes.append(f"buffer_ratio {sparse.buffer_ratio:g} -> {ratio:g}")
    logging.getLogger("hisa").warning(
        "the sparse cache is capped at the context of %d tokens (%s): a request never attends or "
        "buffers more than its context", max_model_len, ", ".join(notes))
    return dataclasses.replace(sparse, token_budget=budget, buffer_ratio=ratio)
