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
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from phi1.cli import UserError
from phi1.quality.engine import EXECUTORS, STEPS, ExecutorOptions, StepOptions, run_pipeline


def _whole_number(name: str, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise UserError(f"{name} {text!r}: not a whole number") from None
    if value < 1:
        raise UserError(f"{name} {value}: must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="data_pipeline.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("chain")
    group.add_argument("--steps", required=True, help=f"comma-separated, in order, from: {', '.join(STEPS)}")
    group.add_argument("--input-dir", required=True, help="folder of JSONL shards (.jsonl, .jsonl.gz)")
    group.add_argument("--glob", default="*.jsonl", help="which files of --input-dir are shards (default %(default)s)")
    group.add_argument("--output-dir", required=True, help="steps' outputs and the result (OUTPUT/result)")
    group.add_argument("--text-key", default="text")
    group.add_argument("--id-key", default="id")

    group = parser.add_argument_group("executor")
    group.add_argument("--executor", default="local", help=f"one of {', '.join(EXECUTORS)} (default %(default)s)")
    group.add_argument("--tasks", default="1", help="tasks per JSONL step; each takes whole shards (default 1)")
    group.add_argument("--workers", default="1", help="tasks running at once (default 1)")
    group.add_argument("--logging-dir", help="datatrove logs and completion markers (default OUTPUT/logs)")
    group.add_argument("--partition", help="slurm: partition")
    group.add_argument("--time", default="04:00:00", help="slurm: time limit of each task (default %(default)s)")
    group.add_argument("--cpus-per-task", default="1")
    group.add_argument("--mem-per-cpu-gb", default="2")
    group.add_argument("--qos", help="slurm: quality of service")
    group.add_argument("--account", help="slurm: account to charge")
    group.add_argument("--job-name", default="phi1-data", help="slurm: job name prefix (default %(default)s)")
    group.add_argument("--env-command", help="slurm: shell line run first in each job, e.g. 'source venv/bin/activate'")
    group.add_argument("--dry-run", action="store_true", help="slurm: write the sbatch scripts, submit nothing")

    group = parser.add_argument_group("annotate")
    group.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL"), help="OpenAI-compatible endpoint")
    group.add_argument("--model", help="model name the endpoint serves")
    group.add_argument("--api-key", help="default: $OPENAI_API_KEY, read by each task (not written to disk)")
    group.add_argument("--api", choices=("chat", "completions"), default="chat")
    group.add_argument("--prompt-file", help="prompt template with {text} (default: the paper's question)")
    group.add_argument("--concurrency", type=int, default=4, help="requests in flight per task")
    group.add_argument("--requests-per-minute", type=float, default=0.0, help="per task; 0: no limit")
    group.add_argument("--label-threshold", type=float, default=0.5)

    group = parser.add_argument_group("filter")
    group.add_argument("--classifier", help="classifier directory from tools/quality_filter.py train")
    group.add_argument("--threshold", type=float, help="keep scores at or above it (default: the classifier's)")
    group.add_argument("--embedding-model", help="default: the embedder the classifier records")
    group.add_argument("--allow-other-embedder", action="store_true")
    group.add_argument("--device", default="auto")

    group = parser.add_argument_group("dedup")
    group.add_argument("--dedup-threshold", type=float, help="Jaccard similarity the LSH bands are tuned for "
                       "(default: 14 bands x 8 rows, datatrove's)")

    group = parser.add_argument_group("decontaminate")
    group.add_argument("--humaneval", help="HumanEval jsonl(.gz) (default: the bundled one)")
    group.add_argument("--mbpp", help="original mbpp.jsonl, checked too")
    group.add_argument("--ngram-n", type=int, default=13)
    group.add_argument("--tau", type=float, default=0.9, help="AST match threshold; 0 disables the AST check")

    group = parser.add_argument_group("preprocess")
    group.add_argument("--tokenizer-model", help="tokenizer file or directory")
    group.add_argument("--tokenizer-type", help="default: detected from --tokenizer-model")
    group.add_argument("--no-eod", action="store_true", help="do not append the end-of-document token")
    group.add_argument("--dataset-name", default="corpus", help="result/NAME_{key}_document.bin (default %(default)s)")
    return parser


def options_from_args(args: argparse.Namespace) -> tuple[list[str], StepOptions, ExecutorOptions]:
    """The chain, step options and executor options of parsed arguments (numbers checked, one clear line)."""
    chain = [step.strip() for step in args.steps.split(",") if step.strip()]
    steps = StepOptions(
        text_key=args.text_key, id_key=args.id_key, base_url=args.base_url, model=args.model, api_key=args.api_key,
        api=args.api, prompt_file=args.prompt_file, concurrency=args.concurrency,
        requests_per_minute=args.requests_per_minute, label_threshold=args.label_threshold,
        classifier=args.classifier, threshold=args.threshold, embedding_model=args.embedding_model,
        allow_other_embedder=args.allow_other_embedder, device=args.device, dedup_threshold=args.dedup_threshold,
        humaneval=args.humaneval, mbpp=args.mbpp, ngram_n=args.ngram_n, tau=args.tau,
        tokenizer_model=args.tokenizer_model, tokenizer_type=args.tokenizer_type, append_eod=not args.no_eod,
        dataset_name=args.dataset_name)
    if args.concurrency < 1:
        raise UserError(f"--concurrency {args.concurrency}: must be at least 1")
    if not args.dataset_name or any(c in args.dataset_name for c in "/\\\x00") or args.dataset_name in (".", ".."):
        raise UserError(f"--dataset-name {args.dataset_name!r}: a plain file name, without '/'")
    executor = ExecutorOptions(
        kind=args.executor, tasks=_whole_number("--tasks", args.tasks), workers=_whole_number("--workers", args.workers),
        logging_dir=args.logging_dir, partition=args.partition, time=args.time,
        cpus_per_task=_whole_number("--cpus-per-task", args.cpus_per_task),
        mem_per_cpu_gb=_whole_number("--mem-per-cpu-gb", args.mem_per_cpu_gb), qos=args.qos, job_name=args.job_name,
        env_command=args.env_command, sbatch_args={"account": args.account} if args.account else {},
        dry_run=args.dry_run)
    return chain, steps, executor


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    chain, steps, executor = options_from_args(args)
    result = run_pipeline(chain, args.input_dir, args.output_dir, steps, executor, glob=args.glob)
    if executor.kind == "slurm":
        for stage in result.stages:
            print(f"{stage['name']}: {stage['tasks']} tasks, script {stage['script']}, job {stage['job_id']}",
                  file=sys.stderr)
        if executor.dry_run:
            print(f"dry run: {len(result.submissions)} sbatch calls written, nothing submitted:", file=sys.stderr)
            for submission in result.submissions:
                print(f"  sbatch {' '.join(submission['args'])} {submission['script']}  # {submission['kind']} "
                      f"{submission['job_name']}", file=sys.stderr)
        else:
            print(f"submitted; the result will be in {result.result_dir}. Rerun the same command to resume "
                  "after failures", file=sys.stderr)
    else:
        for stage in result.stages:
            print(f"{stage['name']}: {json.dumps(stage.get('stats', {}), ensure_ascii=False)}", file=sys.stderr)
        print(f"result: {result.result_dir}" if result.finished else "result not complete", file=sys.stderr)
    return 0 if result.finished or executor.kind == "slurm" else 1

