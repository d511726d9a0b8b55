"""LLM annotation (`quality_filter.py annotate`): scores parsed from many answer styles, bad answers re-asked and
counted, endpoint failures retried, resume after SIGKILL loses and repeats nothing; against a scripted HTTP
endpoint on 127.0.0.1 and against phi1-serve on a tiny model, whose annotations then train a classifier."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from phi1.quality.annotate import REMINDER, parse_score
from phi1.testing.endpoints import ScriptedEndpoint
from phi1.testing.hostile import assert_clear_error, python, run_bounded

ROOT = Path(__file__).resolve().parents[1]
TOOL = str(ROOT / "tools" / "quality_filter.py")


def _files(path: Path, count: int, with_ids: bool = True) -> list[str]:
    texts = [f"# FILE-{i}\ndef f{i}(x):\n    return x + {i}\n" for i in range(count)]
    path.write_text("".join(json.dumps({**({"id": f"f{i}"} if with_ids else {}), "text": t}) + "\n"
                            for i, t in enumerate(texts)))
    return texts


@pytest.mark.parametrize("answer, expected", [
    ("7", 0.7), ("Score: 8/10", 0.8), ('{"score": 3}', 0.3), ('```json\n{"rating": "9"}\n```', 0.9),
    ("high", 1.0), ("No.", 0.0), ("Educational value: moderate", 0.5),
    ("I would rate this a 6 because it shows loops.", 0.6), ("It deserves 4 points.", 0.4), ("8 out of 10", 0.8),
    ("15", None), ("Score: 11", None), ("between 3 and 5", None), ("I cannot judge this.", None), ("", None),
    ("not high", None), ("no idea", None), ("Yes, it teaches loops.", 1.0),
])
def test_parse_score(answer, expected) -> None:
    assert parse_score(answer, 10) == expected


def test_annotate_scripted_endpoint_styles_reasks_and_retries(tmp_path) -> None:
    from phi1.quality.filter_cli import main, read_labelled

    inputs = tmp_path / "files.jsonl"
    _files(inputs, 7)
    script = {"FILE-0": ["7"], "FILE-1": ["Score: 8/10"], "FILE-2": ['{"score": 3}'], "FILE-3": ["high"],
              "FILE-4": ["I would rate this a 6 because it shows a loop."],
              "FILE-5": ["I cannot judge this.", "maybe", "no idea at all"],  # never readable: unparsed
              "FILE-6": ["Hmm, between 3 and 5", "4"]}  # readable when asked again
    output = tmp_path / "annotated.jsonl"
    with ScriptedEndpoint(script, fail_first={"FILE-0"}) as endpoint:
        counts = main(["annotate", "--input", str(inputs), "--output", str(output), "--base-url", endpoint.url,
                       "--concurrency", "2", "--backoff", "0.01", "--no-progress", "--counts",
                       str(tmp_path / "counts.json")])
    records = {r["id"]: r for r in map(json.loads, output.read_text().splitlines())}
    assert {k: r.get("score") for k, r in records.items()} == {
        "f0": 0.7, "f1": 0.8, "f2": 0.3, "f3": 1.0, "f4": 0.6, "f5": None, "f6": 0.4}
    assert {k: r.get("label") for k, r in records.items()} == {
        "f0": 1, "f1": 1, "f2": 0, "f3": 1, "f4": 1, "f5": None, "f6": 0}
    assert records["f5"]["status"] == "unparsed" and records["f5"]["attempts"] == 3
    assert records["f5"]["raw_answer"] == "no idea at all"
    assert records["f5"]["earlier_answers"] == ["I cannot judge this.", "maybe"]
    assert records["f6"]["attempts"] == 2 and records["f6"]["raw_answer"] == "4"
    assert all(r["model"] == "scripted" and "educational value for a student" in r["prompt_template"]
               for r in records.values())
    assert counts["bad_answers"] == 4 and counts["retries"] == 1
    assert counts["written"] == {"ok": 6, "unparsed": 1}
    assert json.loads((tmp_path / "counts.json").read_text())["bad_answers"] == 4
    asked = [p for m, p in endpoint.requests if m == "FILE-6"]
    assert len(asked) == 2 and not asked[0].endswith(REMINDER.format(scale=10)) and \
        asked[1].endswith(REMINDER.format(scale=10))
    texts, labels, stats = read_labelled(str(output), "text", "score")  # what `train` reads
    assert len(texts) == 6 and sorted(labels.tolist()) == [0.3, 0.4, 0.6, 0.7, 0.8, 1.0] and stats.bad == 0


def test_annotate_prompt_file_and_ids_from_text(tmp_path) -> None:
    from phi1.quality.filter_cli import main

    inputs = tmp_path / "files.jsonl"
    _files(inputs, 3, with_ids=False)
    with open(inputs, "a") as handle:  # the same text again: annotated once
        handle.write(inputs.read_text().splitlines()[0] + "\n")
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Rate from 0 to {scale} how well this teaches: {text}\nJSON please.")
    with ScriptedEndpoint({}, default='{"score": 2}') as endpoint:
        counts = main(["annotate", "--input", str(inputs), "--output", str(tmp_path / "out.jsonl"), "--base-url",
                       endpoint.url, "--prompt-file", str(prompt), "--scale", "4", "--no-progress"])
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(records) == 3 and counts["duplicate_ids"] == 1
    assert all(r["id"].startswith("sha256:") and r["score"] == 0.5 and r["label"] == 1 for r in records)
    # requests run concurrently, so their order is not fixed: each file was asked once, in the user's template
    asked = sorted(request[1] for request in endpoint.requests)
    assert len(asked) == 3
    assert [a.startswith(f"Rate from 0 to 4 how well this teaches: # FILE-{i}") for i, a in enumerate(asked)] == [True] * 3
    assert all(a.endswith("\nJSON please.") for a in asked)


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_annotate_resume_after_kill_loses_and_repeats_nothing(tmp_path) -> None:
    inputs = tmp_path / "files.jsonl"
    n = 40
    _files(inputs, n)
    output = tmp_path / "annotated.jsonl"
    with ScriptedEndpoint({}, default="Score: 6/10", delay_s=0.05) as endpoint:
        command = python(TOOL, "annotate", "--input", str(inputs), "--output", str(output), "--base-url",
                         endpoint.url, "--concurrency", "2", "--no-progress")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        tool = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.time() + 120
            while _lines(output) < 6 and tool.poll() is None and time.time() < deadline:
                time.sleep(0.02)
            tool.send_signal(signal.SIGKILL)
            tool.wait(timeout=30)
        finally:
            if tool.poll() is None:
                tool.kill()
                tool.wait()
        first = [json.loads(line)["id"] for line in output.read_text().splitlines()]
        assert 0 < len(first) < n, "the tool should have been killed mid-run"
        with open(output, "a") as handle:  # as if killed in the middle of writing a line
            handle.write('{"id": "f39", "status": "ok", "sco')
        before = len(endpoint.requests)
        resumed = run_bounded(command, timeout_s=180)
        assert resumed.returncode == 0, resumed.describe()
        second = {f"f{m.split('-')[1]}" for m, _ in endpoint.requests[before:]}
    records = [json.loads(line) for line in output.read_text().splitlines()]
    ids = [r["id"] for r in records]
    assert sorted(ids) == sorted(f"f{i}" for i in range(n))  # nothing lost, nothing twice
    assert second.isdisjoint(first)  # nothing finished was asked again
    assert second == {f"f{i}" for i in range(n)} - set(first)
    assert all(r["score"] == 0.6 and r["status"] == "ok" for r in records)
    assert "cut a torn last line" in resumed.stderr


@pytest.mark.parametrize("case", ["missing_input", "prompt_without_text", "threshold", "other_model", "no_url"])
def test_annotate_bad_input_is_one_clear_line(tmp_path, case) -> None:
    inputs = tmp_path / "files.jsonl"
    _files(inputs, 2)
    output = tmp_path / "out.jsonl"
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Rate this file from 0 to 10.")
    with ScriptedEndpoint({}) as endpoint:
        base = ["annotate", "--input", str(inputs), "--output", str(output), "--base-url", endpoint.url,
                "--no-progress"]
        if case == "other_model":
            done = run_bounded(python(TOOL, *base, "--model", "a"), timeout_s=120)
            assert done.returncode == 0, done.describe()
        argv, names = {
            "missing_input": (["annotate", "--input", str(tmp_path / "nope.jsonl"), "--output", str(output),
                               "--base-url", endpoint.url], "nope.jsonl"),
            "prompt_without_text": ([*base, "--prompt-file", str(prompt)], str(prompt)),
            "threshold": ([*base, "--label-threshold", "7"], "--label-threshold"),
            "other_model": ([*base, "--model", "b"], "manifest.json"),
            "no_url": (["annotate", "--input", str(inputs), "--output", str(output)], "--base-url"),
        }[case]
        outcome = run_bounded(python(TOOL, *argv), timeout_s=120, env={"OPENAI_BASE_URL": ""})
    assert_clear_error(outcome, names=names)


@pytest.mark.slow
def test_annotate_against_phi1_serve_then_train_on_annotations(tmp_path, capsys) -> None:
    import shutil
    import socket

    from phi1.core.config import get_preset
    from phi1.core.model import PhiForCausalLM
    from phi1.core.pretrained import save_pretrained
    from phi1.data.tokenizer_training import main as train_tokenizer
    from phi1.quality.filter_cli import main
    from phi1.quality.stdlib_functions import documented_labelled_set, stdlib_functions

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f.source}) + "\n" for f in stdlib_functions(200, seed=4)))
    train_tokenizer(["--input", str(corpus), "--output-dir", str(tmp_path / "tok"), "--vocab-size", "512",
                     "--threads", "1"])
    # A random model with a 512-token context: the prompt holds the whole file.
    config = get_preset("phi-1-tiny", vocab_size=512, n_layer=2, d_model=128, n_head=2, d_mlp=512)
    model_dir = tmp_path / "model"
    save_pretrained(PhiForCausalLM(config, init_seed=0).state_dict(), config, model_dir)
    shutil.copyfile(tmp_path / "tok" / "tokenizer.model", model_dir / "tokenizer.model")

    inputs = tmp_path / "files.jsonl"
    _files(inputs, 4)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(python("-m", "phi1.serve", "--model", str(model_dir), "--port", str(port)),
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                              stderr=open(tmp_path / "serve.log", "w"))
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
                time.sleep(0.3)
        output = tmp_path / "annotated.jsonl"
        outcome = run_bounded(python(TOOL, "annotate", "--input", str(inputs), "--output", str(output),
                                     "--base-url", f"http://127.0.0.1:{port}/v1", "--max-tokens", "8",
                                     "--max-chars", "400", "--max-attempts", "2", "--no-progress", "--counts",
                                     str(tmp_path / "counts.json")), timeout_s=300)
    finally:
        server.kill()
        server.wait()
    assert outcome.returncode == 0, outcome.describe()
    records = [json.loads(line) for line in output.read_text().splitlines()]
    counts = json.loads((tmp_path / "counts.json").read_text())
    assert sorted(r["id"] for r in records) == ["f0", "f1", "f2", "f3"]
    # A random model mostly answers noise: whatever it said is kept raw, scored only when readable.
    for record in records:
        assert record["model"] and isinstance(record["raw_answer"], str)
        assert (record["status"] == "ok") == ("score" in record) == (parse_score(record["raw_answer"], 10) is not None)
    assert counts["bad_answers"] == sum(r["attempts"] - (r["status"] == "ok") for r in records)

    # Annotations feed `train`: scores from a scripted teacher that likes docstrings, regression on `score`.
    labelled = tmp_path / "labelled.jsonl"
    functions = documented_labelled_set(40, seed=2)
    labelled.write_text("".join(json.dumps({"id": f"d{i}", "text": f"# FILE-{i}\n" + r["text"]}) + "\n"
                                for i, r in enumerate(functions)))
    script = {f"FILE-{i}": ["Score: 8/10" if r["label"] else "2"] for i, r in enumerate(functions)}
    with ScriptedEndpoint(script) as endpoint:
        main(["annotate", "--input", str(labelled), "--output", str(tmp_path / "scored.jsonl"), "--base-url",
              endpoint.url, "--no-progress"])
    main(["train", "--labelled", str(tmp_path / "scored.jsonl"), "--label-key", "score", "--embedding-model",
          str(model_dir), "--output", str(tmp_path / "cls"), "--trees", "10", "--folds", "2"])
    header = json.loads((tmp_path / "cls" / "classifier.json").read_text())
    assert header["kind"] == "regression" and header["cross_validation"]["examples"] == 40
    assert "precision" in capsys.readouterr().out


def test_annotate_is_rate_limited(tmp_path) -> None:
    from phi1.quality.filter_cli import main

    inputs = tmp_path / "files.jsonl"
    _files(inputs, 6)
    with ScriptedEndpoint({}) as endpoint:
        start = time.perf_counter()
        main(["annotate", "--input", str(inputs), "--output", str(tmp_path / "out.jsonl"), "--base-url", endpoint.url,
              "--model", "scripted", "--requests-per-minute", "600", "--concurrency", "1", "--no-progress"])
        elapsed = time.perf_counter() - start
    assert len(endpoint.requests) == 6 and elapsed >= 0.45  # 10 per second: the first at once, 5 more >= 0.5 s


def test_annotate_stops_resumably_when_the_endpoint_stays_down(tmp_path) -> None:
    import socket

    inputs = tmp_path / "files.jsonl"
    _files(inputs, 2)
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    outcome = run_bounded(python(TOOL, "annotate", "--input", str(inputs), "--output", str(tmp_path / "out.jsonl"),
                                 "--base-url", f"http://127.0.0.1:{port}/v1", "--model", "m", "--max-retries", "2",
                                 "--backoff", "0.01", "--no-progress"), timeout_s=120)
    assert outcome.returncode == 3 and "Run the same command again to resume" in outcome.stderr, outcome.describe()
    assert "Traceback" not in outcome.stderr and (tmp_path / "out.jsonl").read_text() == ""
