"""Synthetic data generator: validation, dedup, resuming, balanced draws; end to end against phi1.serve with the
server SIGKILLed and restarted and the tool SIGKILLed and rerun."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from phi1.quality.synthetic import DiversityLists, GeneratorConfig, SyntheticGenerator, draw

ROOT = Path(__file__).resolve().parents[1]
LISTS = DiversityLists.from_directory(str(ROOT / "configs" / "synthetic"))
TEXT_A = " ".join(f"word{i % 37} lists keep items in order and loops visit each one" for i in range(30))
TEXT_B = " ".join(f"term{i % 41} dictionaries map keys to values with fast lookups" for i in range(30))
VALID = 'def {name}(values: list) -> int:\n    """Count them.\n\n    >>> {name}([1, 2])\n    2\n    """\n    return len(values)\n'
FAILING = 'def {name}(values: list) -> int:\n    """Count them.\n\n    >>> {name}([1, 2])\n    3\n    """\n    return len(values)\n'
UNTESTED = 'def {name}(text: str) -> str:\n    """Reverse the text."""\n    return text[::-1]\n'


class ScriptedClient:
    """Answers chat requests from a script, in order (the tests run one request at a time)."""

    def __init__(self, answers: list[str]) -> None:
        self.answers = list(answers)
        self.calls = 0
        self.chat = SimpleNamespace(completions=SimpleNamespace(create=self._create))

    async def _create(self, model, messages, max_tokens, temperature, seed):
        self.calls += 1
        prompt = messages[0]["content"]
        name = prompt.split("named `")[1].split("`")[0] if "named `" in prompt else ""
        answer = self.answers.pop(0).replace("{name}", name)
        return SimpleNamespace(choices=[SimpleNamespace(message=SimpleNamespace(content=answer))])


def _run(client, output: Path, **overrides):
    from phi1.eval.sandbox import run_program

    config = GeneratorConfig(**{"textbooks": 3, "exercises": 3, "concurrency": 1, "max_attempts": 2, **overrides})
    generator = SyntheticGenerator(client, config, LISTS, str(output), sandbox=run_program)
    return asyncio.run(generator.run(progress=False))


def test_validation_dedup_and_sandboxed_tests(tmp_path) -> None:
    near_a = TEXT_A.replace("word5 ", "zebra ", 1)
    script = [TEXT_A, TEXT_A, near_a, TEXT_B,  # textbooks: ok; exact then near duplicate -> rejected; ok
              "```python\n" + VALID + "```", FAILING, "def broken(:\n    return 'this does not parse'", UNTESTED]  # exercises
    counts = _run(ScriptedClient(script), tmp_path / "out.jsonl")
    records = {r["id"]: r for r in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())}
    assert sorted(records) == [f"{k}-{i:06d}" for k in ("exercise", "textbook") for i in range(3)]
    assert records["textbook-000000"]["status"] == "ok"
    rejected = records["textbook-000001"]
    assert rejected["status"] == "rejected" and rejected["attempts"] == 2
    assert rejected["reject_reasons"][0].startswith("near duplicate of textbook-000000")
    assert records["exercise-000000"]["status"] == "ok" and records["exercise-000000"]["tests_passed"] is True
    failed = records["exercise-000001"]
    assert failed["status"] == "rejected" and failed["reject_reasons"][0].startswith("does not parse")
    assert records["exercise-000002"]["tests_passed"] is None and records["exercise-000002"]["status"] == "ok"
    assert counts.rejections["exact duplicate"] == 1 and counts.rejections["its tests failed"] == 1
    assert counts.rejections["does not parse"] == 1
    ok_name = records["exercise-000000"]["function_name"]
    assert f"def {ok_name}(" in records["exercise-000000"]["text"]


def test_resume_skips_finished_ids_and_cuts_a_torn_line(tmp_path) -> None:
    output = tmp_path / "out.jsonl"
    _run(ScriptedClient([TEXT_A, TEXT_B]), output, exercises=0, textbooks=2)
    with open(output, "a") as handle:
        handle.write('{"id": "textbook-000002", "status": "ok", "te')  # killed mid-write
    client = ScriptedClient([" ".join(f"alpha{i}" for i in range(80)), " ".join(f"beta{i}" for i in range(80))])
    _run(client, output, exercises=0, textbooks=4)
    ids = [json.loads(line)["id"] for line in output.read_text().splitlines()]
    assert client.calls == 2 and sorted(ids) == [f"textbook-{i:06d}" for i in range(4)]
    with pytest.raises(ValueError, match="manifest"):
        _run(ScriptedClient([]), output, exercises=0, textbooks=4, seed=1)


def test_draws_are_balanced_and_fixed_by_the_id() -> None:
    draws = [draw(LISTS, 0, "exercise", i) for i in range(2 * len(LISTS.topics))]
    assert set(Counter(d["topic"] for d in draws).values()) == {2}
    audiences = Counter(d["audience"] for d in draws[: 5 * len(LISTS.audiences)])
    assert set(audiences.values()) == {5}
    assert draw(LISTS, 0, "exercise", 7) == draws[7] and draw(LISTS, 1, "exercise", 7) != draws[7]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start_server(model_dir: Path, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "phi1.serve", "--model", str(model_dir), "--port", str(port)],
                               env=env, stdout=open(log, "a"), stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return process
        except OSError:
            time.sleep(0.3)
    process.kill()
    raise RuntimeError(f"phi1.serve did not start: {log.read_text()[-2000:]}")


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


@pytest.mark.slow
def test_against_phi1_serve_killed_and_restarted(tmp_path) -> None:
    import shutil

    from phi1.core.config import get_preset
    from phi1.core.model import PhiForCausalLM
    from phi1.core.pretrained import save_pretrained
    from phi1.data.tokenizer_training import main as train_tokenizer
    from phi1.quality.stdlib_functions import stdlib_functions

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f.source}) + "\n" for f in stdlib_functions(200, seed=4)))
    train_tokenizer(["--input", str(corpus), "--output-dir", str(tmp_path / "tok"), "--vocab-size", "512",
                     "--threads", "1"])
    # A random model with a 512-token context (the nano preset's 128 cannot hold a chat prompt).
    config = get_preset("phi-1-tiny", vocab_size=512, n_layer=2, d_model=128, n_head=2, d_mlp=512)
    model_dir = tmp_path / "model"
    save_pretrained(PhiForCausalLM(config, init_seed=0).state_dict(), config, model_dir)
    shutil.copyfile(tmp_path / "tok" / "tokenizer.model", model_dir / "tokenizer.model")

    n = 15
    port, output, log = _free_port(), tmp_path / "synthetic.jsonl", tmp_path / "serve.log"
    command = [sys.executable, str(ROOT / "tools" / "generate_synthetic.py"), "--output", str(output),
               "--textbooks", str(n), "--exercises", str(n), "--base-url", f"http://127.0.0.1:{port}/v1",
               "--max-tokens", "24", "--concurrency", "3", "--backoff", "0.2", "--max-backoff", "1",
               "--max-retries", "60", "--max-attempts", "2", "--no-progress", "--counts", str(tmp_path / "counts.json")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    server = _start_server(model_dir, port, log)
    tool = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "tool.log", "w"))
    try:
        while _lines(output) < 4 and tool.poll() is None:
            time.sleep(0.1)
        server.send_signal(signal.SIGKILL)  # the server dies mid-run; the tool retries with backoff
        server.wait()
        killed_at = _lines(output)
        time.sleep(2)
        server = _start_server(model_dir, port, log)
        while _lines(output) < killed_at + 6 and tool.poll() is None:
            time.sleep(0.1)
        assert tool.poll() is None, "the tool should have survived the server's death: " + \
            (tmp_path / "tool.log").read_text()[-2000:]
        tool.send_signal(signal.SIGKILL)  # now the tool dies mid-run too
        tool.wait()
        partial = _lines(output)
        assert 0 < partial < 2 * n, "the tool should have been stopped mid-run"
        resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
    finally:
        for process in (server, tool):
            if process.poll() is None:
                process.kill()
                process.wait()
    counts = json.loads((tmp_path / "counts.json").read_text())
    print(json.dumps(counts, indent=1))
    assert counts["records"] == 2 * n and counts["distinct_ids"] == 2 * n and counts["duplicated_ids"] == []
    assert counts["this_run"]["skipped_finished"] == partial  # resumed: finished ids were not redone
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert sorted(r["id"] for r in records) == sorted(f"{k}-{i:06d}" for k in ("textbook", "exercise") for i in range(n))
    for kind in ("textbook", "exercise"):
        audiences = Counter(r["audience"] for r in records if r["kind"] == kind)
        assert set(audiences) == set(LISTS.audiences) and max(audiences.values()) - min(audiences.values()) <= 1
        topics = Counter(r["topic"] for r in records if r["kind"] == kind)
        assert len(topics) == n and set(topics.values()) == {1}  # 15 ids, 20 topics: 15 different ones
    assert all(r["status"] in ("ok", "rejected") for r in records)
    assert all(r.get("reject_reasons") for r in records if r["status"] == "rejected")
