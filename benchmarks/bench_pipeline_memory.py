#!/usr/bin/env python
"""Measured peak memory of every pipeline stage against the planner's `stage_memory`, on CPU gloo.

    python benchmarks/bench_pipeline_memory.py [--cases pp2-m4,pp4-m8,...] [--steps 2] [--tolerance 0.10]

Each case launches P fresh processes, one per pipeline rank, that run `--steps` optimizer steps of real phi
stages (4 blocks, d_model 512, 8 heads, MLP 2048, vocabulary 8192; micro-batches of 4 x 256 tokens; fp32; torch
AdamW) through torch.distributed.pipelining's schedule (phi1.planning.measure_pipeline); pp2-dp2-m4 runs two such
pipelines side by side, each stage wrapped in DDP, and reports each pipeline rank's larger peak. Printed per rank: the
activations in flight the planner counts (under 1F1B the first rank holds P micro-batches, the last one), the
predicted and measured peak MiB above the baseline, and the error. Exits 1 when an error passes --tolerance.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from phi1.core.config import get_preset  # noqa: E402
from phi1.planning.measure_pipeline import measure_stage_memory  # noqa: E402

MODEL = dict(n_layer=4, d_model=512, n_head=8, d_mlp=2048, vocab_size=8192, max_seq_len=256)
MICRO_BATCH, SEQ_LEN = 4, 256

# name: (pipeline ranks, micro-batches, schedule, virtual stages, activation checkpointing, data-parallel replicas)
CASES: dict[str, tuple[int, int, str, int, str, int]] = {
    "pp2-m4": (2, 4, "1f1b", 1, "none", 1),
    "pp2-m8": (2, 8, "1f1b", 1, "none", 1),
    "pp4-m8": (4, 8, "1f1b", 1, "none", 1),
    "pp2-m4-ac": (2, 4, "1f1b", 1, "full", 1),
    "pp2-m4-gpipe": (2, 4, "gpipe", 1, "none", 1),
    "pp2-m4-interleaved": (2, 4, "interleaved", 2, "none", 1),
    "pp2-dp2-m4": (2, 4, "1f1b", 1, "none", 2),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="pp2-m4,pp2-m8,pp4-m8,pp2-m4-ac,pp2-m4-interleaved",
                        help="comma-separated names of " + ", ".join(CASES))
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--tolerance", type=float, default=0.10)
    args = parser.parse_args(argv)
    names = [name for name in args.cases.split(",") if name]
    unknown = [name for name in names if name not in CASES]
    if unknown:
        parser.error(f"--cases: unknown {unknown}; known: {sorted(CASES)}")
    config = get_preset("phi-1-tiny", **MODEL)
    worst = 0.0
    print(f"{'case':<20} {'rank':>4} {'in flight':>9} {'predicted MiB':>13} {'measured MiB':>12} {'error':>7}")
    for name in names:
        pp, micro_batches, schedule, virtual, checkpointing, dp = CASES[name]
        start = time.perf_counter()
        rows = measure_stage_memory(config, pp, micro_batches, MICRO_BATCH, SEQ_LEN, schedule, virtual, checkpointing,
                                    steps=args.steps, data_parallel=dp)
        for row in rows:
            worst = max(worst, abs(row.error))
            print(f"{name:<20} {row.pp_rank:>4} {row.in_flight:>9} {row.predicted / 2**20:>13.1f} "
                  f"{row.measured / 2**20:>12.1f} {100 * row.error:>+6.1f}%", flush=True)
        print(f"  ({time.perf_counter() - start:.0f} s)", flush=True)
    print(f"largest error {100 * worst:.1f}% (tolerance {100 * args.tolerance:.0f}%)")
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
