#!/usr/bin/env bash
# Sets up and runs the main job on a fresh machine with only Python: the README's first command.
# torch is pinned first (a CPU machine takes the 2.13.0 CPU build instead of GBs of CUDA wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
python -m pip install -q -e .
bash examples/quickstart.sh "$@"
