"""Hostile fine-tuning JSONL through the real command, `python -m phi1.train ... finetune.data=BAD`: each case
must exit 2 with one line naming the file and line (where there is one), no traceback, bounded in time and
memory. The in-process reader is checked on the same cases, so a failure points at the reader or the CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from phi1.testing.hostile import assert_clear_error, python, run_bounded
from phi1.testing.synthetic import write_word_tokenizer
from phi1.training.finetune_data import MAX_LINE_BYTES, read_exercises

GOOD = json.dumps({"prompt": "w1 w2 ", "solution": "w3 w4"})


def _lines(*lines: bytes) -> bytes:
    return b"".join(line + b"\n" for line in lines)


# name -> (file content, or a callable making the path; the line the message must name, None for the whole file;
#          words the message must hold)
CASES = {
    "not_utf8": (_lines(GOOD.encode(), b'{"prompt": "caf\xe9", "solution": "w1"}'), 2, "not UTF-8"),
    "solution_not_string": (_lines(GOOD.encode(), b'{"prompt": "w1 ", "solution": 5}'), 2, "not a string"),
    "prompt_is_list": (_lines(b'{"prompt": ["w1"], "solution": "w2"}'), 1, "JSON array, not a string"),
    "prompt_null": (_lines(GOOD.encode(), GOOD.encode(), b'{"prompt": null, "solution": "w2"}'), 3, "JSON null"),
    "missing_solution": (_lines(GOOD.encode(), b'{"prompt": "w1 "}'), 2, "no field 'solution'"),
    "not_json": (_lines(GOOD.encode(), b"{prompt: w1}"), 2, "not JSON"),
    "not_an_object": (_lines(b'["w1", "w2"]'), 1, "expected a JSON object"),
    "lone_surrogate": (_lines(GOOD.encode(), b'{"prompt": "w1 \\udc80", "solution": "w2"}'), 2, "lone surrogate"),
    "deeply_nested": (_lines(GOOD.encode(), b"[" * 100000 + b"]" * 100000), 2, "not JSON"),
    "empty_file": (b"", None, "no exercises"),
    "blank_lines_only": (b"\n  \n\n", None, "no exercises"),
    "line_over_limit": (lambda path: _huge_line(path), 2, "longer than"),
    "fifo": (lambda path: (os.mkfifo(path), path)[1], None, "named pipe"),
    "directory": (lambda path: (path.mkdir(), path)[1], None, "directory"),
}


def _huge_line(path: Path) -> Path:
    with open(path, "wb") as handle:
        handle.write(GOOD.encode() + b"\n")
        handle.write(b'{"prompt": "' + b"w1 " * (MAX_LINE_BYTES // 3 + 10) + b'", "solution": "w2"}\n')
    return path


def _make(case: str, directory: Path) -> Path:
    content = CASES[case][0]
    path = directory / f"{case}.jsonl"
    if callable(content):
        return content(path)
    path.write_bytes(content)
    return path


def _expected_name(path: Path, line: int | None) -> str:
    return f"{path}:{line}:" if line is not None else str(path)


@pytest.mark.parametrize("case", sorted(CASES))
def test_reader_names_file_and_line(case, tmp_path) -> None:
    path = _make(case, tmp_path)
    _, line, words = CASES[case]
    with pytest.raises(ValueError) as raised:
        read_exercises(path)
    assert _expected_name(path, line) in str(raised.value) and words in str(raised.value)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    return write_word_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")


@pytest.mark.parametrize("case", sorted(CASES))
def test_finetune_command_exits_2_naming_file_and_line(case, tokenizer, tmp_path) -> None:
    path = _make(case, tmp_path)
    _, line, words = CASES[case]
    overrides = {
        "model.preset": "phi-1-nano", "data.path": "none", "data.tokenizer_model": tokenizer, "data.seq_len": 32,
        "data.split": "100,0,0", "batch.global_batch_size": 4, "batch.micro_batch_size": 2,
        "schedule.train_steps": 2, "schedule.warmup_steps": 1, "checkpoint.dir": tmp_path / "run",
        "checkpoint.interval": 0, "eval.interval": 0, "logging.tensorboard_dir": "", "finetune.data": path,
    }
    outcome = run_bounded(python("-m", "phi1.train", *(f"{k}={v}" for k, v in overrides.items())),
                          timeout_s=240, memory_mb=4096)
    assert_clear_error(outcome, names=_expected_name(path, line))
    if case not in ("fifo", "directory"):  # those the config validation refuses first, in its own words
        assert words in outcome.stderr, outcome.describe()
    assert not (tmp_path / "run" / "latest").exists()
