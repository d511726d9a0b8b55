"""What `--dry-run` prints: parameter count, parallel layout, batch arithmetic, memory estimate per device.

The memory estimate is `phi1.planning.memory`, the project's one memory model (checked against measured peaks
by benchmarks/bench_planner_memory.py): weights, gradients and optimizer states by ZeRO stage and precision, our
block's saved activations counted tensor by tensor, the logits, and the buffers and transients of the backward
and the optimizer step; the total is the peak of a steady-state step.

`memory_layout` is the one translation of a TrainConfig into the planner's plain `Layout`: the dry run calls it,
and so does `tools/plan.py --config`, so both print the same number for the same config and GPU count.
"""

from __future__ import annotations

import dataclasses

from phi1.core.activation_checkpointing import activation_checkpointing_mode
from phi1.core.config import ModelConfig
from phi1.planning.hardware import DEFAULT_RUNTIME_OVERHEAD_GIB
from phi1.planning.memory import GIB, Layout, assumptions, estimate_memory, make_layout
from phi1.training.config import TrainConfig

# CUDA context, NCCL buffers and allocator slack on a GPU (every phi1.planning.hardware.GPU_KINDS entry's too).
GPU_RUNTIME_OVERHEAD_GIB = DEFAULT_RUNTIME_OVERHEAD_GIB


def memory_layout(config: TrainConfig, model_config: ModelConfig, world_size: int, gpu: bool = True,
                  runtime_overhead_gib: float | None = None) -> Layout:
    """The planner's Layout of `config` run on `world_size` processes.

    Args:
        gpu: True for a GPU (fused AdamW; `runtime_overhead_gib`, default GPU_RUNTIME_OVERHEAD_GIB, of CUDA
            context and NCCL buffers), False for CPU ranks (no overhead).
    """
    tp, par = config.parallel.tensor_parallel, config.parallel
    overhead = (GPU_RUNTIME_OVERHEAD_GIB if runtime_overhead_gib is None else runtime_overhead_gib) if gpu else 0.0
    return make_layout(
        model_config,
        tensor_parallel=tp,
        data_parallel=max(1, world_size // (tp * par.pipeline_parallel)),
        pipeline_parallel=par.pipeline_parallel,
        pipeline_schedule=par.pipeline_schedule,
        virtual_stages=par.virtual_stages,
        zero_stage=config.parallel.zero_stage,
        micro_batch_size=config.batch.micro_batch_size,
        gradient_accumulation=config.grad_accum_steps(world_size),
        seq_len=config.data.seq_len,
        precision=config.precision,
        activation_checkpointing=config.activation_checkpointing,
        activation_checkpointing_every=config.activation_checkpointing_every,
        sequence_parallel=config.parallel.sequence_parallel,
        loss_chunk_size=config.loss_chunk_size,
        gpu=gpu,
        runtime_overhead_bytes=overhead * GIB,
        fsdp=bool(par.fsdp),
        fsdp_cpu_offload=bool(par.fsdp_cpu_offload),
    )


def memory_estimate(config: TrainConfig, model_config: ModelConfig, world_size: int, fused_attention: bool = True,
                    gpu: bool = True) -> dict[str, float]:
    """Bytes per device by part (weights, gradients, optimizer, activations, logits, buffers) and the peak
    `total`, from phi1.planning.memory. `fused_attention=False` counts the 'math' backend's s x s scores."""
    layout = memory_layout(config, model_config, world_size, gpu=gpu)
    if not fused_attention:
        layout = dataclasses.replace(layout, fused_attention=False)
    estimate = estimate_memory(model_config, layout)
    return {k: v for k, v in estimate.as_dict().items() if isinstance(v, float)}


def checkpointing_text(config: TrainConfig) -> str:
    """'; activation checkpointing ...' for the layout line, or '' without it."""
    mode = activation_checkpointing_mode(config.activation_checkpointing)
    if mode == "selective":
        return "; selective activation checkpointing"
    if mode == "full":
        every = config.activation_checkpointing_every
        return "; activation checkpointing" + (f" of every {every}th block" if every > 1 else "")
    return ""


def dry_run_report(config: TrainConfig, model_config: ModelConfig, world_size: int) -> str:
    """The text `python -m phi1.train --dry-run` prints."""
    tp, pp = config.parallel.tensor_parallel, config.parallel.pipeline_parallel
    dp = world_size // (tp * pp)
    accum = config.grad_accum_steps(world_size)
    seq = config.data.seq_len
    g = config.batch.global_batch_size
    steps = config.schedule.train_steps
    n_total = model_config.num_parameters()
    n_flops = model_config.num_parameters(exclude_embedding=True)
    memory = memory_estimate(config, model_config, world_size)
    par = config.parallel
    if par.fsdp:
        parallel = "FSDP2" + (" with CPU offload" if par.fsdp_cpu_offload else "")
    else:
        parallel = "DDP" if par.zero_stage == 0 else f"DeepSpeed ZeRO-{par.zero_stage}"
    lines = [
        f"model       {model_config.name}: {n_total:,} parameters ({n_flops:,} without the input embedding); "
        f"{model_config.n_layer} layers, d_model {model_config.d_model}, {model_config.n_head} heads, "
        f"vocab {model_config.vocab_size}",
        f"layout      {world_size} processes = tensor parallel {tp} x "
        + (f"pipeline parallel {pp} x " if pp > 1 else "") + f"data parallel {dp}; {parallel}"
        + (", sequence parallel" if config.parallel.sequence_parallel else "")
        + f"; precision {config.precision}" + checkpointing_text(config),
        f"batch       global {g} sequences = micro {config.batch.micro_batch_size} x data parallel {dp} x "
        f"gradient accumulation {accum}; {g * seq:,} tokens per step of seq_len {seq}",
        f"run         {steps:,} steps = {steps * g:,} sequences = {steps * g * seq:,} tokens; warmup "
        f"{config.schedule.warmup_steps}, {config.schedule.decay} decay {config.optim.lr:g} -> {config.optim.min_lr:g}",
        f"flops       {model_config.flops_per_token(seq) / 1e9:.3f} GFLOP per token (6N + 12 L d T); "
        f"{model_config.flops_per_token(seq) * g * seq / 1e15:.3f} PFLOP per step",
        "memory      estimate per device (phi1.planning.memory; a GPU, with "
        f"{GPU_RUNTIME_OVERHEAD_GIB:g} GiB of CUDA context and NCCL buffers): "
        + ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in memory.items() if k not in ("total", "host"))
        + (f" ({memory['host'] / GIB:.2f} GiB more in CPU memory: offloaded)" if memory.get("host") else "")
        + f"; peak {memory['total'] / GIB:.2f} GiB",
        f"assumes     {assumptions(memory_layout(config, model_config, world_size))}",
    ]
    if pp > 1:
        lines[5:5] = pipeline_lines(config, model_config, world_size)
    return "\n".join(lines)


