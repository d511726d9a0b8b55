#!/usr/bin/env python
"""Plan a training run before renting the GPUs: every layout with its memory per GPU, step time, tokens/s and
days to a token budget, best first; or, with --config, the layout of one training config.

    python tools/plan.py --config configs/pretrain_phi1.yaml --gpus 8 --gpu A100-80GB
    python tools/plan.py --preset phi-1 --gpu A100-80GB --gpus 8 --global-batch 1024 --seq-len 2048 \
        --precision fp16 activation_checkpointing=true parallel.zero_stage=2 loss_chunk_size=2048

`--config FILE [KEY=VALUE ...]` reads a training config exactly as `python -m phi1.train` does (the same YAML,
the same overrides, validated for GPUs) and prints its memory per GPU, which is the number `python -m phi1.train
--config FILE --dry-run --world-size N --device cuda` prints for the same N (on a GPU machine --device cuda is
the default): both turn the config into the planner's layout with
`phi1.training.plan.memory_layout` and estimate it with `phi1.planning.memory.estimate_memory`. Then it lists
the other layouts of the same model, batch, sequence length, precision and loss chunking.

Without --config, the layout options are given as in a training config and pin that choice of the search:
`parallel.tensor_parallel=2`, `parallel.pipeline_parallel=4` (1F1B; the search tries every size that divides
the GPUs left after TP, with the bubble and the busiest stage's memory), `parallel.zero_stage=1`,
`parallel.fsdp=true|false` (FSDP2, searched beside DDP and ZeRO where DP > 1 and there is no pipeline),
`parallel.sequence_parallel=true`,
`batch.micro_batch_size=4`, `activation_checkpointing=true|false`, `loss_chunk_size=N` (default 0, as in
training); `model.FIELD=VALUE` changes the model (e.g. `model.resid_dropout=0.1`). Choices not given are
searched.

Memory comes from `phi1.planning.memory` (checked against measured peaks by benchmarks/bench_planner_memory.py);
time from `phi1.planning.timing`: compute at the stated utilisation of the GPU's peak plus ring-collective
communication. For phi-1 the last lines compare the paper's run (8 A100, batch 1024 x 2048, fp16, ~50B tokens
in under 4 days).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from phi1.cli import UserError, run_cli  # noqa: E402
from phi1.core.config import PRESETS, ModelConfig, get_preset  # noqa: E402
from phi1.planning.hardware import GPU_KINDS, INTER_NODE_LINKS, INTRA_NODE_LINKS, Cluster, cluster  # noqa: E402
from phi1.planning.memory import GIB, Layout, assumptions, estimate_memory  # noqa: E402
from phi1.planning.search import Plan, enumerate_plans  # noqa: E402
from phi1.planning.timing import predict_on_cluster  # noqa: E402

PAPER_DAYS = 4.0  # "under 4 days" (770 GPU-hours for ~51B tokens on 8 A100)
PAPER_TOKENS = 50e9

# Training-config options that pin one choice of the layout search (the rest of a config needs --config).
LAYOUT_OPTIONS = ("parallel.tensor_parallel", "parallel.pipeline_parallel", "parallel.zero_stage", "parallel.fsdp",
                  "parallel.sequence_parallel", "batch.micro_batch_size", "activation_checkpointing", "loss_chunk_size")


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


def config_report(source: str, model_config: ModelConfig, layout: Layout, global_batch: int, hardware: Cluster,
                  utilisation: float, tokens: float, gpus: int) -> str:
    """The lines for one training config's own layout: memory (the --dry-run number), time and assumptions."""
    memory = estimate_memory(model_config, layout)
    time = predict_on_cluster(model_config, layout, global_batch, hardware, utilisation)
    plan = Plan(layout, memory, time, memory.total <= hardware.gpu.memory_gib * GIB, layout.gradient_accumulation)
    parts = ", ".join(f"{k} {v:.2f} GiB" for k, v in memory.gib().items() if k not in ("total", "host"))
    if memory.host:
        parts += f" (and {memory.host / GIB:.2f} GiB in CPU memory: fsdp_cpu_offload)"
    return "\n".join([
        f"config      {source}: {model_config.name}, {plan.describe()}, gradient accumulation "
        f"{layout.gradient_accumulation}, {layout.precision}, seq_len {layout.seq_len}, global batch {global_batch}",
        f"memory      per GPU: {parts}; peak {memory.total / GIB:.2f} GiB ({memory.peak_moment}); "
        + (f"fits in {hardware.gpu.memory_gib:g} GiB" if plan.fits
           else f"does NOT fit in {hardware.gpu.memory_gib:g} GiB"),
        f"            (the number `python -m phi1.train --config {source.split(' ')[0]} --dry-run --world-size {gpus} "
        "--device cuda` prints: the same layout and the same memory model)",
        f"time        step {time.total:.2f} s (compute {time.compute:.2f}, TP comm {time.tensor_parallel_comm:.2f}, "
        f"DP comm {time.data_parallel_comm:.2f}, optimizer {time.optimizer:.2f}); {time.tokens_per_second:,.0f} "
        f"tokens/s, MFU {100 * time.model_flops_utilisation:.0f}%, {time.days_for(tokens):.2f} days for "
        f"{tokens:.3g} tokens",
        f"assumes     {assumptions(layout)}; compute at {100 * utilisation:.0f}% of the GPU's peak",
    ])


