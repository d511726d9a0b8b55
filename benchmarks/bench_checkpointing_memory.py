#!/usr/bin/env python
"""Measured peak memory of each activation-checkpointing mode against the planner's estimate, on CPU.

    python benchmarks/bench_checkpointing_memory.py                                   # phi-1-tiny, seq 512, mb 8
    python benchmarks/bench_checkpointing_memory.py --preset phi-1-small --seq-len 2048 --micro-batch 1

Each mode (none, full, full every 2nd block, selective) launches a fresh process that builds the real Trainer
on a synthetic corpus, runs `--steps` optimizer steps, and reports its peak resident memory above the baseline
taken just before the Trainer was built (phi1.training.measure_memory), with the planner's estimate for the
same config (phi1.planning.memory). Prints predicted, measured and the error; exits 1 when an error passes
--tolerance (10%).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from phi1.core.config import get_preset  # noqa: E402
from phi1.testing.synthetic import write_synthetic_dataset  # noqa: E402
from phi1.training.measure_memory import measure_peak_memory  # noqa: E402

MODES = {
    "none": ["activation_checkpointing=none"],
    "full": ["activation_checkpointing=full"],
    "full-every-2": ["activation_checkpointing=full", "activation_checkpointing_every=2"],
    "selective": ["activation_checkpointing=selective"],
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="phi-1-tiny")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated: " + ", ".join(MODES))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--tolerance", type=float, default=0.10)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per mode")
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"--modes: unknown {unknown}; choose from {list(MODES)}")
    worst = 0.0
    with tempfile.TemporaryDirectory(prefix="phi1-ckpt-mem-") as tmp:
        data_dir = Path(tmp) / "data"
        # Enough counting documents for steps x micro-batch samples of seq_len tokens.
        write_synthetic_dataset(data_dir, num_documents=max(400, args.seq_len * args.micro_batch * (args.steps + 2) // 40))
        # The preset's own vocabulary (the synthetic tokenizer's few words would otherwise set it).
        base = [
            f"model.preset={args.preset}", f"model.vocab_size={get_preset(args.preset).vocab_size}", f"data.path={data_dir / 'counting_text_document'}",
            f"data.tokenizer_model={data_dir / 'tokenizer.json'}", f"data.seq_len={args.seq_len}",
            "data.split=100,0,0", "eval.interval=0", "checkpoint.resume=false", "logging.jsonl=",
            "logging.tensorboard_dir=", "schedule.train_steps=20", "schedule.warmup_steps=1", "precision=fp32",
            f"batch.micro_batch_size={args.micro_batch}", f"batch.global_batch_size={args.micro_batch}",
        ]
        print(f"{args.preset}, micro-batch {args.micro_batch} x seq {args.seq_len}, fp32, {args.steps} steps")
        print(f"{'mode':<14} {'predicted MiB':>13} {'measured MiB':>12} {'error':>7}  peak moment (predicted)")
        for mode in modes:
            start = time.perf_counter()
            result = measure_peak_memory(base + [f"checkpoint.dir={Path(tmp) / mode}"] + MODES[mode],
                                         steps=args.steps, timeout=args.timeout)
            error = result["predicted"] / result["measured"] - 1
            worst = max(worst, abs(error))
            print(f"{mode:<14} {result['predicted'] / 2**20:>13.1f} {result['measured'] / 2**20:>12.1f} "
                  f"{100 * error:>+6.1f}%  {result['peak_moment']} ({time.perf_counter() - start:.0f} s)", flush=True)
    print(f"largest error {100 * worst:.1f}% (tolerance {100 * args.tolerance:.0f}%)")
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
