"""The engine loop in a background thread, bridged to asyncio.

One thread owns the `LLMEngine` (and its tokenizer): it takes commands from a thread-safe queue
(add a request, abort a request, stop), calls `engine.step()` while there is work and blocks on the
queue while there is none. Requests that arrive while others run join the next step (continuous
batching). Outputs go back to each request's own `asyncio.Queue` through
`loop.call_soon_threadsafe`, so handlers never block the event loop and never touch the engine.

The thread publishes an immutable `EngineStats` snapshot (running, waiting, KV pages, the sparse
cache's stats if the engine has any) that `/metrics` and `/health` read: once a step is scheduled
(before the model runs, so the gauges are fresh during a long step) and after every loop turn.

Faults stay with the requests they belong to. A request the engine fails (finish_reason "error":
its sampling row, its stop check, or the step that ran it) gets its error (HTTP 400 when its input
was the cause, 500 otherwise) and the others go on. If `step()` itself raises, every request in
flight is failed with `StepFailedError` (HTTP 500), their pages are freed, and the loop goes on.
Only a `DeviceError` (the device no longer works) or a failure to clean up stops the thread: it
fails every pending request with `EngineDeadError` (HTTP 500), `AsyncEngine.is_healthy` turns
False, new requests fail at once instead of hanging, and `on_dead` is called (`hisa serve` exits).

Example::

    async_engine = AsyncEngine(LLMEngine(EngineConfig(device="cpu")))
    stream = await async_engine.submit(PromptInput(text="Hi"), request_id="r1", max_tokens=8,
                                       params_for=lambda n: SamplingParams(max_tokens=n))
    async for out in stream:          # RequestOutput, text so far; the last one has finished=True
        print(out.text)
    async_engine.shutdown()
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from hisa.chat_template import apply_chat_template
from hisa.engine.outputs import RequestOutput
from hisa.engine.sampling_params import SamplingParams
from hisa.errors import DeviceError, HisaError, InvalidRequestError, StepFailedError

log = logging.getLogger("hisa.server")


class EngineDeadError(RuntimeError):
    """The engine thread has stopped (crash or shutdown); the request cannot be served."""


class RequestFailedError(RuntimeError):
    """The engine failed this request alone, not because of its input (HTTP 500); the others go on."""


@dataclass(frozen=True)
class EngineStats:
    """What the engine thread last saw, for /metrics and /health (read without touching the engine)."""

    num_running: int = 0
    num_waiting: int = 0
    kv_pages_used: int = 0
    kv_pages_total: int = 0
    sparse: Mapping[str, float] | None = None  # engine.sparse_stats, when the engine has a sparse cache
    l3: Mapping[str, float] | None = None  # engine.l3_prefix.metrics(), when --l3 is on
    prefix: Mapping[str, float] | None = None  # engine.prefix_cache.metrics(), when --prefix-cache is on
    host_prefix: Mapping[str, float] | None = None  # engine.host_prefix_cache.metrics(): host-backed requests


@dataclass(frozen=True)
class PromptInput:
    """One prompt: text, token ids, or a chat conversation (templated on the engine thread)."""

    text: str | None = None
    token_ids: list[int] | None = None
    messages: list[dict[str, str]] | None = None


class RequestObserver:
    """Callbacks the engine thread makes as a request progresses (the metrics hook up here).

    Every method runs on the engine thread and must be cheap and thread-safe.
    """

    def on_first_token(self, *, num_prompt_tokens: int, ttft_s: float) -> None: ...

    def on_token(self, *, inter_token_s: float | None) -> None: ...

    def on_finish(self, *, finish_reason: str, e2e_s: float) -> None: ...


class RequestStream:
    """The async side of one request: iterate it for `RequestOutput`s until one is finished.

    Leaving the iteration early (client gone, task cancelled) aborts the request in the engine.
    `num_prompt_tokens` is set once the engine has accepted the request.
    """

    def __init__(self, request_id: str, *, engine: "AsyncEngine", loop: asyncio.AbstractEventLoop):
        self.request_id = request_id
        self.arrival = time.monotonic()
        self.num_prompt_tokens = 0
        self.finished = False
        self._engine = engine
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self._last_token_time: float | None = None  # engine-thread bookkeeping (inter-token latency)

    async def next_output(self) -> RequestOutput:
        """The next output; raises the request's error (InvalidRequestError, EngineDeadError, ...)."""
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
        return item

    def __aiter__(self):
        return self._iterate()

    async def _iterate(self):
        try:
            while not self.finished:
                yield await self.next_output()
        finally:
            self.abort()

    def abort(self) -> None:
        """Stop the request in the engine and free its pages (no-op once it has finished)."""
        if not self.finished:
            self.finished = True
            self._engine._commands.put(("abort", self.request_id))


