"""tools/scaling_sweep.py end to end on CPU (1 and 2 processes, a few steps): real runs, a table and a plot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from phi1.planning.collectives import fit_link

REPO = Path(__file__).resolve().parents[1]


def test_ring_fit_recovers_bandwidth_and_latency() -> None:
    sizes = [1 << 16, 1 << 20, 1 << 24]
    ranks, gbps, latency_us = 4, 5.0, 30.0
    seconds = [2 * (ranks - 1) / ranks * s / (gbps * 1e9) + 2 * (ranks - 1) * latency_us * 1e-6 for s in sizes]
    fitted_gbps, fitted_latency = fit_link(sizes, seconds, ranks)
    assert fitted_gbps == pytest.approx(gbps, rel=1e-6) and fitted_latency == pytest.approx(latency_us, rel=1e-6)


@pytest.mark.slow
def test_scaling_sweep_writes_table_and_plot(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "scaling"
    result = subprocess.run(
        [sys.executable, "tools/scaling_sweep.py", "--procs", "1,2", "--steps", "3", "--warmup", "1",
         "--strong-global-batch", "4", "--weak-micro-batch", "2", "--seq-len", "64", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=400,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (out / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    points = json.loads((out / "scaling.json").read_text())["points"]
    assert sorted((p["mode"], p["processes"]) for p in points) == [("strong", 1), ("strong", 2), ("weak", 1), ("weak", 2)]
    assert all(p["measured_step_s"] > 0 and p["predicted_step_s"] > 0 for p in points)
    assert "| strong | 2 |" in (out / "scaling.md").read_text()
