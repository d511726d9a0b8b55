#!/usr/bin/env python
"""Builds CodeExercises-shaped fine-tuning data from real Python functions that have docstrings.

Each top-level function of each .py file under --root (default: the standard library) whose body starts with a
docstring becomes one exercise, the shape phi-1 fine-tunes on:

    {"prompt": "def name(args):\\n    \\"\\"\\"Docstring.\\"\\"\\"\\n", "solution": "    body...\\n", "path": ..., "name": ...}

Files already in a pretraining corpus can be left out (--exclude-corpus), so the exercises are held out from
pretraining as CodeExercises are from CodeTextbook. The output is sorted by path and line: the same on every run.

    python tools/build_exercises.py --output data/exercises.jsonl --exclude-corpus data/stdlib.jsonl --max-exercises 3000
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import sysconfig

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from phi1.cli import UserError, run_cli  # noqa: E402
from phi1.data.corpus import iter_python_files  # noqa: E402


def exercises_from_source(source: str, max_solution_lines: int = 40) -> list[dict]:
    """(prompt, solution, name) of every top-level function with a docstring and a non-empty body after it.

    The prompt is the source from the first decorator (or `def`) through the docstring's last line; the
    solution is the rest of the function, byte for byte. Functions whose solution is longer than
    `max_solution_lines` are left out (a small model learns little from them).
    """
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    lines = source.splitlines(keepends=True)
    found = []
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or ast.get_docstring(node) is None:
            continue
        docstring_node = node.body[0]
        if len(node.body) < 2:
            continue  # only a docstring: nothing to solve
        first = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
        prompt_end = docstring_node.end_lineno
        solution_end = node.end_lineno
        if node.body[1].lineno <= prompt_end or solution_end - prompt_end > max_solution_lines:
            continue  # `"""doc"""; x = 1` on one line, or a long body
        prompt = "".join(lines[first:prompt_end])
        solution = "".join(lines[prompt_end:solution_end])
        if solution.strip():
            found.append({"prompt": prompt, "solution": solution, "name": node.name})
    return found


def excluded_paths(corpus: str | None) -> set[str]:
    """The `path` fields of a build_corpus.py jsonl (relative to its root)."""
    if corpus is None:
        return set()
    if not os.path.isfile(corpus):
        raise UserError(f"--exclude-corpus {corpus}: no such file; pass the jsonl that tools/build_corpus.py wrote")
    with open(corpus, encoding="utf-8") as handle:
        paths = set()
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                paths.add(record["path"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"--exclude-corpus {corpus}:{number}: not a build_corpus.py record (a JSON object "
                                "with a 'path' field); pass the jsonl that tools/build_corpus.py wrote") from None
        return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=sysconfig.get_paths()["stdlib"], help="folder of .py files (default: stdlib)")
    parser.add_argument("--output", required=True, help="jsonl file to write")
    parser.add_argument("--exclude-corpus", default=None, help="a build_corpus.py jsonl whose files are skipped")
    parser.add_argument("--max-exercises", type=int, default=None, help="stop after this many")
    parser.add_argument("--max-solution-lines", type=int, default=40)
    args = parser.parse_args(argv)
    if not os.path.isdir(args.root):
        raise UserError(f"--root {args.root}: not a directory of .py files")
    if args.max_exercises is not None and args.max_exercises < 1:
        raise UserError(f"--max-exercises {args.max_exercises}: must be at least 1")

    skip = excluded_paths(args.exclude_corpus)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    written = files_used = unreadable = 0
    with open(args.output, "w", encoding="utf-8") as sink:
        for path in iter_python_files(args.root):
            relative = os.path.relpath(path, args.root)
            if relative in skip or any(part.startswith("test") or part.endswith("_test") for part in relative.split(os.sep)):
                continue  # held out from pretraining; test suites are not exercises
            try:
                with open(path, encoding="utf-8") as handle:
                    source = handle.read()
            except (OSError, UnicodeDecodeError):
                unreadable += 1
                continue
            found = exercises_from_source(source, args.max_solution_lines)
            files_used += bool(found)
            for exercise in found:
                sink.write(json.dumps({**exercise, "path": relative}, ensure_ascii=False) + "\n")
                written += 1
                if args.max_exercises is not None and written >= args.max_exercises:
                    break
            if args.max_exercises is not None and written >= args.max_exercises:
                break
    print(f"wrote {written} exercises from {files_used} files to {args.output}"
          + (f" ({len(skip)} corpus files excluded, {unreadable} unreadable)" if skip or unreadable else ""))
    if not written:
        raise UserError(f"--root {args.root}: no top-level function with a docstring and a body found; nothing "
                        f"was written to {args.output}")
    return 0


if __name__ == "__main__":
    run_cli(main, prog="build_exercises.py")
