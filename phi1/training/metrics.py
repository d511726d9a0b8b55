"""Throughput accounting (tokens/s, TFLOP/s, MFU), the metrics sinks (console, TensorBoard, JSONL, Weights &
Biases) and the step-range profiler.

Sinks (rank 0 only): every record goes to the console and to `metrics.jsonl`; its numbers to TensorBoard
(`SummaryWriter`, event files under logging.tensorboard_dir) and, when `logging.wandb_project` is set, to W&B
(`wandb.log` at step = iteration; mode online, offline (files under {checkpoint.dir}/wandb, no network; upload
later with `wandb sync DIR`) or disabled).

Profiler: `profiling.steps=[a, b]` runs `torch.profiler` on rank 0 over iterations a to b, each step inside a
`record_function("phi1 iteration N")` range, and writes one Chrome-trace JSON, `rank0_iterations{a}-{b}.pt.trace.json`,
under profiling.dir. Perfetto (ui.perfetto.dev) and chrome://tracing open it; the `.pt.trace.json` suffix is the
one TensorBoard's PyTorch profiler plugin (torch-tb-profiler) reads, so `tensorboard --logdir DIR` shows it too.

MFU is counted as PaLM and nanoGPT count it: model FLOPs per token `6 N + 12 L d T` (N without the input
embedding; activation recomputation not counted), times tokens per second, divided by the number of devices
and by the device's peak dense FLOP/s at the precision the run computes in. The peak is looked up by the
device's name in PEAK_TFLOPS (phi1.planning.hardware); a device that is not there (a CPU, a new GPU) gets no MFU unless
`logging.peak_tflops` says its peak.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import sys
import time
from pathlib import Path

import torch

# The device peaks live with the planner's hardware table (phi1.planning must not import phi1.training); they
# are re-exported here because MFU is computed here.
from phi1.planning.hardware import PEAK_TFLOPS, peak_tflops

logger = logging.getLogger("phi1.train")

def device_name(device: torch.device) -> str:
    """The accelerator's marketing name ("NVIDIA H100 80GB HBM3"), or "cpu"."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


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
    """Writes a metrics dict to the console, TensorBoard, a JSONL file and W&B; does nothing on non-logging ranks.

    The JSONL file is appended to, so a resumed run continues the same file (each line carries `iteration`).
    """

    def __init__(self, enabled: bool, tensorboard_dir: str | None, jsonl_path: str | None, *,
                 wandb_project: str | None = None, wandb_mode: str = "online", wandb_run_name: str | None = None,
                 wandb_dir: str | None = None, wandb_config: dict | None = None) -> None:
        """
        Args:
            enabled: False on every rank but the logging one.
            tensorboard_dir, jsonl_path: where TensorBoard events and the JSONL file go; None disables each.
            wandb_project: W&B project to log to; None (or wandb_mode 'disabled') disables W&B.
            wandb_mode, wandb_run_name, wandb_dir, wandb_config: the run's mode, name, directory (W&B makes
                `wandb/` inside it) and config (the resolved TrainConfig).

        Raises:
            ImportError: wandb_project is set and wandb is not installed (train() checks this on every rank first).
            ValueError: W&B refused to start the run (an online run without an API key), naming the option.
        """
        self.enabled = enabled
        self.writer = None
        self.jsonl = None
        self.wandb_run = None
        self.wandb_path: Path | None = None
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
        if wandb_project and wandb_mode != "disabled":
            import wandb

            if wandb_dir:
                Path(wandb_dir).mkdir(parents=True, exist_ok=True)
            try:
                self.wandb_run = wandb.init(project=wandb_project, name=wandb_run_name, mode=wandb_mode,
                                            dir=wandb_dir, config=wandb_config)
            except wandb.errors.Error as error:  # no API key, no network for an online run, a bad setting
                self.close()
                reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
                raise ValueError(f"logging.wandb_project: W&B could not start a {wandb_mode} run ({reason}); log in "
                                 "with `wandb login` or set WANDB_API_KEY, or set logging.wandb_mode=offline") from None
            self.wandb_path = Path(self.wandb_run.dir).parent  # the run's folder; `files/` is inside it

    def write(self, record: dict, console: str | None = None) -> None:
        """Log `record` (which must hold `iteration`); `console` is the line printed, default all fields."""
        if not self.enabled:
            return
        record = {"time": time.time(), **record}
        if console is None:
            console = " | ".join(f"{k} {_fmt(v)}" for k, v in record.items() if k != "time")
        logger.info(console)
        numbers = {key: value for key, value in record.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("iteration", "time")}
        step = record["iteration"]
        if self.writer is not None:
            for key, value in numbers.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(numbers, step=step)
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
            os.fsync(self.jsonl.fileno())

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


class StepProfiler:
    """torch.profiler over iterations `first` to `last` (inclusive) of this process, exported as one Chrome trace.

    The loop calls `step(iteration)` around each training step; a resumed run that starts inside the range
    traces the rest of it, and a run that ends inside it (exit_at_iteration) exports what it traced at `close`.
    """

    def __init__(self, first: int, last: int, directory: str | os.PathLike, rank: int, device: torch.device,
                 record_shapes: bool = False, profile_memory: bool = False) -> None:
        self.first, self.last = first, last
        self.path = Path(directory) / f"rank{rank}_iterations{first}-{last}.pt.trace.json"
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._options = dict(activities=activities, record_shapes=record_shapes, profile_memory=profile_memory)
        self._profile: torch.profiler.profile | None = None
        self.traced: list[int] = []

    @contextlib.contextmanager
    def step(self, iteration: int):
        """Context of one training step: starts the profiler at the range's first step, labels the step
        `phi1 iteration N`, and stops and exports after the last one."""
        if self._profile is None and self.first <= iteration <= self.last and not self.traced:
            self._profile = torch.profiler.profile(**self._options)
            self._profile.__enter__()
        if self._profile is None:
            yield
            return
        with torch.profiler.record_function(f"phi1 iteration {iteration}"):
            yield
        self.traced.append(iteration)
        if iteration >= self.last:
            self._export()

    def _export(self) -> None:
        profile, self._profile = self._profile, None
        profile.__exit__(None, None, None)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        profile.export_chrome_trace(str(self.path))
        logger.info("profiler trace of iterations %d-%d: %s (open in ui.perfetto.dev, or tensorboard --logdir %s)",
                    self.traced[0], self.traced[-1], self.path, self.path.parent)

    def close(self) -> None:
        """Export a trace the run stopped inside of."""
        if self._profile is not None:
            self._export()


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.4e}"
    return str(value)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics file (tests, plots)."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


__all__ = [
    "PEAK_TFLOPS",
    "MetricsSink",
    "StepProfiler",
    "device_name",
    "memory_stats",
    "mfu",
    "model_flops_per_second",
    "peak_tflops",
    "read_jsonl",
]
