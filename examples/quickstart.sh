#!/usr/bin/env bash
# The quickstart: on a CPU-only machine, from nothing to a generated completion in a few minutes.
#   1. corpus:     600 standard-library .py files -> jsonl                      (tools/build_corpus.py)
#   2. exercises:  held-out stdlib functions with docstrings -> prompt/solution  (tools/build_exercises.py)
#   3. tokenizer:  SentencePiece BPE, 4096 tokens                                (tools/train_tokenizer.py)
#   4. preprocess: jsonl -> Megatron .bin/.idx                                    (tools/preprocess_data.py)
#   5. pretrain:   a small phi model, 2 processes (DP = 2) with torchrun         (configs/quickstart_pretrain.yaml)
#   6. fine-tune:  from step 5's checkpoint on the exercises, loss on solutions  (configs/quickstart_finetune.yaml)
#   7. generate:   a completion of a function signature + docstring              (examples/generate_completion.py)
# Everything goes under $QUICKSTART_DIR (default runs/quickstart, ignored by git); it is rebuilt from scratch.
# Extra arguments are passed to both training runs as overrides, e.g. `bash examples/quickstart.sh precision=bf16`.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"   # 2 processes share the cores
NPROC="${NPROC:-2}"
DIR="${QUICKSTART_DIR:-runs/quickstart}"
PY="${PYTHON:-python}"

start=$(date +%s)
stage() { echo; echo "=== [$(( $(date +%s) - start )) s] $*"; }

rm -rf "$DIR"
mkdir -p "$DIR/data"

stage "1/7 corpus"
"$PY" tools/build_corpus.py --output "$DIR/data/stdlib.jsonl" --max-files 600
stage "2/7 exercises"
"$PY" tools/build_exercises.py --output "$DIR/data/exercises.jsonl" --exclude-corpus "$DIR/data/stdlib.jsonl" --max-exercises 3000
stage "3/7 tokenizer"
"$PY" tools/train_tokenizer.py --input "$DIR/data/stdlib.jsonl" --output-dir "$DIR/tokenizer" --vocab-size 4096 --threads 2
stage "4/7 preprocess"
"$PY" tools/preprocess_data.py --input "$DIR/data/stdlib.jsonl" --json-keys text --append-eod \
    --output-prefix "$DIR/data/stdlib" --workers 2 \
    --tokenizer-type SentencePieceTokenizer --tokenizer-model "$DIR/tokenizer/tokenizer.model"

common=(data.tokenizer_model="$DIR/tokenizer/tokenizer.model")
stage "5/7 pretrain ($NPROC processes)"
"$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" -m phi1.train \
    --config configs/quickstart_pretrain.yaml "${common[@]}" \
    data.path="$DIR/data/stdlib_text_document" checkpoint.dir="$DIR/pretrain" "$@"
stage "6/7 fine-tune ($NPROC processes)"
"$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" -m phi1.train \
    --config configs/quickstart_finetune.yaml "${common[@]}" \
    finetune.init_from="$DIR/pretrain" finetune.data="$DIR/data/exercises.jsonl" checkpoint.dir="$DIR/finetune" "$@"
stage "7/7 generate"
"$PY" examples/generate_completion.py --checkpoint "$DIR/finetune" --max-new-tokens 64 \
    --prompt 'def is_even(n):\n    """Return True if n is even, else False."""\n'

"$PY" - "$DIR" <<'PYEOF'
import sys
from phi1.training.metrics import read_jsonl
directory = sys.argv[1]
for name in ("pretrain", "finetune"):
    losses = [loss for r in read_jsonl(f"{directory}/{name}/metrics.jsonl") for loss in r.get("step_losses", [])]
    last = sum(losses[-10:]) / len(losses[-10:])
    print(f"{name}: loss at step 1 {losses[0]:.3f} -> mean of the last 10 steps {last:.3f} ({last / losses[0]:.0%} of the start)")
PYEOF

stage "done in $(( $(date +%s) - start )) s. Artefacts:"
cat <<EOT
  corpus              $DIR/data/stdlib.jsonl
  exercises           $DIR/data/exercises.jsonl
  tokenizer           $DIR/tokenizer/tokenizer.model
  indexed dataset     $DIR/data/stdlib_text_document.bin/.idx
  pretrained model    $DIR/pretrain/iter_$(printf %07d "$(cat "$DIR/pretrain/latest")")  (metrics $DIR/pretrain/metrics.jsonl, TensorBoard $DIR/pretrain/tensorboard)
  fine-tuned model    $DIR/finetune/iter_$(printf %07d "$(cat "$DIR/finetune/latest")")  (best by validation loss: iter $(cut -d' ' -f1 "$DIR/finetune/best"))
  HuggingFace export  python tools/convert_checkpoint.py --input $DIR/finetune --input-format phi1 --output $DIR/hf --output-format hf
EOT
