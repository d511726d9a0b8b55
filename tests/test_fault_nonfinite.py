"""The non-finite guard: an injected NaN gradient skips its step and is counted; K in a row stop the run with a
diagnosis that names the step and the parameter, and leave the last good checkpoint as it was."""

from __future__ import annotations

import json
import math

import pytest
import torch

from phi1.train import main as train_main
from phi1.training.checkpointing import (
    find_checkpoint,
    load_model_from_training_checkpoint,
    read_trainer_state,
)
from phi1.training.config import load_config
from phi1.training.fault import NonFiniteTrainingError, file_sha256, verify_checkpoint
from phi1.training.loop import train
from phi1.training.metrics import read_jsonl
from phi1.training.synthetic import write_synthetic_dataset

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
