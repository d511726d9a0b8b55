#!/usr/bin/env bash
# Several nodes with torchrun's c10d rendezvous: run this same command on every node.
#   NNODES=4 NODE_RANK=<0..3> MASTER_ADDR=node0 MASTER_PORT=29500 GPUS_PER_NODE=8 \
#       CONFIG=configs/pretrain_phi1.yaml bash examples/multinode_torchrun.sh [overrides...]
# DATA_PATH, TOKENIZER_MODEL, CHECKPOINT_DIR, INIT_FROM, EXERCISES override the config's paths when set.
# NODE_RANK may be left out (the rendezvous assigns ranks). Data and checkpoint paths must be on a file system
# every node sees (checkpoints are renamed into place by global rank 0). Started by torchrun or mpirun itself
# (`torchrun --nnodes 4 ... examples/multinode_torchrun.sh`), it is one rank and NNODES is not needed.
# This file is both a bash script and a Python program, so every launcher runs it: `bash FILE`, `./FILE`,
# `torchrun [--no-python] FILE` (torchrun runs FILE with Python unless --no-python) and `python FILE`. Bash reads
# the next line as the no-op command `:` and runs the shell part up to its `exit`; Python reads the shell part as
# one string and runs only the last lines, which hand this same file, with its arguments, to bash. (Bash never
# reaches those lines; the here-document around them keeps `bash -n` and shellcheck parsing the whole file.)
""":"
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch_common.sh"
if ! phi1_launched_rank; then   # we start torchrun ourselves: it needs the rendezvous
    : "${NNODES:?set NNODES (number of nodes)}"
    : "${MASTER_ADDR:?set MASTER_ADDR (host of the rendezvous, e.g. the first node)}"
fi
phi1_env_overrides
phi1_launch "${CONFIG:-configs/pretrain_phi1.yaml}" "${phi1_env_args[@]}" "$@"
exit 0
: <<'# end of the Python part'
":"""
import os
import sys

os.execvp("bash", ["bash", os.path.abspath(__file__), *sys.argv[1:]])
# end of the Python part
