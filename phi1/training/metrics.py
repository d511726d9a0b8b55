"""Throughput accounting (tokens/s, TFLOP/s, MFU), the metrics processor (the records and console lines of a
run), the metrics sinks (console, TensorBoard, JSONL, Weights & Biases) and the step-range profiler.

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
import math
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


class MetricsProcessor:
    """Builds the run's metric records and console lines from the steps' results, and hands them to the sink.

    Per step the trainer calls `step_done`; at each logging interval (logging.interval, and the last step)
    `log_interval` writes one record: the interval's mean loss and every step's loss, the last step's lr,
    gradient norm and loss scale, skipped and non-finite step counts, step time, tokens/s, TFLOP/s per device,
    MFU and peak memory. The first step of a compiled run is compile time: it is logged on its own and not
    counted in step time. `log_validation` writes the validation record.
    """

    def __init__(self, sink: MetricsSink, *, train_steps: int, global_batch_size: int, seq_len: int,
                 flops_per_token: int, world_size: int, peak: float | None, device: torch.device,
                 log_interval: int, compile_first_step: bool) -> None:
        """
        Args:
            sink: where records go (does nothing on non-logging ranks).
            train_steps: schedule.train_steps (the console shows iteration N/train_steps; the last step logs).
            global_batch_size, seq_len: tokens per step = global_batch_size x seq_len.
            flops_per_token: model FLOPs per token (ModelConfig.flops_per_token).
            world_size: devices the FLOP/s are divided over.
            peak: the device's peak TFLOP/s at the run's precision, or None (no MFU).
            device: whose peak memory is reported.
            log_interval: logging.interval.
            compile_first_step: the first step compiles (config.compile): its time is compile time.
        """
        self.sink = sink
        self.train_steps, self.global_batch_size, self.seq_len = train_steps, global_batch_size, seq_len
        self.flops_per_token, self.world_size, self.peak, self.device = flops_per_token, world_size, peak, device
        self.interval = log_interval
        """logging.interval: a record every this many steps."""
        self.compile_pending = compile_first_step
        self._losses: list[torch.Tensor] = []
        self._time, self._steps, self._skipped = 0.0, 0, 0

    def step_done(self, iteration: int, loss: torch.Tensor, skipped: bool, seconds: float) -> None:
        """Account for step `iteration` (its DP-mean loss tensor, whether it was skipped, its wall time)."""
        if self.compile_pending:
            # The first step compiles the blocks: its time is compile time, not step time.
            self.compile_pending = False
            self.sink.write({"iteration": iteration, "compile_time_s": seconds},
                            console=f"compile warm-up: the first step took {seconds:.1f} s (torch.compile "
                                    "of the blocks); not counted in step time")
        else:
            self._time += seconds
            self._steps += 1
        self._skipped += int(skipped)
        self._losses.append(loss)

    def due(self, iteration: int) -> bool:
        """True when step `iteration` ends a logging interval."""
        return iteration % self.interval == 0 or iteration == self.train_steps

    def log_interval(self, iteration: int, consumed_samples: int, lr: float, grad_norm: float, loss_scale: float,
                     skipped_steps: int, nonfinite_steps: int) -> list[float]:
        """Write the interval's record (lr, norm and scale of its last step; run-wide skipped and non-finite
        counts) and start the next interval; return the interval's step losses."""
        losses = [float(v) for v in self._losses]
        record = self.interval_record(iteration, consumed_samples, losses, lr, grad_norm, loss_scale, skipped_steps,
                                      self._skipped, nonfinite_steps, self._time, self._steps,
                                      memory_stats(self.device))
        self.sink.write(record, console=self.console_line(record, self.train_steps))
        self._losses, self._time, self._steps, self._skipped = [], 0.0, 0, 0
        return losses

    def interval_record(self, iteration: int, consumed_samples: int, losses: list[float], lr: float,
                        grad_norm: float, loss_scale: float, skipped_steps: int, skipped_in_interval: int,
                        nonfinite_steps: int, interval_time: float, interval_steps: int,
                        memory: dict[str, float]) -> dict:
        """The record of one logging interval from its numbers (`interval_steps` timed steps in `interval_time`
        seconds; `memory` as memory_stats gives it)."""
        tokens_per_second = (interval_steps * self.global_batch_size * self.seq_len / interval_time
                             if interval_steps else 0.0)
        return {
            "iteration": iteration, "consumed_samples": consumed_samples,
            "loss": sum(losses) / len(losses), "step_losses": losses, "lr": lr,
            "grad_norm": grad_norm, "loss_scale": loss_scale,
            "skipped_steps": skipped_steps, "skipped_in_interval": skipped_in_interval,
            "nonfinite_steps": nonfinite_steps,
            "step_time_s": interval_time / interval_steps if interval_steps else None,
            "tokens_per_second": tokens_per_second,
            "tflops_per_device": model_flops_per_second(self.flops_per_token, tokens_per_second, self.world_size) / 1e12,
            "mfu": mfu(self.flops_per_token, tokens_per_second, self.world_size, self.peak),
            **memory,
        }

    @staticmethod
    def console_line(record: dict, train_steps: int) -> str:
        """The console line of an interval record."""
        r = record
        parts = [
            f"iteration {r['iteration']:>7d}/{train_steps}", f"loss {r['loss']:.4f}", f"lr {r['lr']:.3e}",
            f"grad norm {r['grad_norm']:.3f}", f"loss scale {r['loss_scale']:g}", f"skipped {r['skipped_steps']}",
            f"{r['tokens_per_second']:,.0f} tokens/s", f"{r['tflops_per_device']:.3f} TFLOP/s/device",
            "MFU " + (f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"),
        ]
        memory = ", ".join(f"{k[4:]} {v:.2f} GiB" for k, v in r.items() if k.startswith("mem_"))
        return " | ".join(parts + [f"memory {memory}"])

    def log_validation(self, iteration: int, val_loss: float) -> None:
        """Write the validation record of `iteration` (loss and perplexity, capped at e^50)."""
        ppl = math.exp(min(val_loss, 50.0))
        self.sink.write({"iteration": iteration, "val_loss": val_loss, "val_ppl": ppl},
                        console=f"iteration {iteration:>7d} | validation loss {val_loss:.4f} | ppl {ppl:.2f}")


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
    "MetricsProcessor",
    "MetricsSink",
    "StepProfiler",
    "device_name",
    "memory_stats",
    "mfu",
    "model_flops_per_second",
    "peak_tflops",
    "read_jsonl",
]
