"""The HTTP layer: a Starlette ASGI app served by uvicorn; all generation runs on the batching engine's thread.

Endpoints: GET /v1/models, GET /health, POST /v1/completions, POST /v1/chat/completions (with "stream": true
answered as server-sent events, `data: {...}` per chunk and `data: [DONE]` at the end, as OpenAI does).

What holds the server up under load and against slow or hostile clients (all set by `ServerLimits`):
- uvicorn's listen backlog is 2048 (the stdlib server's was 5, and clients got connection resets).
- At most `max_concurrent_requests` generation requests are in flight; one more is answered at once with
  429 and a Retry-After header (the official `openai` client retries after it). Only requests that are read and
  valid count, so slow or broken clients never take the slots of good ones.
- A request's line and headers must arrive within `header_timeout_s` of the connection opening (or of the
  previous response on a kept-alive connection), whatever the client trickles: uvicorn itself has no such
  deadline (its keep-alive timer is reset by every byte), so `DeadlineH11Protocol` adds one. The client then
  gets 408 and the connection is closed. h11 answers 400 to a request head still incomplete past 16 KiB.
- The body must arrive within `body_timeout_s` (408 and close) and be at most `max_body_bytes` (413; the
  rest of a larger body is read and dropped first, up to a bound, so that the client sees the answer instead of
  a reset). The JSON may nest at most `max_json_depth` levels (400).
- A client that does not read its response for `write_timeout_s` is disconnected; a request whose generation
  takes longer than `request_timeout_s` gets 503.
- Disconnected clients cancel their requests in the engine.
- SIGINT / SIGTERM stop accepting, let running requests finish for up to `shutdown_timeout_s`, then exit 0.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
import threading
import time
from dataclasses import dataclass, replace

import anyio
import h11
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse as StarletteJSONResponse
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from phi1.serve.engine import BatchingEngine, Event, Submission
from phi1.serve.protocol import (
    MAX_JSON_DEPTH,
    ParsedRequest,
    RequestError,
    chunk_body,
    new_id,
    parse_json_body,
    response_body,
    usage,
    validate,
)

log = logging.getLogger(__name__)
LARGE_BODY_BYTES = 64 * 1024  # bodies above this are parsed and tokenized off the event loop


@dataclass
class ServerLimits:
    """Bounds on what clients can make the server hold (see the module docstring)."""

    max_concurrent_requests: int = 64
    """Generation requests in flight; more get 429 with Retry-After."""
    max_body_bytes: int = 4 * 2**20
    max_drain_bytes: int = 64 * 2**20
    """Of a too-large body, this much is read and dropped before the 413, so the client reads the answer."""
    max_json_depth: int = MAX_JSON_DEPTH
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    keep_alive_s: float = 5.0
    write_timeout_s: float = 60.0
    request_timeout_s: float = 600.0
    retry_after_s: int = 1
    backlog: int = 2048
    shutdown_timeout_s: float = 10.0

    def check(self) -> None:
        """Raise ValueError naming the first limit out of range."""
        for name in ("max_concurrent_requests", "max_body_bytes", "max_json_depth", "retry_after_s", "backlog"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("header_timeout_s", "body_timeout_s", "keep_alive_s", "write_timeout_s", "request_timeout_s",
                     "shutdown_timeout_s"):
            value = getattr(self, name)
            if not 0 < value < 1e6:  # also refuses NaN
                raise ValueError(f"--{name.removesuffix('_s').replace('_', '-')} must be between 0 and 1e6 "
                                 f"seconds, got {value}")


class CompletionService:
    """Tokenizes, checks the context, and submits to the engine."""

    def __init__(self, model, tokenizer, served_model: str, max_batch_size: int = 32, batch_window_ms: float = 5.0,
                 default_max_tokens: int = 256) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.served_model = served_model
        self.context = model.config.max_seq_len
        self.default_max_tokens = default_max_tokens
        self.engine = BatchingEngine(model, tokenizer.decode, max_batch_size, batch_window_ms,
                                     vocab_size=tokenizer.vocab_size)
        try:
            self.eos = tokenizer.eod
        except (ValueError, AttributeError):
            self.eos = None

    def prepare(self, body, kind: str) -> tuple[ParsedRequest, list[list[int]]]:
        """Validate and tokenize; returns (parsed request, prompt token lists). Raises RequestError.

        Without max_tokens the completion may use the context the prompt leaves, up to --default-max-tokens;
        a max_tokens that does not fit is a 400 naming it.
        """
        parsed = validate(body, kind, self.served_model)
        prompts = []
        for text in parsed.prompt_texts:
            ids = self.tokenizer.encode(text) if text else []
            prompts.append(ids or ([self.eos] if self.eos is not None else [0]))
        longest = max(len(p) for p in prompts)
        where = "messages" if kind == "chat" else "prompt"
        room = self.context - longest
        if room < 1:
            raise RequestError(
                f"This model's maximum context length is {self.context} tokens. However, the {where} has "
                f"{longest} tokens, which leaves no room for a completion. Please reduce the length of the {where}.",
                param=where, code="context_length_exceeded")
        max_tokens = parsed.max_tokens if parsed.max_tokens is not None else min(self.default_max_tokens, room)
        if max_tokens > room:
            raise RequestError(
                f"This model's maximum context length is {self.context} tokens. However, you requested "
                f"{longest + max_tokens} tokens ({longest} in the {where}, {max_tokens} for the completion). "
                f"Please reduce the length of the {where} or '{parsed.max_tokens_field}' (at most {room} here).",
                param=parsed.max_tokens_field, code="context_length_exceeded")
        parsed.params = replace(parsed.params, max_new_tokens=max_tokens, eos_token_id=self.eos)
        return parsed, prompts

    def submit(self, parsed: ParsedRequest, prompts: list[list[int]], on_event=None) -> Submission:
        expanded = [p for p in prompts for _ in range(parsed.n)]
        return self.engine.submit(expanded, parsed.params, on_event)


class DeadlineH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for a request's line and headers.

    The deadline runs from the connection's start, or from the end of the previous response on a kept-alive
    connection, and is not moved by the bytes that arrive, so a client that trickles its headers one byte at a
    time is closed as surely as one that sends nothing more. A client that sent part of a request gets a 408.
    """

    header_timeout_s = 10.0  # set on the subclass `protocol_class` makes

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._partial_request = False
        self._arm_header_deadline()

    def _arm_header_deadline(self) -> None:
        self._disarm_header_deadline()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_deadline_passed)

    def _disarm_header_deadline(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:
            self._partial_request = self._partial_request or bool(data)
        else:
            self._partial_request = False
            self._disarm_header_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._partial_request = False
            self._arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)

    def _header_deadline_passed(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self._partial_request:
            body = json.dumps(RequestError(
                f"the request's headers did not arrive within {self.header_timeout_s:g} s", status=408,
                code="request_timeout").body()).encode()
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                 b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        self.transport.close()


def protocol_class(header_timeout_s: float) -> type[DeadlineH11Protocol]:
    return type("DeadlineH11ProtocolWithTimeout", (DeadlineH11Protocol,), {"header_timeout_s": header_timeout_s})


class _SlowReader(Exception):
    """The client did not take the response's bytes within the write timeout."""


def _holds_slow_reader(error: BaseException) -> bool:
    if isinstance(error, _SlowReader):
        return True
    inner = getattr(error, "exceptions", None)  # an exception group (anyio's task groups make them)
    return isinstance(inner, (list, tuple)) and any(_holds_slow_reader(e) for e in inner)


class WriteTimeout:
    """ASGI middleware: a send that the client's reading does not let through within `timeout_s` ends the
    request (uvicorn then closes the connection), so a stalled reader cannot hold a stream forever."""

    def __init__(self, app, timeout_s: float) -> None:
        self.app, self.timeout_s = app, timeout_s

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def timed_send(message) -> None:
            try:
                await asyncio.wait_for(send(message), self.timeout_s)
            except asyncio.TimeoutError:
                raise _SlowReader() from None

        try:
            await self.app(scope, receive, timed_send)
        except Exception as error:
            if not _holds_slow_reader(error):
                raise
            log.warning("%s: the client did not read for %g s; connection dropped", scope.get("client"),
                        self.timeout_s)


class JSONResponse(StarletteJSONResponse):
    """JSON with non-ASCII escaped: a lone surrogate that a client sent (and an error message repeats) cannot
    make the response unencodable."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


class _Admission:
    """Counts generation requests in flight (the event loop is one thread: no lock needed)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.in_flight, self.peak, self.refused = limit, 0, 0, 0

    def try_enter(self) -> bool:
        if self.in_flight >= self.limit:
            self.refused += 1
            return False
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        return True

    def leave(self) -> None:
        self.in_flight -= 1


def _error_response(error: RequestError, close: bool = False, retry_after: int | None = None) -> JSONResponse:
    headers = {}
    if close:
        headers["connection"] = "close"
    if retry_after is not None:
        headers["retry-after"] = str(retry_after)
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


class _GuardedStream(StreamingResponse):
    """A streamed response that calls `on_close` when it ends, also when its generator never started."""

    def __init__(self, content, on_close, **kwargs) -> None:
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


class _ClientGone(Exception):
    pass


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def build_app(service: CompletionService, limits: ServerLimits | None = None):
    """The ASGI application of `service` (Starlette routes wrapped in the write-timeout middleware)."""
    limits = limits or ServerLimits()
    limits.check()
    admission = _Admission(limits.max_concurrent_requests)
    started = int(time.time())

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limits.max_drain_bytes:
            raise RequestError(f"the body must be at most {limits.max_body_bytes} bytes, got {declared}",
                               status=413, code="body_too_large")
        chunks: list[bytes] = []
        size = 0

        async def receive_all() -> None:
            nonlocal size
            async for chunk in request.stream():
                size += len(chunk)
                if size <= limits.max_body_bytes:
                    chunks.append(chunk)
                elif size > limits.max_drain_bytes:
                    return

        try:
            await asyncio.wait_for(receive_all(), limits.body_timeout_s)
        except asyncio.TimeoutError:
            raise RequestError(f"the request body did not arrive within {limits.body_timeout_s:g} s", status=408,
                               code="request_timeout") from None
        if size > limits.max_body_bytes:
            raise RequestError(f"the body must be at most {limits.max_body_bytes} bytes", status=413,
                               code="body_too_large")
        return b"".join(chunks)

    async def events(request: Request | None, queue: asyncio.Queue, choices: int):
        """Engine events until every choice finished. Raises RequestError on an engine error or a timeout,
        _ClientGone when `request`'s client disconnects (None: the caller watches for that itself)."""
        finished = 0
        deadline = time.monotonic() + limits.request_timeout_s
        gone = asyncio.ensure_future(_wait_disconnect(request)) if request is not None else None
        try:
            while finished < choices:
                getter = asyncio.ensure_future(queue.get())
                waiting = {getter} | ({gone} if gone is not None else set())
                done, _ = await asyncio.wait(waiting, timeout=max(0.0, deadline - time.monotonic()),
                                             return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    if gone is not None and gone in done:
                        raise _ClientGone()
                    raise RequestError(f"generation took longer than {limits.request_timeout_s:g} s", status=503,
                                       code="timeout")
                event: Event = getter.result()
                if event.kind == "error":
                    raise RequestError(event.text, status=500)
                if event.kind == "finish":
                    finished += 1
                yield event
        finally:
            if gone is not None:
                gone.cancel()

    async def answer(request: Request, kind: str) -> Response:
        try:
            raw = await read_body(request)
            if len(raw) > LARGE_BODY_BYTES:
                body = await anyio.to_thread.run_sync(parse_json_body, raw, limits.max_json_depth)
                parsed, prompts = await anyio.to_thread.run_sync(service.prepare, body, kind)
            else:
                parsed, prompts = service.prepare(parse_json_body(raw, limits.max_json_depth), kind)
        except RequestError as error:
            return _error_response(error, close=error.status in (408, 413))
        except ClientDisconnect:
            return Response(status_code=400)  # nobody reads it
        if not admission.try_enter():
            error = RequestError(
                f"the server is busy: {admission.limit} requests in flight (--max-concurrent-requests); retry "
                f"after {limits.retry_after_s} s", status=429, code="server_busy")
            return _error_response(error, retry_after=limits.retry_after_s)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        submission = service.submit(parsed, prompts, lambda event: loop.call_soon_threadsafe(queue.put_nowait, event))
        prompt_tokens = sum(len(p) for p in prompts) * parsed.n
        request_id = new_id(kind)
        if parsed.stream:
            finished = False

            def release() -> None:  # once, however the stream ends (done, client gone, never started)
                nonlocal finished
                if not finished:
                    finished = True
                    submission.cancel()
                    admission.leave()

            return _GuardedStream(stream(kind, request_id, parsed, submission, queue, prompt_tokens), release,
                                  media_type="text/event-stream", headers={"cache-control": "no-cache"})
        try:
            return await whole(request, kind, request_id, parsed, submission, queue, prompt_tokens)
        finally:
            submission.cancel()  # a no-op once finished; stops the work of a client that left
            admission.leave()

    async def whole(request, kind, request_id, parsed, submission, queue, prompt_tokens) -> Response:
        texts: dict[int, list[str]] = {}
        logprobs: dict[int, list] = {}
        choices: dict[int, dict] = {}
        try:
            async for event in events(request, queue, len(submission.prompts)):
                texts.setdefault(event.choice, []).append(event.text)
                logprobs.setdefault(event.choice, []).extend(event.logprobs)
                if event.kind == "finish":
                    choices[event.choice] = {"index": event.choice, "text": "".join(texts[event.choice]),
                                             "finish_reason": event.finish_reason, "tokens": event.completion_tokens,
                                             "logprobs": logprobs[event.choice]}
        except RequestError as error:
            return _error_response(error, retry_after=limits.retry_after_s if error.status == 503 else None)
        except _ClientGone:
            return Response(status_code=499)  # nobody reads it
        ordered = [choices[i] for i in sorted(choices)]
        completion_tokens = sum(c["tokens"] for c in ordered)
        return JSONResponse(response_body(kind, request_id, service.served_model, ordered, prompt_tokens,
                                          completion_tokens, with_logprobs=parsed.params.logprobs is not None))

    async def stream(kind, request_id, parsed, submission, queue, prompt_tokens):
        model = service.served_model
        want_logprobs = parsed.params.logprobs is not None

        def sse(body) -> bytes:
            return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n".encode()

        completion_tokens = 0
        try:
            if kind == "chat":
                for choice in range(len(submission.prompts)):
                    yield sse(chunk_body(kind, request_id, model, choice, "", None, role=True,
                                         logprobs=[] if want_logprobs else None))
            async for event in events(None, queue, len(submission.prompts)):
                logprobs = event.logprobs if want_logprobs else None
                if event.text or (logprobs and event.kind == "delta"):
                    yield sse(chunk_body(kind, request_id, model, event.choice, event.text, None, logprobs=logprobs))
                    logprobs = [] if want_logprobs else None
                if event.kind == "finish":
                    completion_tokens += event.completion_tokens
                    text = None if kind == "chat" else ""
                    yield sse(chunk_body(kind, request_id, model, event.choice, text, event.finish_reason,
                                         logprobs=logprobs))
            if parsed.include_usage:
                yield sse({"id": request_id, "object": "text_completion" if kind == "completion" else
                           "chat.completion.chunk", "created": int(time.time()), "model": model, "choices": [],
                           "usage": usage(prompt_tokens, completion_tokens)})
            yield sse("[DONE]")
        except RequestError as error:
            yield sse(error.body())  # the status line is gone; OpenAI's clients read an error object from the stream

    async def completions(request: Request) -> Response:
        return await answer(request, "completion")

    async def chat_completions(request: Request) -> Response:
        return await answer(request, "chat")

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{
            "id": service.served_model, "object": "model", "created": started, "owned_by": "phi1",
            "max_model_len": service.context}]})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "in_flight": admission.in_flight,
                             "max_concurrent_requests": admission.limit, "refused": admission.refused})

    async def http_error(request: Request, error: HTTPException) -> Response:
        if error.status_code == 404:
            message = f"no route {request.method} {request.url.path}; use /v1/completions, /v1/chat/completions, " \
                      "/v1/models or /health"
        else:
            message = f"{request.method} is not allowed on {request.url.path}"
        return _error_response(RequestError(message, status=error.status_code,
                                            code="not_found" if error.status_code == 404 else "method_not_allowed"))

    routes = [
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error})
    app.state.admission = admission
    return WriteTimeout(app, limits.write_timeout_s)


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (port 0: a free one), not listening yet: the CLI binds before it loads
    the model, so a port in use is reported at once, and clients are refused, not queued, until it listens.
    Raises ValueError naming --host/--port."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as error:
        raise ValueError(f"--host {host} --port {port}: cannot listen there ({error.strerror or error}); "
                         "choose another address or port") from None
    return sock


