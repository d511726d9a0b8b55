"""phi1-serve under load and against slow clients, as a user runs it: the real command in a subprocess on
127.0.0.1, a tiny random model, and raw sockets as clients (so a reset or a dropped connection is seen as one).

Bounded: 256 clients, 200 half-open connections, timeouts of 2 s; each test finishes in well under a minute.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from phi1.testing.serving import health, request_json
from phi1.testing.toy_model import build_toy_model_dir

ROOT = Path(__file__).resolve().parents[1]
NAME = "toy"
MAX_CONCURRENT = 32
HEADER_TIMEOUT_S = 2.0
BODY_TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_toy_model_dir(tmp_path_factory.mktemp("model") / NAME, "phi-1-nano", max_seq_len=128)


class Server:
    """`python -m phi1.serve` on a free port of 127.0.0.1; the port is read from its start-up line."""

    def __init__(self, model_dir: Path, log: Path, *extra: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        self.log = log
        self.process = subprocess.Popen(
            [sys.executable, "-m", "phi1.serve", "--model", str(model_dir), "--port", "0", "--max-batch-size", "16",
             "--batch-window-ms", "20", "--max-concurrent-requests", str(MAX_CONCURRENT),
             "--header-timeout", str(HEADER_TIMEOUT_S), "--body-timeout", str(BODY_TIMEOUT_S),
             "--keep-alive-timeout", "2", *extra],
            env=env, stdout=subprocess.DEVNULL, stderr=open(log, "w"))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and self.process.poll() is None:
            found = re.search(r"on http://127\.0\.0\.1:(\d+)/v1", log.read_text())
            if found:
                self.port = int(found.group(1))
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"phi1.serve did not start:\n{log.read_text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    running = Server(model_dir, tmp_path_factory.mktemp("log") / "serve.log")
    yield running
    running.stop()


def request_bytes(body: dict | bytes, path: str = "/v1/completions", close: bool = True) -> bytes:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n" + ("Connection: close\r\n" if close else "") + "\r\n")
    return head.encode() + data


def parse_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, body


def ask(port: int, body: dict, timeout: float = 60) -> tuple[int, dict]:
    return request_json(port, "POST", "/v1/completions", body, timeout)


@pytest.mark.slow
def test_256_concurrent_clients_are_all_answered(server):
    clients = 256
    body = {"model": NAME, "prompt": "def add(a, b):\n", "max_tokens": 8, "temperature": 0}

    async def one(start: asyncio.Event) -> tuple[str, int | None, str | None]:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            await start.wait()
            writer.write(request_bytes(body))
            await writer.drain()
            raw = await asyncio.wait_for(reader.read(), timeout=50)
            writer.close()
        except (ConnectionError, OSError) as error:
            return "reset", None, type(error).__name__
        if not raw:
            return "closed without an answer", None, None
        status, headers, _ = parse_response(raw)
        return "answered", status, headers.get("retry-after")

    async def all_at_once():
        start = asyncio.Event()
        tasks = [asyncio.ensure_future(one(start)) for _ in range(clients)]
        await asyncio.sleep(1.0)  # every client connected (the listen backlog holds the rest) before any sends
        start.set()
        return await asyncio.gather(*tasks)

    began = time.monotonic()
    results = asyncio.run(all_at_once())
    elapsed = time.monotonic() - began
    outcomes = [r[0] for r in results]
    statuses = [r[1] for r in results]
    counts = {"200": statuses.count(200), "429": statuses.count(429), "resets": outcomes.count("reset"),
              "unanswered": outcomes.count("closed without an answer"),
              "other": sum(s not in (200, 429) for s in statuses if s is not None), "seconds": round(elapsed, 1)}
    print(f"256 concurrent clients: {counts}")
    assert counts["resets"] == 0 and counts["unanswered"] == 0 and counts["other"] == 0, counts
    assert counts["200"] + counts["429"] == clients
    assert counts["200"] >= MAX_CONCURRENT  # at least one full set of slots served
    assert all(r[2] == "1" for r in results if r[1] == 429), "every 429 carries Retry-After"
    assert elapsed < 60
    # And the server still answers normally afterwards.
    assert ask(server.port, body)[0] == 200


@pytest.mark.slow
def test_half_open_connections_are_closed_while_others_are_served(server):
    partial_headers = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le"
    partial_body = request_bytes(b'{"model": "toy", "prompt": "x"' + b" " * 100)[:-60]  # headers whole, body cut

    async def run():
        async def half_open(payload: bytes, trickle: bool) -> tuple[float, bytes]:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            opened = time.monotonic()
            if trickle:  # one byte every 0.3 s: the header deadline must not move with them
                async def drip():
                    for byte in payload:
                        writer.write(bytes([byte]))
                        await asyncio.sleep(0.3)
                dripping = asyncio.ensure_future(drip())
            else:
                writer.write(payload)
            try:
                answer = await asyncio.wait_for(reader.read(), timeout=HEADER_TIMEOUT_S + BODY_TIMEOUT_S + 10)
            except (ConnectionError, OSError):
                answer = b"<reset>"
            closed = time.monotonic() - opened
            if trickle:
                dripping.cancel()
            writer.close()
            return closed, answer

        jobs = [half_open(partial_headers, False) for _ in range(95)]
        jobs += [half_open(partial_headers, True) for _ in range(5)]
        jobs += [half_open(partial_body, False) for _ in range(100)]
        waiting = asyncio.ensure_future(asyncio.gather(*jobs))
        await asyncio.sleep(0.3)
        # Meanwhile, normal requests are answered, and quickly.
        served = []
        for _ in range(5):
            began = time.monotonic()
            status, _ = await asyncio.to_thread(ask, server.port, {"model": NAME, "prompt": "x", "max_tokens": 4})
            served.append((status, time.monotonic() - began))
        return await waiting, served

    closed, served = asyncio.run(run())
    times = [t for t, _ in closed]
    print(f"200 half-open connections closed after {min(times):.2f}-{max(times):.2f} s "
          f"(header and body timeouts {HEADER_TIMEOUT_S} s); normal requests meanwhile: {served}")
    assert all(status == 200 for status, _ in served) and all(seconds < HEADER_TIMEOUT_S for _, seconds in served)
    assert all(t < max(HEADER_TIMEOUT_S, BODY_TIMEOUT_S) + 1.5 for t in times), times
    assert all(answer.startswith(b"HTTP/1.1 408") for _, answer in closed), {a[:40] for _, a in closed}
    body = json.loads(closed[-1][1].partition(b"\r\n\r\n")[2])
    assert "did not arrive within" in body["error"]["message"]


def test_a_10_MB_body_gets_413_not_a_reset(server):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    data = b'{"model": "toy", "prompt": "' + b"x" * (10 * 2**20) + b'"}'
    connection.request("POST", "/v1/completions", body=data, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    body = json.loads(response.read())
    connection.close()
    assert response.status == 413 and "at most 4194304 bytes" in body["error"]["message"]


def test_an_idle_connection_gets_no_answer_and_is_closed(server):
    async def run() -> tuple[float, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        began = time.monotonic()
        answer = await asyncio.wait_for(reader.read(), timeout=HEADER_TIMEOUT_S + 10)
        writer.close()
        return time.monotonic() - began, answer

    seconds, answer = asyncio.run(run())
    assert answer == b"" and seconds < HEADER_TIMEOUT_S + 1.5


@pytest.mark.slow
def test_sigterm_lets_the_running_request_finish_then_exits_0(model_dir, tmp_path):
    running = Server(model_dir, tmp_path / "serve.log")
    result: dict = {}

    def long_request() -> None:
        result["answer"] = ask(running.port, {"model": NAME, "prompt": "def f(", "max_tokens": 100,
                                              "temperature": 0})

    thread = threading.Thread(target=long_request)
    thread.start()
    time.sleep(0.5)
    began = time.monotonic()
    status = running.stop(signal.SIGTERM)
    thread.join(30)
    assert status == 0 and time.monotonic() - began < 20
    assert result["answer"][0] == 200 and result["answer"][1]["choices"][0]["finish_reason"] in ("length", "stop")
    log = (tmp_path / "serve.log").read_text()
    assert "stopped by SIGTERM" in log and "Traceback" not in log


@pytest.mark.slow
def test_the_openai_client_retries_429_until_all_are_served(server):
    openai = pytest.importorskip("openai")
    clients = 3 * MAX_CONCURRENT

    async def run():
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=30,
                                    timeout=60)
        async with client:
            return await asyncio.gather(*(client.completions.create(model=NAME, prompt=f"def f{i}(", max_tokens=4,
                                                                    temperature=0) for i in range(clients)))

    refused_before = health(server.port)["refused"]
    began = time.monotonic()
    answers = asyncio.run(run())
    refused = health(server.port)["refused"] - refused_before
    print(f"{clients} openai clients, {MAX_CONCURRENT} slots: all served in {time.monotonic() - began:.1f} s "
          f"after {refused} answers 429")
    assert len(answers) == clients and all(a.choices[0].finish_reason in ("length", "stop") for a in answers)
    assert refused > 0  # the client did meet the limit, and its retries got through
