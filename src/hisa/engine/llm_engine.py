"""The engine: `add_request` / `step` / `abort_request`, one step = schedule → run → postprocess.

Fault isolation: an exception raised for one request (its sampling row, its stop check, its
detokenization) ends that request alone with finish_reason "error"; an exception in the step itself
(the model forward: out of memory, a bug) ends that step's requests the same way and the engine goes
on, unless the device no longer works (`DeviceError`). Either way the failed requests' pages are freed.
"""

from __future__ import annotations

import gc
import itertools
import logging
import operator
import time
from collections.abc import Callable

import torch

from hisa.config import EngineConfig
from hisa.engine.detokenizer import Detokenizer
from hisa.engine.outputs import RequestOutput
from hisa.engine.overlap import InFlightStep, TokenReadback, can_overlap
from hisa.engine.prefix_cache import DevicePrefixCache, HostPrefixCache
from hisa.engine.sampler import Sampler
from hisa.engine.sampling_params import SamplingParams
from hisa.engine.scheduler import ScheduledBatch, Scheduler
from hisa.engine.sequence import PENDING_TOKEN, Sequence
from hisa.engine.model_runner import ModelRunner
from hisa.config import fit_sparse_to_context
from hisa.errors import ConfigError, DeviceError, InvalidRequestError, StepFailedError
from hisa.kvcache.page_allocator import PageAllocator
from hisa.kvcache.mla_cache import MLAKVCache
from hisa.kvcache.mla_fp8 import TILE as FP8_TILE
from hisa.kvcache.paged_cache import PagedKVCache
from hisa.models.factory import LoadedModel, load_model

log = logging.getLogger("hisa.engine")


