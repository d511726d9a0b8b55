#!/bin/bash
# phi1's data steps on a SLURM cluster: run this on a login node; it submits one job array per stage, each
# starting when the one before has succeeded (datatrove's SlurmPipelineExecutor), and returns.
#
#   INPUT_DIR=/shared/raw OUTPUT_DIR=/shared/prepared TOKENIZER=/shared/tok/tokenizer.json \
#   PARTITION=cpu VENV=/shared/phi1-venv bash examples/slurm/data_pipeline.sh
#   DRY_RUN=1 ... bash examples/slurm/data_pipeline.sh    # write the sbatch scripts, submit nothing
#
# INPUT_DIR, OUTPUT_DIR and LOGGING_DIR must be on storage every node sees. A stage whose tasks failed (or were
# pre-empted) is resumed by running the same command again: finished tasks are skipped.
# The result: OUTPUT_DIR/result/corpus_text_document.bin/.idx/.json, ready for training (data.path).
set -euo pipefail

: "${INPUT_DIR:?set INPUT_DIR to the folder of JSONL shards}"
: "${OUTPUT_DIR:?set OUTPUT_DIR (shared storage)}"
: "${TOKENIZER:?set TOKENIZER to the tokenizer file or directory}"
: "${PARTITION:?set PARTITION to the SLURM partition}"
STEPS=${STEPS:-decontaminate,dedup,preprocess}
TASKS=${TASKS:-64}                 # tasks per JSONL step; each takes whole shards (use <= the number of shards)
WORKERS=${WORKERS:-32}             # array tasks running at once (the %N of --array)
TIME=${TIME:-04:00:00}
CPUS_PER_TASK=${CPUS_PER_TASK:-2}
MEM_PER_CPU_GB=${MEM_PER_CPU_GB:-4}
LOGGING_DIR=${LOGGING_DIR:-$OUTPUT_DIR/logs}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# Each job runs `launch_pickled_pipeline` (a datatrove command) in this environment.
ENV_COMMAND=${ENV_COMMAND:-${VENV:+source $VENV/bin/activate}}

extra=()
[[ -n "${ACCOUNT:-}" ]] && extra+=(--account "$ACCOUNT")
[[ -n "${QOS:-}" ]] && extra+=(--qos "$QOS")
[[ -n "${ENV_COMMAND:-}" ]] && extra+=(--env-command "$ENV_COMMAND")
[[ -n "${CLASSIFIER:-}" ]] && extra+=(--classifier "$CLASSIFIER")
[[ "${DRY_RUN:-0}" == 1 ]] && extra+=(--dry-run)

exec python "$REPO/tools/data_pipeline.py" --executor slurm --steps "$STEPS" \
    --input-dir "$INPUT_DIR" --output-dir "$OUTPUT_DIR" --logging-dir "$LOGGING_DIR" \
    --tokenizer-model "$TOKENIZER" --partition "$PARTITION" --time "$TIME" \
    --tasks "$TASKS" --workers "$WORKERS" --cpus-per-task "$CPUS_PER_TASK" --mem-per-cpu-gb "$MEM_PER_CPU_GB" \
    "${extra[@]}"
