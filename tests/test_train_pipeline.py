"""Pipeline parallelism through the real trainer (`python -m phi1.train parallel.pipeline_parallel=P`).

Every layout trains phi-1-nano with 4 blocks (dropout off, fp32) for 10 steps on the same global batches of the
synthetic corpus as one process does, and must log the one-process loss at every step, and the same validation
losses, within 1e-5 relative. At step 1 every parameter's gradient, gathered from its stage and TP shards under
the full model's name, equals the one-process model's. With dropout on, a PP=2 run stopped at step 4 and resumed
logs the uninterrupted run's losses bit for bit. The peak memory of each stage is checked against the planner.
"""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import pytest
import torch

from phi1.testing.runs import (
    assert_succeeded,
    run_overrides,
    run_train,
    step_losses,
    synthetic_data_dir,
    train_env,
)
from phi1.training.metrics import read_jsonl

STEPS = 10
LOSS_RTOL = 1e-5


def _overrides(data_dir: Path, run_dir: Path, **extra) -> list[str]:
    values = {"model.n_layer": 4, "batch.global_batch_size": 8, "schedule.train_steps": STEPS,
              "checkpoint.interval": 100, "eval.interval": 5, "eval.iters": 2}
    return run_overrides(data_dir, run_dir, **{**values, **extra})


def _train(args: list[str], nproc: int, timeout: float = 900) -> subprocess.CompletedProcess:
    result = run_train(args, nproc, env=train_env(DS_ACCELERATOR="cpu"), timeout=timeout)
    assert_succeeded(result)
    return result


