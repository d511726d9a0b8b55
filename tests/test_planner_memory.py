"""The planner's memory per process against the measured peak of real Trainer steps (one CPU configuration;
benchmarks/bench_planner_memory.py runs the full table)."""

from __future__ import annotations

from pathlib import Path

import pytest

from phi1.testing.synthetic import write_synthetic_dataset
from phi1.training.measure_memory import CONFIGS, base_overrides, measure_peak_memory


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to measure the peak RSS")
def test_predicted_memory_within_ten_percent_of_measured_peak(tmp_path) -> None:
    write_synthetic_dataset(tmp_path / "data")
    nproc, overrides = CONFIGS["mb4"]
    result = measure_peak_memory(base_overrides(tmp_path / "data", tmp_path / "run") + overrides, nproc=nproc,
                                 steps=2, timeout=240)
    assert result["peak_reset"], "the peak RSS could not be reset at the baseline"
    assert result["measured"] > 300 * 2**20  # big enough that start-up noise is small next to it
    error = result["predicted"] / result["measured"] - 1
    assert abs(error) < 0.10, result
