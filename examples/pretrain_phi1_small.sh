#!/usr/bin/env bash
# phi-1-small (350M) pretraining with phi-1's recipe (configs/pretrain_phi1_small.yaml): 8 GPUs, ZeRO-2, fp16.
#   DATA_PATH=... TOKENIZER_MODEL=... bash examples/pretrain_phi1_small.sh
#   torchrun --nproc-per-node 8 examples/pretrain_phi1_small.sh          (with or without --no-python)
# Environment as in examples/pretrain_phi1.sh; extra arguments are config overrides.
# This file is both a bash script and a Python program, so every launcher runs it: `bash FILE`, `./FILE`,
# `torchrun [--no-python] FILE` (torchrun runs FILE with Python unless --no-python) and `python FILE`. Bash reads
# the next line as the no-op command `:` and runs the shell part up to its `exit`; Python reads the shell part as
# one string and runs only the last lines, which hand this same file, with its arguments, to bash. (Bash never
# reaches those lines; the here-document around them keeps `bash -n` and shellcheck parsing the whole file.)
""":"
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch_common.sh"
export GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
phi1_launch configs/pretrain_phi1_small.yaml \
    data.path="${DATA_PATH:-data/codetextbook_text_document}" \
    data.tokenizer_model="${TOKENIZER_MODEL:-data/codegen-350M-mono}" \
    checkpoint.dir="${CHECKPOINT_DIR:-checkpoints/phi1-small-base}" \
    "$@"
exit 0
: <<'# end of the Python part'
":"""
import os
import sys

os.execvp("bash", ["bash", os.path.abspath(__file__), *sys.argv[1:]])
# end of the Python part
