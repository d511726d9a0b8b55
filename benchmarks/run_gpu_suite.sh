#!/usr/bin/env bash
# Every GPU measurement of benchmarks/README.md in one command, on one CUDA GPU:
#
#     bash benchmarks/run_gpu_suite.sh            # logs and JSON rows under runs/bench/gpu/
#
# 1. builds csrc/fused_ops for CUDA and runs the GPU tests (each fused op against its PyTorch reference);
# 2. times each fused op against its reference and torch.compile at phi-1's layer shapes;
# 3. trains phi-1 and phi-1-small side by side with HuggingFace PhiForCausalLM (same GPU, same process, same
#    weights and batch, bf16 autocast, fused AdamW): tokens/s, MFU, peak memory;
# 4. finds the largest micro-batch of phi-1 in 80 GB, ours and HuggingFace's, with and without activation
#    checkpointing.
# Needs transformers (for the HuggingFace rows) and pytest; nothing from the network.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT_DIR:-runs/bench/gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

python -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.cuda.get_device_name(), torch.__version__)" | tee "$OUT/device.txt"
python -m phi1.ops --kind cuda 2>&1 | tee "$OUT/build.log"
python -m pytest -q tests/test_fused_ops.py tests/test_model.py 2>&1 | tee "$OUT/gpu_tests.log"

python benchmarks/bench_fused_ops.py --preset phi-1 --micro-batch 8 --seq-len 2048 --compile \
    --json-out "$OUT/fused_ops.json" 2>&1 | tee "$OUT/fused_ops.log"

# The same micro-batch for both systems, so tokens/s and memory compare like for like.
for preset_mb in "phi-1 8" "phi-1-small 16"; do
    set -- $preset_mb
    for chunk in 0 4096; do
        python benchmarks/train_throughput.py --preset "$1" --micro-batch "$2" --seq-len 2048 --precision bf16 \
            --steps 20 --warmup 5 --compare-hf --loss-chunk-size "$chunk" \
            --json-out "$OUT/throughput_$1_mb$2_chunk$chunk.json" 2>&1 | tee "$OUT/throughput_$1_mb$2_chunk$chunk.log"
    done
    python benchmarks/train_throughput.py --preset "$1" --micro-batch "$2" --seq-len 2048 --precision bf16 \
        --steps 20 --warmup 5 --loss-chunk-size 4096 --compile \
        --json-out "$OUT/throughput_$1_mb$2_compile.json" 2>&1 | tee "$OUT/throughput_$1_mb$2_compile.log"
done

python benchmarks/max_micro_batch.py --preset phi-1 --seq-len 2048 --precision bf16 --memory-limit-gib 80 \
    --max-micro-batch 128 --json-out "$OUT/max_micro_batch_phi-1.json" 2>&1 | tee "$OUT/max_micro_batch_phi-1.log"
echo "done: $OUT"
