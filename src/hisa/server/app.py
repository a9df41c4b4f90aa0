"""The OpenAI-compatible FastAPI app: completions, chat completions (plain and SSE), models, health, metrics.

Example::

    engine = LLMEngine(EngineConfig(device="cpu"))
    app = create_app(engine, served_model_name="SmolLM2-135M-Instruct", api_key="sk-local")
    uvicorn.run(app, host="127.0.0.1", port=8000)

With `api_key`, every /v1 request must carry `Authorization: Bearer <key>` (401 otherwise);
/health and /metrics stay open for probes and scrapers.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.message
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from hisa.engine.outputs import RequestOutput
from hisa.errors import DeviceError, HisaError, StepFailedError
from hisa.server.async_engine import AsyncEngine, EngineDeadError, PromptInput, RequestFailedError, RequestStream
from hisa.server.metrics import CONTENT_TYPE, ServerMetrics
from hisa.server.protocol import (
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
    ChatCompletionResponse, CompletionChoice, CompletionRequest, CompletionResponse, DeltaMessage, ErrorInfo,
    ErrorResponse, ModelCard, ModelList, Usage, new_id,
)

log = logging.getLogger("hisa.server")

DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks whether its client is still there


class APIError(Exception):
    """An error with an HTTP status and OpenAI's error fields."""

    def __init__(self, status_code: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status_code, self.message, self.type, self.param, self.code = status_code, message, type, param, code


class ClientDisconnected(Exception):
    """The client went away before its non-streaming response was ready."""


def create_app(engine, *, served_model_name: str, api_key: str | None = None,
               on_engine_dead=None) -> FastAPI:
    """Build the app around `engine` (an LLMEngine, handed over to a background thread from here on).

    The engine thread starts now and stops at the app's shutdown (or `app.state.async_engine.shutdown()`).
    `app.state.metrics` is the app's ServerMetrics (its own prometheus CollectorRegistry).
    `api_key`: when set, /v1 requests without `Authorization: Bearer <api_key>` get 401.
    `on_engine_dead(error)`: called (on the engine thread) if the engine stops for good (a broken device).
    """
    metrics = ServerMetrics()
    async_engine = AsyncEngine(engine, observer=metrics, on_dead=on_engine_dead)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await asyncio.to_thread(async_engine.shutdown)

    app = FastAPI(title="hisa", summary="OpenAI-compatible server of the hisa inference engine",
                  lifespan=lifespan)
    app.state.async_engine = async_engine
    app.state.metrics = metrics
    app.state.served_model_name = served_model_name
    _add_error_handlers(app, metrics)
    if api_key:
        app.add_middleware(_APIKeyMiddleware, api_key=api_key, metrics=metrics)

    def check_model(name: str | None) -> str:
        if name is not None and name != served_model_name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{served_model_name}`",
                           param="model", code="model_not_found")
        return served_model_name

    @app.get("/health")
    async def health():
        if async_engine.is_healthy:
            return {"status": "ok"}
        return JSONResponse({"status": "unhealthy", "error": repr(async_engine.error)}, status_code=503)

    @app.get("/metrics")
    async def prometheus_metrics():
        metrics.refresh(async_engine.stats)
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=served_model_name, max_model_len=async_engine.max_model_len)])

    @app.post("/v1/completions", openapi_extra=_body_schema(CompletionRequest))
    async def completions(request: Request):
        req = await _request_body(request, CompletionRequest)
        model = check_model(req.model)
        if isinstance(req.prompt, str):
            prompt = PromptInput(text=req.prompt)
        else:
            prompt = PromptInput(token_ids=list(req.prompt))
        rid, created = new_id("cmpl"), int(time.time())
        stream = await async_engine.submit(prompt, request_id=rid, max_tokens=req.requested_max_tokens(),
                                           params_for=req.sampling_params)

        def chunk(text: str, finish_reason: str | None) -> CompletionResponse:
            return CompletionResponse(id=rid, created=created, model=model,
                                      choices=[CompletionChoice(text=text, finish_reason=finish_reason)])

        if req.stream:
            events = _stream_events(stream, stop=req.stop, include_usage=req.include_usage, metrics=metrics,
                                    content_chunk=chunk,
                                    usage_chunk=lambda u: CompletionResponse(id=rid, created=created, model=model,
                                                                             choices=[], usage=u))
            return _RequestStreamingResponse(events, stream)
        out = await _final_output(stream, request)
        return CompletionResponse(id=rid, created=created, model=model, usage=_usage(out),
                                  choices=[CompletionChoice(text=out.text, finish_reason=out.finish_reason)])

    @app.post("/v1/chat/completions", openapi_extra=_body_schema(ChatCompletionRequest))
    async def chat_completions(request: Request):
        req = await _request_body(request, ChatCompletionRequest)
        model = check_model(req.model)
        rid, created = new_id("chatcmpl"), int(time.time())
        stream = await async_engine.submit(PromptInput(messages=req.conversation()), request_id=rid,
                                           max_tokens=req.requested_max_tokens(), params_for=req.sampling_params)

        def chunk(text: str | None, finish_reason: str | None, role: str | None = None) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=rid, created=created, model=model, choices=[ChatChunkChoice(
                delta=DeltaMessage(role=role, content=text), finish_reason=finish_reason)])

        if req.stream:
            events = _stream_events(stream, stop=req.stop, include_usage=req.include_usage, metrics=metrics,
                                    first_chunk=chunk("", None, role="assistant"),
                                    content_chunk=lambda text, reason: chunk(text or None, reason),
                                    usage_chunk=lambda u: ChatCompletionChunk(id=rid, created=created, model=model,
                                                                              choices=[], usage=u))
            return _RequestStreamingResponse(events, stream)
        out = await _final_output(stream, request)
        return ChatCompletionResponse(id=rid, created=created, model=model, usage=_usage(out), choices=[
            ChatChoice(message=AssistantMessage(content=out.text), finish_reason=out.finish_reason)])

    return app


# -- request helpers ---------------------------------------------------------------------------
LARGE_BODY_BYTES = 256 * 1024  # bodies above this are parsed and validated on a worker thread


async def _request_body(request: Request, model: type[BaseModel]):
    """The request's JSON body as `model`, read as FastAPI reads a body parameter (the same errors), but a
    large body is parsed and validated off the event loop: a 1M-token prompt sent as token ids is ~9 MB
    of JSON, ~0.6 s of parsing that stalled every other stream when FastAPI did it on the loop."""
    body = await request.body()
    content_type = request.headers.get("content-type")
    if len(body) > LARGE_BODY_BYTES:
        return await asyncio.to_thread(_validated_body, body, content_type, model)
    return _validated_body(body, content_type, model)


def _validated_body(body: bytes, content_type: str | None, model: type[BaseModel]):
    """`body` validated as `model`, or RequestValidationError with FastAPI's own error items: JSON is
    decoded only under a JSON content type (FastAPI's strict default; other bodies fail validation)."""
    from pydantic import ValidationError

    value = None
    if body:
        value = body
        if content_type:
            message = email.message.Message()
            message["content-type"] = content_type
            subtype = message.get_content_subtype()
            if message.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json")):
                try:
                    value = json.loads(body)
                except json.JSONDecodeError as e:
                    raise RequestValidationError([{"type": "json_invalid", "loc": ("body", e.pos),
                                                   "msg": "JSON decode error", "input": {},
                                                   "ctx": {"error": e.msg}}], body=e.doc) from None
                except (ValueError, RecursionError) as e:   # not UTF-8, an integer of over 4,300 digits, deep nesting
                    why = ("the body is not UTF-8" if isinstance(e, UnicodeDecodeError) else
                           "arrays or objects nested too deep" if isinstance(e, RecursionError) else str(e).split(";")[0])
                    raise RequestValidationError([{"type": "json_invalid", "loc": ("body",), "msg": "JSON decode "
                                                   "error", "input": {}, "ctx": {"error": why}}]) from None
    if value is None:
        raise RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}])
    try:
        return model.model_validate(value)
    except ValidationError as e:
        raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in e.errors()]) from None


def _body_schema(model: type[BaseModel]) -> dict:
    """OpenAPI's description of a JSON body of `model` (the endpoints read their bodies themselves)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


def _usage(out: RequestOutput) -> Usage:
    return Usage.of(out.num_prompt_tokens, out.num_output_tokens)


async def _final_output(stream: RequestStream, request: Request) -> RequestOutput:
    """Wait for the finished output, aborting the request if the client disconnects meanwhile."""
    getter: asyncio.Future | None = None
    next_check = time.monotonic() + DISCONNECT_POLL_S
    try:
        while True:
            getter = getter or asyncio.ensure_future(stream.next_output())
            done, _ = await asyncio.wait({getter}, timeout=max(0.0, next_check - time.monotonic()))
            if getter in done:
                out = getter.result()
                getter = None
                if out.finished:
                    return out
            if time.monotonic() >= next_check:
                if await request.is_disconnected():
                    raise ClientDisconnected(stream.request_id)
                next_check = time.monotonic() + DISCONNECT_POLL_S
    finally:
        if getter is not None:
            getter.cancel()
        stream.abort()  # no-op when finished


class _TextDeltas:
    """Turns RequestOutput.text (all text so far) into the new piece to stream.

    While unfinished, a tail that could be the start of a stop string is held back: the engine cuts
    the final text where a stop string begins, and text already streamed cannot be taken back.
    """

    def __init__(self, stop: list[str]):
        self.stop = stop
        self.sent = 0

    def next(self, out: RequestOutput) -> str:
        text = out.text
        if not out.finished and self.stop:
            text = text[: len(text) - _partial_stop_len(text, self.stop)]
        delta = text[self.sent:]
        self.sent = max(self.sent, len(text))
        return delta


def _partial_stop_len(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


async def _stream_events(stream: RequestStream, *, stop: list[str], include_usage: bool,
                         metrics: ServerMetrics, content_chunk, usage_chunk,
                         first_chunk: BaseModel | None = None) -> AsyncIterator[str]:
    """SSE lines of one streamed request: content deltas, the finish chunk, usage, `[DONE]`.

    Ending early (client disconnect cancels this generator) aborts the request in the engine.
    """
    deltas = _TextDeltas(stop)
    try:
        if first_chunk is not None:
            yield _sse(first_chunk, include_usage)
        async for out in stream:
            text = deltas.next(out)
            if text or out.finished:
                yield _sse(content_chunk(text, out.finish_reason if out.finished else None), include_usage)
            if out.finished and include_usage:
                yield _sse(usage_chunk(_usage(out)), include_usage)
    except Exception as e:  # headers are sent: report in-band, OpenAI style
        status, body = _error_body(e)
        metrics.count_error(status)
        if status >= 500:
            log.error("request %s failed mid-stream: %r", stream.request_id, e)
        yield f"data: {json.dumps(body)}\n\n"
    finally:
        stream.abort()  # no-op when finished
    yield "data: [DONE]\n\n"


def _sse(chunk: BaseModel, include_usage: bool) -> str:
    data = chunk.model_dump()
    if not include_usage:
        data.pop("usage", None)
    for choice in data.get("choices", []):
        if "delta" in choice:  # OpenAI omits unset delta fields
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


class _RequestStreamingResponse(StreamingResponse):
    """An SSE response that aborts its request however it ends, even if the body never started
    (a client gone before the first byte cancels the response before the generator runs)."""

    def __init__(self, events: AsyncIterator[str], stream: RequestStream):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._request_stream = stream

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._request_stream.abort()  # no-op when finished


# -- errors ------------------------------------------------------------------------------------
def _error_body(e: BaseException) -> tuple[int, dict]:
    if isinstance(e, APIError):
        info = ErrorInfo(message=e.message, type=e.type, param=e.param, code=e.code)
        return e.status_code, ErrorResponse(error=info).model_dump()
    if isinstance(e, HisaError):
        return 400, ErrorResponse(error=ErrorInfo(message=str(e), type="invalid_request_error")).model_dump()
    if isinstance(e, EngineDeadError):
        return 500, ErrorResponse(error=ErrorInfo(message=str(e), type="server_error",
                                                  code="engine_dead")).model_dump()
    if isinstance(e, RequestFailedError):
        return 500, ErrorResponse(error=ErrorInfo(message=str(e), type="server_error",
                                                  code="request_failed")).model_dump()
    if isinstance(e, StepFailedError):
        return 500, ErrorResponse(error=ErrorInfo(message=str(e), type="server_error",
                                                  code="step_failed")).model_dump()
    if isinstance(e, DeviceError):
        return 500, ErrorResponse(error=ErrorInfo(message=str(e), type="server_error",
                                                  code="device_error")).model_dump()
    return 500, ErrorResponse(error=ErrorInfo(message=f"internal error: {e!r}", type="server_error")).model_dump()


class _APIKeyMiddleware:
    """Refuse /v1 requests without `Authorization: Bearer <api_key>` (401, OpenAI's error body).

    A plain ASGI middleware: it answers before the body is read, so a client without the key learns
    nothing else (not even whether its JSON was valid), and streamed responses pass through untouched.
    """

    def __init__(self, app, *, api_key: str, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics
        self._key = api_key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1") and not self._authorized(scope):
            self.metrics.count_error(401)
            body = ErrorResponse(error=ErrorInfo(
                message="Incorrect or missing API key: send the header 'Authorization: Bearer <key>' with the key "
                        "the server was started with (--api-key or HISA_API_KEY)",
                type="invalid_request_error", code="invalid_api_key")).model_dump()
            await JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope) -> bool:
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._key)
        return False


def _validation_error(e: RequestValidationError) -> APIError:
    err = e.errors()[0] if e.errors() else {"msg": "invalid request", "loc": ()}
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    if err.get("type") == "json_invalid":
        return APIError(400, f"malformed JSON body: {err.get('ctx', {}).get('error', err['msg'])}",
                        code="invalid_json")
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    if err.get("type") == "missing":
        msg = "this field is required"
    # a field of several types (prompt: text, token ids, ...) names the type it tried in its location
    # ("prompt.str"), and gives one error per type: the parameter is the field, the error that none fits
    tags = [i for i, p in enumerate(loc) if _is_type_tag(p)]
    if tags:
        loc = loc[:tags[0]]
        if sum(1 for other in e.errors() if [str(p) for p in other.get("loc", ()) if p != "body"][:len(loc)] == loc) > 1:
            msg = f"the value is none of the types this field takes ({msg.lower()}, ...)"
    param = ".".join(loc) or None
    return APIError(400, f"{param}: {msg}" if param else msg, param=param)


def _is_type_tag(part: str) -> bool:
    """Whether a pydantic error location part names a member of a union type, not a field or an index."""
    return part in ("str", "int", "float", "bool", "dict", "list", "none") or "[" in part


class _ErrorJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: an error message may quote the client's text, lone surrogates included."""

    def render(self, content) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode()


def _add_error_handlers(app: FastAPI, metrics: ServerMetrics) -> None:
    def respond(e: BaseException) -> JSONResponse:
        status, body = _error_body(e)
        metrics.count_error(status)
        return _ErrorJSONResponse(body, status_code=status)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return respond(e)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        return respond(_validation_error(e))

    @app.exception_handler(HisaError)
    async def hisa_error(request: Request, e: HisaError):
        return respond(e)

    @app.exception_handler(EngineDeadError)
    async def engine_dead(request: Request, e: EngineDeadError):
        return respond(e)

    @app.exception_handler(RequestFailedError)
    async def request_failed(request: Request, e: RequestFailedError):  # the engine thread logged it
        return respond(e)

    @app.exception_handler(StepFailedError)
    async def step_failed(request: Request, e: StepFailedError):  # the engine thread logged it
        return respond(e)

    @app.exception_handler(ClientDisconnected)
    async def client_gone(request: Request, e: ClientDisconnected):
        return Response(status_code=499)  # nobody reads it; nginx's "client closed request"

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return respond(APIError(e.status_code, str(e.detail), type=kind))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return respond(e)
