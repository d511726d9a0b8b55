"""finetune.select_by: pass@1: every kept checkpoint scored on held-out exercises in the sandbox, the best kept.

The run directory comes from the real trainer (phi-1-nano, 2 steps, a checkpoint each step). One checkpoint is
then made clearly better: its weights are trained in the test until they reproduce the held-out solutions, so
its greedy pass@1 is 1 while the other's is 0.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from phi1.testing.hostile import assert_clear_error, python, run_bounded
from phi1.testing.toy_model import train_bytelevel_tokenizer

EXERCISES = [
    ('def add(a, b):\n    """Return a plus b."""\n', "    return a + b\n", "assert add(2, 3) == 5\n"),
    ('def double(x):\n    """Return twice x."""\n', "    return 2 * x\n", "assert double(4) == 8\n"),
    ('def first(items):\n    """Return the first item."""\n', "    return items[0]\n", "assert first([7, 8]) == 7\n"),
]


def _write_data(directory: Path) -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = train_bytelevel_tokenizer([p + s + t for p, s, t in EXERCISES] * 5, 512, directory / "tokenizer.json")
    exercises = directory / "exercises.jsonl"
    exercises.write_text("".join(json.dumps({"prompt": p, "solution": s}) + "\n" for p, s, _ in EXERCISES))
    held_out = directory / "heldout.jsonl"
    held_out.write_text("".join(json.dumps({"task_id": f"ex/{i}", "prompt": p, "tests": t}) + "\n"
                                for i, (p, _, t) in enumerate(EXERCISES)))
    return {"tokenizer": tokenizer, "exercises": exercises, "held_out": held_out}


def _train_args(data: dict[str, Path], run: Path, **extra) -> list[str]:
    values = {
        "model.preset": "phi-1-nano", "finetune.data": data["exercises"], "data.tokenizer_type": "HuggingFaceTokenizer",
        "data.tokenizer_model": data["tokenizer"], "data.seq_len": 64, "batch.global_batch_size": 2,
        "batch.micro_batch_size": 1, "schedule.train_steps": 2, "schedule.warmup_steps": 1, "checkpoint.dir": run,
        "checkpoint.interval": 1, "checkpoint.keep_last": 0, "logging.interval": 1, "eval.interval": 0,
        "logging.tensorboard_dir": "", "finetune.select_by": "pass@1", "finetune.select_problems": data["held_out"],
    }
    values.update(extra)
    return [f"{key}={value}" for key, value in values.items()]


def _memorise(checkpoint: Path, tokenizer_path: Path, steps: int = 200) -> None:
    """Train the checkpoint's weights on prompt + solution + eod of each exercise until greedy decoding
    reproduces the solutions; write them back into its shard and renew its manifest."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from phi1.core.model import PhiForCausalLM
    from phi1.data.tokenizers import build_tokenizer
    from phi1.loading.checkpoints import load_checkpoint_state, shard_files
    from phi1.loading.manifest import write_manifest

    config, state = load_checkpoint_state(checkpoint)
    model = PhiForCausalLM(config, init_seed=0)
    model.load_state_dict(state)
    tokenizer = build_tokenizer("HuggingFaceTokenizer", str(tokenizer_path))
    sequences = [tokenizer.encode(p) + tokenizer.encode(s) + [tokenizer.eod] for p, s, _ in EXERCISES]
    length = max(len(s) for s in sequences)
    input_ids = torch.tensor([s[:-1] + [0] * (length - len(s)) for s in sequences])
    labels = torch.tensor([s[1:] + [-100] * (length - len(s)) for s in sequences])
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    torch.manual_seed(0)
    model.eval()  # no dropout: the loss falls steadily to ~0
    for _ in range(steps):
        loss = model(input_ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # The floor is ~0.05: the name after the first token `def` is a three-way guess; the rest is determined.
    assert loss.item() < 0.1, f"the toy model did not memorise the exercises (loss {loss.item():.3f})"
    trained = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    tp_size, [shard] = shard_files(checkpoint)
    assert tp_size == 1
    with safe_open(str(shard), "pt") as handle:
        metadata, names = handle.metadata(), list(handle.keys())
    assert set(names) <= set(trained)
    save_file({name: trained[name] for name in names}, str(shard), metadata=metadata)
    write_manifest(checkpoint)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> dict:
    """A 2-checkpoint run trained with finetune.select_by: pass@1 (the trainer's hook selects at the end)."""
    root = tmp_path_factory.mktemp("select_by")
    data = _write_data(root / "data")
    run = root / "run"
    outcome = run_bounded(python("-m", "phi1.train", *_train_args(data, run)), timeout_s=600)
    assert outcome.returncode == 0, outcome.describe()
    return {"root": root, "data": data, "run": run, "outcome": outcome}


@pytest.mark.slow
def test_the_trainer_selects_at_the_end_of_the_run(run_dir) -> None:
    run = run_dir["run"]
    record = json.loads((run / "selection.json").read_text())
    assert [s["iteration"] for s in record["scores"]] == [1, 2]
    assert all(s["problems"] == 3 and set(s["per_problem"]) == {"ex/0", "ex/1", "ex/2"} for s in record["scores"])
    # Two random-ish checkpoints score alike: the later one is kept on a tie.
    best = max(s["pass@1"] for s in record["scores"])
    assert record["selected"] == max(s["iteration"] for s in record["scores"] if s["pass@1"] == best)
    assert (run / "selected").read_text() == f"{record['selected']}\n"
    assert "selection: kept" in run_dir["outcome"].stdout


@pytest.mark.slow
def test_the_clearly_better_checkpoint_is_selected(run_dir, tmp_path) -> None:
    import shutil

    from phi1.training.checkpoint_selection import select_checkpoint

    run = tmp_path / "run"
    shutil.copytree(run_dir["run"], run)
    for name in ("selected", "selection.json"):
        (run / name).unlink()
    _memorise(run / "iter_0000001", run_dir["data"]["tokenizer"])  # the earlier one: not "the latest wins"
    record = select_checkpoint(run, run_dir["data"]["held_out"], device="cpu", workers=2, max_new_tokens=24)
    scores = {s["iteration"]: s["pass@1"] for s in record["scores"]}
    assert scores == {1: 1.0, 2: 0.0}
    assert record["selected"] == 1 and record["selected_checkpoint"] == "iter_0000001"
    assert (run / "selected").read_text() == "1\n"
    saved = json.loads((run / "selection.json").read_text())
    assert saved["scores"][0]["per_problem"] == {"ex/0": True, "ex/1": True, "ex/2": True}
    assert saved["problems"] == str(run_dir["data"]["held_out"]) and saved["select_by"] == "pass@1"
    # The same by hand, from the command line (problems from the run's saved config).
    (run / "selected").unlink()
    outcome = run_bounded(python("-m", "phi1.training.checkpoint_selection", str(run), "--max-new-tokens", "24",
                                 "--workers", "2"), timeout_s=300)
    assert outcome.returncode == 0, outcome.describe()
    assert json.loads(outcome.stdout)["scores"] == {"iter_0000001": 1.0, "iter_0000002": 0.0}
    assert (run / "selected").read_text() == "1\n"


def _bad_heldout(directory: Path, kind: str) -> Path:
    path = directory / f"{kind}.jsonl"
    lines = {
        "not_json": "{not json\n",
        "no_tests": json.dumps({"prompt": "def f():\n"}) + "\n",
        "tests_do_not_parse": json.dumps({"prompt": "def f():\n", "tests": "assert f( ==\n"}) + "\n",
        "duplicate_ids": "".join(json.dumps({"task_id": "a", "prompt": "def f():\n", "tests": "assert 1\n"}) + "\n"
                                 for _ in range(2)),
        "empty": "",
    }
    path.write_text(lines[kind])
    return path


BAD_CONFIGS = [
    ("unknown_rule", {"finetune.select_by": "pass@2"}, "finetune.select_by"),
    ("no_problems", {"finetune.select_problems": "null"}, "finetune.select_problems"),
    ("problems_without_rule", {"finetune.select_by": "none"}, "finetune.select_problems"),
    ("keeps_one", {"checkpoint.keep_last": 1}, "checkpoint.keep_last"),
    ("saves_only_the_end", {"checkpoint.interval": 0}, "checkpoint.interval"),
    ("missing_file", {"finetune.select_problems": "/nonexistent/heldout.jsonl"}, "/nonexistent/heldout.jsonl"),
    ("not_json", "not_json", "not_json.jsonl:1"),
    ("no_tests", "no_tests", "no_tests.jsonl:1"),
    ("tests_do_not_parse", "tests_do_not_parse", "tests_do_not_parse.jsonl:1"),
    ("duplicate_ids", "duplicate_ids", "duplicate_ids.jsonl:2"),
    ("empty", "empty", "empty.jsonl"),
]


@pytest.mark.parametrize("name, change, names", BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_selection_config_is_one_clear_line(tmp_path, name, change, names) -> None:
    data = _write_data(tmp_path / "data")
    if isinstance(change, str):
        change = {"finetune.select_problems": _bad_heldout(tmp_path, change)}
    outcome = run_bounded(python("-m", "phi1.train", *_train_args(data, tmp_path / "run", **change)), timeout_s=120)
    assert_clear_error(outcome, names=names)
    assert not (tmp_path / "run").exists()  # refused before training


def test_selection_command_errors_are_one_clear_line(tmp_path) -> None:
    data = _write_data(tmp_path / "data")
    empty_run = tmp_path / "run"
    empty_run.mkdir()
    for args, names in (([str(tmp_path / "nowhere")], "nowhere"),
                        ([str(empty_run), "--problems", str(data["held_out"])], "no complete checkpoint"),
                        ([str(empty_run), "--problems", str(_bad_heldout(tmp_path, "no_tests"))], "no_tests.jsonl:1"),
                        ([str(empty_run), "--select-by", "pass@9"], "--select-by")):
        outcome = run_bounded(python("-m", "phi1.training.checkpoint_selection", *args), timeout_s=120)
        assert_clear_error(outcome, names=names)
