"""Runs a chain of phi1's data steps over a folder of JSONL shards on datatrove's executors.

    # on this machine: decontaminate, near-dedup, tokenize into one Megatron dataset (8 tasks, 2 at a time)
    python tools/data_pipeline.py --steps decontaminate,dedup,preprocess --input-dir data/raw \\
        --output-dir data/prepared --tokenizer-model runs/tok/tokenizer.json --tasks 8 --workers 2
    # the paper's whole filter: LLM labels -> (train a classifier with quality_filter.py) -> filter -> dedup
    python tools/data_pipeline.py --steps annotate --input-dir data/sample --output-dir data/annotated \\
        --base-url http://127.0.0.1:8000/v1 --model gpt-4
    python tools/data_pipeline.py --steps filter,dedup,decontaminate,preprocess --input-dir data/raw \\
        --output-dir data/prepared --classifier runs/quality/classifier --tokenizer-model runs/tok/tokenizer.json
    # on a SLURM cluster: one job array per stage, each depending on the one before; --dry-run writes the
    # sbatch scripts (under LOGGING_DIR/sbatch) without submitting
    python tools/data_pipeline.py --steps dedup,preprocess --input-dir /shared/raw --output-dir /shared/prepared \\
        --tokenizer-model /shared/tok --executor slurm --partition cpu --tasks 256 --workers 64 \\
        --time 04:00:00 --env-command "source /shared/venv/bin/activate" [--dry-run]

Steps: annotate (LLM educational-value labels), filter (quality classifier on embeddings), dedup (MinHash LSH),
decontaminate (HumanEval/MBPP n-gram and AST checks), preprocess (tokenize to .bin/.idx, last). The result is
OUTPUT/result: the last JSONL step's shards (same names as the inputs) or the merged dataset
OUTPUT/result/corpus_text_document.bin/.idx/.json. The output is the same bytes whatever --tasks and --workers.
A killed run resumes: run the same command again (finished tasks are skipped by datatrove's completion markers,
under --logging-dir). See phi1/quality/engine.py for the layout.

The logic lives in `phi1.quality.pipeline_cli`; this script is its command line.
"""

import os
import sys

# Runnable from a checkout without installing phi1.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from phi1.cli import run_cli  # noqa: E402
from phi1.quality.pipeline_cli import main  # noqa: E402

if __name__ == "__main__":
    run_cli(main, prog="data_pipeline.py")
