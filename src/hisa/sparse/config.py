"""Configuration of the hierarchical sparse KV cache (validated once, at construction)."""

from __future__ import annotations

from dataclasses import dataclass

from hisa.errors import ConfigError, check_int, check_number


@dataclass(slots=True)
class SparseConfig:
    """What the sparse cache selects and how much memory each tier gets.

    algorithm: a registered selection algorithm ("quest", "oracle", "streaming", ...).
    token_budget: tokens attended per layer per decode step: sinks + selected pages + recent window,
        the page being written included. Must cover at least the sinks, the window and one more page.
    buffer_ratio: device buffer slots per request = buffer_ratio × budget pages (an LRU; >= 1).
    sink_pages / recent_pages: always-resident pages at the start and the end of the context.
    min_prompt_len: prompts shorter than this run dense.
    residency: where a sparse request's KV lives. "auto" (HBM first): every page on the device while
        the device pool has room (attention still reads only the selected pages, and nothing moves
        over PCIe), the full KV in the host pool with only an LRU buffer of buffer_ratio x budget
        pages on the device once it does not (new requests), or when the pool runs short (the
        youngest resident request is demoted); "device": always resident (preempted when the pool
        is full); "host": always host-backed (device memory per request O(budget) from the start).
    host_pool_gb: the pinned host pool shared by the host-backed requests (their full KV lives
        there); None sizes it from the RAM the machine has available (less headroom), capped at
        what max_sparse_requests requests of the longest context need.
    max_sparse_requests: sparse requests running at once (representations are preallocated per slot).
    prefetch: host-backed requests only: while a global layer computes, load the pages it chose into
        the next global layer's buffer too (a side stream on CUDA), guessing that adjacent layers
        select alike (hisa.kvcache.manager). Off by default: the guess is wrong more often than
        right, with random weights (tiny-llama: 51 pages loaded ahead, 5 more misses) and on a real
        model (SmolLM2 on an H200, 32 host-backed rows: 2.2x the bytes, the same hit rate, 3.97 vs
        2.91 ms per step; bench/results/decode_real_gpu_h200_smollm2_1204.json). Sliding-window
        layers (Gemma-3) always load the next one's window ahead: it is the same pages.
    warm_start: host-backed requests only: at the end of the prefill, fill each layer's device buffer
        with the pages the first decode step will most likely read (its sinks and recent pages, and
        the middle pages the last prompt token's query ranks best), copied from the prefill's K/V while
        it is on the device, instead of starting decode from an empty buffer that misses every page
        of its first step. Changes only what is loaded over PCIe, never the outputs.
    dense_layers: the first N layers attend densely to every page of a sparse request (no selection
        there; Quest keeps 2); 0 (the default) selects in every layer. Sliding-window layers keep
        their window either way. Needs residency="device": a host-backed request's device buffer
        holds only its budget's pages, not a whole context per layer.
    decode_streams: CUDA decode steps captured in a graph whose sparse rows are all resident split
        their rows into this many groups, each selecting and attending on its own stream (the new
        K/V written on another): the chains of small, latency-bound selection kernels of different
        rows overlap. 1 runs every row on one stream. Eager and host-backed steps always use one.

    Example::

        SparseConfig(algorithm="quest", token_budget=512, buffer_ratio=2.0)
    """

    algorithm: str = "quest"
    token_budget: int = 2048
    buffer_ratio: float = 2.0
    sink_pages: int = 1
    recent_pages: int = 2
    min_prompt_len: int = 1024
    residency: str = "auto"
    host_pool_gb: float | None = None
    max_sparse_requests: int = 16
    prefetch: bool = False
    warm_start: bool = True
    dense_layers: int = 0
    decode_streams: int = 2

    def __post_init__(self) -> None:
        from hisa.sparse.base import registered_algorithms

        known = registered_algorithms()
        if self.algorithm not in known:
            raise ConfigError(f"unknown sparse algorithm {self.algorithm!r}; choose one of: {', '.join(known)}")
        for name in ("token_budget", "min_prompt_len", "max_sparse_requests", "recent_pages", "decode_streams"):
            check_int(name, getattr(self, name), low=1)   # (recent: the page being written is recent)
        for name in ("sink_pages", "dense_layers"):
            check_int(name, getattr(self, name))
        check_number("buffer_ratio", self.buffer_ratio, low=1.0)  # the buffer must hold the whole selection
        if self.host_pool_gb is not None:  # (None: sized from the machine's RAM)
            check_number("host_pool_gb", self.host_pool_gb, low=0, open_low=True)
        if self.residency not in ("auto", "device", "host"):
            raise ConfigError(f"residency must be 'auto', 'device' or 'host', got {self.residency!r}")
        if self.dense_layers and self.residency != "device":
            raise ConfigError(f"dense_layers={self.dense_layers} needs residency='device' (--residency device): a "
                              f"host-backed request keeps only its budget's pages on the device, not a whole "
                              f"context for its dense layers")

    def budget_pages(self, page_size: int) -> int:
        """Pages attended per step (token_budget rounded down to whole pages)."""
        pages = self.token_budget // page_size
        if pages < self.fixed_pages():
            raise ConfigError(
                f"token_budget={self.token_budget} is smaller than {self.fixed_pages_text()} at page_size="
                f"{page_size}; raise --token-budget to at least {self.fixed_pages() * page_size} or lower --sink-pages/--recent-pages")
        return pages

    def fixed_pages(self) -> int:
        """The fewest pages a budget must hold: sinks + recent window, + one selected page where the
        algorithm selects (streaming attends to the sinks and the window alone)."""
        return self.sink_pages + self.recent_pages + (0 if self.algorithm == "streaming" else 1)

    def fixed_pages_text(self) -> str:
        """`fixed_pages` in words, for error messages."""
        one = "" if self.algorithm == "streaming" else " + one selected page"
        return f"the sinks ({self.sink_pages} pages) + the recent window ({self.recent_pages} pages){one}"

    def selected_pages(self, page_size: int) -> int:
        """Pages chosen by the algorithm from the middle of the context (the rest are sinks + window)."""
        return self.budget_pages(page_size) - self.sink_pages - self.recent_pages

    def buffer_slots(self, page_size: int) -> int:
        """Device slots per request per layer: the LRU holds buffer_ratio × the whole budget."""
        return max(self.budget_pages(page_size), int(self.buffer_ratio * self.budget_pages(page_size)))
