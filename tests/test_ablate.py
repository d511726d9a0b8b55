"""tools/ablate.py: the same model at equal tokens on several data mixes, each scored the same way (held-out
exercise loss and HumanEval pass@1), at toy size; bad arguments are one line, exit 2."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from phi1.testing.hostile import assert_clear_error, python, run_bounded

ROOT = Path(__file__).resolve().parents[1]
TOOL = str(ROOT / "tools" / "ablate.py")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    from phi1.data.tokenizer_training import main as train_tokenizer
    from phi1.quality.stdlib_functions import stdlib_functions

    directory = tmp_path_factory.mktemp("ablate")
    functions = stdlib_functions(80, seed=5)
    raw = directory / "raw.jsonl"
    raw.write_text("".join(json.dumps({"text": f.source}) + "\n" for f in functions))
    documented = directory / "filtered.jsonl"
    documented.write_text("".join(json.dumps({"text": f.source}) + "\n" for f in functions if f.docstring))
    synthetic = directory / "textbooks.jsonl"  # the generator's format: a rejected record is not training data
    synthetic.write_text(json.dumps({"id": "textbook-000000", "status": "ok", "text": "Loops repeat work.\n" * 5}) + "\n"
                         + json.dumps({"id": "textbook-000001", "status": "rejected", "text": "x"}) + "\n")
    heldout = directory / "exercises.jsonl"
    heldout.write_text("".join(json.dumps({"prompt": f"def f{i}(x):\n    \"\"\"Add {i}.\"\"\"\n",
                                           "solution": f"    return x + {i}\n"}) + "\n" for i in range(6)))
    train_tokenizer(["--input", str(raw), "--output-dir", str(directory / "tok"), "--vocab-size", "400",
                     "--threads", "1"])
    return {"dir": directory, "raw": raw, "filtered": documented, "synthetic": synthetic, "heldout": heldout,
            "tokenizer": directory / "tok" / "tokenizer.model"}


OVERRIDES = ["batch.global_batch_size=4", "batch.micro_batch_size=4", "data.seq_len=64", "eval.interval=3",
             "eval.iters=1", "data.split=90,10,0", "schedule.warmup_steps=1", "logging.interval=1"]


@pytest.mark.slow
def test_ablation_trains_each_mix_at_equal_tokens_and_scores_them_alike(data, tmp_path) -> None:
    output = tmp_path / "ablation"
    argv = python(TOOL, "--output-dir", str(output), "--tokenizer", str(data["tokenizer"]), "--config",
                  str(ROOT / "configs" / "quickstart_pretrain.yaml"), "--steps", "3", "--heldout", str(data["heldout"]),
                  "--eval-limit", "1", "--max-new-tokens", "8", "--mix", f"raw={data['raw']}",
                  "--mix", f"filtered={data['filtered']}", "--mix", f"filtered+synthetic={data['filtered']},{data['synthetic']}",
                  *OVERRIDES)
    done = run_bounded(argv, timeout_s=900, memory_mb=None, env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.describe()
    results = json.loads((output / "results.json").read_text())
    assert [r["mix"] for r in results] == ["raw", "filtered", "filtered+synthetic"]
    filtered_documents = len(data["filtered"].read_text().splitlines())
    assert [r["documents"] for r in results] == [80, filtered_documents, filtered_documents + 1]  # rejected left out
    assert {r["trained_tokens"] for r in results} == {3 * 4 * 64}  # equal tokens, whatever the mix's size
    for result in results:
        assert math.isfinite(result["heldout_loss"]) and result["heldout_loss"] > 0
        assert result["heldout_exercises"] == 6 and result["heldout_tokens"] > 6
        assert result["humaneval_problems"] == 1 and 0 <= result["humaneval_pass@1"] <= 1
        assert (output / result["mix"] / "seed-1234" / "eval" / "summary.json").exists()
    table = (output / "table.md").read_text().splitlines()
    assert len(table) == 5 and table[2].startswith("| raw | 80 |") and all("| 1 |" in row for row in table[2:])
    assert done.stdout.strip().splitlines() == table

    again = run_bounded(argv, timeout_s=300, env={"PYTHONPATH": str(ROOT)})  # finished mixes are not retrained
    assert again.returncode == 0 and again.stderr.count("results.json exists, skipped") == 3, again.describe()


@pytest.mark.parametrize("case", ["mix_syntax", "mix_missing_file", "mix_twice", "steps_zero", "train_steps_override"])
def test_ablate_bad_arguments_are_one_line(data, tmp_path, case) -> None:
    base = ["--output-dir", str(tmp_path / "out"), "--tokenizer", str(data["tokenizer"]), "--config",
            str(ROOT / "configs" / "quickstart_pretrain.yaml"), "--heldout", str(data["heldout"])]
    mix = ["--mix", f"raw={data['raw']}"]
    argv, names = {
        "mix_syntax": ([*base, "--steps", "3", "--mix", "raw"], "--mix"),
        "mix_missing_file": ([*base, "--steps", "3", "--mix", f"raw={tmp_path / 'nope.jsonl'}"], "nope.jsonl"),
        "mix_twice": ([*base, "--steps", "3", *mix, *mix], "--mix"),
        "steps_zero": ([*base, "--steps", "0", *mix], "--steps"),
        "train_steps_override": ([*base, "--steps", "3", *mix, "schedule.train_steps=9"], "schedule.train_steps"),
    }[case]
    outcome = run_bounded(python(TOOL, *argv), timeout_s=120, env={"PYTHONPATH": str(ROOT)})
    assert_clear_error(outcome, names=names)
    assert not (tmp_path / "out").exists()
