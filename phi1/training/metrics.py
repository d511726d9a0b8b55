"""Throughput accounting (tokens/s, TFLOP/s, MFU) and the metrics sinks: console, TensorBoard, JSONL.

MFU is counted as PaLM and nanoGPT count it: model FLOPs per token `6 N + 12 L d T` (N without the input
embedding; activation recomputation not counted), times tokens per second, divided by the number of devices
and by the device's peak dense FLOP/s at the precision the run computes in. The peak is looked up by the
device's name in PEAK_TFLOPS; a device that is not there (a CPU, a new GPU) gets no MFU unless
`logging.peak_tflops` says its peak.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import time
from pathlib import Path

import torch

logger = logging.getLogger("phi1.train")

# Peak dense TFLOP/s per device (no 2:4 sparsity), by the precision of the matmuls. fp32 means plain IEEE
# fp32 (TF32 tensor-core figures are not used: phi1 does not enable TF32). Matched against the device name
# as CUDA reports it, most specific pattern first.
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0}),
    ("H100 NVL", {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0}),
    ("H100", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),  # SXM; "NVIDIA H100 80GB HBM3"
    ("H200", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    ("GH200", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6}),
    ("L4", {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3}),
    ("V100", {"fp16": 125.0, "fp32": 15.7}),
    ("MI300X", {"bf16": 1307.0, "fp16": 1307.0, "fp32": 163.4}),
    ("MI250X", {"bf16": 383.0, "fp16": 383.0, "fp32": 47.9}),
]

# The ordering above matters: "GH200" must not be read as "H200" first, nor "H100 PCIe" as "H100".
_MATCH_ORDER = sorted(PEAK_TFLOPS, key=lambda item: -len(item[0]))


def device_name(device: torch.device) -> str:
    """The accelerator's marketing name ("NVIDIA H100 80GB HBM3"), or "cpu"."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def peak_tflops(name: str, precision: str, override: float | None = None) -> float | None:
    """Peak dense TFLOP/s of the device called `name` at `precision`; `override` wins; None when unknown."""
    if override is not None:
        return override
    for pattern, peaks in _MATCH_ORDER:
        if pattern.lower() in name.lower():
            return peaks.get(precision)
    return None


def model_flops_per_second(flops_per_token: int, tokens_per_second: float, num_devices: int) -> float:
    """Model FLOP/s achieved per device."""
    return flops_per_token * tokens_per_second / num_devices


def mfu(flops_per_token: int, tokens_per_second: float, num_devices: int, peak: float | None) -> float | None:
    """Model FLOPs utilisation, a fraction of `peak` (TFLOP/s per device); None without a peak."""
    if peak is None:
        return None
    return model_flops_per_second(flops_per_token, tokens_per_second, num_devices) / (peak * 1e12)


def memory_stats(device: torch.device) -> dict[str, float]:
    """Peak memory of this process in GiB: allocated / reserved on CUDA, resident set size on CPU."""
    if device.type == "cuda":
        return {
            "mem_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "mem_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,
        }
    # ru_maxrss is KiB on Linux, bytes on macOS
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"mem_rss_gib": rss / (2**30 if sys.platform == "darwin" else 2**20)}


class MetricsSink:
    """Writes a metrics dict to the console, TensorBoard and a JSONL file; does nothing on non-logging ranks.

    The JSONL file is appended to, so a resumed run continues the same file (each line carries `iteration`).
    """

    def __init__(self, enabled: bool, tensorboard_dir: str | None, jsonl_path: str | None) -> None:
        self.enabled = enabled
        self.writer = None
        self.jsonl = None
        if not enabled:
            return
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.warning("tensorboard is not installed: no TensorBoard events (pip install tensorboard)")
            else:
                self.writer = SummaryWriter(tensorboard_dir)
        if jsonl_path:
            Path(jsonl_path).parent.mkdir(parents=True, exist_ok=True)
            self.jsonl = open(jsonl_path, "a", encoding="utf-8")

    def write(self, record: dict, console: str | None = None) -> None:
        """Log `record` (which must hold `iteration`); `console` is the line printed, default all fields."""
        if not self.enabled:
            return
        record = {"time": time.time(), **record}
        if console is None:
            console = " | ".join(f"{k} {_fmt(v)}" for k, v in record.items() if k != "time")
        logger.info(console)
        if self.writer is not None:
            step = record["iteration"]
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("iteration", "time"):
                    self.writer.add_scalar(key, value, step)
            self.writer.flush()
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
            os.fsync(self.jsonl.fileno())

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.4e}"
    return str(value)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics file (tests, plots)."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