def pipeline_lines(config: TrainConfig, model_config: ModelConfig, world_size: int) -> list[str]:
    """The dry run's pipeline lines: stages, bubble, P2P bytes and every pipeline rank's memory."""
    from phi1.core.pipeline_stage import layer_ranges
    from phi1.planning.pipeline import bubble_fraction, p2p_bytes_per_step, rank_memory

    par = config.parallel
    pp, v, m = par.pipeline_parallel, par.virtual_stages, config.grad_accum_steps(world_size)
    layout = memory_layout(config, model_config, world_size)
    split = list(par.pipeline_split) or None
    blocks = [len(r) for r in layer_ranges(model_config.n_layer, pp * v, split)]
    bubble = bubble_fraction(pp, m, par.pipeline_schedule, v)
    formula = "(P-1)/(V m+P-1)" if par.pipeline_schedule == "interleaved" else "(P-1)/(m+P-1)"
    traffic = p2p_bytes_per_step(model_config, layout, pp, m, v)
    stages = rank_memory(model_config, layout, split)
    return [
        f"pipeline    {pp} ranks x {v} chunk(s), {par.pipeline_schedule} schedule, {m} micro-batches per step; "
        f"blocks per stage {blocks}; embedding on the first stage, final LayerNorm, lm_head and loss on the last",
        f"bubble      {100 * bubble:.1f}% of each step idle, {formula} with P={pp}, m={m}"
        + (f", V={v}" if par.pipeline_schedule == "interleaved" else ""),
        f"p2p         {traffic.message / 2**20:.2f} MiB per activation message; {traffic.per_rank / 2**20:.1f} MiB "
        f"sent per step by the busiest rank, {traffic.total / 2**20:.1f} MiB by the whole job",
        "stages      memory per pipeline rank (activations of the micro-batches in flight; the first rank holds "
        "the most): " + ", ".join(f"rank {rank} {stage.in_flight} in flight {total / GIB:.2f} GiB"
                                  for rank, (stage, total) in enumerate(stages)),
    ]