class AsyncEngine:
    """Owns an `LLMEngine` on a background thread; `submit()` from any coroutine.

    `observer` (a RequestObserver, e.g. the Prometheus metrics) is told about first tokens, tokens
    and finishes; it runs on the engine thread. `on_dead(error)` is called on the engine thread if
    it stops for any reason but `shutdown()` (a broken device).
    """

    def __init__(self, engine, *, observer: RequestObserver | None = None,
                 on_dead: Callable[[BaseException], None] | None = None):
        self._engine = engine  # touched only by the engine thread from here on
        self._on_dead = on_dead
        self.max_model_len: int = engine.max_model_len
        self._max_prompt_chars = _max_prompt_chars(engine.tokenizer, engine.max_model_len)
        self._observer = observer or RequestObserver()
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, RequestStream] = {}  # accepted, unfinished (engine thread only)
        self._outbox: list[tuple[RequestStream, Any]] = []  # (stream, item) to hand over (engine thread only)
        self.stats = EngineStats()
        self._publish_stats()  # the thread has not started: reading the engine here is safe
        self.error: BaseException | None = None
        # Held while a request is queued and while the dying thread fails what is queued, so that no
        # request can slip into the queue after the last drain and wait forever.
        self._lock = threading.Lock()
        self._dead = False
        self._thread = threading.Thread(target=self._run, name="hisa-engine", daemon=True)
        self._thread.start()

    # -- event-loop side ---------------------------------------------------------------------
    @property
    def is_healthy(self) -> bool:
        return not self._dead and self._thread.is_alive()

    async def submit(self, prompt: PromptInput, *, request_id: str, max_tokens: int | None,
                     params_for: Callable[[int], SamplingParams]) -> RequestStream:
        """Queue a request and wait until the engine has accepted it.

        `max_tokens` None means "up to the end of the context"; `params_for(max_tokens)` builds the
        SamplingParams once the prompt length is known. Raises InvalidRequestError (bad prompt or
        params: HTTP 400) or EngineDeadError (HTTP 500) before any output is produced.
        """
        chars = len(prompt.text or "") + sum(len(m.get("content") or "") for m in prompt.messages or [])
        if chars > self._max_prompt_chars:  # refused before the engine thread spends time tokenizing it
            raise InvalidRequestError(
                f"the prompt has {chars} characters, more than a context of {self.max_model_len} tokens can hold; "
                "shorten the prompt")
        stream = RequestStream(request_id, engine=self, loop=asyncio.get_running_loop())
        with self._lock:
            if self._dead:
                raise EngineDeadError(f"the engine has stopped: {self.error!r}")
            self._commands.put(("add", stream, prompt, max_tokens, params_for))
        try:
            ack = await stream._queue.get()
        except BaseException:
            stream.abort()
            raise
        if isinstance(ack, BaseException):
            stream.finished = True
            raise ack
        stream.num_prompt_tokens = ack
        return stream

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine thread (pending requests fail with EngineDeadError) and free the engine's memory."""
        self._commands.put(("stop",))
        self._thread.join(timeout)

    # -- engine thread -----------------------------------------------------------------------
    def _run(self) -> None:
        engine = self._engine
        engine.on_schedule = self._publish_stats  # gauges fresh while the step's model runs
        stopping = False
        try:
            while True:
                running = self._drain(block=not engine.has_unfinished_requests())
                self._flush()  # acks and errors of new requests go out before the step
                if not running:
                    self.error = EngineDeadError("the server is shutting down")
                    stopping = True
                    break
                if engine.has_unfinished_requests():
                    for out in self._step():
                        self._deliver(out)
                self._publish_stats()  # before the outputs go out: a client that sees its end sees its pages freed
                self._flush()
        except BaseException as e:  # a broken device, or a failure to clean up: fail everything pending, loudly
            log.critical("engine thread stopped; failing %d pending request(s): %r", len(self._streams), e,
                         exc_info=not isinstance(e, DeviceError))
            self.error = e
        finally:
            with self._lock:
                self._dead = True
                dead = EngineDeadError(f"the engine has stopped: {self.error!r}")
                for stream in self._streams.values():
                    self._send(stream, dead)
                self._streams.clear()
                while True:
                    try:
                        cmd = self._commands.get_nowait()
                    except queue.Empty:
                        break
                    if cmd[0] == "add":
                        self._send(cmd[1], dead)
                self._flush()
            self._publish_stats_safely()
            close = getattr(engine, "close", None)
            if close is not None:
                try:
                    close()  # free the KV pool, graphs and sparse cache now, not when the process exits
                except Exception:  # noqa: BLE001 — a broken device may refuse; nothing is left to serve
                    log.exception("closing the engine failed")
            if not stopping and self._on_dead is not None:
                self._on_dead(self.error)

    def _step(self) -> list[RequestOutput]:
        """engine.step(); if it raises (not a DeviceError), fail every request in flight and go on."""
        try:
            return self._engine.step()
        except DeviceError:
            raise
        except Exception as e:  # noqa: BLE001 — no single request to blame: end them all, keep serving
            log.exception("engine step failed; failing the %d request(s) in flight", len(self._streams))
            failed = StepFailedError(f"the engine step running this request failed: {e!r}")
            for request_id, stream in list(self._streams.items()):
                self._engine.abort_request(request_id)  # frees its pages; if this raises, the thread stops
                self._streams.pop(request_id)
                self._observer.on_finish(finish_reason="error", e2e_s=time.monotonic() - stream.arrival)
                self._send(stream, failed)
            if not self._engine.device_is_healthy():
                raise DeviceError(f"the device stopped working after a failed step: {e!r}") from e
            return []

    def _drain(self, *, block: bool) -> bool:
        """Run queued commands (waiting for one if `block`). Returns False on "stop"."""
        while True:
            try:
                cmd = self._commands.get(block=block)
            except queue.Empty:
                return True
            block = False
            if cmd[0] == "stop":
                return False
            if cmd[0] == "add":
                self._add(*cmd[1:])
            elif cmd[0] == "abort":
                self._abort(cmd[1])

    def _add(self, stream: RequestStream, prompt: PromptInput, max_tokens: int | None,
             params_for: Callable[[int], SamplingParams]) -> None:
        try:
            ids = self._prompt_ids(prompt)
            if max_tokens is None:   # to the end of the context (or of the device pool, for a dense request)
                max_tokens = max(1, self._engine.max_output_tokens(ids))
            self._engine.add_request(ids, params_for(max_tokens), request_id=stream.request_id)
        except HisaError as e:
            self._send(stream, e)
            return
        except Exception as e:  # not the user's fault: a 500 for this request, the server goes on
            log.exception("add_request failed for %s", stream.request_id)
            self._send(stream, e)
            return
        self._streams[stream.request_id] = stream
        self._send(stream, len(ids))

    def _prompt_ids(self, prompt: PromptInput) -> list[int]:
        engine = self._engine
        if prompt.token_ids is not None:
            return list(prompt.token_ids)
        if prompt.text is not None:
            return engine.encode(prompt.text)
        return apply_chat_template(engine.tokenizer, prompt.messages)

    def _abort(self, request_id: str) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is None:
            return  # finished before the abort arrived
        self._engine.abort_request(request_id)
        self._observer.on_finish(finish_reason="abort", e2e_s=time.monotonic() - stream.arrival)

    def _deliver(self, out: RequestOutput) -> None:
        stream = self._streams.get(out.request_id)
        if stream is None:
            return
        now = time.monotonic()
        if out.error is not None:  # the engine failed this request alone (its pages are freed): no new token
            del self._streams[out.request_id]
            self._observer.on_finish(finish_reason="error", e2e_s=now - stream.arrival)
            error = out.error
            if not isinstance(error, (HisaError, StepFailedError)):  # already logged with its traceback
                error = RequestFailedError(f"the engine failed this request: {error!r}")
            self._send(stream, error)
            return
        if stream._last_token_time is None:
            self._observer.on_first_token(num_prompt_tokens=out.num_prompt_tokens, ttft_s=now - stream.arrival)
            self._observer.on_token(inter_token_s=None)
        else:
            self._observer.on_token(inter_token_s=now - stream._last_token_time)
        stream._last_token_time = now
        self._send(stream, out)
        if out.finished:
            del self._streams[out.request_id]
            self._observer.on_finish(finish_reason=out.finish_reason or "stop", e2e_s=now - stream.arrival)

    def _send(self, stream: RequestStream, item: Any) -> None:
        self._outbox.append((stream, item))

    def _flush(self) -> None:
        """Hand the outbox to the event loop(s): one wake-up per loop per engine step, not per request."""
        if not self._outbox:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Any]]] = {}
        for stream, item in self._outbox:
            by_loop.setdefault(stream._loop, []).append((stream._queue, item))
        self._outbox = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:
                pass  # that event loop has closed (server shutting down): nobody is left to receive these

    def _publish_stats_safely(self) -> None:
        try:
            self._publish_stats()
        except Exception:  # noqa: BLE001 — the engine is dying; the last snapshot stays
            pass

    def _publish_stats(self) -> None:
        engine = self._engine
        self.stats = EngineStats(num_running=engine.num_running, num_waiting=engine.num_waiting,
                                 kv_pages_used=engine.allocator.num_used,
                                 kv_pages_total=engine.allocator.num_pages,
                                 sparse=read_sparse_stats(engine),
                                 l3=engine.l3_prefix.metrics() if getattr(engine, "l3_prefix", None) else None,
                                 prefix=engine.prefix_cache.metrics() if getattr(engine, "prefix_cache", None)
                                 else None,
                                 host_prefix=engine.host_prefix_cache.metrics()
                                 if getattr(engine, "host_prefix_cache", None) else None)


