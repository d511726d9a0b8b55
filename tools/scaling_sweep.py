#!/usr/bin/env python
"""Strong- and weak-scaling experiments with the processes (or GPUs) this machine has, measured against the
planner's prediction: a table and a PNG plot.

    python tools/scaling_sweep.py --procs 1,2,4 --out runs/scaling

Each point is a real training run (`torchrun -m phi1.train`, DDP over the processes, a synthetic corpus) whose
step time is the median over the steps after `--warmup`. Strong scaling keeps the global batch and splits it
over the processes; weak scaling keeps each process's micro-batch, so the global batch grows with them.

The prediction is `phi1.planning.timing.predict_step_time`, calibrated by measurements of the parts, never
of the multi-process runs it predicts:
  - the compute rate of ONE process at each micro-batch size used: a 1-process run's FLOPs over its step time
    minus its optimizer step (the optimizer step, replicated by DDP, is timed separately and added back);
  - the all-reduce link: `phi1.planning.collectives` times gloo (or NCCL) all-reduces between two processes and
    fits the ring model's bandwidth and latency;
  - the compute N processes get at once. Two predictions are drawn: on dedicated hardware (each process a core
    of its own while there are enough, else cores / N of one; on GPUs a device each), and, on a CPU, at the
    effective number of cores measured just before the runs (N single-threaded matmul loops run together;
    their combined speed over one loop's), which is what a machine shared with other users really gives.
Every CPU process runs one thread (OMP_NUM_THREADS=1).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from phi1.cli import UserError, run_cli  # noqa: E402
from phi1.core.config import get_preset  # noqa: E402
from phi1.planning.collectives import RESULT_PREFIX  # noqa: E402
from phi1.planning.hardware import Link  # noqa: E402
from phi1.planning.memory import Layout, parameter_counts  # noqa: E402
from phi1.planning.timing import predict_step_time, step_flops  # noqa: E402
from phi1.testing.synthetic import write_synthetic_dataset  # noqa: E402
from phi1.training.metrics import read_jsonl  # noqa: E402

MODEL = dict(n_layer=2, d_model=256, n_head=4, d_mlp=1024, vocab_size=4096, max_seq_len=128)


@dataclass
class Point:
    """One run: its layout, the measured and the predicted step time."""

    mode: str
    processes: int
    global_batch: int
    micro_batch: int
    measured_step_s: float
    predicted_step_s: float
    measured_tokens_per_s: float
    predicted_tokens_per_s: float
    predicted_shared_step_s: float
    """At the effective cores measured on this (shared) machine."""

    @property
    def error(self) -> float:
        return self.predicted_step_s / self.measured_step_s - 1

    @property
    def error_shared(self) -> float:
        return self.predicted_shared_step_s / self.measured_step_s - 1


def _env(threads: int = 1) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(threads), DS_ACCELERATOR="cpu")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _launch(module_args: list[str], nproc: int, timeout: float) -> subprocess.CompletedProcess:
    if nproc > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *module_args]
    else:
        command = [sys.executable, *module_args]
    result = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:6])} ... failed ({result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return result


def measure_link(timeout: float) -> Link:
    """The all-reduce link between two of this machine's processes (bandwidth and latency fitted)."""
    result = _launch(["-m", "phi1.planning.collectives"], 2, timeout)
    for line in result.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            values = json.loads(line[len(RESULT_PREFIX):])
            return Link(f"measured {values['backend']}", values["gbps"], values["latency_us"])
    raise RuntimeError(f"no all-reduce result in:\n{result.stdout[-2000:]}")


_MATMUL_LOOP = """
import sys, time, torch
torch.set_num_threads(1)
a = torch.randn(384, 384)
start = time.perf_counter()
for _ in range(int(sys.argv[1])):
    a = torch.tanh(a @ a) * 0.5
print(time.perf_counter() - start)
"""


def effective_cores(counts: list[int], iterations: int = 300) -> dict[int, float]:
    """{N: the speed of N concurrent single-threaded matmul loops over one loop's} on this machine, now."""
    def run(n: int) -> float:
        workers = [subprocess.Popen([sys.executable, "-c", _MATMUL_LOOP, str(iterations)], env=_env(),
                                    stdout=subprocess.PIPE, text=True) for _ in range(n)]
        return max(float(w.communicate(timeout=300)[0]) for w in workers)

    solo = min(run(1) for _ in range(2))
    return {n: (1.0 if n == 1 else min(float(n), n * solo / run(n))) for n in counts}


