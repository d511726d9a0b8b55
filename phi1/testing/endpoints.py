"""A scripted OpenAI-compatible chat endpoint for tests of the data tools that call a teacher model."""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def send_json(handler: BaseHTTPRequestHandler, status: int, body: dict) -> None:
    """Answer `handler`'s request with `body` as JSON (what every fake OpenAI endpoint of the tests replies)."""
    data = json.dumps(body).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


class ScriptedEndpoint:
    """An OpenAI-compatible chat endpoint on 127.0.0.1 answering from a script keyed by a FILE-n marker in the
    prompt (the marker's answers are given in order; the last repeats). `fail_first` markers get one 503 first.
    Every request is logged as (marker, prompt)."""

    def __init__(self, script: dict[str, list[str]], default: str = "5", delay_s: float = 0.0,
                 fail_first: set[str] | None = None) -> None:
        self.script = {k: list(v) for k, v in script.items()}
        self.default = default
        self.delay_s = delay_s
        self.fail_first = set(fail_first or ())
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                return

            def _send(self, status: int, body: dict) -> None:
                send_json(self, status, body)

            def do_GET(self) -> None:
                self._send(200, {"object": "list", "data": [{"id": "scripted", "object": "model", "owned_by": "t"}]})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][0]["content"]
                marker = (re.findall(r"FILE-\d+", prompt) or ["?"])[0]
                with endpoint.lock:
                    if marker in endpoint.fail_first:
                        endpoint.fail_first.discard(marker)
                        self._send(503, {"error": {"message": "overloaded"}})
                        return
                    endpoint.requests.append((marker, prompt))
                    answers = endpoint.script.get(marker, [endpoint.default])
                    answer = answers.pop(0) if len(answers) > 1 else answers[0]
                time.sleep(endpoint.delay_s)
                self._send(200, {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": answer}}]})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> ScriptedEndpoint:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
