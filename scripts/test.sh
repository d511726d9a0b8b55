#!/usr/bin/env bash
# Sets up and runs the test suite on a fresh machine with only Python: the README's test command.
# torch is pinned first (a CPU machine takes the 2.13.0 CPU build on disk instead of GBs of CUDA wheels);
# the package's own requirement is a range that 2.13.0 satisfies, so nothing else pulls torch.
set -euo pipefail
cd "$(dirname "$0")/.."
export DS_BUILD_OPS=0 DS_ACCELERATOR=cpu PYTHONFAULTHANDLER=1
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test]"
# Two pytest workers (pytest-xdist), each taking whole test files: on 2 cores the multi-process tests of one
# overlap the in-process tests of the other. PHI1_TEST_WORKERS=0 runs in one process.
python -m pytest -q -n "${PHI1_TEST_WORKERS:-2}" --dist loadfile "$@"