def _search_options(overrides: list[str]) -> dict[str, list[str]]:
    """The layout options given as KEY=VALUE (each may be given several times to try several values)."""
    pinned: dict[str, list[str]] = {}
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key in LAYOUT_OPTIONS:
            pinned.setdefault(key, []).append(item)
        elif not key.startswith("model."):
            raise UserError(f"{key}: without --config, plan.py takes the layout options {', '.join(LAYOUT_OPTIONS)} "
                            "and model.FIELD=VALUE; for any other training option give the config with --config")
    return pinned


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="plan.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a training config (YAML, as python -m phi1.train --config reads)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="training-config options, e.g. activation_checkpointing=true parallel.zero_stage=2")
    parser.add_argument("--preset", default="phi-1", choices=sorted(PRESETS), help="model, without --config")
    parser.add_argument("--gpu", default="A100-80GB", help=f"GPU kind: {', '.join(GPU_KINDS)}")
    parser.add_argument("--gpus", type=int, default=8, help="number of GPUs (the training world size)")
    parser.add_argument("--interconnect", default=None,
                        help=f"intra-node link: {', '.join(INTRA_NODE_LINKS)} (default: the GPU kind's usual one)")
    parser.add_argument("--inter-node", default="ib-hdr", help=f"link between nodes: {', '.join(INTER_NODE_LINKS)}")
    parser.add_argument("--global-batch", type=int, default=1024, help="sequences per optimizer step (no --config)")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (no --config)")
    parser.add_argument("--precision", default="fp16", choices=("fp32", "bf16", "fp16"), help="(no --config)")
    parser.add_argument("--mfu", type=float, default=0.5,
                        help="fraction of the GPU's peak the kernels reach (the paper implies ~0.5 on A100)")
    parser.add_argument("--tokens", type=float, default=PAPER_TOKENS, help="token budget for the days column")
    parser.add_argument("--zero", default="0,1,2,3", help="ZeRO stages to search, comma-separated "
                        "(parallel.zero_stage=N pins one)")
    parser.add_argument("--top", type=int, default=20, help="rows to print (0: all)")
    parser.add_argument("--all", action="store_true", help="include layouts that do not fit in memory")
    parser.add_argument("--no-search", action="store_true", help="with --config: only the config's own layout")
    parser.add_argument("--no-paper", action="store_true", help="leave out the comparison with the phi-1 paper")
    args = parser.parse_args(argv)
    if not 0 < args.mfu <= 1:
        raise UserError(f"--mfu: must be in (0, 1], got {args.mfu}")
    if args.gpus < 1:
        raise UserError(f"--gpus: must be >= 1, got {args.gpus}")
    hardware = cluster(args.gpu, args.gpus, args.interconnect, args.inter_node)
    try:
        stages = tuple(int(z) for z in args.zero.split(",") if z.strip())
    except ValueError:
        raise UserError(f"--zero: expected comma-separated stages 0-3, got {args.zero!r}") from None

    # Training-config reading lives here, in a tool: phi1.planning never imports phi1.training.
    from phi1.training.config import load_config, validate_config
    from phi1.training.plan import memory_layout
    from phi1.training.trainer import resolve_config

    header = ""
    if args.config is not None:
        config = load_config(args.config, args.overrides)
        resolve_config(config, args.gpus)
        # validated as `python -m phi1.train --dry-run --device cuda` validates it (precision 'auto' resolved for
        # a GPU); whether it fits is this tool's own answer below, for the GPU kind asked for
        model_config = validate_config(config, args.gpus, check_files=False, device="cuda", check_memory=False)
        layout = memory_layout(config, model_config, args.gpus,
                               runtime_overhead_gib=hardware.gpu.runtime_overhead_gib)
        source = args.config + (f" {' '.join(args.overrides)}" if args.overrides else "")
        print(config_report(source, model_config, layout, config.batch.global_batch_size, hardware, args.mfu,
                            args.tokens, args.gpus))
        if args.no_search:
            return 0
        global_batch, seq_len, precision = config.batch.global_batch_size, config.data.seq_len, config.precision
        search = {"loss_chunk_size": config.loss_chunk_size, "fsdp": (False, True)}
        header = "\nother layouts of this model, batch, sequence length and precision:\n"
    else:
        pinned = _search_options(args.overrides)
        config = load_config(None, [f"model.preset={args.preset}", *args.overrides])
        model_config = config.model.build()
        global_batch, seq_len, precision = args.global_batch, args.seq_len, args.precision
        # the pinned options were parsed and typed by the training config's own fields above
        search = {"loss_chunk_size": config.loss_chunk_size}
        if "parallel.tensor_parallel" in pinned:
            search["tensor_parallel"] = (config.parallel.tensor_parallel,)
        if "parallel.pipeline_parallel" in pinned:
            search["pipeline_parallel"] = (config.parallel.pipeline_parallel,)
        if "parallel.zero_stage" in pinned:
            stages = (config.parallel.zero_stage,)
        if "parallel.fsdp" in pinned:
            search["fsdp"] = (config.parallel.fsdp,)
        else:  # a pinned ZeRO stage asks for that stage, not FSDP2 beside it
            search["fsdp"] = (False,) if "parallel.zero_stage" in pinned else (False, True)
        if "parallel.sequence_parallel" in pinned:
            search["sequence_parallel"] = (config.parallel.sequence_parallel,)
        if "batch.micro_batch_size" in pinned:
            search["micro_batches"] = (config.batch.micro_batch_size,)
        if "activation_checkpointing" in pinned:
            search["activation_checkpointing"] = (config.activation_checkpointing,)
    plans = enumerate_plans(model_config, hardware, global_batch, seq_len, precision, args.mfu, stages, **search)
    shown = plans if args.all else [p for p in plans if p.fits]
    if args.top:
        shown = shown[: args.top]
    fitting = sum(p.fits for p in plans)
    print(header + f"{model_config.name}: {model_config.num_parameters():,} parameters; {args.gpus} x {args.gpu} "
          f"({hardware.gpu.memory_gib:g} GiB, {hardware.gpu.peak_tflops(precision):g} TFLOP/s {precision}), "
          f"{hardware.intra.name} within a node, {hardware.inter.name} between nodes; global batch "
          f"{global_batch} x {seq_len}; compute at {100 * args.mfu:.0f}% of peak")
    print(f"{len(plans)} layouts, {fitting} fit in memory; best first\n")
    if shown:
        print(format_table(shown, args.tokens, hardware.gpu.memory_gib))
    else:
        print("no layout fits: add GPUs, or allow more ZeRO stages / smaller micro-batches")
    if args.config is None:
        print(f"assumes     {assumptions(plans[0].layout, per_layout=False)}; compute at {100 * args.mfu:.0f}% "
              "of the GPU's peak")
    if args.config is None and args.preset == "phi-1" and not args.no_paper and not args.overrides:
        print()
        print(paper_comparison(sorted({0.5, args.mfu})))
    return 0


if __name__ == "__main__":
    run_cli(main, prog="plan.py")