def measure_optimizer_step(model_config, repeats: int = 5) -> float:
    """Seconds of one foreach AdamW step over the whole model in one thread (what each DDP replica runs)."""
    from phi1.core.model import PhiForCausalLM

    torch.set_num_threads(1)
    model = PhiForCausalLM(model_config)
    for param in model.parameters():
        param.grad = torch.randn_like(param)
    optimizer = torch.optim.AdamW(model.parameters(), foreach=True)
    optimizer.step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_training(data_dir: Path, run_dir: Path, processes: int, global_batch: int, micro_batch: int, seq_len: int,
                 steps: int, warmup: int, timeout: float) -> float:
    """Median step seconds of a real DDP training run after `warmup` steps."""
    overrides = {
        "model.preset": "phi-1-tiny", **{f"model.{k}": v for k, v in MODEL.items()},
        "data.path": data_dir / "counting_text_document", "data.tokenizer_model": data_dir / "tokenizer.json",
        "data.seq_len": seq_len, "data.split": "100,0,0", "batch.global_batch_size": global_batch,
        "batch.micro_batch_size": micro_batch, "schedule.train_steps": steps, "schedule.warmup_steps": 1,
        "checkpoint.dir": run_dir, "checkpoint.interval": 0, "checkpoint.resume": "false", "logging.interval": 1,
        "eval.interval": 0, "logging.tensorboard_dir": "", "precision": "fp32",
    }
    _launch(["-m", "phi1.train", *[f"{k}={v}" for k, v in overrides.items()]], processes, timeout)
    records = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "step_time_s" in r]
    return statistics.median(r["step_time_s"] for r in records[warmup:])


def predict(model_config, processes: int, global_batch: int, micro_batch: int, seq_len: int, rate: float,
            optimizer_s: float, link: Link, parallelism: float) -> float:
    """Predicted step seconds: the timing model at the calibrated rate, each process getting `parallelism` /
    processes of it, plus the replicated optimizer step."""
    share = min(1.0, parallelism / processes)
    layout = Layout(data_parallel=processes, micro_batch_size=micro_batch, seq_len=seq_len, precision="fp32", gpu=False)
    timing = predict_step_time(model_config, layout, global_batch, flops_per_second_per_device=rate * share,
                               peak_flops_per_device=rate, tp_link=link, dp_link=link, memory_gbps=float("inf"))
    return timing.total + optimizer_s / share


