"""What `--dry-run` prints: parameter count, parallel layout, batch arithmetic, memory estimate per device.

The memory estimate is arithmetic, not a measurement:

- model states, bytes per parameter of this rank's 1/tp shard: DDP with autocast keeps fp32 weights (4),
  fp32 gradients (4) and AdamW's two fp32 moments (8) = 16; DeepSpeed bf16/fp16 keeps 16-bit weights (2) and
  gradients (2) plus an fp32 master copy and moments (12), of which ZeRO-1 partitions the 12 over the DP
  group, ZeRO-2 also the gradients, ZeRO-3 also the weights;
- activations, per layer and micro-batch (Korthikanti et al. 2022, "Reducing Activation Recomputation"):
  s b h (10 + 24 / t) bytes in 16-bit, plus 5 a s^2 b / t for the attention scores when they are materialised
  (not with FlashAttention / SDPA's fused kernels, which is assumed on CUDA); doubled in fp32; with activation
  checkpointing only each block's 2 s b h input is kept, plus one block's full activations;
- the logits: b s V / t in fp32 for the loss, with their gradient.
"""

from __future__ import annotations

from phi1.core.config import ModelConfig
from phi1.training.config import TrainConfig

GIB = 2**30


def memory_estimate(config: TrainConfig, model_config: ModelConfig, world_size: int, fused_attention: bool = True) -> dict[str, float]:
    """Bytes per device, by part (see the module docstring), and the total."""
    tp = config.parallel.tensor_parallel
    dp = world_size // tp
    zero = config.parallel.zero_stage
    params = model_config.num_parameters() / tp
    if zero == 0:
        weights, grads, optim = 4 * params, 4 * params, 8 * params
    else:
        half = config.precision in ("bf16", "fp16")
        weights = (2 if half else 4) * params
        grads = (2 if half else 4) * params
        optim = (12 if half else 8) * params
        optim /= dp
        if zero >= 2:
            grads /= dp
        if zero >= 3:
            weights /= dp
    s, b, h = config.data.seq_len, config.batch.micro_batch_size, model_config.d_model
    a, L, V = model_config.n_head, model_config.n_layer, model_config.vocab_size
    width = 1.0 if config.precision in ("bf16", "fp16") else 2.0  # the formula counts 16-bit activations
    per_layer = s * b * h * (10 + 24 / tp) * width
    if not fused_attention:
        per_layer += 5 * a * s * s * b / tp * width
    if config.activation_checkpointing:
        activations = L * 2 * s * b * h * width + per_layer
    else:
        activations = L * per_layer
    logits = 2 * 4 * b * s * V / tp
    total = weights + grads + optim + activations + logits
    return {"weights": weights, "gradients": grads, "optimizer": optim, "activations": activations,
            "logits": logits, "total": total}


def dry_run_report(config: TrainConfig, model_config: ModelConfig, world_size: int) -> str:
    """The text `python -m phi1.train --dry-run` prints."""
    tp = config.parallel.tensor_parallel
    dp = world_size // tp
    accum = config.grad_accum_steps(world_size)
    seq = config.data.seq_len
    g = config.batch.global_batch_size
    steps = config.schedule.train_steps
    n_total = model_config.num_parameters()
    n_flops = model_config.num_parameters(exclude_embedding=True)
    memory = memory_estimate(config, model_config, world_size)
    parallel = "DDP" if config.parallel.zero_stage == 0 else f"DeepSpeed ZeRO-{config.parallel.zero_stage}"
    lines = [
        f"model       {model_config.name}: {n_total:,} parameters ({n_flops:,} without the input embedding); "
        f"{model_config.n_layer} layers, d_model {model_config.d_model}, {model_config.n_head} heads, "
        f"vocab {model_config.vocab_size}",
        f"layout      {world_size} processes = tensor parallel {tp} x data parallel {dp}; {parallel}"
        + (", sequence parallel" if config.parallel.sequence_parallel else "")
        + f"; precision {config.precision}" + ("; activation checkpointing" if config.activation_checkpointing else ""),
        f"batch       global {g} sequences = micro {config.batch.micro_batch_size} x data parallel {dp} x "
        f"gradient accumulation {accum}; {g * seq:,} tokens per step of seq_len {seq}",
        f"run         {steps:,} steps = {steps * g:,} sequences = {steps * g * seq:,} tokens; warmup "
        f"{config.schedule.warmup_steps}, {config.schedule.decay} decay {config.optim.lr:g} -> {config.optim.min_lr:g}",
        f"flops       {model_config.flops_per_token(seq) / 1e9:.3f} GFLOP per token (6N + 12 L d T); "
        f"{model_config.flops_per_token(seq) * g * seq / 1e15:.3f} PFLOP per step",
        "memory      estimate per device: "
        + ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in memory.items() if k != "total")
        + f"; total {memory['total'] / GIB:.2f} GiB",
    ]
    return "\n".join(lines)
