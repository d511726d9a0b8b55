#!/usr/bin/env python
"""The planner's memory per process against the measured peak of real training steps, on CPU.

    python benchmarks/bench_planner_memory.py [--configs mb4,tp2,...] [--steps 3] [--with-zero]

Each configuration launches fresh processes (torchrun for two) that build the real Trainer on a synthetic
corpus, run `--steps` optimizer steps and report their peak resident memory above the baseline taken just
before the Trainer was built (see phi1.training.measure_memory: MALLOC_MMAP_THRESHOLD_=65536 makes the resident set
follow the live tensors). The model: 4 layers, d_model 512, 8 heads, MLP 2048, vocabulary 8192 (~21M
parameters), sequences of 256 tokens. Prints predicted, measured and the error; exits 1 when an error passes
--tolerance (10%).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from phi1.testing.synthetic import write_synthetic_dataset  # noqa: E402
from phi1.training.measure_memory import CONFIGS, ZERO_CONFIGS, base_overrides, measure_peak_memory  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated names of " + ", ".join(CONFIGS))
    parser.add_argument("--with-zero", action="store_true", help="also DeepSpeed ZeRO-1 over 2 processes (slow to start)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--tolerance", type=float, default=0.10)
    args = parser.parse_args(argv)
    table = dict(CONFIGS, **ZERO_CONFIGS)
    names = [n for n in args.configs.split(",") if n] + (list(ZERO_CONFIGS) if args.with_zero else [])
    unknown = [n for n in names if n not in table]
    if unknown:
        print(f"unknown configs {unknown}; known: {sorted(table)}", file=sys.stderr)
        return 2
    worst = 0.0
    with tempfile.TemporaryDirectory(prefix="phi1-planner-mem-") as tmp:
        data_dir = Path(tmp) / "data"
        write_synthetic_dataset(data_dir)
        print(f"{'config':<16} {'procs':>5} {'predicted MiB':>13} {'measured MiB':>12} {'error':>7}  peak moment (predicted)")
        for name in names:
            nproc, overrides = table[name]
            start = time.perf_counter()
            result = measure_peak_memory(base_overrides(data_dir, Path(tmp) / name) + overrides, nproc=nproc,
                                         steps=args.steps)
            error = result["predicted"] / result["measured"] - 1
            worst = max(worst, abs(error))
            print(f"{name:<16} {nproc:>5} {result['predicted'] / 2**20:>13.1f} {result['measured'] / 2**20:>12.1f} "
                  f"{100 * error:>+6.1f}%  {result['peak_moment']} ({time.perf_counter() - start:.0f} s)", flush=True)
    print(f"largest error {100 * worst:.1f}% (tolerance {100 * args.tolerance:.0f}%)")
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
