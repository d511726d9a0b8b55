"""benchmarks/train_throughput.py runs on CPU with a small preset, ours and HuggingFace's (issue 8)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_throughput_benchmark_reports_both_rows(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "rows.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"), "--preset", "phi-1-nano", "--micro-batch", "2",
         "--steps", "2", "--warmup", "1", "--compare-hf", "--loss-chunk-size", "64", "--json-out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu"
    systems = [row["system"] for row in report["rows"]]
    assert systems == ["phi1", "HF PhiForCausalLM"]
    for row in report["rows"]:
        assert row["tokens_per_second"] > 0 and row["seq_len"] == 128
        assert row["mfu"] is None  # no peak FLOP/s is known for a CPU: no made-up MFU
        assert row["peak_memory_gib"] is None  # CPU RSS is process-wide: no per-row figure
    assert "ratio phi1 / HF tokens/s" in result.stdout