def format_table(points: list[Point]) -> str:
    lines = ["| mode | processes | global batch | micro-batch | measured step s | predicted step s (dedicated) | error | "
             "predicted step s (measured cores) | error | measured tokens/s | predicted tokens/s (dedicated) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        processes = f"{p.processes} (calibration)" if p.processes == 1 and p.global_batch == p.micro_batch else p.processes
        lines.append(f"| {p.mode} | {processes} | {p.global_batch} | {p.micro_batch} | {p.measured_step_s:.3f} | "
                     f"{p.predicted_step_s:.3f} | {100 * p.error:+.0f}% | {p.predicted_shared_step_s:.3f} | "
                     f"{100 * p.error_shared:+.0f}% | {p.measured_tokens_per_s:,.0f} | "
                     f"{p.predicted_tokens_per_s:,.0f} |")
    return "\n".join(lines)


def plot(points: list[Point], path: Path, title: str) -> None:
    """Two panels (strong, weak): tokens/s against processes, measured and predicted, with ideal scaling."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise UserError(f"the plot needs matplotlib ({e}); pip install matplotlib") from None
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for axis, mode in zip(axes, ("strong", "weak")):
        rows = sorted((p for p in points if p.mode == mode), key=lambda p: p.processes)
        if not rows:
            axis.set_visible(False)
            continue
        procs = [p.processes for p in rows]
        axis.plot(procs, [p.measured_tokens_per_s for p in rows], "o-", label="measured")
        axis.plot(procs, [p.predicted_tokens_per_s for p in rows], "s--", label="predicted, dedicated cores")
        tokens = [p.measured_tokens_per_s * p.measured_step_s for p in rows]  # per step
        axis.plot(procs, [t / p.predicted_shared_step_s for t, p in zip(tokens, rows)], "^-.",
                  label="predicted, measured effective cores")
        base = rows[0].measured_tokens_per_s / rows[0].processes
        axis.plot(procs, [base * n for n in procs], ":", color="gray", label="ideal (linear)")
        axis.set_xlabel("processes")
        axis.set_ylabel("tokens / s (whole job)")
        axis.set_xticks(procs)
        axis.set_title(f"{mode} scaling")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--procs", default="1,2,4", help="process counts, comma-separated (must include 1)")
    parser.add_argument("--strong-global-batch", type=int, default=8, help="strong scaling: sequences per step")
    parser.add_argument("--weak-micro-batch", type=int, default=4, help="weak scaling: sequences per process")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the median")
    parser.add_argument("--modes", default="strong,weak")
    parser.add_argument("--out", default="runs/scaling", help="directory of scaling.png, scaling.md, scaling.json")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per run")
    args = parser.parse_args(argv)
    try:
        procs = sorted({int(p) for p in args.procs.split(",") if p.strip()})
    except ValueError:
        raise UserError(f"--procs {args.procs}: give process counts separated by commas, e.g. 1,2,4") from None
    if 1 not in procs or procs[0] < 1:
        raise UserError(f"--procs {args.procs}: must include 1 (the run that calibrates the compute rate) and no "
                        "count below 1")
    if args.warmup >= args.steps:
        raise UserError(f"--warmup {args.warmup}: must be smaller than --steps ({args.steps})")
    for option, value in (("--strong-global-batch", args.strong_global_batch), ("--weak-micro-batch",
                          args.weak_micro_batch), ("--seq-len", args.seq_len), ("--steps", args.steps)):
        if value < 1:
            raise UserError(f"{option} {value}: must be at least 1")
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - {"strong", "weak"})
    if unknown or not modes:
        raise UserError(f"--modes {args.modes}: choose from strong, weak (comma-separated)")
    gpus = torch.cuda.device_count()
    cores = gpus if gpus else (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    model_config = get_preset("phi-1-tiny", **MODEL)
    out = Path(args.out)
    data_dir = out / "data"
    write_synthetic_dataset(data_dir)

    link = measure_link(args.timeout) if max(procs) > 1 else Link("none", 1.0, 0.0)
    optimizer_s = measure_optimizer_step(model_config)
    load_before = os.getloadavg()[0]
    parallelism = {n: float(n) for n in procs} if gpus else effective_cores(procs)
    print(f"model: {parameter_counts(model_config).per_rank:,} parameters; {cores} {'GPUs' if gpus else 'CPU cores'}; "
          f"all-reduce link {link.name}: {link.gbps:.2f} GB/s, {link.latency_us:.0f} us per hop; optimizer step "
          f"{1000 * optimizer_s:.1f} ms; effective parallelism "
          + ", ".join(f"{n} procs {v:.2f}" for n, v in parallelism.items()), flush=True)

    layouts = []
    for mode in modes:
        for n in procs:
            if mode == "strong":
                if args.strong_global_batch % n:
                    continue
                layouts.append((mode, n, args.strong_global_batch, args.strong_global_batch // n))
            else:
                layouts.append((mode, n, args.weak_micro_batch * n, args.weak_micro_batch))
    # One process at every micro-batch size the sweep uses gives the compute rates the predictions start from;
    # the sweep's own 1-process runs serve where their micro-batch matches (their prediction is then exact by
    # construction, and the table says so).
    measured: dict[tuple, float] = {}
    for mode, n, global_batch, micro in layouts:
        seconds = run_training(data_dir, out / f"{mode}_{n}", n, global_batch, micro, args.seq_len, args.steps,
                               args.warmup, args.timeout)
        measured[(mode, n)] = seconds
        print(f"  {mode:<6} {n} processes, global batch {global_batch}, micro-batch {micro}: {seconds:.3f} s/step",
              flush=True)
    solo = {m: measured[(mode, 1)] * m / g for mode, n, g, m in layouts if n == 1 and g == m}
    rates: dict[int, float] = {}
    for micro in sorted({m for _, _, _, m in layouts}):
        if micro not in solo:
            solo[micro] = run_training(data_dir, out / f"calibrate_mb{micro}", 1, micro, micro, args.seq_len,
                                       args.steps, args.warmup, args.timeout)
        _, run_flops = step_flops(model_config, Layout(micro_batch_size=micro, seq_len=args.seq_len), micro)
        rates[micro] = run_flops / max(solo[micro] - optimizer_s, 1e-9)
        print(f"  calibration: 1 process, micro-batch {micro}: {solo[micro]:.3f} s/step, "
              f"{rates[micro] / 1e9:.2f} GFLOP/s", flush=True)

    points = []
    for mode, n, global_batch, micro in layouts:
        dedicated = predict(model_config, n, global_batch, micro, args.seq_len, rates[micro], optimizer_s, link,
                            float(min(n, cores)))
        shared = predict(model_config, n, global_batch, micro, args.seq_len, rates[micro], optimizer_s, link,
                         parallelism[n])
        tokens = global_batch * args.seq_len
        points.append(Point(mode, n, global_batch, micro, measured[(mode, n)], dedicated,
                            tokens / measured[(mode, n)], tokens / dedicated, shared))

    table = format_table(points)
    load = f"; load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}" if not gpus else ""
    title = (f"phi1 DDP scaling on {cores} {'GPUs' if gpus else 'CPU cores'}{load}: "
             f"{model_config.num_parameters():,}-parameter phi model, seq {args.seq_len}\npredicted = "
             f"phi1.planning.timing from 1-process rates + measured all-reduce ({link.gbps:.2f} GB/s, "
             f"{link.latency_us:.0f} us); effective cores " + ", ".join(f"{n}: {v:.2f}" for n, v in parallelism.items()))
    plot(points, out / "scaling.png", title)
    (out / "scaling.md").write_text(title + "\n\n" + table + "\n")
    (out / "scaling.json").write_text(json.dumps({"link": asdict(link), "optimizer_s": optimizer_s, "cores": cores,
                                                  "effective_parallelism": parallelism, "rates_flops": rates,
                                                  "points": [asdict(p) for p in points]}, indent=1) + "\n")
    print(table)
    print(f"wrote {out / 'scaling.png'}, {out / 'scaling.md'}, {out / 'scaling.json'}")
    return 0


if __name__ == "__main__":
    run_cli(main, prog="scaling_sweep.py")