def _max_prompt_chars(tokenizer, max_model_len: int) -> int:
    """Characters beyond which a text prompt is certainly longer than the context: every token covers
    at most as many characters as the vocabulary's longest token string (byte-level tokens spell one
    byte per character, so this holds for any UTF-8 text)."""
    if tokenizer is None or not hasattr(tokenizer, "get_vocab"):
        return 2**62
    longest = max((len(t) for t in tokenizer.get_vocab()), default=1)
    return (max_model_len + 1) * max(longest, 1)


def _put_all(items: list[tuple[asyncio.Queue, Any]]) -> None:
    for q, item in items:
        q.put_nowait(item)


def read_sparse_stats(engine) -> Mapping[str, float] | None:
    """The sparse cache's figures, if the engine has any (the hook behind the `hisa_sparse_*` gauges).

    Reads `engine.sparse_stats` (a mapping, a dataclass, or a zero-argument method returning either)
    or, without it, `engine.sparse.summary()` (the SparseCoordinator's totals, what `--stats` prints).
    Numeric scalar fields are kept (lists and strings are dropped). None when the cache is off.
    """
    stats = getattr(engine, "sparse_stats", None)
    if callable(stats):
        stats = stats()
    if stats is None:
        sparse = getattr(engine, "sparse", None)
        if sparse is None or not hasattr(sparse, "summary"):
            return None
        # without waiting on the device: this runs at every step, while the step runs (the device
        # counters then lag a step or so)
        takes_blocking = "blocking" in inspect.signature(sparse.summary).parameters
        stats = sparse.summary(blocking=False) if takes_blocking else sparse.summary()
    if dataclasses.is_dataclass(stats):
        stats = dataclasses.asdict(stats)
    return {k: float(v) for k, v in dict(stats).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}
