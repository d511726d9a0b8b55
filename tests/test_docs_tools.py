"""The data-quality tools behave as documented for users: `tools/generate_synthetic.py --max-tokens` defaults to what
fits the teacher's context when the endpoint states it, an explicit value that cannot fit and a request the
server refuses each end in one line (exit 2), and every quality tool reports a user error the same way."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from phi1.testing.endpoints import send_json
from phi1.testing.hostile import assert_clear_error, python, run_bounded

REPO = Path(__file__).resolve().parents[1]
PROMPT_TOKENS = 60  # what the fake server pretends every prompt costs
TEXTBOOK = ("Lists hold values in order.\n\n```python\nvalues = [3, 1, 2]\nvalues.sort()\nprint(values)\n```\n\n"
            "Sorting in place changes the list itself; `sorted(values)` returns a new one and leaves it alone.\n")


class FakeEndpoint(ThreadingHTTPServer):
    """An OpenAI-compatible endpoint on 127.0.0.1 with a small context that refuses what does not fit (as
    phi1-serve and vLLM do: 400, code context_length_exceeded). `context` None: /v1/models states no context."""

    def __init__(self, context: int | None, serving_context: int = 256) -> None:
        self.context, self.serving_context, self.requested = context, serving_context, []
        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class Handler(BaseHTTPRequestHandler):
    server: FakeEndpoint

    def log_message(self, *args) -> None:
        pass

    def reply(self, status: int, body: dict) -> None:
        send_json(self, status, body)

    def do_GET(self) -> None:
        entry = {"id": "tiny", "object": "model", "created": 0, "owned_by": "test"}
        if self.server.context is not None:
            entry["max_model_len"] = self.server.context
        self.reply(200, {"object": "list", "data": [entry]})

    def do_POST(self) -> None:
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        max_tokens = request.get("max_tokens")
        self.server.requested.append(max_tokens)
        if max_tokens is not None and max_tokens + PROMPT_TOKENS > self.server.serving_context:
            self.reply(400, {"error": {
                "message": f"This model's maximum context length is {self.server.serving_context} tokens. However, "
                           f"you requested {max_tokens + PROMPT_TOKENS} tokens.",
                "type": "invalid_request_error", "param": "max_tokens", "code": "context_length_exceeded"}})
            return
        self.reply(200, {"id": "c", "object": "chat.completion", "created": 0, "model": "tiny", "choices": [{
            "index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": TEXTBOOK}}],
            "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": 40, "total_tokens": PROMPT_TOKENS + 40}})


@pytest.fixture
def endpoint(request):
    server = FakeEndpoint(*request.param)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def generate(endpoint_url: str, output: Path, *extra: str):
    return run_bounded(python("tools/generate_synthetic.py", "--output", str(output), "--textbooks", "1",
                              "--exercises", "0", "--base-url", endpoint_url, "--no-progress", "--max-retries", "0",
                              *extra), timeout_s=120)


def test_choose_max_tokens_fits_the_context() -> None:
    import phi1.quality.endpoint_models as tool

    assert tool.choose_max_tokens(None, None, "u") == 512           # nothing stated: the usual default
    assert tool.choose_max_tokens(None, 2048, "u") == 512           # a large context: the usual default
    assert tool.choose_max_tokens(None, 256, "u") == 128            # the quickstart model: room for the prompt kept
    assert tool.choose_max_tokens(100, 256, "u") == 100
    for requested, context in ((384, 256), (0, None), (None, 100)):
        with pytest.raises(ValueError):
            tool.choose_max_tokens(requested, context, "u")


@pytest.mark.parametrize("endpoint", [(256,)], indirect=True)
def test_default_max_tokens_fits_a_small_teacher(endpoint, tmp_path) -> None:
    output = tmp_path / "synthetic.jsonl"
    outcome = generate(endpoint.url, output)
    assert outcome.returncode == 0, outcome.describe()
    assert endpoint.requested == [128]
    record = json.loads(output.read_text().splitlines()[0])
    assert record["status"] == "ok" and record["text"] == TEXTBOOK.strip()


@pytest.mark.parametrize("endpoint, extra, names", [
    ((256,), ("--max-tokens", "384"), "--max-tokens 384"),         # stated context, explicit value too large
    ((None,), (), "--max-tokens"),                                 # no context stated: the server's 400 explained
    ((None,), ("--max-tokens", "0"), "--max-tokens 0"),
], indirect=["endpoint"], ids=["explicit-too-large", "server-refuses-default", "zero"])
def test_max_tokens_that_cannot_fit_is_one_line(endpoint, tmp_path, extra, names) -> None:
    outcome = generate(endpoint.url, tmp_path / "synthetic.jsonl", *extra)
    assert_clear_error(outcome, names)
    assert len(outcome.stderr.strip().splitlines()[-1]) > 20


def test_unreachable_endpoint_is_one_line(tmp_path) -> None:
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert_clear_error(generate(f"http://127.0.0.1:{port}/v1", tmp_path / "s.jsonl"), "--base-url")


@pytest.mark.parametrize("argv, names", [
    (["tools/decontaminate.py", "--input", "{tmp}/in.jsonl", "--output", "{tmp}/o.jsonl", "--report", "{tmp}/r.jsonl",
      "--no-humaneval"], "--no-humaneval"),
    (["tools/quality_filter.py", "train", "--embedding-model", "{tmp}", "--labelled", "{tmp}/empty.jsonl",
      "--output", "{tmp}/classifier"], "empty.jsonl"),
    (["tools/build_exercises.py", "--output", "{tmp}/x.jsonl", "--root", "{tmp}/missing"], "--root"),
    (["tools/build_exercises.py", "--output", "{tmp}/x.jsonl", "--exclude-corpus", "{tmp}/in.jsonl"], "in.jsonl:1"),
    (["tools/scaling_sweep.py", "--procs", "2,4", "--out", "{tmp}/sweep"], "--procs"),
    (["tools/scaling_sweep.py", "--procs", "1,x", "--out", "{tmp}/sweep"], "--procs"),
    (["tools/scaling_sweep.py", "--warmup", "9", "--steps", "3", "--out", "{tmp}/sweep"], "--warmup"),
    (["tools/generate_synthetic.py", "--output", "{tmp}/s.jsonl"], "--base-url"),
], ids=["decontaminate-nothing", "quality-filter-empty", "exercises-root", "exercises-corpus", "sweep-procs",
        "sweep-procs-text", "sweep-warmup", "synthetic-no-url"])
def test_quality_tools_report_user_errors_in_one_line(tmp_path, argv, names) -> None:
    (tmp_path / "in.jsonl").write_text('{"text": "def f():\\n    return 1\\n"}\n')
    (tmp_path / "empty.jsonl").write_text("")
    argv = [part.replace("{tmp}", str(tmp_path)) for part in argv]
    outcome = run_bounded(python(*argv), timeout_s=120, env={"OPENAI_BASE_URL": ""})
    assert_clear_error(outcome, names)
