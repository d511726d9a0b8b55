"""Functions of the running Python's standard library as a corpus that can be built anywhere, offline.

Used for the honest, computable labelled set of the classifier (documented functions vs the same functions with
the docstring and comments stripped), as the "clean" side of the decontamination checks, and for benchmarks.
"""

from __future__ import annotations

import ast
import os
import random
import sysconfig
import textwrap
from dataclasses import dataclass

SKIPPED_FOLDERS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idlelib", "lib2to3"}


@dataclass
class StdlibFunction:
    path: str
    """File, relative to the stdlib folder."""
    name: str
    line: int
    source: str
    """Dedented source of the function (decorators excluded)."""
    docstring: str | None


def stdlib_files(root: str | None = None) -> list[str]:
    """Sorted .py files of the standard library, test suites and third-party folders excluded."""
    root = root or sysconfig.get_paths()["stdlib"]
    found = []
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = sorted(d for d in subdirectories if d not in SKIPPED_FOLDERS)
        found.extend(os.path.join(directory, name) for name in sorted(files) if name.endswith(".py"))
    return found


def stdlib_functions(count: int, seed: int = 0, min_lines: int = 3, root: str | None = None,
                     per_file: int | None = 8) -> list[StdlibFunction]:
    """`count` distinct functions (at least `min_lines` lines, at most `per_file` per file; None: no cap) from
    randomly ordered stdlib files.

    Deterministic for a given seed and Python installation. Raises ValueError when the library holds fewer.
    """
    root = root or sysconfig.get_paths()["stdlib"]
    files = stdlib_files(root)
    random.Random(seed).shuffle(files)
    chosen: list[StdlibFunction] = []
    seen: set[str] = set()
    for path in files:
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
            tree = ast.parse(text)
        except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
            continue
        functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        # A few functions per file so the sample spans many modules.
        random.Random(f"{seed}:{path}").shuffle(functions)
        for node in functions[:per_file]:
            segment = ast.get_source_segment(text, node)
            if segment is None or segment.count("\n") + 1 < min_lines:
                continue
            source = textwrap.dedent(" " * node.col_offset + segment)
            if source in seen:
                continue
            try:  # lines less indented than the def (a multi-line string at column 0) do not dedent
                ast.parse(source)
            except SyntaxError:
                continue
            seen.add(source)
            chosen.append(StdlibFunction(os.path.relpath(path, root), node.name, node.lineno, source,
                                         ast.get_docstring(node)))
            if len(chosen) == count:
                return chosen
    raise ValueError(f"{root}: only {len(chosen)} functions of >= {min_lines} lines found, {count} requested")


def without_docstring(source: str) -> str | None:
    """`source` (one function) with its docstring's lines removed; None when it has no docstring or nothing
    but one (removing it would leave an empty body)."""
    tree = ast.parse(source)
    function = tree.body[0] if tree.body else None
    if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)) or ast.get_docstring(function) is None:
        return None
    if len(function.body) < 2:
        return None
    docstring = function.body[0]
    lines = source.split("\n")
    # Remove whole lines: the docstring statement spans lineno..end_lineno (1-based) and owns them alone.
    return "\n".join(lines[: docstring.lineno - 1] + lines[docstring.end_lineno:])


def documented_labelled_set(count: int, seed: int = 0) -> list[dict]:
    """`count` records {"text", "label", "path", "name"}: stdlib functions that have a docstring, half of them
    kept as they are (label 1) and half with the docstring removed (label 0), chosen at random.

    The label is computed, not judged: "is this function documented", a proxy for the paper's GPT-4 label of
    educational value that can be built offline.
    """
    rng = random.Random(seed)
    pool = [f for f in stdlib_functions(max(4 * count, 2000), seed=seed, per_file=None)
            if f.docstring is not None and without_docstring(f.source) is not None]
    if len(pool) < count:
        raise ValueError(f"only {len(pool)} documented stdlib functions found, {count} requested")
    chosen = rng.sample(pool, count)
    records = []
    for number, function in enumerate(chosen):
        label = number % 2
        text = function.source if label == 1 else without_docstring(function.source)
        records.append({"text": text, "label": label, "path": function.path, "name": function.name})
    rng.shuffle(records)
    return records
