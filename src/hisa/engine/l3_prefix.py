"""Prefix reuse from L3 for dense requests: load a prompt's full pages that L3 holds instead of
prefilling them, and store a prompt's full pages once its prefill is done.

A page in L3 is one token page across every layer, `[layers, 2, page_size, kv_heads, head_dim]`
in the cache's dtype (what `PagedKVCache.data[:, page]` holds), keyed by the chain of its tokens
and the KV layout (`hisa.kvcache.l3.keys`). Before each schedule, each waiting dense request the
scheduler may admit next (never looked up since it last lost its pages) has its keys checked: the
longest run of leading pages that L3 holds and that pass their checksum is copied into newly
allocated device pages and counted as computed, so the scheduler prefills only the rest (a chunk
after a cached prefix). At least the prompt's last token is always computed: its logits give the
first output token. A missing or corrupt page ends the run; nothing past it is used. With the pool's prefix cache on,
the leading pages the pool still holds are shared first and L3 fills in the pages after them.

Parking: a dense request the scheduler preempts (the device pool ran short) first writes its full
pages, prompt and generated tokens alike, to L3 (those L3 lacks); its pages are then freed as
before. When it is admitted again, the same lookup finds them under the keys of its tokens so far,
and it resumes from L3 instead of recomputing its whole context: only the tokens past its last full
page run again.

A request that finishes (stop or length) also writes its answer's full pages: a chat's or an
agent's next turn starts with this turn's prompt and answer, and finds all of it in L3.

Synchronous: a lookup and its reads run on the engine thread before the step; the write of a
finished prefill runs after the step, a parking write inside the schedule that preempts. Sparse
requests and MLA caches are not served yet.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from hisa.engine.scheduler import Scheduler
from hisa.engine.sequence import Sequence
from hisa.kvcache.l3 import KVLayout, L3Store, page_keys
from hisa.kvcache.paged_cache import PagedKVCache

log = logging.getLogger("hisa.l3")
STAGING_BYTES = 256 << 20  # CUDA: the size of each of the two pinned buffers loaded pages cross through


@dataclass(slots=True)
class PrefixStats:
    """Engine-side counters (pages are token pages across all layers)."""
    lookups: int = 0          # requests whose prompt was looked up
    requests_hit: int = 0     # of which at least one page was loaded
    pages_loaded: int = 0
    tokens_loaded: int = 0    # prompt tokens not prefilled thanks to L3
    pages_stored: int = 0
    requests_parked: int = 0  # preempted requests whose full pages were written to L3 before being freed
    pages_parked: int = 0     # pages those writes added (pages L3 held already are not written again)


class L3PrefixCache:
    """Loads and stores dense requests' prompt pages through an :class:`L3Store`.

    Example::

        prefix = L3PrefixCache(open_l3("file:/tmp/l3"), cache=engine.cache, layout=layout)
        prefix.load(engine.scheduler)        # before schedule()
        prefix.store_prompts(batch.seqs)             # after the step's KV is written
    """

    def __init__(self, store: L3Store, *, cache: PagedKVCache, layout: KVLayout):
        self.l3, self.cache, self.layout = store, cache, layout
        self.page_size = cache.page_size
        self.page_shape = tuple(cache.data.shape[:1] + cache.data.shape[2:])  # [layers, 2, S, KVH, D]
        self.page_bytes = cache.data[:, 0].numel() * cache.data.element_size()
        self.stats = PrefixStats()
        self._staging: list[torch.Tensor] | None = None  # CUDA: two pinned [n, L, 2, S, KVH, D] buffers
        self._staged: list | None = None  # and the events of their last copies
        self._looked_up: dict[str, int] = {}   # request id -> num_preemptions when last looked up
        self._stored: set[str] = set()

    # -- load --------------------------------------------------------------------------------
    def load(self, scheduler: Scheduler) -> None:
        """Give waiting dense requests that the scheduler may admit next their L3 prefix pages."""
        room = scheduler.max_num_seqs - len(scheduler.running)
        reserve = len(scheduler.running)   # the one-page-per-running-request margin the scheduler keeps
        for i, seq in enumerate(list(scheduler.waiting)[:max(0, room)]):
            if seq.sparse or seq.pages or seq.num_computed:
                continue
            if self._looked_up.get(seq.request_id) == seq.num_preemptions:
                continue
            s = self.page_size
            full = (seq.num_tokens - 1) // s   # the last token is always computed (it gives the logits)
            if full == 0:
                continue
            # Pages held by a waiting request cannot be preempted, so a request gets pages only when the
            # scheduler admits it next: the whole request fits now, or it is first in line (a request
            # just preempted is put there) and loads the leading pages that fit, one page and the
            # running requests' margin left free, prefilling the rest in chunks as pages free up.
            # Otherwise it is looked up again at a later step.
            free = scheduler.allocator.num_free
            cap = full if free >= -(-seq.num_tokens // s) + reserve else (free - reserve - 1 if i == 0 else 0)
            if cap <= 0:
                continue
            self._looked_up[seq.request_id] = seq.num_preemptions
            self.stats.lookups += 1
            # the leading pages the pool still holds are shared (cheaper than any copy); L3 continues after them
            start = scheduler.prefix.match(seq) // s if scheduler.prefix is not None else 0
            keys = page_keys(seq.token_ids[:full * s], self.layout)[start:cap]
            found = self.l3.exists(keys)
            hits = found.index(False) if False in found else len(found)
            hits = min(hits, max(0, scheduler.allocator.num_free - reserve - 1))  # sharing may have used room
            if hits == 0:
                continue
            payloads = self.l3.get(keys[:hits])
            hits = next((i for i, p in enumerate(payloads) if p is None or len(p) != self.page_bytes), hits)
            if hits == 0:
                continue
            pages = scheduler.allocator.allocate(hits)
            self._write_pages(pages, payloads[:hits])
            seq.pages, seq.num_computed = seq.pages + pages, (start + hits) * s
            self._stored.discard(seq.request_id)
            self.stats.requests_hit += 1
            self.stats.pages_loaded += hits
            self.stats.tokens_loaded += hits * s

    def _write_pages(self, pages: list[int], payloads) -> None:
        """Copy loaded pages into device pages. On CUDA through two reusable pinned staging buffers of
        up to STAGING_BYTES each, so one chunk's host copy overlaps the previous chunk's DMA (a fresh
        2 GB pinned buffer per load cost ~1 s of cudaHostAlloc on the H200 machine); on the CPU the
        pages go straight into the cache."""
        device = self.cache.data.device
        if device.type != "cuda":
            host = torch.empty(len(pages), *self.page_shape, dtype=self.cache.data.dtype)   # [n, L, 2, S, KVH, D]
            self._fill(host, payloads)
            self.cache.data.index_copy_(1, torch.tensor(pages, dtype=torch.int64), host.transpose(0, 1))
            return
        per_chunk = min(max(1, STAGING_BYTES // self.page_bytes), len(pages))
        if self._staging is None or self._staging[0].shape[0] < per_chunk:
            if self._staged is not None:  # grown up to STAGING_BYTES as loads need: let the old copies finish
                for e in self._staged:
                    e.synchronize()
            self._staging = [torch.empty(per_chunk, *self.page_shape, dtype=self.cache.data.dtype, pin_memory=True)
                             for _ in range(2)]
            self._staged = [torch.cuda.Event(), torch.cuda.Event()]
        for j, first in enumerate(range(0, len(pages), per_chunk)):
            buf, done = self._staging[j % 2], self._staged[j % 2]
            n = min(per_chunk, len(pages) - first)
            done.synchronize()  # this buffer's previous DMA has finished
            self._fill(buf[:n], payloads[first:first + n])
            index = torch.tensor(pages[first:first + n], dtype=torch.int64).to(device, non_blocking=True)
            # the contiguous host rows cross as they are; the [n, L] -> [L, n] swap happens on the device
            self.cache.data.index_copy_(1, index, buf[:n].to(device, non_blocking=True).transpose(0, 1))
            done.record()

    def _fill(self, host: torch.Tensor, payloads) -> None:
        rows = host.view(host.shape[0], -1).view(torch.uint8).numpy()                  # [n, page bytes]
        for row, payload in zip(rows, payloads):                                      # one copy per page
            row[:] = np.frombuffer(payload, dtype=np.uint8)

    # -- store -------------------------------------------------------------------------------
    def store_prompts(self, seqs: list[Sequence]) -> None:
        """Write the full prompt pages of dense requests whose prefill just ended (those L3 lacks)."""
        for seq in seqs:
            if seq.sparse or seq.request_id in self._stored or seq.num_computed < seq.num_prompt:
                continue
            self._stored.add(seq.request_id)
            self.stats.pages_stored += self._write_missing(seq, seq.num_prompt // self.page_size)

    def store_finished(self, seq: Sequence) -> None:
        """When a dense request finishes (stop or length): write its full pages past the prompt's (its
        answer) that L3 lacks, so the next turn of the conversation, which starts with this prompt
        and answer, loads them too."""
        full = self._computed_pages(seq)
        if full > seq.num_prompt // self.page_size:
            self.stats.pages_stored += self._write_missing(seq, full)

    def park(self, seq: Sequence) -> None:
        """Before a dense request is preempted: write every full page whose KV it has computed (prompt
        and generated tokens) to L3, so that its resumption loads them instead of recomputing them."""
        full = self._computed_pages(seq)
        if full == 0:
            return
        self.stats.requests_parked += 1
        self.stats.pages_parked += self._write_missing(seq, full)

    def _computed_pages(self, seq: Sequence) -> int:
        """Full pages of a dense request whose KV is computed and still held (0 for a sparse one)."""
        if seq.sparse or not seq.pages:
            return 0
        return min(seq.num_computed // self.page_size, len(seq.pages))

    def _write_missing(self, seq: Sequence, full: int) -> int:
        """Write the first `full` pages of `seq` that L3 lacks; the number written."""
        if full == 0:
            return 0
        keys = page_keys(seq.token_ids[:full * self.page_size], self.layout)
        missing = [i for i, there in enumerate(self.l3.exists(keys)) if not there]
        if not missing:
            return 0
        index = torch.tensor([seq.pages[i] for i in missing], dtype=torch.int64, device=self.cache.data.device)
        host = self.cache.data.index_select(1, index).transpose(0, 1).contiguous().cpu()   # [n, L, 2, S, KVH, D]
        rows = host.view(len(missing), -1).view(torch.uint8).numpy()
        return self.l3.set([keys[i] for i in missing], [rows[j].data for j in range(len(missing))])

    def forget(self, request_id: str) -> None:
        self._looked_up.pop(request_id, None)
        self._stored.discard(request_id)

    def metrics(self) -> dict[str, int]:
        return {**asdict(self.stats), **{f"store_{k}": v for k, v in self.l3.stats.as_dict().items()}}


def kv_layout(loaded, cache: PagedKVCache, *, seed: int) -> KVLayout:
    """The layout that keys a model's pages: its weights' identity, dtype and page geometry."""
    src, cfg = loaded.source, loaded.config
    if src.kind == "random":
        model_id = f"random:{src.preset}:seed{seed}"
    else:
        path = Path(src.path)
        files = [path] if path.is_file() else sorted(path.glob("*.safetensors")) or sorted(path.iterdir())
        model_id = f"{src.kind}:{path.name}:{sum(f.stat().st_size for f in files if f.is_file())}"
    return KVLayout(model_id=model_id, dtype=str(cache.data.dtype).removeprefix("torch."), page_size=cache.page_size,
                    num_layers=cache.num_layers, num_kv_heads=cache.num_kv_heads, head_dim=cache.head_dim,
                    extra=(("arch", str(cfg.arch)), ("windows", repr(list(cfg.layer_windows))),
                           ("page_layout", "layers,2,S,KVH,D")))
