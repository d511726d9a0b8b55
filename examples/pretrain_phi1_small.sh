#!/usr/bin/env bash
# phi-1-small (350M) pretraining with phi-1's recipe (configs/pretrain_phi1_small.yaml): 8 GPUs, ZeRO-2, fp16.
#   DATA_PATH=... TOKENIZER_MODEL=... bash examples/pretrain_phi1_small.sh
#   torchrun --nproc-per-node 8 --no-python examples/pretrain_phi1_small.sh
# Environment as in examples/pretrain_phi1.sh; extra arguments are config overrides.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch_common.sh"
export GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
phi1_launch configs/pretrain_phi1_small.yaml \
    data.path="${DATA_PATH:-data/codetextbook_text_document}" \
    data.tokenizer_model="${TOKENIZER_MODEL:-data/codegen-350M-mono}" \
    checkpoint.dir="${CHECKPOINT_DIR:-checkpoints/phi1-small-base}" \
    "$@"
