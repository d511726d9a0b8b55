#!/usr/bin/env bash
# phi-1 pretraining with the paper's hyperparameters (configs/pretrain_phi1.yaml): 8 GPUs on one node,
# torchrun, DeepSpeed ZeRO-2, fp16, global batch 1024 x 2048 tokens, LR 1e-3 / 750 warmup / linear decay.
#   DATA_PATH=data/codetextbook_text_document TOKENIZER_MODEL=data/codegen-350M-mono bash examples/pretrain_phi1.sh
#   torchrun --nproc-per-node 8 examples/pretrain_phi1.sh                    (same run, torchrun outside;
#                                                                            --no-python works too)
# Environment: DATA_PATH (a prefix, or "0.8 PREFIX_A 0.2 PREFIX_B"), TOKENIZER_MODEL, CHECKPOINT_DIR,
# GPUS_PER_NODE (default 8 here), NNODES / NODE_RANK / MASTER_ADDR / MASTER_PORT for several nodes.
# Extra arguments are config overrides, e.g. `bash examples/pretrain_phi1.sh batch.micro_batch_size=4`.
# This file is both a bash script and a Python program, so every launcher runs it: `bash FILE`, `./FILE`,
# `torchrun [--no-python] FILE` (torchrun runs FILE with Python unless --no-python) and `python FILE`. Bash reads
# the next line as the no-op command `:` and runs the shell part up to its `exit`; Python reads the shell part as
# one string and runs only the last lines, which hand this same file, with its arguments, to bash. (Bash never
# reaches those lines; the here-document around them keeps `bash -n` and shellcheck parsing the whole file.)
""":"
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch_common.sh"
export GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
phi1_launch configs/pretrain_phi1.yaml \
    data.path="${DATA_PATH:-data/codetextbook_text_document}" \
    data.tokenizer_model="${TOKENIZER_MODEL:-data/codegen-350M-mono}" \
    checkpoint.dir="${CHECKPOINT_DIR:-checkpoints/phi1-base}" \
    "$@"
exit 0
: <<'# end of the Python part'
":"""
import os
import sys

os.execvp("bash", ["bash", os.path.abspath(__file__), *sys.argv[1:]])
# end of the Python part
