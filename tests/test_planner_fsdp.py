"""The planner's FSDP2 memory (phi1.planning.fsdp): the parts it shards and gathers, the dry run and plan.py
printing it, and the total against the measured peak of real FSDP2 Trainer steps on CPU (one configuration;
benchmarks/bench_fsdp_memory.py runs the table)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from phi1.core.config import get_preset
from phi1.planning.memory import GIB, estimate_memory, make_layout, parameter_counts
from phi1.testing.hostile import REPO, python, run_bounded
from phi1.testing.synthetic import write_synthetic_dataset
from phi1.training.config import load_config, validate_config
from phi1.training.measure_memory import FSDP_CONFIGS, base_overrides, measure_peak_memory
from phi1.training.plan import dry_run_report, memory_layout


def _layout(config, **changes):
    fields = dict(tensor_parallel=1, data_parallel=8, zero_stage=0, micro_batch_size=2, gradient_accumulation=1,
                  seq_len=2048, precision="bf16", activation_checkpointing=False, sequence_parallel=False,
                  loss_chunk_size=0, gpu=True, fsdp=True)
    return make_layout(config, **{**fields, **changes})


def test_fsdp_shards_the_model_states_and_gathers_a_block_at_a_time() -> None:
    config = get_preset("phi-1")
    counts = parameter_counts(config)
    fsdp = estimate_memory(config, _layout(config))
    ddp = estimate_memory(config, _layout(config, fsdp=False))
    # fp32 weights, gradients and both AdamW moments, 1/8 each on 8 ranks (DDP keeps them whole)
    assert (fsdp.weights, fsdp.gradients, fsdp.optimizer) == (4 * counts.per_rank / 8, 4 * counts.per_rank / 8,
                                                              8 * counts.per_rank / 8)
    assert (ddp.weights, ddp.optimizer) == (4 * counts.per_rank, 8 * counts.per_rank)
    assert fsdp.activations == ddp.activations  # FSDP shards the model, not the batch
    assert fsdp.total < ddp.total - 8 * counts.per_rank * 7 / 8  # at least the AdamW states saved
    # twice the ranks: the sharded states halve; what is gathered (the root, a block or two) does not
    sixteen = estimate_memory(config, _layout(config, data_parallel=16))
    assert sixteen.weights == fsdp.weights / 2
    assert fsdp.buffers == sixteen.buffers > 2 * 2 * counts.per_layer  # two 16-bit blocks at least
    # gradient accumulation holds every block's full fp32 gradient between micro-batches
    accumulating = estimate_memory(config, _layout(config, gradient_accumulation=4))
    assert accumulating.total - fsdp.total == pytest.approx(4 * counts.per_rank, rel=0.05)


def test_cpu_offload_moves_the_sharded_states_to_host_memory() -> None:
    config = get_preset("phi-1")
    on_device = estimate_memory(config, _layout(config))
    offloaded = estimate_memory(config, _layout(config, fsdp_cpu_offload=True))
    sharded = on_device.weights + on_device.gradients + on_device.optimizer
    assert (offloaded.weights, offloaded.gradients, offloaded.optimizer) == (0.0, 0.0, 0.0)
    counts = parameter_counts(config)
    # and the CPU step's foreach AdamW temporaries (sqrt(v) of the decayed shards)
    assert offloaded.host == pytest.approx(sharded + 4 * counts.decay / 8)
    assert offloaded.total < on_device.total - on_device.weights - on_device.optimizer + 1
    # on a CPU rank "offloaded" is the same memory: nothing leaves the estimate
    cpu = dict(gpu=False)
    assert (estimate_memory(config, _layout(config, fsdp_cpu_offload=True, **cpu)).total
            == estimate_memory(config, _layout(config, **cpu)).total)
    from phi1.planning.fsdp import fsdp_memory

    with pytest.raises(ValueError, match="zero_stage 0"):
        fsdp_memory(config, _layout(config, zero_stage=2))


def test_dry_run_counts_fsdp2_not_ddp() -> None:
    overrides = ["parallel.zero_stage=0", "parallel.fsdp=true", "precision=bf16"]
    config = load_config(REPO / "configs/pretrain_phi1_small.yaml", overrides)
    model_config = validate_config(config, 4, check_files=False, device="cuda")
    layout = memory_layout(config, model_config, 4)
    assert layout.fsdp and not layout.fsdp_cpu_offload
    report = dry_run_report(config, model_config, 4)
    assert "FSDP2" in report and "DDP" not in report.split("\n")[1]
    fsdp_peak = estimate_memory(model_config, layout).total
    assert f"peak {fsdp_peak / GIB:.2f} GiB" in report
    assert fsdp_peak < estimate_memory(model_config, dataclasses.replace(layout, fsdp=False)).total
    offload = load_config(REPO / "configs/pretrain_phi1_small.yaml", [*overrides, "parallel.fsdp_cpu_offload=true"])
    text = dry_run_report(offload, validate_config(offload, 4, check_files=False, device="cuda"), 4)
    assert "FSDP2 with CPU offload" in text and "GiB more in CPU memory: offloaded)" in text


def test_plan_py_searches_and_prints_fsdp2() -> None:
    plan = run_bounded(python("tools/plan.py", "--preset", "phi-1", "--gpus", "8", "--top", "3", "--no-paper",
                              "parallel.fsdp=true"), timeout_s=180, memory_mb=None)
    assert plan.returncode == 0, plan.describe()
    rows = [line for line in plan.stdout.splitlines() if line.startswith("TP")]
    assert len(rows) == 3 and all("FSDP2" in row for row in rows), plan.stdout


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to measure the peak RSS")
def test_fsdp_memory_within_ten_percent_of_measured_peak(tmp_path) -> None:
    write_synthetic_dataset(tmp_path / "data")
    nproc, overrides = FSDP_CONFIGS["fsdp-dp2-mb4"]
    result = measure_peak_memory(base_overrides(tmp_path / "data", tmp_path / "run") + overrides, nproc=nproc,
                                 steps=2, timeout=240)
    assert result["peak_reset"], "the peak RSS could not be reset at the baseline"
    assert result["measured"] > 300 * 2**20  # big enough that start-up noise is small next to it
    error = result["predicted"] / result["measured"] - 1
    assert abs(error) < 0.10, result
    # what the dry run counted before FSDP2 was modelled (DDP's whole states) is far off
    assert result["as_ddp"] / result["measured"] - 1 > 0.20, result
