"""The HTTP server: stdlib ThreadingHTTPServer, one thread per connection, all generation on the engine's thread.

Endpoints: GET /v1/models, GET /health, POST /v1/completions, POST /v1/chat/completions (with "stream": true
answered as server-sent events, `data: {...}` per chunk and `data: [DONE]` at the end, as OpenAI does).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from phi1.serve.engine import BatchingEngine, Event
from phi1.serve.protocol import RequestError, chunk_body, new_id, response_body, usage, validate

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 4 * 2**20
RESPONSE_TIMEOUT_S = 600


class CompletionService:
    """Tokenizes, checks the context, submits to the engine and collects the answer of one request."""

    def __init__(self, model, tokenizer, served_model: str, max_batch_size: int = 32, batch_window_ms: float = 5.0,
                 default_max_tokens: int = 256) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.served_model = served_model
        self.context = model.config.max_seq_len
        self.default_max_tokens = default_max_tokens
        self.engine = BatchingEngine(model, tokenizer.decode, max_batch_size, batch_window_ms, vocab_size=tokenizer.vocab_size)
        try:
            self.eos = tokenizer.eod
        except (ValueError, AttributeError):
            self.eos = None

    def prepare(self, body, kind: str):
        """Validate and tokenize; returns (parsed request, prompt token lists). Raises RequestError."""
        parsed = validate(body, kind, self.served_model)
        prompts = []
        for text in parsed.prompt_texts:
            ids = self.tokenizer.encode(text) if text else []
            prompts.append(ids or ([self.eos] if self.eos is not None else [0]))
        longest = max(len(p) for p in prompts)
        max_tokens = parsed.params.max_new_tokens
        if not parsed.max_tokens_given:
            # OpenAI's default is 16 for completions; chat answers until done, here up to the server default.
            max_tokens = 16 if kind == "completion" else min(self.default_max_tokens, self.context - longest)
        if longest + max(max_tokens, 1) > self.context:
            where = "messages" if kind == "chat" else "prompt"
            raise RequestError(
                f"This model's maximum context length is {self.context} tokens. However, you requested "
                f"{longest + max_tokens} tokens ({longest} in the {where}, {max_tokens} for the completion). "
                f"Please reduce the length of the {where} or the completion.",
                param=where if longest >= self.context else "max_tokens", code="context_length_exceeded",
            )
        parsed.params = replace(parsed.params, max_new_tokens=max_tokens, eos_token_id=self.eos)
        return parsed, prompts

    def submit(self, parsed, prompts):
        expanded = [p for p in prompts for _ in range(parsed.n)]
        return self.engine.submit(expanded, parsed.params)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "phi1-serve"

    @property
    def service(self) -> CompletionService:
        return self.server.service

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        log.info("%s %s", self.address_string(), format % args)

    def _send_json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, error: RequestError) -> None:
        self._send_json(error.status, error.body())

    def do_GET(self):  # noqa: N802 - http.server's naming
        if self.path.rstrip("/") == "/v1/models":
            self._send_json(200, {"object": "list", "data": [{
                "id": self.service.served_model, "object": "model", "created": self.server.started,
                "owned_by": "phi1", "max_model_len": self.service.context}]})
        elif self.path == "/health":
            self._send_json(200, {"status": "ok"})
        else:
            self._send_error(RequestError(f"no route GET {self.path}", status=404, code="not_found"))

    def do_POST(self):  # noqa: N802
        routes = {"/v1/completions": "completion", "/v1/chat/completions": "chat"}
        kind = routes.get(self.path.rstrip("/"))
        try:
            length = self.headers.get("Content-Length")
            if length is None:
                raise RequestError("a Content-Length header is required", status=411)
            if not length.isdigit() or int(length) > MAX_BODY_BYTES:
                raise RequestError(f"the body must be at most {MAX_BODY_BYTES} bytes", status=413)
            raw = self.rfile.read(int(length))
            if kind is None:
                raise RequestError(f"no route POST {self.path}; use /v1/completions or /v1/chat/completions",
                                   status=404, code="not_found")
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise RequestError(f"the body is not valid JSON: {e}") from None
            parsed, prompts = self.service.prepare(body, kind)
        except RequestError as error:
            self._send_error(error)
            return
        submission = self.service.submit(parsed, prompts)
        prompt_tokens = sum(len(p) for p in prompts) * parsed.n
        request_id = new_id(kind)
        if parsed.stream:
            self._stream(kind, request_id, parsed, submission, prompt_tokens)
        else:
            self._answer(kind, request_id, submission, prompt_tokens)

    def _events(self, submission, choices: int):
        """Engine events until every choice finished; raises RequestError (500) on an engine error."""
        finished = 0
        deadline = time.monotonic() + RESPONSE_TIMEOUT_S
        while finished < choices:
            try:
                event: Event = submission.events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise RequestError("generation timed out", status=500) from None
            if event.kind == "error":
                raise RequestError(event.text, status=500)
            if event.kind == "finish":
                finished += 1
            yield event

    def _answer(self, kind, request_id, submission, prompt_tokens) -> None:
        texts: dict[int, list[str]] = {}
        choices: dict[int, dict] = {}
        try:
            for event in self._events(submission, len(submission.prompts)):
                texts.setdefault(event.choice, []).append(event.text)
                if event.kind == "finish":
                    choices[event.choice] = {"index": event.choice, "text": "".join(texts[event.choice]),
                                             "finish_reason": event.finish_reason, "tokens": event.completion_tokens}
        except RequestError as error:
            self._send_error(error)
            return
        ordered = [choices[i] for i in sorted(choices)]
        completion_tokens = sum(c["tokens"] for c in ordered)
        self._send_json(200, response_body(kind, request_id, self.service.served_model, ordered, prompt_tokens,
                                           completion_tokens))

    def _stream(self, kind, request_id, parsed, submission, prompt_tokens) -> None:
        model = self.service.served_model
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the stream's end is the connection's end
        self.end_headers()
        self.close_connection = True

        def send(body) -> None:
            payload = body if isinstance(body, str) else json.dumps(body)
            self.wfile.write(f"data: {payload}\n\n".encode())
            self.wfile.flush()

        completion_tokens = 0
        try:
            if kind == "chat":
                for choice in range(len(submission.prompts)):
                    send(chunk_body(kind, request_id, model, choice, "", None, role=True))
            for event in self._events(submission, len(submission.prompts)):
                if event.text:
                    send(chunk_body(kind, request_id, model, event.choice, event.text, None))
                if event.kind == "finish":
                    completion_tokens += event.completion_tokens
                    text = None if kind == "chat" else ""
                    send(chunk_body(kind, request_id, model, event.choice, text, event.finish_reason))
            if parsed.include_usage:
                send({"id": request_id, "object": "text_completion" if kind == "completion" else
                      "chat.completion.chunk", "created": int(time.time()), "model": model, "choices": [],
                      "usage": usage(prompt_tokens, completion_tokens)})
        except RequestError as error:
            send(error.body())  # the status line is gone; OpenAI's clients read an error object from the stream
        except (BrokenPipeError, ConnectionResetError):
            return  # the client left; the engine finishes the batch and the events are dropped
        send("[DONE]")


class CompletionHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, service: CompletionService) -> None:
        super().__init__(address, Handler)
        self.service = service
        self.started = int(time.time())


def start_server(service: CompletionService, host: str = "127.0.0.1", port: int = 0):
    """Serve in a background thread; returns (server, thread). `server.server_address[1]` is the port
    (port 0 picks a free one). Stop with `server.shutdown(); service.engine.stop()`."""
    server = CompletionHTTPServer((host, port), service)
    thread = threading.Thread(target=server.serve_forever, name="phi1-http", daemon=True)
    thread.start()
    return server, thread
