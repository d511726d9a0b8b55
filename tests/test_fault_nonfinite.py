"""The non-finite guard: an injected NaN gradient skips its step and is counted; K in a row stop the run with a
diagnosis that names the step and the parameter, and leave the last good checkpoint as it was. Non-finite
weights are never saved: the check before each save stops the run (exit 3) and `latest` stays on the last good
checkpoint, whether a NaN was written into the weights or an infinite learning rate made them all NaN."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from phi1.testing.hostile import assert_clear_error, python, run_bounded
from phi1.testing.synthetic import write_synthetic_dataset
from phi1.train import run as train_main
from phi1.training.checkpointing import (
    find_checkpoint,
    load_model_from_training_checkpoint,
    read_trainer_state,
)
from phi1.training.config import load_config
from phi1.training.fault import (
    NonFiniteTrainingError,
    file_sha256,
    nonfinite_weights,
    verify_checkpoint,
    weights_are_finite,
)
from phi1.training.metrics import read_jsonl
from phi1.training.trainer import train

POISONED = "layers.1.mlp.fc2.weight"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    prefix, tokenizer = write_synthetic_dataset(tmp_path_factory.mktemp("data"))
    return prefix, tokenizer


def overrides(data, run_dir, **extra) -> list[str]:
    prefix, tokenizer = data
    values = {
        "model.preset": "phi-1-nano", "data.path": prefix, "data.tokenizer_model": tokenizer, "data.seq_len": 32,
        "data.split": "100,0,0", "batch.global_batch_size": 4, "batch.micro_batch_size": 2,
        "schedule.train_steps": 6, "schedule.warmup_steps": 1, "checkpoint.dir": run_dir, "checkpoint.interval": 2,
        "checkpoint.keep_last": 0, "logging.interval": 1, "eval.interval": 0, "logging.tensorboard_dir": "",
        "faults.inject_nan_param": POISONED, "guard.max_consecutive_nonfinite": 3,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def test_one_nan_gradient_skips_its_step_and_is_counted(data, tmp_path) -> None:
    run = tmp_path / "run"
    train(load_config(None, overrides(data, run, **{"faults.inject_nan_at": "[3]"})))
    records = {r["iteration"]: r for r in read_jsonl(run / "metrics.jsonl") if "step_losses" in r}
    assert [records[i]["skipped_in_interval"] for i in range(1, 7)] == [0, 0, 1, 0, 0, 0]
    assert math.isnan(records[3]["grad_norm"])
    assert [records[i]["nonfinite_steps"] for i in range(1, 7)] == [0, 0, 1, 1, 1, 1]
    assert records[4]["lr"] == records[3]["lr"]  # the skipped step did not advance the schedule
    state = read_trainer_state(find_checkpoint(run))
    assert state["iteration"] == 6 and state["schedule"]["num_updates"] == 5 and state["nonfinite"]["total"] == 1
    _, weights = load_model_from_training_checkpoint(run)
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_k_bad_steps_in_a_row_stop_with_a_diagnosis(data, tmp_path) -> None:
    run = tmp_path / "run"
    config = load_config(None, overrides(data, run, **{"faults.inject_nan_at": "[3,4,5]"}))
    with pytest.raises(NonFiniteTrainingError) as caught:
        train(config)
    message = str(caught.value)
    assert "3 consecutive steps" in message and "iterations 3 to 5" in message and POISONED in message
    diagnosis = caught.value.diagnosis
    assert diagnosis["first_bad_iteration"] == 3 and diagnosis["last_bad_iteration"] == 5
    assert diagnosis["nonfinite_gradients"] == [POISONED]
    assert [step["iteration"] for step in diagnosis["steps"]] == [3, 4, 5]
    assert json.loads((run / "nonfinite_diagnosis.json").read_text()) == diagnosis
    # iteration 4's save was withheld during the streak: the newest checkpoint is still iteration 2, intact
    assert find_checkpoint(run) == run / "iter_0000002" and not (run / "iter_0000004").exists()
    assert diagnosis["last_good_checkpoint"] == str(run / "iter_0000002")
    assert verify_checkpoint(run / "iter_0000002")


def test_the_cli_exits_with_code_3_and_leaves_the_checkpoint_bytes_alone(data, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    assert train_main(overrides(data, run, **{"schedule.train_steps": 2})) == 0
    shard = run / "iter_0000002" / "model_tp00-of-01.safetensors"
    before = file_sha256(shard)
    code = train_main(overrides(data, run, **{"schedule.train_steps": 8, "faults.inject_nan_at": "[3,4,5,6]",
                                                "guard.max_consecutive_nonfinite": 2}))
    assert code == 3
    assert "2 consecutive steps" in capsys.readouterr().err
    assert file_sha256(shard) == before and find_checkpoint(run) == run / "iter_0000002"


def test_nan_weights_are_never_saved_and_stop_the_run(data, tmp_path) -> None:
    """A NaN written into one weight after iteration 4's update: the save of iteration 4 is refused, the run
    stops with a diagnosis naming the parameter, and `latest` still points at iteration 2, intact."""
    run = tmp_path / "run"
    config = load_config(None, overrides(data, run, **{"faults.inject_nan_weights_at": "[4]"}))
    with pytest.raises(NonFiniteTrainingError) as caught:
        train(config)
    assert "iteration 4" in str(caught.value) and POISONED in str(caught.value)
    diagnosis = caught.value.diagnosis
    assert diagnosis["reason"] == "non-finite weights" and diagnosis["iteration"] == 4
    assert diagnosis["nonfinite_weights"] == [POISONED]
    assert diagnosis["last_good_checkpoint"] == str(run / "iter_0000002")
    assert json.loads((run / "nonfinite_diagnosis.json").read_text()) == diagnosis
    assert find_checkpoint(run) == run / "iter_0000002" and (run / "latest").read_text().strip() == "2"
    assert not (run / "iter_0000004").exists() and not (run / "iter_0000004.tmp").exists()
    assert verify_checkpoint(run / "iter_0000002")
    _, weights = load_model_from_training_checkpoint(run)
    assert all(torch.isfinite(w).all() for w in weights.values())


@pytest.mark.slow
def test_an_infinite_learning_rate_never_ends_done(data, tmp_path) -> None:
    """`optim.lr=inf`, the real command: either validation refuses it (exit 2 naming optim.lr), or training
    stops at its first save with exit 3 and a diagnosis; never "done", never a checkpoint or `latest`."""
    run = tmp_path / "run"
    argv = python("-m", "phi1.train", *overrides(data, run, **{"optim.lr": "inf", "optim.min_lr": 0.0,
                                                               "schedule.train_steps": 3}))
    outcome = run_bounded(argv, timeout_s=300, memory_mb=None)
    assert not outcome.timed_out, outcome.describe()
    if outcome.returncode == 2:
        assert_clear_error(outcome, names="optim.lr")
    else:
        assert outcome.returncode == 3, outcome.describe()
        assert "Traceback" not in outcome.stderr and "the weights are not finite" in outcome.stderr
        diagnosis = json.loads((run / "nonfinite_diagnosis.json").read_text())
        # iteration 1's update makes every decayed weight NaN; iteration 2's save is withheld during the streak
        # of NaN losses, and the final save at iteration 3 is refused by the weight check
        assert diagnosis["reason"] == "non-finite weights" and diagnosis["iteration"] == 3
        assert [step["iteration"] for step in diagnosis["steps"]] == [2, 3]
        assert POISONED in diagnosis["nonfinite_weights"] and diagnosis["lr"] == "inf"
        assert "done:" not in outcome.stdout
    assert find_checkpoint(run) is None and not (run / "latest").exists()
    assert not list(run.glob("iter_*"))


def _weight_check_rank(rank: int, world_size: int, store_path: str, poisoned_rank: int | None, out_dir: str) -> None:
    store = dist.FileStore(store_path, world_size)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, store=store)
    try:
        torch.manual_seed(rank)
        # each rank holds its own shard, as under tensor parallelism: fp32 and fp16 tensors, one large-but-finite
        shard = torch.nn.ParameterDict({
            "a": torch.nn.Parameter(torch.randn(64, 32)),
            "b": torch.nn.Parameter(torch.full((8,), 60000.0, dtype=torch.float16)),
        })
        if rank == poisoned_rank:
            with torch.no_grad():
                shard["a"][3, 5] = float("nan")
        verdict = weights_are_finite(shard, world_size)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"finite": verdict, "names": nonfinite_weights(shard)}))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("poisoned_rank", [None, 1])
def test_weight_check_is_agreed_by_every_rank(tmp_path, poisoned_rank) -> None:
    """A NaN in rank 1's shard only: both ranks answer 'not finite' (one all-reduced flag), and only rank 1
    names the parameter; with no NaN both answer 'finite' (60000 in fp16 is large but finite)."""
    mp.spawn(_weight_check_rank, args=(2, str(tmp_path / "store"), poisoned_rank, str(tmp_path)), nprocs=2)
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert [r["finite"] for r in results] == [poisoned_rank is None] * 2
    assert [r["names"] for r in results] == [[], [] if poisoned_rank is None else ["a"]]
