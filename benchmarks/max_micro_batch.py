#!/usr/bin/env python
"""The largest micro-batch whose training step fits in memory: ours and HuggingFace's, with and without
activation checkpointing.

    python benchmarks/max_micro_batch.py --preset phi-1 --seq-len 2048 --memory-limit-gib 80   # an 80 GB GPU
    python benchmarks/max_micro_batch.py --preset phi-1-nano --seq-len 64 --memory-limit-gib 3 --max-micro-batch 8

Every trial is one `train_throughput.py` step (plus a warm-up step, so the optimizer state exists) in a fresh
process, so no allocator state leaks from one trial into the next. A trial fits when it exits cleanly and its
peak memory is within the limit: on CUDA the limit is enforced in the child (set_per_process_memory_fraction)
and an out-of-memory error is a clean "does not fit"; on CPU the limit applies to the growth of the child's
peak resident set over its resident set before the model was built (what the model and its step need, not
the interpreter and the libraries it loaded: HuggingFace's process also imports transformers). Micro-batches double until one does not fit, then a bisection finds the boundary.
Any other failure of a trial is reported with its output, not taken for "does not fit".
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from phi1.planning.search import largest_fitting  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
THROUGHPUT = REPO / "benchmarks" / "train_throughput.py"
OOM_MARKERS = ("OutOfMemoryError", "CUDA out of memory", "DefaultCPUAllocator: can't allocate memory")


@dataclass
class Trial:
    micro_batch: int
    fits: bool
    peak_memory_gib: float | None
    tokens_per_second: float | None


@dataclass
class Result:
    system: str
    activation_checkpointing: bool
    max_micro_batch: int
    """0 when not even a micro-batch of 1 fits."""
    peak_memory_gib: float | None
    """Peak memory of the step at max_micro_batch."""
    tokens_per_second: float | None
    """From the 1-step trial at max_micro_batch (a rough figure; train_throughput.py measures properly)."""
    capped: bool
    """True when --max-micro-batch fitted, so the real limit may be higher."""
    trials: list[Trial]


def run_trial(args: argparse.Namespace, system: str, checkpointing: bool, micro_batch: int) -> Trial:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        command = [sys.executable, str(THROUGHPUT), "--preset", args.preset, "--seq-len", str(args.seq_len),
                   "--micro-batch", str(micro_batch), "--steps", "1", "--warmup", "1", "--device", args.device,
                   "--json-out", str(out)]
        command += ["--precision", args.precision] if args.precision else []
        command += ["--activation-checkpointing"] if checkpointing else []
        command += ["--hf-only"] if system == "hf" else ["--loss-chunk-size", str(args.loss_chunk_size),
                                                        "--fused-ops", args.fused_ops]
        if args.memory_limit_gib is not None and args.device.startswith("cuda"):
            command += ["--memory-limit-gib", str(args.memory_limit_gib)]
        with open(Path(tmp) / "log", "w+") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
            _, status, _ = os.wait4(process.pid, 0)
            process.returncode = os.waitstatus_to_exitcode(status)
            log.seek(0)
            output = log.read()
        if process.returncode != 0:
            if any(marker in output for marker in OOM_MARKERS) or process.returncode == -9:  # -9: the OOM killer
                return Trial(micro_batch, False, None, None)
            raise RuntimeError(f"trial {system} micro-batch {micro_batch} failed (exit {process.returncode}):\n{output[-3000:]}")
        row = json.loads(out.read_text())["rows"][0]
    peak = row["peak_memory_gib"]
    fits = args.memory_limit_gib is None or (peak is not None and peak <= args.memory_limit_gib)
    return Trial(micro_batch, fits, peak, row["tokens_per_second"])


def search(args: argparse.Namespace, system: str, checkpointing: bool) -> Result:
    trials: dict[int, Trial] = {}

    def fits(micro_batch: int) -> bool:
        trials[micro_batch] = run_trial(args, system, checkpointing, micro_batch)
        print(f"  {system:<5} ckpt={checkpointing!s:<5} micro-batch {micro_batch:>4}: "
              f"{'fits' if trials[micro_batch].fits else 'does not fit'}"
              + (f" (peak {trials[micro_batch].peak_memory_gib:.2f} GiB)" if trials[micro_batch].peak_memory_gib else ""),
              flush=True)
        return trials[micro_batch].fits

    best = largest_fitting(fits, args.max_micro_batch)
    at_best = trials.get(best)
    return Result(system, checkpointing, best, at_best.peak_memory_gib if at_best else None,
                  at_best.tokens_per_second if at_best else None, best == args.max_micro_batch,
                  [trials[m] for m in sorted(trials)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="phi-1-tiny")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--memory-limit-gib", type=float, default=None,
                        help="the memory to fit in; required on CPU (default on CUDA: the whole GPU)")
    parser.add_argument("--max-micro-batch", type=int, default=256, help="stop searching here")
    parser.add_argument("--systems", default="phi1,hf", help="comma-separated: phi1, hf")
    parser.add_argument("--checkpointing", default="off,on", help="comma-separated: off, on")
    parser.add_argument("--loss-chunk-size", type=int, default=4096, help="ours: chunked lm_head + loss (0: off)")
    parser.add_argument("--fused-ops", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.device == "cpu" and args.memory_limit_gib is None:
        parser.error("--memory-limit-gib is required on CPU (there is no out-of-memory error to stop the search)")
    systems = [s for s in args.systems.split(",") if s]
    if set(systems) - {"phi1", "hf"}:
        parser.error(f"--systems: unknown {sorted(set(systems) - {'phi1', 'hf'})}; choose from phi1, hf")
    modes = {"off": False, "on": True}
    checkpointing = [modes[c] for c in args.checkpointing.split(",") if c]

    results = []
    for system in systems:
        for ckpt in checkpointing:
            results.append(search(args, system, ckpt))
    limit = f"{args.memory_limit_gib:g} GiB" if args.memory_limit_gib is not None else "the whole device"
    print(f"\n{args.preset}, seq {args.seq_len}, device {args.device}, memory limit {limit}")
    print(f"{'system':<8} {'ckpt':>5} {'max micro-batch':>16} {'peak GiB':>9} {'tokens/s (1 step)':>18}")
    for r in results:
        mb = f"{r.max_micro_batch}{'+' if r.capped else ''}"
        peak = f"{r.peak_memory_gib:.2f}" if r.peak_memory_gib is not None else "n/a"
        tps = f"{r.tokens_per_second:.0f}" if r.tokens_per_second is not None else "n/a"
        print(f"{r.system:<8} {r.activation_checkpointing!s:>5} {mb:>16} {peak:>9} {tps:>18}")
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