def _logged(run_dir: Path) -> tuple[dict[int, float], dict[int, float]]:
    """(step losses, validation losses) by iteration, from the run's metrics.jsonl."""
    validation = {r["iteration"]: r["val_loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "val_loss" in r}
    return step_losses(run_dir), validation


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return synthetic_data_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def one_process(data_dir, tmp_path_factory) -> tuple[dict[int, float], dict[int, float]]:
    run_dir = tmp_path_factory.mktemp("one-process")
    _train(_overrides(data_dir, run_dir), nproc=1)
    return _logged(run_dir)


# name: (processes, overrides)
LAYOUTS: dict[str, tuple[int, dict]] = {
    "pp2-1f1b": (2, {"parallel.pipeline_parallel": 2}),
    "pp2-interleaved-v2": (2, {"parallel.pipeline_parallel": 2, "parallel.pipeline_schedule": "interleaved",
                               "parallel.virtual_stages": 2}),
    "pp2-tp2-sp": (4, {"parallel.pipeline_parallel": 2, "parallel.tensor_parallel": 2,
                       "parallel.sequence_parallel": "true"}),
    # Under DP = 2 each replica validates eval.iters micro-batches of its own: 1 each covers the one-process run's 2.
    "pp2-dp2": (4, {"parallel.pipeline_parallel": 2, "eval.iters": 1}),
    "pp4": (4, {"parallel.pipeline_parallel": 4}),
    # Composition with the rest of the trainer: ZeRO-1, activation checkpointing, the chunked loss, GPipe.
    "pp2-dp2-zero1": (4, {"parallel.pipeline_parallel": 2, "parallel.zero_stage": 1, "eval.iters": 1}),
    "pp2-checkpointing-chunked-loss": (2, {"parallel.pipeline_parallel": 2, "activation_checkpointing": "full",
                                           "loss_chunk_size": 16}),
    "pp2-gpipe": (2, {"parallel.pipeline_parallel": 2, "parallel.pipeline_schedule": "gpipe"}),
    "pp2-explicit-split": (2, {"parallel.pipeline_parallel": 2, "parallel.pipeline_split": "[1,3]"}),
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_pipeline_training_logs_the_one_process_losses(layout, data_dir, one_process, tmp_path):
    nproc, extra = LAYOUTS[layout]
    run_dir = tmp_path / layout
    result = _train(_overrides(data_dir, run_dir, **extra), nproc=nproc)
    assert f"pipeline parallel {extra['parallel.pipeline_parallel']}" in result.stdout  # the strategy ran
    want_steps, want_validation = one_process
    got_steps, got_validation = _logged(run_dir)
    assert sorted(got_steps) == sorted(want_steps) == list(range(1, STEPS + 1))
    for iteration, want in want_steps.items():
        got = got_steps[iteration]
        assert abs(got - want) <= LOSS_RTOL * abs(want), f"{layout} step {iteration}: loss {got} vs one process {want}"
    assert sorted(got_validation) == sorted(want_validation) == [5, 10]
    for iteration, want in want_validation.items():
        got = got_validation[iteration]
        assert abs(got - want) <= LOSS_RTOL * abs(want), f"{layout} validation at {iteration}: {got} vs {want}"
    assert want_steps[STEPS] < want_steps[1] - 0.5, "the 10 steps must actually train"


# ----------------------------------------------------------------------------------------------------------------
# Gradients at step 1, at the strategy level (the trainer's own strategy, stepped by hand)


def _trainer_for(overrides: list[str], world_size: int):
    from phi1.parallel.state import init_distributed
    from phi1.training.config import load_config, validate_config
    from phi1.training.trainer import Trainer, resolve_config

    config = load_config(None, overrides)
    resolve_config(config, world_size)
    model_config = validate_config(config, world_size)
    state = init_distributed(config.parallel.tensor_parallel, pipeline_parallel_size=config.parallel.pipeline_parallel)
    return Trainer(config, model_config, state), config, state


def _first_step_batches(trainer, config, state) -> list[dict[str, torch.Tensor]]:
    from phi1.training.data_loading import micro_batches

    data = micro_batches(trainer.train_data, config, state, 0)
    return [next(data) for _ in range(trainer.strategy.accum)]


def _pipeline_grads_worker(rank: int, world_size: int, overrides: list[str]) -> dict:
    from phi1.parallel.layers import tensor_parallel_dims

    trainer, config, state = _trainer_for(overrides, world_size)
    try:
        strategy = trainer.strategy
        batches = _first_step_batches(trainer, config, state)
        loss = strategy.runner.forward_backward(torch.cat([b["input_ids"] for b in batches]),
                                                torch.cat([b["labels"] for b in batches]))
        dims = tensor_parallel_dims(strategy.view)
        grads = {name: (p.grad.clone(), -1 if dims[name] is None else dims[name])
                 for name, p in strategy.view.named_parameters()}
        return {"grads": grads, "loss": loss, "coords": [state.dp_rank, state.pp_rank, state.tp_rank]}
    finally:
        trainer.close()


def _one_process_grads(overrides: list[str]) -> tuple[dict[str, torch.Tensor], float]:
    trainer, config, state = _trainer_for(overrides, 1)
    try:
        model = trainer.strategy.modules[0]
        batches = _first_step_batches(trainer, config, state)
        total = 0.0
        for batch in batches:
            loss = model(batch["input_ids"], labels=batch["labels"]).loss
            (loss / len(batches)).backward()
            total += loss.item()
        return {name: p.grad.clone() for name, p in model.named_parameters()}, total / len(batches)
    finally:
        trainer.close()


GRAD_LAYOUTS = ["pp2-1f1b", "pp2-interleaved-v2", "pp2-tp2-sp", "pp2-dp2", "pp4"]


@pytest.mark.slow
@pytest.mark.parametrize("layout", GRAD_LAYOUTS)
def test_first_step_gradients_equal_one_process(layout, data_dir, tmp_path):
    from phi1.testing.spawn import run_on_gloo

    nproc, extra = LAYOUTS[layout]
    want, want_loss = _one_process_grads(_overrides(data_dir, tmp_path / "one"))
    results = run_on_gloo(_pipeline_grads_worker, nproc, _overrides(data_dir, tmp_path / layout, **extra),
                          timeout_s=900)
    tp = extra.get("parallel.tensor_parallel", 1)
    shards: dict[str, dict[int, tuple[torch.Tensor, int]]] = {}
    for result in results:
        assert abs(result["loss"] - want_loss) <= LOSS_RTOL * want_loss
        dp_rank, _, tp_rank = result["coords"]
        for name, (grad, dim) in result["grads"].items():
            if dp_rank == 0:
                shards.setdefault(name, {})[tp_rank] = (grad, dim)
    assert sorted(shards) == sorted(want), "the stages together must hold exactly the model's parameters"
    for name, by_rank in shards.items():
        dim = by_rank[0][1]
        got = by_rank[0][0] if dim < 0 else torch.cat([by_rank[r][0] for r in range(tp)], dim=dim)
        err = (got - want[name]).abs().max().item()
        scale = want[name].abs().max().item()
        assert err <= 1e-5 * scale + 1e-7, f"{layout}: gradient of {name} off by {err:.3e} (largest {scale:.3e})"


# ----------------------------------------------------------------------------------------------------------------
# Exact resume with dropout on


@pytest.mark.slow
def test_pipeline_resume_is_bit_exact_with_dropout(data_dir, one_process, tmp_path):
    """PP = 2 with dropout: stopped at step 4 (a DCP checkpoint) and resumed, every later step logs the same loss
    bits as the uninterrupted run, and the validation losses too."""
    extra = {"parallel.pipeline_parallel": 2, "model.attn_dropout": 0.1, "model.resid_dropout": 0.1,
             "model.embd_dropout": 0.1, "schedule.train_steps": 8, "eval.interval": 3}
    full, split = tmp_path / "full", tmp_path / "split"
    _train(_overrides(data_dir, full, **extra), nproc=2)
    _train(_overrides(data_dir, split, **extra, **{"checkpoint.exit_at_iteration": 4}), nproc=2)
    assert (split / "iter_0000004" / ".metadata").is_file(), "a pipeline run checkpoints in the DCP format"
    resumed = _train(_overrides(data_dir, split, **extra), nproc=2)
    assert f"resuming from {split / 'iter_0000004'}" in resumed.stdout
    want_steps, want_validation = _logged(full)
    got_steps, got_validation = _logged(split)
    assert sorted(got_steps) == list(range(1, 9))
    for iteration in range(1, 9):
        assert got_steps[iteration] == want_steps[iteration], f"step {iteration}"
    assert got_validation == want_validation and sorted(want_validation) == [3, 6, 8]
    # the same first batch and weights without dropout give another loss: the masks are really drawn
    assert abs(want_steps[1] - one_process[0][1]) > 1e-3, "dropout must be on for the test to hold"


# ----------------------------------------------------------------------------------------------------------------
# The non-finite guard under a pipeline


@pytest.mark.slow
def test_nan_gradient_on_one_stage_skips_the_step_on_every_rank(data_dir, tmp_path):
    """A NaN gradient in the first stage's block makes the global norm NaN on both pipeline ranks: step 3 is
    skipped and counted by the guard, and the run goes on and finishes."""
    run = tmp_path / "nan"
    _train(_overrides(data_dir, run, **{"parallel.pipeline_parallel": 2, "schedule.train_steps": 4,
                                        "eval.interval": 0, "faults.inject_nan_at": "[3]",
                                        "faults.inject_nan_param": "layers.0.mlp.fc2.weight"}), nproc=2)
    records = [r for r in read_jsonl(run / "metrics.jsonl") if "step_losses" in r]
    assert [r["iteration"] for r in records] == [1, 2, 3, 4]
    assert [r["skipped_in_interval"] for r in records] == [0, 0, 1, 0]
    assert records[-1]["nonfinite_steps"] == 1 and records[-1]["skipped_steps"] == 1
    assert math.isnan(records[2]["grad_norm"]) and all(math.isfinite(r["loss"]) for r in records)


# ----------------------------------------------------------------------------------------------------------------
# Planner memory per stage against the measured peak


@pytest.mark.slow
def test_stage_memory_matches_the_measured_peak():
    """PP = 2, m = 4 micro-batches under 1F1B: the first rank holds 2 micro-batches of activations, the last one;
    each rank's planner estimate is within 10% of its measured peak (benchmarks/bench_pipeline_memory.py)."""
    from phi1.core.config import get_preset
    from phi1.planning.measure_pipeline import measure_stage_memory

    config = get_preset("phi-1-tiny", n_layer=4, d_model=512, n_head=8, d_mlp=2048, vocab_size=8192, max_seq_len=256)
    rows = measure_stage_memory(config, 2, micro_batches=4, micro_batch_size=4, seq_len=256, steps=2)
    assert [row.in_flight for row in rows] == [2, 1]
    for row in rows:
        assert row.measured > 100 * 2**20, f"rank {row.pp_rank}: implausibly small measured peak {row.measured}"
        assert abs(row.error) <= 0.10, (f"rank {row.pp_rank}: predicted {row.predicted / 2**20:.1f} MiB, measured "
                                        f"{row.measured / 2**20:.1f} MiB")
