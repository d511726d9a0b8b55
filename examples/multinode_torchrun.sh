#!/usr/bin/env bash
# Several nodes with torchrun's c10d rendezvous: run this same command on every node.
#   NNODES=4 NODE_RANK=<0..3> MASTER_ADDR=node0 MASTER_PORT=29500 GPUS_PER_NODE=8 \
#       CONFIG=configs/pretrain_phi1.yaml bash examples/multinode_torchrun.sh [overrides...]
# DATA_PATH, TOKENIZER_MODEL, CHECKPOINT_DIR, INIT_FROM, EXERCISES override the config's paths when set.
# NODE_RANK may be left out (the rendezvous assigns ranks). Data and checkpoint paths must be on a file system
# every node sees (checkpoints are renamed into place by global rank 0).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch_common.sh"
: "${NNODES:?set NNODES (number of nodes)}"
: "${MASTER_ADDR:?set MASTER_ADDR (host of the rendezvous, e.g. the first node)}"
phi1_env_overrides
phi1_launch "${CONFIG:-configs/pretrain_phi1.yaml}" "${phi1_env_args[@]}" "$@"
