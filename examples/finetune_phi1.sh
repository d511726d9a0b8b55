#!/usr/bin/env bash
# phi-1 fine-tuning on CodeExercises with the paper's hyperparameters (configs/finetune_phi1.yaml): from
# phi-1-base with a fresh optimizer and schedule, batch 256, LR 1e-4 / 50 warmup / linear decay, weight decay
# 0.01, 6,000 steps, a checkpoint every 1,000 steps, the best by validation loss kept (`$CHECKPOINT_DIR/best`).
#   INIT_FROM=checkpoints/phi1-base EXERCISES=data/code_exercises.jsonl bash examples/finetune_phi1.sh
#   torchrun --nproc-per-node 8 examples/finetune_phi1.sh                 (with or without --no-python)
# INIT_FROM may be a phi1 run directory, an iter_ directory, or a phi1 / HuggingFace model directory.
# This file is both a bash script and a Python program, so every launcher runs it: `bash FILE`, `./FILE`,
# `torchrun [--no-python] FILE` (torchrun runs FILE with Python unless --no-python) and `python FILE`. Bash reads
# the next line as the no-op command `:` and runs the shell part up to its `exit`; Python reads the shell part as
# one string and runs only the last lines, which hand this same file, with its arguments, to bash. (Bash never
# reaches those lines; the here-document around them keeps `bash -n` and shellcheck parsing the whole file.)
""":"
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch_common.sh"
export GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
phi1_launch configs/finetune_phi1.yaml \
    finetune.init_from="${INIT_FROM:-checkpoints/phi1-base}" \
    finetune.data="${EXERCISES:-data/code_exercises.jsonl}" \
    data.tokenizer_model="${TOKENIZER_MODEL:-data/codegen-350M-mono}" \
    checkpoint.dir="${CHECKPOINT_DIR:-checkpoints/phi1-finetune}" \
    "$@"
exit 0
: <<'# end of the Python part'
":"""
import os
import sys

os.execvp("bash", ["bash", os.path.abspath(__file__), *sys.argv[1:]])
# end of the Python part
