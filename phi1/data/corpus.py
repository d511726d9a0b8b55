"""Builds a jsonl corpus ({"text", "path"} per line) from a folder of .py files, one document per file.

By default the folder is the running Python's standard library. Exact duplicates (same content hash) are dropped;
unreadable and non-UTF-8 files are counted and reported, never silently skipped.

    python tools/build_corpus.py --output data/stdlib.jsonl [--root DIR] [--max-files 2000]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import sysconfig

from phi1.cli import UserError

# Third-party packages live inside the stdlib folder; they are not the standard library.
SKIPPED_FOLDERS = {"site-packages", "dist-packages", "__pycache__"}


def iter_python_files(root: str) -> list[str]:
    """All .py files under `root` (outside site-packages), sorted so the corpus is the same on every run."""
    found = []
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = sorted(d for d in subdirectories if d not in SKIPPED_FOLDERS)
        found.extend(os.path.join(directory, name) for name in sorted(files) if name.endswith(".py"))
    return found


def build_corpus(root: str, output: str, max_files: int | None = None) -> dict[str, int]:
    """Writes the corpus and returns counts: written, duplicates, not_utf8, unreadable, empty."""
    counts = {"written": 0, "duplicates": 0, "not_utf8": 0, "unreadable": 0, "empty": 0}
    seen: set[bytes] = set()
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w", encoding="utf-8") as sink:
        for path in iter_python_files(root):
            if max_files is not None and counts["written"] >= max_files:
                break
            try:
                with open(path, "rb") as source:
                    raw = source.read()
            except OSError as error:
                counts["unreadable"] += 1
                print(f"unreadable: {path}: {error}", file=sys.stderr)
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                counts["not_utf8"] += 1
                print(f"not UTF-8: {path}: {error}", file=sys.stderr)
                continue
            if not text.strip():
                counts["empty"] += 1
                continue
            digest = hashlib.sha256(raw).digest()
            if digest in seen:
                counts["duplicates"] += 1
                continue
            seen.add(digest)
            sink.write(json.dumps({"text": text, "path": os.path.relpath(path, root)}, ensure_ascii=False) + "\n")
            counts["written"] += 1
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=sysconfig.get_paths()["stdlib"], help="folder of .py files (default: stdlib)")
    parser.add_argument("--output", required=True, help="jsonl file to write")
    parser.add_argument("--max-files", type=int, default=None, help="stop after this many documents")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.root):
        raise UserError(f"--root {args.root}: not a directory of .py files")
    if args.max_files is not None and args.max_files < 1:
        raise UserError(f"--max-files {args.max_files}: must be at least 1")
    if os.path.isdir(args.output):
        raise UserError(f"--output {args.output}: is a directory; give the .jsonl file to write")
    counts = build_corpus(args.root, args.output, args.max_files)
    if counts["written"] == 0:
        os.remove(args.output)
        raise UserError(f"--root {args.root}: no readable, non-empty UTF-8 .py file found; nothing was written")
    print(
        f"{args.output}: {counts['written']} documents from {args.root}; dropped {counts['duplicates']} exact "
        f"duplicates, {counts['empty']} empty; skipped {counts['not_utf8']} non-UTF-8 and {counts['unreadable']} "
        "unreadable files"
    )