class LLMEngine:
    """Continuous-batching engine over a paged KV cache.

    Example::

        engine = LLMEngine(EngineConfig(device="cpu"))
        rid = engine.add_request("Hello", SamplingParams(max_tokens=8))
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    print(out.text)
    """

    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None):
        self.closed = False
        self.config = config
        self._owns_weights = loaded is None  # close() frees weights only if this engine loaded them
        # called after each step's schedule(), before the model runs (the server refreshes /metrics here)
        self.on_schedule: Callable[[], None] | None = None
        torch.manual_seed(config.seed)
        self.loaded = loaded or load_model(config.model, device=config.torch_device, dtype=config.torch_dtype,
                                           progress=config.progress, seed=config.seed)
        weight = next(self.loaded.model.parameters())
        if weight.device.type != config.torch_device.type or weight.dtype != config.torch_dtype:
            raise ConfigError(f"the loaded model is {weight.dtype} on {weight.device}, the config asks for "
                              f"{config.torch_dtype} on {config.device}")
        mcfg = self.loaded.config
        self.model_config = mcfg
        self.tokenizer = self.loaded.tokenizer
        self.detokenizer = Detokenizer(self.tokenizer) if self.tokenizer is not None else None
        self.max_model_len = config.max_model_len or mcfg.max_position_embeddings
        if self.max_model_len > mcfg.max_position_embeddings:
            raise ConfigError(f"max_model_len={self.max_model_len} exceeds the model's context "
                              f"({mcfg.max_position_embeddings} tokens)")
        if config.kv_cache_dtype == "fp8" and (mcfg.dsa is None or mcfg.dsa.kv_lora_rank % FP8_TILE):
            raise ConfigError("kv_cache_dtype='fp8' is the FP8 latent cache of DeepSeek-V3.2-style (MLA) models "
                              f"with kv_lora_rank a multiple of {FP8_TILE}; this model "
                              + ("has no latent cache" if mcfg.dsa is None else
                                 f"has kv_lora_rank {mcfg.dsa.kv_lora_rank}") + ": use kv_cache_dtype='auto'")
        self.sparse = None
        if config.sparse is not None:
            _check_sparse_algorithm(config.sparse.algorithm, mcfg)
        if config.sparse is not None and mcfg.dsa is None:  # a budget or buffer beyond the context would only waste memory
            config.sparse = fit_sparse_to_context(config.sparse, max_model_len=self.max_model_len,
                                                  page_size=config.page_size)
        algorithm = None
        if config.sparse is not None:  # first, so the device pool is sized from what its metadata leaves free
            algorithm = _sparse_algorithm(config, mcfg, self.max_model_len)
        num_pages = self._num_kv_pages()
        self._check_pool(num_pages)
        # one page more than the allocator hands out: the scratch page padding rows of a decode step write
        # into (page id num_pages), never read
        try:
            self.cache = self._make_cache(num_pages)
        except RuntimeError as e:  # out of memory (torch.OutOfMemoryError is one) or a size past any memory
            raise ConfigError(
                f"cannot allocate the KV pool of {num_pages} pages ({num_pages * config.page_size} tokens) on "
                f"{config.device}: {str(e).splitlines()[0][:200]}; lower kv_cache_gb or num_kv_pages") from None
        if algorithm is not None:
            self.sparse = build_sparse(config.sparse, algorithm=algorithm, cache=self.cache, model_config=mcfg,
                                       max_model_len=self.max_model_len)
        self.allocator = PageAllocator(num_pages)
        self.prefix_cache = self.host_prefix_cache = None
        self._keep_alive_warned = False
        if config.prefix_cache and mcfg.dsa is None:
            self.prefix_cache = DevicePrefixCache(self.allocator, page_size=config.page_size)
            if self.sparse is not None and config.sparse.residency != "device":
                self.host_prefix_cache = HostPrefixCache(self.sparse.host_allocator, page_size=config.page_size)
        self.scheduler = Scheduler(allocator=self.allocator, page_size=config.page_size,
                                   max_num_seqs=config.max_num_seqs,
                                   max_num_batched_tokens=config.max_num_batched_tokens, sparse=self.sparse,
                                   prefix=self.prefix_cache, host_prefix=self.host_prefix_cache,
                                   keep_alive_s=config.keep_alive_s)
        self.runner = ModelRunner(self.loaded.model, self.cache, config.torch_device, sparse=self.sparse,
                                  max_num_seqs=config.max_num_seqs, cuda_graphs=config.cuda_graphs,
                                  max_model_len=self.max_model_len, scratch_page=num_pages,
                                  cpu_decode_kv_bytes=int(config.cpu_decode_kv_gb * 2**30))
        self.sampler = Sampler(config.torch_device, config.seed)
        self.l3_prefix = self._open_l3() if config.l3 is not None else None
        if self.l3_prefix is not None:  # a preempted request parks its KV in L3 and resumes from it
            self.scheduler.on_preempt = self.l3_prefix.park
        self.eos_token_ids = set(mcfg.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(self.tokenizer.eos_token_id)
        self._ids = itertools.count()
        self._seqs: dict[str, Sequence] = {}
        self.num_steps = 0
        self.last_step_tokens = 0  # tokens the last step ran (prefill chunks + decodes)
        self.last_step_prefill_tokens = 0  # of which prompt (prefill) tokens
        # overlap mode (hisa.engine.overlap): a DSA model, or an algorithm that reads on the host, runs synchronously
        self.overlap = (config.overlap_on and mcfg.dsa is None
                        and (self.sparse is None or self.sparse.algorithm.graph_safe))
        self._readback = (TokenReadback(max_rows=config.max_num_seqs, device=config.torch_device)
                          if self.overlap else None)
        self._in_flight: InFlightStep | None = None  # the launched step whose tokens are not read back yet
        self.num_overlapped_steps = 0  # steps launched while the step before was in flight

    def _open_l3(self):
        """Prefix reuse through the L3 store `config.l3` (dense and sparse requests; hisa.engine.l3_prefix)."""
        from hisa.engine.l3_prefix import L3PrefixCache, kv_layout
        from hisa.kvcache.l3 import open_l3

        if not isinstance(self.cache, PagedKVCache):
            raise ConfigError(f"--l3 is not supported yet for {self.model_config.arch} models (MLA cache)")
        capacity = None if self.config.l3_gb is None else int(self.config.l3_gb * 2**30)
        prefix = L3PrefixCache(open_l3(self.config.l3, capacity_bytes=capacity), cache=self.cache,
                               layout=kv_layout(self.loaded, self.cache),
                               sync=not self.config.l3_async)
        if self.sparse is not None and self.config.sparse.residency != "device":
            prefix.host = self.sparse.manager.host  # host-backed requests load into it and write from it
        return prefix

    def _make_cache(self, num_pages: int):
        """The device KV pool of num_pages pages (the allocator's, and the scratch page after them)."""
        config, mcfg = self.config, self.model_config
        if mcfg.dsa is not None:  # DeepSeek-V3.2: latent rows + indexer keys (kvcache/mla_cache.py)
            return MLAKVCache(num_layers=mcfg.num_layers, num_pages=num_pages + 1, page_size=config.page_size,
                              latent_dim=mcfg.dsa.latent_dim, index_head_dim=mcfg.dsa.index_head_dim,
                              dtype=config.torch_dtype, device=config.torch_device,
                              kv_lora_rank=mcfg.dsa.kv_lora_rank, latent_format=config.kv_cache_dtype)
        return PagedKVCache(num_layers=mcfg.num_layers, num_pages=num_pages + 1, page_size=config.page_size,
                            num_kv_heads=mcfg.num_kv_heads, head_dim=mcfg.head_dim,
                            dtype=config.torch_dtype, device=config.torch_device)

    def _check_pool(self, num_pages: int) -> None:
        """The device pool must hold one dense request just too short to go sparse, and with the sparse
        cache one host-backed request's buffer (or, when sparse requests stay resident, a whole one)."""
        cfg, s = self.config, self.config.page_size
        sp = cfg.sparse
        need, what = -(-self.max_model_len // s), f"one request of {self.max_model_len} tokens"
        if sp is not None and sp.residency != "device":
            dense_len = min(self.max_model_len, sp.min_prompt_len)
            need, what = -(-dense_len // s), f"one request of {dense_len} tokens"
            buffer = host_backed_buffer_pages(sp, self.model_config, s, self.max_model_len)
            if buffer > need:
                need, what = buffer, f"one host-backed request's buffer ({buffer} pages)"
        if num_pages < need:
            raise ConfigError(
                f"the KV pool of {num_pages} pages ({num_pages * s} tokens) cannot hold {what}; "
                f"{_device_memory_note(cfg.torch_device)}raise kv_cache_gb/num_kv_pages or gpu_memory_utilization, "
                f"or lower max_model_len (or the sparse token budget)")

    def _num_kv_pages(self) -> int:
        cfg, mcfg = self.config, self.model_config
        if mcfg.dsa is not None:
            page_bytes = MLAKVCache.page_bytes(num_layers=mcfg.num_layers, page_size=cfg.page_size,
                                               latent_dim=mcfg.dsa.latent_dim, index_head_dim=mcfg.dsa.index_head_dim,
                                               dtype=cfg.torch_dtype, kv_lora_rank=mcfg.dsa.kv_lora_rank,
                                               latent_format=cfg.kv_cache_dtype)
        else:
            page_bytes = PagedKVCache.page_bytes(num_layers=mcfg.num_layers, page_size=cfg.page_size,
                                                 num_kv_heads=mcfg.num_kv_heads, head_dim=mcfg.head_dim,
                                                 dtype=cfg.torch_dtype)
        if cfg.num_kv_pages is not None:
            return cfg.num_kv_pages
        if cfg.kv_cache_gb is not None:
            budget = cfg.kv_cache_gb * 2**30
        elif cfg.device == "cpu":
            budget = min(2 * 2**30, page_bytes * -(-self.max_model_len // cfg.page_size) * cfg.max_num_seqs)
        else:
            gc.collect()  # engines dropped without close() may still hold the device in reference cycles
            torch.cuda.empty_cache()
            free, _ = torch.cuda.mem_get_info(cfg.torch_device)
            reserve = 2 * 2**30  # activations and logits of a full batch
            budget = free * cfg.gpu_memory_utilization - reserve
        return max(1, int(budget // page_bytes))

    # -- requests ----------------------------------------------------------------------------
    def encode(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise InvalidRequestError("this model has no tokenizer (random weights, or a directory without tokenizer files): pass token ids, not text")
        return self.tokenizer.encode(prompt, add_special_tokens=True)

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Queue a request (text, or token ids) and return its id. Raises InvalidRequestError on bad input."""
        self._check_open()
        params = params or SamplingParams()
        params.check_vocab(self.model_config.vocab_size)
        if params.keep_alive and self.prefix_cache is None and not self._keep_alive_warned:
            self._keep_alive_warned = True   # (once: an agent client may send it with every turn)
            log.warning("keep_alive has no effect without the prefix cache (off with --no-prefix-cache, and for "
                        "DeepSeek-V3.2 / GLM-5 models): a finished request's pages are not kept for its next turn")
        if params.stop and self.tokenizer is None:  # no text is made, so a stop string could never match
            raise InvalidRequestError("stop strings need a tokenizer, and this model has none (random weights, or a "
                                      "directory without tokenizer files): use stop_token_ids")
        if isinstance(prompt, str):
            text, ids = prompt, self.encode(prompt)
        else:
            text, ids = None, _token_ids(prompt)
            if any(t < 0 or t >= self.model_config.vocab_size for t in ids):
                raise InvalidRequestError(f"token ids must be in [0, {self.model_config.vocab_size})")
        if not ids:
            raise InvalidRequestError("the prompt is empty")
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {len(ids)} tokens but the model's context is {self.max_model_len} tokens; "
                "shorten the prompt")
        if len(ids) + params.max_tokens > self.max_model_len:
            raise InvalidRequestError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the context of "
                f"{self.max_model_len} tokens; lower max_tokens to at most {self.max_model_len - len(ids)}")
        rid = request_id
        while rid is None or (request_id is None and rid in self._seqs):  # an id a caller chose is skipped
            rid = f"req-{next(self._ids)}"
        if rid in self._seqs:
            raise InvalidRequestError(f"request id {rid!r} is already in use")
        seq = Sequence(request_id=rid, prompt_token_ids=ids, params=params, prompt=text)
        room = self._dense_room(seq)
        if room is not None and params.max_tokens > room:  # (only a device pool sized for sparse requests is smaller)
            why = "" if self.scheduler.sparse is None else (
                f", and a prompt this short is not sparse (the sparse cache takes prompts from "
                f"{self.config.sparse.min_prompt_len} tokens)")
            raise InvalidRequestError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) needs more KV than the device pool's "
                f"{self.allocator.num_pages * self.config.page_size} tokens{why}; lower max_tokens to at most {room}, "
                f"or raise kv_cache_gb")
        self._seqs[rid] = seq
        self.scheduler.add(seq)
        return rid

    def max_output_tokens(self, prompt_ids: list[int]) -> int:
        """The most tokens a request with this prompt may ask for: to the end of the context, and for a
        dense request (not sparse) no more than the device pool holds."""
        probe = Sequence(request_id="", prompt_token_ids=list(prompt_ids), params=SamplingParams())
        room = self._dense_room(probe)
        return max(0, min(self.max_model_len - len(prompt_ids), room if room is not None else self.max_model_len))

    def _dense_room(self, seq: Sequence) -> int | None:
        """For a request that would run dense (all of its KV in the device pool, to its last token): the most
        tokens it may generate before it outgrows the pool. None for a sparse one."""
        policy = self.scheduler.sparse
        if policy is not None and policy.wants(seq):
            return None
        return self.allocator.num_pages * self.config.page_size - seq.num_prompt + 1

    @torch.inference_mode()
    def score(self, token_ids: list[int], *, prefill_tokens: int | None = None) -> torch.Tensor:
        """Teacher-forced next-token logits of a document, through the engine's real paths.

        The first `prefill_tokens` tokens are prefilled (in chunks), the rest are fed one decode step
        at a time. Returns fp32 [len(token_ids) - prefill_tokens + 1, V] on the CPU: row j predicts
        token `prefill_tokens + j` (the last row predicts the token after the document). Runs alone:
        other requests must not be in flight.
        """
        if self.scheduler.has_unfinished():
            raise RuntimeError("score() runs alone; finish or abort other requests first")
        if self._in_flight is not None:  # a step of requests aborted since: nothing to output
            self._resolve_in_flight()
        n = len(token_ids)
        prefill_tokens = n if prefill_tokens is None else prefill_tokens
        if not 1 <= prefill_tokens <= n:
            raise InvalidRequestError(f"prefill_tokens must be in [1, {n}], got {prefill_tokens}")
        forced = list(token_ids[prefill_tokens:]) + [0]  # the last forced token is never computed
        params = SamplingParams(max_tokens=len(forced), ignore_eos=True)
        rid = self.add_request(list(token_ids[:prefill_tokens]), params)
        seq = self._seqs[rid]
        seq.forced_output = forced
        while self.has_unfinished_requests():
            for out in self.step():
                if out.error is not None:
                    raise out.error
        return torch.stack(seq.scored_logits)

    def abort_request(self, request_id: str) -> bool:
        """Stop a request and free its pages. Returns False if it was unknown or already finished."""
        seq = self.scheduler.abort(request_id)
        if seq is None:
            return False
        seq.drop_pending()  # its token in flight is dropped when the step is resolved
        self._forget(seq)
        return True

    def has_unfinished_requests(self) -> bool:
        """True while a request is waiting or running, or a step's tokens are not read back yet."""
        return self.scheduler.has_unfinished() or self._in_flight is not None

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_prefilling(self) -> int:
        return sum(1 for s in self.scheduler.running if s.in_prefill) + len(self.scheduler.waiting)

    def num_prompt_tokens(self, request_id: str) -> int:
        return self._seqs[request_id].num_prompt

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # -- one step ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule → run → postprocess. Returns an output for each request that got a new token, and
        a finished one (finish_reason "error") for each request the step failed.

        In overlap mode (`EngineConfig.overlap`, `hisa.engine.overlap`) a decode step's outputs come
        back from the next call (which launches the step after it first); a call that only resolves
        the step in flight, before a step that cannot overlap, launches nothing.

        Raises DeviceError when the step failed and the device no longer works."""
        self._check_open()
        outputs = self._step_overlap() if self.overlap else self._step_sync()
        if self.l3_prefix is not None:   # host pages whose L3 writes have read them (a finished answer's):
            self.l3_prefix.release_holds()   # freed now, not at the next step (an idle engine holds none)
        return outputs

    def _step_sync(self) -> list[RequestOutput]:
        if self.l3_prefix is not None:
            self.l3_prefix.load(self.scheduler)
        batch = self.scheduler.schedule()
        released = 0
        if self.l3_prefix is not None:
            released = self.l3_prefix.release_unadmitted(self.scheduler)
            self.l3_prefix.take_loaded_ahead(self.scheduler, batch)   # a back read met by this step's chunk
        if not batch.seqs:
            self.last_step_tokens = self.last_step_prefill_tokens = 0
            if self.l3_prefix is not None and self.l3_prefix.loading:
                self.l3_prefix.wait_for_lookups()  # nothing runs before a lookup is back: wait a little for one
            elif self.scheduler.has_unfinished() and not self.scheduler.running and not released:
                raise RuntimeError("scheduler made no progress with an empty running set (pool too small?)")
            return []
        if self.on_schedule is not None:
            self.on_schedule()
        prefill_tokens = sum(n for seq, n in zip(batch.seqs, batch.num_new_tokens) if not _is_decode(seq, n))
        timer = self.l3_prefix.prefill_timer(prefill_tokens) if self.l3_prefix is not None and prefill_tokens else None
        try:
            logits, rows = self.runner.run(batch)
            seqs = [batch.seqs[i] for i in rows]
            tokens = self.sampler.sample(logits, seqs) if seqs else []
        except Exception as e:  # noqa: BLE001 — not one request's fault: end the step's requests, go on
            if timer is not None:
                timer.stop(ok=False)
            return self._fail_step(batch, e)
        if timer is not None:
            timer.stop()
        self.last_step_tokens = batch.num_tokens
        self.last_step_prefill_tokens = prefill_tokens
        self.scheduler.complete_step(batch)
        if self.l3_prefix is not None:
            self.l3_prefix.store_prompts(batch.seqs)
        now = time.monotonic()
        outputs = []
        for row, (seq, token) in enumerate(zip(seqs, tokens)):
            if seq.forced_output is not None and not isinstance(token, Exception):
                seq.scored_logits.append(logits[row].cpu())
                token = seq.forced_output[seq.num_output]
            outputs.extend(self._postprocess(seq, token, now))
        self.scheduler.remove_finished()
        self.num_steps += 1
        return outputs

    def _postprocess(self, seq: Sequence, token: int | Exception, now: float) -> list[RequestOutput]:
        """Append a sampled token (or fail the request with the exception its row raised), check the
        stops, finish the request if one hit; its output."""
        try:
            if isinstance(token, Exception):
                raise token
            seq.token_ids.append(token)
            if seq.first_token_time is None:
                seq.first_token_time = now
            reason = self._check_stop(seq, token)
            if reason is not None:
                if self.l3_prefix is not None:  # the next turn starts with this prompt and answer
                    self.l3_prefix.store_finished(seq)
                self.scheduler.finish(seq, reason)
            outputs = [self._output(seq, now)]
            if reason is not None:
                self._forget(seq)
        except Exception as e:  # noqa: BLE001 — this request's fault alone: end it, keep the others
            outputs = [self._fail_request(seq, e, now)]
        return outputs

    # -- overlap mode (hisa.engine.overlap) -------------------------------------------------------
    def _step_overlap(self) -> list[RequestOutput]:
        """Launch the next decode step, then resolve the one in flight (its outputs are returned); or,
        when the next step cannot overlap, resolve the one in flight alone (the next call runs
        synchronously), or run synchronously when none is in flight."""
        prev = self._in_flight
        if not can_overlap(self.scheduler, l3=self.l3_prefix is not None):
            return self._resolve_in_flight() if prev is not None else self._step_sync()
        batch = self.scheduler.schedule()
        decodes_only = all(_is_decode(s, n) for s, n in zip(batch.seqs, batch.num_new_tokens))
        if batch.preempted or batch.demoted or not decodes_only:
            raise RuntimeError("an overlapped step may only decode (the eligibility check missed a case)")
        if not batch.seqs:  # every running request's token in flight is its last
            self.last_step_tokens = self.last_step_prefill_tokens = 0
            return self._resolve_in_flight() if prev is not None else []
        if self.on_schedule is not None:
            self.on_schedule()
        try:
            logits, rows = self.runner.run(batch, prev_tokens=prev.tokens if prev is not None else None,
                                           prev_rows=prev.rows if prev is not None else None)
            seqs = [batch.seqs[i] for i in rows]
            launched = self._readback.start(self.sampler.sample_on_device(logits, seqs), seqs)
        except Exception as e:  # noqa: BLE001 — as in the synchronous step: end the step's requests, go on
            outputs = self._resolve_in_flight() if prev is not None else []
            return outputs + self._fail_step(batch, e)
        self.last_step_tokens, self.last_step_prefill_tokens = batch.num_tokens, 0
        self.num_steps += 1
        self.num_overlapped_steps += prev is not None
        # while the device runs the step just launched: the step before's tokens (the one sync)
        outputs = self._resolve_in_flight() if prev is not None else []
        # a request that stopped there also ran in the step launched: that token is dropped (never
        # appended), its pages went with the request; the others count their token as computed
        # only now, so that every token before num_computed is known when full pages are registered
        live = [(seq, n) for seq, n in zip(batch.seqs, batch.num_new_tokens) if not seq.is_finished]
        self.scheduler.complete_step(ScheduledBatch([seq for seq, _ in live], [n for _, n in live]))
        if self.l3_prefix is not None:  # a prompt write dropped earlier (pending writes full) is tried again
            self.l3_prefix.store_prompts([seq for seq, _ in live])
        for seq in launched.seqs:
            if not seq.is_finished:
                seq.token_ids.append(PENDING_TOKEN)
                seq.pending = True
                seq.last_pending = seq.num_output >= seq.params.max_tokens or seq.num_tokens >= self.max_model_len
        self._in_flight = launched
        self.scheduler.remove_finished()
        return outputs

    def _resolve_in_flight(self) -> list[RequestOutput]:
        """Read back the step in flight's tokens (waiting for them) and post-process them: the
        PENDING_TOKEN of each request still running is replaced by its token, as the synchronous
        step appends it. Requests aborted meanwhile are skipped (their token is dropped)."""
        step, self._in_flight = self._in_flight, None
        tokens = step.read()
        now = time.monotonic()
        outputs = []
        for seq, token in zip(step.seqs, tokens):
            if not seq.pending or seq.is_finished:
                continue
            seq.drop_pending()
            outputs.extend(self._postprocess(seq, token, now))
        self.scheduler.remove_finished()
        return outputs

    # -- fault isolation -----------------------------------------------------------------------
    def _fail_request(self, seq: Sequence, error: Exception, now: float) -> RequestOutput:
        """End `seq` with finish_reason "error" (its pages freed) and return its final output."""
        if not isinstance(error, InvalidRequestError):
            log.error("request %s failed: %r", seq.request_id, error, exc_info=error)
        if not seq.is_finished:
            self.scheduler.finish(seq, "error")
        self._forget(seq)
        return RequestOutput(
            request_id=seq.request_id, prompt=seq.prompt, prompt_token_ids=seq.prompt_token_ids, text="",
            token_ids=list(seq.output_token_ids), finished=True, finish_reason="error",
            num_preemptions=seq.num_preemptions, arrival_time=seq.arrival_time,
            first_token_time=seq.first_token_time, finish_time=now, error=error)

    def _fail_step(self, batch, error: Exception) -> list[RequestOutput]:
        """The step itself failed: end each of its requests with a StepFailedError, then check the device."""
        log.error("engine step of %d request(s) failed; ending them and going on: %r", len(batch.seqs), error,
                  exc_info=error)
        if isinstance(error, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()
        failed = StepFailedError(f"the engine step running this request failed: {error!r}")
        failed.__cause__ = error
        now = time.monotonic()
        # a request demoted for this step whose KV never reached the host pool (the step failed first) has
        # nothing to decode from, in the step or not: it fails too (decoding on would read unwritten pages)
        stranded = [d.seq for d in batch.demoted if not d.applied and all(d.seq is not s for s in batch.seqs)]
        outputs = [self._fail_request(seq, failed, now) for seq in list(batch.seqs) + stranded if not seq.is_finished]
        self.scheduler.remove_finished()
        self.last_step_tokens = self.last_step_prefill_tokens = 0
        if not self.device_is_healthy():
            raise DeviceError(f"the device {self.config.device} stopped working after a failed step: {error!r}") \
                from error
        return outputs

    def device_is_healthy(self) -> bool:
        """False when the device no longer runs work (a sticky CUDA error). Always True on the CPU."""
        device = self.config.torch_device
        if device.type != "cuda":
            return True
        try:
            torch.cuda.synchronize(device)
            return int((torch.ones(1, device=device) + 1).item()) == 2
        except Exception:  # noqa: BLE001 — any failure here means the device is gone
            return False

    # -- freeing memory --------------------------------------------------------------------------
    def close(self) -> None:
        """Free the engine's memory now: the KV pool, CUDA graphs and their pools, the sparse cache's
        device and host tensors, and the weights if this engine loaded them. Requests in flight are
        aborted. Idempotent; the engine cannot be used afterwards (LLM.close() calls this)."""
        self._release(collect=True)

    def __del__(self):
        try:
            self._release(collect=False)
        except Exception:  # noqa: BLE001 — interpreter shutdown: torch may be half gone
            pass

    def _release(self, *, collect: bool) -> None:
        if self.__dict__.get("closed", True):  # closed already, or __init__ failed before setting it
            return
        self.closed = True
        scheduler = self.__dict__.get("scheduler")
        for seq in (list(scheduler.running) + list(scheduler.waiting)) if scheduler is not None else []:
            self.abort_request(seq.request_id)
        in_flight = self.__dict__.get("_in_flight")
        if in_flight is not None:  # its requests are aborted: wait for the device to finish it, drop its tokens
            self._in_flight = None
            in_flight.read()
        del scheduler  # it holds the KV cache: a live local would keep the pool through the collection below
        sparse = self.__dict__.get("sparse")
        if sparse is not None:
            sparse.drop_step_state()
        del sparse
        if self.__dict__.get("l3_prefix") is not None:
            self.l3_prefix.close()  # runs the writes still queued, then joins its I/O thread
        for name in ("runner", "cache", "sparse", "scheduler", "sampler", "l3_prefix"):
            self.__dict__[name] = None
        if self._owns_weights:
            self.__dict__["loaded"] = None
        self.__dict__.get("_seqs", {}).clear()
        on_cuda = self.config.torch_device.type == "cuda" and torch.cuda.is_available()
        if collect or on_cuda:  # captured CUDA graphs may hold their pools through reference cycles
            gc.collect()  # (inside a collection already under way, this returns at once)
        if on_cuda:
            torch.cuda.empty_cache()

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("this engine is closed (close() freed its memory); create a new one")

    def _check_stop(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        if (not p.ignore_eos and token in self.eos_token_ids) or token in p.stop_token_ids:
            return "stop"
        if p.stop and self.detokenizer is not None:
            text = self.detokenizer.peek(seq.detok, seq.output_token_ids)
            hits = [i for i in (text.find(s) for s in p.stop) if i >= 0]
            if hits:
                seq.stop_text_len = min(hits)
                return "stop"
        if seq.num_output >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _output(self, seq: Sequence, now: float) -> RequestOutput:
        if self.detokenizer is None:
            text = ""
        elif seq.is_finished:  # the whole output decoded once: exactly what the tokenizer makes of it
            text = self.detokenizer.decode(seq.output_token_ids)
            if seq.stop_text_len is not None:
                text = text[: seq.stop_text_len]
        else:  # an incomplete multi-byte character at the end waits for the next token
            text = self.detokenizer.update(seq.detok, seq.output_token_ids)
        return RequestOutput(
            request_id=seq.request_id, prompt=seq.prompt, prompt_token_ids=seq.prompt_token_ids,
            text=text, token_ids=list(seq.output_token_ids), finished=seq.is_finished,
            finish_reason=seq.finish_reason, num_preemptions=seq.num_preemptions,
            arrival_time=seq.arrival_time, first_token_time=seq.first_token_time,
            finish_time=now if seq.is_finished else None,
        )

    def _forget(self, seq: Sequence) -> None:
        self._seqs.pop(seq.request_id, None)
        self.sampler.forget(seq.request_id)
        runner = self.__dict__.get("runner")
        if runner is not None and runner.cpu_kv is not None:
            runner.cpu_kv.forget(seq.request_id)
        if self.__dict__.get("l3_prefix") is not None:
            self.l3_prefix.forget(seq.request_id)

    def kv_pages_free(self) -> int:
        return self.allocator.num_free


# -- the sparse cache's parts ----------------------------------------------------------------------
def _sparse_algorithm(config: EngineConfig, mcfg, max_model_len: int):
    """The selection algorithm, with its representations preallocated for every sparse slot."""
    from hisa.sparse.base import create_algorithm

    sp = config.sparse
    extra = {} if mcfg.dsa is None else dict(index_head_dim=mcfg.dsa.index_head_dim, index_topk=mcfg.dsa.index_topk,
                                             fp8_keys=config.kv_cache_dtype == "fp8")
    return create_algorithm(
        sp.algorithm, num_layers=mcfg.num_layers, num_heads=mcfg.num_heads, num_kv_heads=mcfg.num_kv_heads,
        head_dim=mcfg.head_dim, page_size=config.page_size, max_requests=sp.max_sparse_requests,
        max_pages=-(-max_model_len // config.page_size), scale=mcfg.attention_scale, device=config.torch_device,
        dtype=config.torch_dtype, **extra)


def _check_sparse_algorithm(algorithm: str, mcfg) -> None:
    """A DSA model selects with its own indexer (`dsa`); `dsa` needs a model that has one."""
    if mcfg.dsa is not None and algorithm != "dsa":
        raise ConfigError(f"{mcfg.arch} models select tokens with their own indexer: use --sparse dsa (hierarchical "
                          f"DSA: latent KV in the host pool), or no --sparse (DSA with everything on the device), "
                          f"not {algorithm!r}")
    if mcfg.dsa is None and algorithm == "dsa":
        from hisa.sparse.base import registered_algorithms

        others = ", ".join(a for a in registered_algorithms() if a != "dsa")
        raise ConfigError(f"--sparse dsa needs a model with DSA's indexer (DeepSeek-V3.2, GLM-5); {mcfg.arch} has "
                          f"none: choose one of {others}")


def dsa_selected_pages(mcfg, page_size: int, max_model_len: int) -> int:
    """Pages a DSA decode step can need from a host-backed request's buffer per layer: the distinct
    pages of index_topk tokens, the page being written (the tail page) excluded."""
    return max(1, min(mcfg.dsa.index_topk, -(-max_model_len // page_size) - 1))


def host_backed_buffer_pages(sp, mcfg, page_size: int, max_model_len: int) -> int:
    """Device pages a host-backed request holds: LRU slots (buffer_ratio x budget, at least a sliding
    window's pages, which the diff needs resident at once; never more than a whole context) + the
    tail page."""
    max_pages = -(-max_model_len // page_size)
    if mcfg.dsa is not None:  # DSA: buffer_ratio x the pages index_topk tokens can touch
        picks = dsa_selected_pages(mcfg, page_size, max_model_len)
        return min(max(picks, int(sp.buffer_ratio * picks)), max_pages) + 1
    widest = max((w for w in mcfg.layer_windows if w is not None), default=None)
    window_pages = None if widest is None else (widest - 1) // page_size + 2
    return max(min(sp.buffer_slots(page_size), max_pages), window_pages or 0) + 1


def build_sparse(sp, *, algorithm, cache: PagedKVCache | MLAKVCache, model_config, max_model_len: int):
    """Assemble the SparseCoordinator from its parts: the algorithm, the tiers' manager (over the
    engine's device pool and a host pool sized from `host_pool_gb` or the machine's RAM), the adaptor."""
    from hisa.kvcache.host_pool import default_host_pool_bytes
    from hisa.kvcache.manager import SparseKVCacheManager
    from hisa.sparse.adaptor import BackendAdaptor
    from hisa.sparse.coordinator import SparseCoordinator

    s, mc = cache.page_size, model_config
    if sp.dense_layers > mc.num_layers:
        raise ConfigError(f"dense_layers={sp.dense_layers} is more than the model's {mc.num_layers} layers")
    max_pages = -(-max_model_len // s)
    # a host page: one device page of every layer (GQA: K and V; DSA: the latent rows only)
    page_bytes = mc.num_layers * cache.layer_rows(0).shape[1] * cache.layer_rows(0).element_size()
    if sp.host_pool_gb is not None:
        host_pages = int(sp.host_pool_gb * 2**30 // page_bytes)
    else:  # the machine's RAM, but no more than every sparse slot at the longest context needs
        host_pages = min(default_host_pool_bytes() // page_bytes, sp.max_sparse_requests * (max_pages + 1))
    if sp.residency == "device":
        host_pages = max(host_pages, 1)
    elif host_pages < max_pages:
        where = ("--host-pool-gb" if sp.host_pool_gb is not None else
                 f"75% of the RAM available now ({default_host_pool_bytes() / 0.75 / 2**30:.1f} GiB)")
        raise ConfigError(f"the host pool ({host_pages * page_bytes / 2**30:.2f} GiB, from {where}) holds "
                          f"{host_pages * s} tokens, less than one request of max_model_len={max_model_len}; free "
                          f"memory, pass a larger --host-pool-gb, lower --max-model-len, or use --residency device")
    widest = max((w for w in mc.layer_windows if w is not None), default=None)
    if mc.dsa is not None:  # the indexer's picks (up to index_topk pages) + the tail page; no sinks or window
        adaptor = BackendAdaptor(page_size=s, sink_pages=0, recent_pages=1,
                                 budget_pages=dsa_selected_pages(mc, s, max_model_len) + 1)
    else:
        adaptor = BackendAdaptor(page_size=s, sink_pages=sp.sink_pages, recent_pages=sp.recent_pages,
                                 budget_pages=min(sp.budget_pages(s), max_pages), window=widest)  # no more than a context
    manager = SparseKVCacheManager(device_cache=cache,
                                   buffer_slots=host_backed_buffer_pages(sp, mc, s, max_model_len) - 1,
                                   max_requests=sp.max_sparse_requests, max_pages=max_pages, host_pages=host_pages,
                                   device=cache.device)
    return SparseCoordinator(sp, algorithm=algorithm, manager=manager, adaptor=adaptor, windows=mc.layer_windows,
                             scale=mc.attention_scale)


def _token_ids(prompt) -> list[int]:
    """A prompt given as token ids, as ints: integers of any kind (numpy's, a torch tensor's), not floats or bools."""
    ids = []
    for t in prompt:
        try:
            if isinstance(t, bool):
                raise TypeError
            ids.append(operator.index(t))
        except TypeError:
            raise InvalidRequestError(f"a prompt of token ids must hold integers, not {t!r}") from None
    return ids


def _is_decode(seq: Sequence, num_new: int) -> bool:
    """True when this scheduled piece is one decode token (not a prompt chunk or a recompute)."""
    return num_new == 1 and seq.num_output > 0 and seq.num_computed == seq.num_tokens - 1


def _device_memory_note(device: torch.device) -> str:
    """On CUDA, what holds the device's memory (for the pool-size error); empty on the CPU."""
    if device.type != "cuda":
        return ""
    free, total = torch.cuda.mem_get_info(device)
    reserved, allocated = torch.cuda.memory_reserved(device), torch.cuda.memory_allocated(device)
    others = max(0, total - free - reserved)
    gib = 2**30
    return (f"the GPU has {free / gib:.1f} GiB free of {total / gib:.1f} GiB: this process holds "
            f"{reserved / gib:.1f} GiB ({allocated / gib:.1f} GiB in live tensors: weights, and the KV pools "
            f"of LLM/LLMEngine objects not yet closed; call .close() or use `with LLM(...) as llm:`), other "
            f"processes and the CUDA context {others / gib:.1f} GiB; ")
