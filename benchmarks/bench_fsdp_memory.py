#!/usr/bin/env python
"""The planner's FSDP2 memory per process (phi1.planning.fsdp) against the measured peak, on CPU, 2 processes.

    python benchmarks/bench_fsdp_memory.py [--configs fsdp-dp2-mb4,...] [--steps 3] [--tolerance 0.10]

Each configuration launches 2 fresh processes (torchrun, gloo) that build the real Trainer with
`parallel.fsdp=true` on a synthetic corpus, run `--steps` optimizer steps and report the worst rank's peak
resident memory above the baseline taken just before the Trainer was built (phi1.training.measure_memory). The
model: 4 layers, d_model 512, 8 heads, MLP 2048, vocabulary 8192 (~21M parameters), sequences of 256 tokens.
Beside the prediction it prints what the dry run counted before FSDP2 was modelled (the same layout as DDP), to
show what the sharding saves. Exits 1 when an error passes --tolerance.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from phi1.testing.synthetic import write_synthetic_dataset  # noqa: E402
from phi1.training.measure_memory import FSDP_CONFIGS, base_overrides, measure_peak_memory  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=",".join(FSDP_CONFIGS), help="comma-separated names of "
                        + ", ".join(FSDP_CONFIGS))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--tolerance", type=float, default=0.10)
    args = parser.parse_args(argv)
    names = [n for n in args.configs.split(",") if n]
    unknown = [n for n in names if n not in FSDP_CONFIGS]
    if unknown:
        parser.error(f"--configs: unknown {unknown}; known: {sorted(FSDP_CONFIGS)}")
    worst = 0.0
    with tempfile.TemporaryDirectory(prefix="phi1-fsdp-mem-") as tmp:
        data_dir = Path(tmp) / "data"
        write_synthetic_dataset(data_dir)
        print(f"{'config':<20} {'procs':>5} {'as DDP MiB':>10} {'predicted MiB':>13} {'measured MiB':>12} "
              f"{'error':>7}  peak moment (predicted)")
        for name in names:
            nproc, overrides = FSDP_CONFIGS[name]
            start = time.perf_counter()
            result = measure_peak_memory(base_overrides(data_dir, Path(tmp) / name) + overrides, nproc=nproc,
                                         steps=args.steps)
            error = result["predicted"] / result["measured"] - 1
            worst = max(worst, abs(error))
            print(f"{name:<20} {nproc:>5} {result['as_ddp'] / 2**20:>10.1f} {result['predicted'] / 2**20:>13.1f} "
                  f"{result['measured'] / 2**20:>12.1f} {100 * error:>+6.1f}%  {result['peak_moment']} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    print(f"largest error {100 * worst:.1f}% (tolerance {100 * args.tolerance:.0f}%)")
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