def uvicorn_server(app, limits: ServerLimits) -> uvicorn.Server:
    config = uvicorn.Config(
        app, http=protocol_class(limits.header_timeout_s), lifespan="off", backlog=limits.backlog,
        timeout_keep_alive=limits.keep_alive_s, timeout_graceful_shutdown=limits.shutdown_timeout_s,
        log_level="warning", access_log=False,
    )
    return uvicorn.Server(config)


class RunningServer:
    """A server on a background thread (tests and embedding). `stop()` shuts it down and stops the engine."""

    def __init__(self, service: CompletionService, sock: socket.socket, limits: ServerLimits) -> None:
        self.service, self.limits = service, limits
        sock.listen(limits.backlog)
        self.address = sock.getsockname()[:2]
        self.app = build_app(service, limits)
        self.server = uvicorn_server(self.app, limits)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, name="phi1-http",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self.server.started:
            raise RuntimeError("the HTTP server did not start within 60 s")

    @property
    def port(self) -> int:
        return self.address[1]

    @property
    def admission(self) -> _Admission:
        return self.app.app.state.admission

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=self.limits.shutdown_timeout_s + 30)
        self.service.engine.stop()


def start_server(service: CompletionService, host: str = "127.0.0.1", port: int = 0,
                 limits: ServerLimits | None = None) -> RunningServer:
    """Serve `service` on a background thread; `.port` is the port (0 picks a free one), `.stop()` ends it."""
    limits = limits or ServerLimits()
    limits.check()
    return RunningServer(service, bind_socket(host, port), limits)


def serve_forever(service: CompletionService, sock: socket.socket, limits: ServerLimits) -> str | None:
    """Serve on the calling (main) thread until SIGINT or SIGTERM; returns the signal's name, if one ended it.
    `sock` is bound (`bind_socket`) and listening.

    uvicorn shuts down gracefully on those signals and then raises them again; the handlers installed here take
    that second delivery, so the process exits with status 0 after a clean shutdown.
    """
    received: list[int] = []

    def note(signum, frame) -> None:
        received.append(signum)

    previous = {sig: signal.signal(sig, note) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        uvicorn_server(build_app(service, limits), limits).run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        service.engine.stop()
    return signal.Signals(received[0]).name if received else None
