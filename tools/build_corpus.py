"""Builds a jsonl corpus ({"text", "path"} per line) from a folder of .py files, one document per file.

By default the folder is the running Python's standard library. Exact duplicates (same content hash) are dropped;
unreadable and non-UTF-8 files are counted and reported, never silently skipped.

    python tools/build_corpus.py --output data/stdlib.jsonl [--root DIR] [--max-files 2000]

The logic lives in `phi1.data.corpus`; this script is its command line.
"""

import os
import sys

# Runnable from a checkout without installing phi1.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from phi1.cli import run_cli  # noqa: E402
from phi1.data.corpus import main  # noqa: E402

if __name__ == "__main__":
    run_cli(main, prog="build_corpus.py")
