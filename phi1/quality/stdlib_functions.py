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


def stdlib_functions(count: int, seed: int = 0, min_lines: int = 3, root: str | None = None) -> list[StdlibFunction]:
    """`count` distinct functions (at least `min_lines` lines) from randomly ordered stdlib files.

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
        for node in functions[:8]:
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
