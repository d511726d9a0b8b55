"""Exact resume, and a crash during a checkpoint save, through the real entry point (`python -m phi1.train`)."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

from phi1.testing.runs import (
    assert_succeeded,
    run_overrides,
    run_train,
    step_losses,
    synthetic_data_dir,
    train_env,
)
from phi1.training.checkpointing import (
    find_checkpoint,
    load_model_from_training_checkpoint,
    read_trainer_state,
)
from phi1.training.metrics import read_jsonl


def base_args(data_dir: Path, run_dir: Path, **extra) -> list[str]:
    values = {
        "model.attn_dropout": 0.1, "model.resid_dropout": 0.1, "precision": "auto", "batch.global_batch_size": 8,
        "schedule.train_steps": 8, "checkpoint.interval": 100, "eval.interval": 3, "eval.iters": 2,
    }
    return run_overrides(data_dir, run_dir, **{**values, **extra})


def torchrun(args: list[str], nproc: int = 2, timeout: float = 150) -> subprocess.CompletedProcess:
    return run_train(args, nproc, env=train_env(DS_ACCELERATOR="cpu"), timeout=timeout)


def single(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return run_train(args, 1, env=train_env(DS_ACCELERATOR="cpu"), timeout=timeout)


check = assert_succeeded


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return synthetic_data_dir(tmp_path_factory)


@pytest.mark.slow
def test_resume_is_bit_exact_with_two_processes(data_dir, tmp_path) -> None:
    """Stopped at step 4 and resumed: the same loss bits at every later step, the same consumed samples,
    with dropout on (so every RNG state must come back) and DP = 2 with gradient accumulation 2."""
    full, split = tmp_path / "full", tmp_path / "split"
    check(torchrun(base_args(data_dir, full)))
    first = torchrun(base_args(data_dir, split, **{"checkpoint.exit_at_iteration": 4}))
    check(first)
    assert read_trainer_state(find_checkpoint(split))["iteration"] == 4
    second = torchrun(base_args(data_dir, split))
    check(second)
    assert "resuming from" in second.stdout

    expected, got = step_losses(full), step_losses(split)
    assert sorted(got) == list(range(1, 9)) == sorted(expected)
    for iteration in range(1, 9):
        assert got[iteration] == expected[iteration], f"iteration {iteration}: {got[iteration]!r} != {expected[iteration]!r}"
    full_state, split_state = read_trainer_state(find_checkpoint(full)), read_trainer_state(find_checkpoint(split))
    assert full_state["consumed_samples"] == split_state["consumed_samples"] == 8 * 8
    assert full_state["schedule"] == split_state["schedule"]
    full_weights = load_model_from_training_checkpoint(full)[1]
    split_weights = load_model_from_training_checkpoint(split)[1]
    assert all((full_weights[k] == split_weights[k]).all() for k in full_weights)


@pytest.mark.slow
def test_kill_during_save_leaves_previous_checkpoint(data_dir, tmp_path) -> None:
    """SIGKILL half-way through writing iteration 4's checkpoint: `latest` still names iteration 2, which
    loads, and the next launch resumes from it and finishes."""
    run = tmp_path / "run"
    args = base_args(data_dir, run, **{"schedule.train_steps": 6, "checkpoint.interval": 2, "checkpoint.keep_last": 1})
    killed = single(args + ["faults.kill_during_save_at=4"])
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-2000:]
    assert (run / "iter_0000004.tmp").is_dir()  # the interrupted save, under its temporary name
    assert not (run / "iter_0000004").exists()
    assert (run / "latest").read_text().strip() == "2"
    assert find_checkpoint(run) == run / "iter_0000002"
    config, weights = load_model_from_training_checkpoint(run)
    assert config.n_layer == 2 and weights["lm_head.weight"].shape[0] == config.vocab_size

    resumed = single(args)
    check(resumed)
    assert f"resuming from {run / 'iter_0000002'}" in resumed.stdout
    assert not (run / "iter_0000004.tmp").exists()
    assert read_trainer_state(find_checkpoint(run))["iteration"] == 6
    assert sorted(p.name for p in run.glob("iter_*")) == ["iter_0000006"]  # keep_last 1
    iterations = [r["iteration"] for r in read_jsonl(run / "metrics.jsonl") if "step_losses" in r]
    assert iterations == [1, 2, 3, 4, 3, 4, 5, 6]  # steps 3-4 ran again after the crash
