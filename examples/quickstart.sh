#!/usr/bin/env bash
# The quickstart: on a CPU-only machine, from nothing to a generated completion in a few minutes.
#   1. corpus:     600 standard-library .py files -> jsonl                      (tools/build_corpus.py)
#   2. exercises:  held-out stdlib functions with docstrings -> prompt/solution  (tools/build_exercises.py)
#   3. tokenizer:  SentencePiece BPE, 4096 tokens                                (tools/train_tokenizer.py)
#   4. preprocess: jsonl -> Megatron .bin/.idx                                    (tools/preprocess_data.py)
#   5. pretrain:   a small phi model, 2 processes (DP = 2) with torchrun         (configs/quickstart_pretrain.yaml)
#   6. fine-tune:  from step 5's checkpoint on the exercises, loss on solutions  (configs/quickstart_finetune.yaml)
#   7. generate:   a completion of a function signature + docstring              (examples/generate_completion.py)
#   8. export:     the fine-tuned run as a HuggingFace directory                  (tools/convert_checkpoint.py)
# Everything goes under $QUICKSTART_DIR (default runs/quickstart, ignored by git); it is rebuilt from scratch.
# Extra arguments are passed to both training runs as overrides, e.g. `bash examples/quickstart.sh precision=bf16`.
# Environment: QUICKSTART_DIR, NPROC (2), QUICKSTART_FILES (600 corpus files), QUICKSTART_EXERCISES (3000),
# PYTHON. It ends by checking that every artefact it lists exists, and prints the next commands to run.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"   # 2 processes share the cores
NPROC="${NPROC:-2}"
DIR="${QUICKSTART_DIR:-runs/quickstart}"
FILES="${QUICKSTART_FILES:-600}"
EXERCISES="${QUICKSTART_EXERCISES:-3000}"
PY="${PYTHON:-python}"

start=$(date +%s)
stage() { echo; echo "=== [$(( $(date +%s) - start )) s] $*"; }

rm -rf "$DIR"
mkdir -p "$DIR/data"

stage "1/8 corpus"
"$PY" tools/build_corpus.py --output "$DIR/data/stdlib.jsonl" --max-files "$FILES"
stage "2/8 exercises"
"$PY" tools/build_exercises.py --output "$DIR/data/exercises.jsonl" --exclude-corpus "$DIR/data/stdlib.jsonl" --max-exercises "$EXERCISES"
stage "3/8 tokenizer"
"$PY" tools/train_tokenizer.py --input "$DIR/data/stdlib.jsonl" --output-dir "$DIR/tokenizer" --vocab-size 4096 --threads 2
stage "4/8 preprocess"
"$PY" tools/preprocess_data.py --input "$DIR/data/stdlib.jsonl" --json-keys text --append-eod \
    --output-prefix "$DIR/data/stdlib" --workers 2 \
    --tokenizer-type SentencePieceTokenizer --tokenizer-model "$DIR/tokenizer/tokenizer.model"

common=(data.tokenizer_model="$DIR/tokenizer/tokenizer.model")
stage "5/8 pretrain ($NPROC processes)"
"$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" -m phi1.train \
    --config configs/quickstart_pretrain.yaml "${common[@]}" \
    data.path="$DIR/data/stdlib_text_document" checkpoint.dir="$DIR/pretrain" "$@"
stage "6/8 fine-tune ($NPROC processes)"
"$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" -m phi1.train \
    --config configs/quickstart_finetune.yaml "${common[@]}" \
    finetune.init_from="$DIR/pretrain" finetune.data="$DIR/data/exercises.jsonl" checkpoint.dir="$DIR/finetune" "$@"
stage "7/8 generate"
"$PY" examples/generate_completion.py --checkpoint "$DIR/finetune" --max-new-tokens 64 \
    --prompt 'def is_even(n):\n    """Return True if n is even, else False."""\n'

stage "8/8 export to HuggingFace"
"$PY" tools/convert_checkpoint.py --input "$DIR/finetune" --input-format phi1 --output "$DIR/hf" --output-format hf

"$PY" - "$DIR" <<'PYEOF'
import sys
from phi1.training.metrics import read_jsonl
directory = sys.argv[1]
for name in ("pretrain", "finetune"):
    losses = [loss for r in read_jsonl(f"{directory}/{name}/metrics.jsonl") for loss in r.get("step_losses", [])]
    last = sum(losses[-10:]) / len(losses[-10:])
    print(f"{name}: loss at step 1 {losses[0]:.3f} -> mean of the last 10 steps {last:.3f} ({last / losses[0]:.0%} of the start)")
PYEOF

pretrained="$DIR/pretrain/iter_$(printf %07d "$(cat "$DIR/pretrain/latest")")"
finetuned="$DIR/finetune/iter_$(printf %07d "$(cat "$DIR/finetune/latest")")"
artefacts=("$DIR/data/stdlib.jsonl" "$DIR/data/exercises.jsonl" "$DIR/tokenizer/tokenizer.model"
           "$DIR/data/stdlib_text_document.bin" "$DIR/data/stdlib_text_document.idx" "$pretrained"
           "$DIR/pretrain/metrics.jsonl" "$DIR/pretrain/tensorboard" "$finetuned" "$DIR/finetune/metrics.jsonl"
           "$DIR/finetune/tensorboard" "$DIR/finetune/best" "$DIR/hf/config.json" "$DIR/hf/model.safetensors")
for artefact in "${artefacts[@]}"; do
    [[ -e "$artefact" ]] || { echo "quickstart: error: $artefact was not made (see the output above)" >&2; exit 1; }
done

stage "done in $(( $(date +%s) - start )) s. Artefacts:"
cat <<EOT
  corpus              $DIR/data/stdlib.jsonl
  exercises           $DIR/data/exercises.jsonl
  tokenizer           $DIR/tokenizer/tokenizer.model
  indexed dataset     $DIR/data/stdlib_text_document.bin/.idx
  pretrained model    $pretrained  (metrics $DIR/pretrain/metrics.jsonl, TensorBoard $DIR/pretrain/tensorboard)
  fine-tuned model    $finetuned  (best by validation loss: iter $(cut -d' ' -f1 "$DIR/finetune/best"); TensorBoard $DIR/finetune/tensorboard)
  HuggingFace export  $DIR/hf  (transformers.PhiForCausalLM.from_pretrained loads it)

Next:
  phi1-eval --model $DIR/finetune --limit 20
  phi1-serve --model $DIR/finetune --port 8000
  DATA_PATH=$DIR/data/stdlib_text_document TOKENIZER_MODEL=$DIR/tokenizer/tokenizer.model CHECKPOINT_DIR=$DIR/phi-1 torchrun --nproc-per-node 8 examples/pretrain_phi1.sh
     (the paper's pretraining recipe on 8 GPUs; every step on your own data: README.md, "The pipeline, step by step")
EOT
