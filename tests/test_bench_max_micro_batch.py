"""benchmarks/max_micro_batch.py: the search over micro-batches, and its trials run for real on CPU."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from phi1.planning.search import largest_fitting

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "max_micro_batch.py"


@pytest.mark.parametrize("boundary", [0, 1, 2, 3, 5, 17, 63, 64, 100])
def test_search_finds_the_boundary_in_logarithmic_trials(boundary):
    calls = []

    def fits(m):
        calls.append(m)
        return m <= boundary

    upper = 64
    assert largest_fitting(fits, upper) == min(boundary, upper)
    assert len(calls) <= 2 * math.ceil(math.log2(upper)) + 1
    assert all(1 <= m <= upper for m in calls)


def _run(tmp_path, *extra):
    out = tmp_path / "result.json"
    command = [sys.executable, str(SCRIPT), "--preset", "phi-1-nano", "--seq-len", "32", "--device", "cpu",
               "--json-out", str(out), *extra]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {(r["system"], r["activation_checkpointing"]): r for r in json.loads(out.read_text())}, result.stdout


@pytest.mark.slow
def test_real_trials_on_cpu_respect_the_limit(tmp_path):
    results, stdout = _run(tmp_path, "--memory-limit-gib", "64", "--max-micro-batch", "2", "--checkpointing", "off,on")
    for key in (("phi1", False), ("phi1", True), ("hf", False), ("hf", True)):
        assert results[key]["max_micro_batch"] == 2 and results[key]["capped"], key
        assert 0.001 < results[key]["peak_memory_gib"] < 64  # what the model and its step added
    assert "max micro-batch" in stdout
    # A limit below what even the nano model and its optimizer state take (~ 3 MiB): nothing fits.
    results, _ = _run(tmp_path, "--memory-limit-gib", "0.0005", "--systems", "phi1", "--checkpointing", "off")
    assert results["phi1", False]["max_micro_batch"] == 0


def test_cpu_needs_a_limit():
    result = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--memory-limit-gib is required on CPU" in result.stderr
