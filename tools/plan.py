#!/usr/bin/env python
"""Plan a training run before renting the GPUs: every layout with its memory per GPU, step time, tokens/s and
days to a token budget, best first.

    python tools/plan.py --preset phi-1 --gpu A100-80GB --gpus 8 --interconnect nvlink3 \
        --global-batch 1024 --seq-len 2048 --precision fp16 --mfu 0.5 --tokens 50e9

Memory comes from `phi1.planning.memory` (the same model `python -m phi1.train --dry-run` prints, checked
against measured peaks by benchmarks/bench_planner_memory.py); time from `phi1.planning.timing`: compute at the
stated utilisation of the GPU's peak (phi1.training.metrics.PEAK_TFLOPS) plus ring-collective communication.
For phi-1 the last lines compare the paper's run (8 A100, batch 1024 x 2048, fp16, ~50B tokens in under 4 days).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from phi1.core.config import PRESETS, get_preset  # noqa: E402
from phi1.planning.hardware import GPU_KINDS, INTER_NODE_LINKS, INTRA_NODE_LINKS, cluster  # noqa: E402
from phi1.planning.memory import GIB  # noqa: E402
from phi1.planning.search import Plan, enumerate_plans  # noqa: E402

PAPER_DAYS = 4.0  # "under 4 days" (770 GPU-hours for ~51B tokens on 8 A100)
PAPER_TOKENS = 50e9


def format_table(plans: list[Plan], tokens: float, capacity_gib: float) -> str:
    """The plans as an aligned text table."""
    header = (f"{'layout':<28} {'accum':>5} {'weights':>8} {'grads':>7} {'optim':>7} {'activ':>7} {'logits':>7} "
              f"{'buffers':>8} {'PEAK GiB':>9} {'fits':>4} {'step s':>7} {'compute':>7} {'TP comm':>7} "
              f"{'DP comm':>7} {'tokens/s':>10} {'MFU':>5} {'days':>6}")
    lines = [header, "-" * len(header)]
    for plan in plans:
        m, t = plan.memory.gib(), plan.time
        lines.append(
            f"{plan.describe():<28} {plan.gradient_accumulation:>5} {m['weights']:>8.2f} {m['gradients']:>7.2f} "
            f"{m['optimizer']:>7.2f} {m['activations']:>7.2f} {m['logits']:>7.2f} {m['buffers']:>8.2f} "
            f"{m['total']:>9.2f} {'yes' if plan.fits else 'NO':>4} {t.total:>7.2f} {t.compute:>7.2f} "
            f"{t.tensor_parallel_comm:>7.2f} {t.data_parallel_comm:>7.2f} {t.tokens_per_second:>10,.0f} "
            f"{100 * t.model_flops_utilisation:>4.0f}% {t.days_for(tokens):>6.2f}"
        )
    lines.append(f"(memory per GPU of {capacity_gib:g} GiB, peak of a steady-state step; the parts are not all alive "
                 "at once; days to the token budget)")
    return "\n".join(lines)


def paper_comparison(utilisations: list[float]) -> str:
    """Days to 50B tokens for phi-1 on 8 x A100-80GB (batch 1024 x 2048, fp16), best layout, beside the paper."""
    config = get_preset("phi-1")
    lines = ["phi-1 as the paper trained it: 8 x A100, global batch 1024 x 2048 tokens, fp16, 50B tokens"]
    for kind in ("A100-40GB", "A100-80GB"):
        hardware = cluster(kind, 8)
        for utilisation in utilisations:
            best = enumerate_plans(config, hardware, 1024, 2048, "fp16", utilisation)[0]
            lines.append(
                f"  {kind} at {100 * utilisation:.0f}% of peak: best {best.describe()} "
                f"({best.memory.total / GIB:.1f} GiB/GPU) -> {best.time.tokens_per_second:,.0f} tokens/s, "
                f"MFU {100 * best.time.model_flops_utilisation:.0f}%, {best.time.days_for(PAPER_TOKENS):.2f} days "
                f"(paper: under {PAPER_DAYS:g} days)"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="phi-1", choices=sorted(PRESETS))
    parser.add_argument("--gpu", default="A100-80GB", help=f"GPU kind: {', '.join(GPU_KINDS)}")
    parser.add_argument("--gpus", type=int, default=8, help="number of GPUs")
    parser.add_argument("--interconnect", default=None,
                        help=f"intra-node link: {', '.join(INTRA_NODE_LINKS)} (default: the GPU kind's usual one)")
    parser.add_argument("--inter-node", default="ib-hdr", help=f"link between nodes: {', '.join(INTER_NODE_LINKS)}")
    parser.add_argument("--global-batch", type=int, default=1024, help="sequences per optimizer step")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--precision", default="fp16", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--mfu", type=float, default=0.5,
                        help="fraction of the GPU's peak the kernels reach (the paper implies ~0.5 on A100)")
    parser.add_argument("--tokens", type=float, default=PAPER_TOKENS, help="token budget for the days column")
    parser.add_argument("--zero", default="0,1,2,3", help="ZeRO stages to consider, comma-separated")
    parser.add_argument("--top", type=int, default=20, help="rows to print (0: all)")
    parser.add_argument("--all", action="store_true", help="include layouts that do not fit in memory")
    parser.add_argument("--no-paper", action="store_true", help="leave out the comparison with the phi-1 paper")
    args = parser.parse_args(argv)
    try:
        config = get_preset(args.preset)
        hardware = cluster(args.gpu, args.gpus, args.interconnect, args.inter_node)
        stages = tuple(int(z) for z in args.zero.split(",") if z.strip())
        plans = enumerate_plans(config, hardware, args.global_batch, args.seq_len, args.precision, args.mfu, stages)
    except ValueError as e:
        print(f"plan.py: error: {e}", file=sys.stderr)
        return 2
    shown = plans if args.all else [p for p in plans if p.fits]
    if args.top:
        shown = shown[: args.top]
    fitting = sum(p.fits for p in plans)
    print(f"{config.name}: {config.num_parameters():,} parameters; {args.gpus} x {args.gpu} "
          f"({hardware.gpu.memory_gib:g} GiB, {hardware.gpu.peak_tflops(args.precision):g} TFLOP/s {args.precision}), "
          f"{hardware.intra.name} within a node, {hardware.inter.name} between nodes; global batch "
          f"{args.global_batch} x {args.seq_len}; compute at {100 * args.mfu:.0f}% of peak")
    print(f"{len(plans)} layouts, {fitting} fit in memory; best first\n")
    if shown:
        print(format_table(shown, args.tokens, hardware.gpu.memory_gib))
    else:
        print("no layout fits: add GPUs, or allow more ZeRO stages / smaller micro-batches")
    if args.preset == "phi-1" and not args.no_paper:
        print()
        print(paper_comparison(sorted({0.5, args.mfu})))
    return 0


if __name__ == "__main__":
    sys.exit(main())
