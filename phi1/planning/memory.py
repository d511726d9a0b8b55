"""Memory per process of a phi1 training step: the one memory model of the project.

Every figure is bytes for ONE process (one GPU, or one CPU rank) holding a 1/tp shard of the model. The parts:

- weights, gradients, optimizer states ("model states"), by ZeRO stage and precision:
    zero 0 (torch DDP, autocast over fp32 parameters): fp32 weights 4, fp32 gradients 4, AdamW m and v 8 bytes
      per parameter of this TP rank (the DDP buckets ARE the gradients: phi1 sets gradient_as_bucket_view);
    zero 1, 2, 3 (DeepSpeed): weights and gradients in the compute precision (2 bytes in bf16/fp16, 4 in fp32)
      plus an fp32 master copy and m and v (12 bytes), of which stage 1 partitions the 12 over the DP group,
      stage 2 also the gradients, stage 3 also the weights;
- activations that autograd saves for the backward, counted for OUR block tensor by tensor (see
  `saved_bytes_per_layer`), times the layers, or only each block's input under activation checkpointing;
- logits: the (b, s, V / tp) tensors of the loss, whose largest moment is the start of the backward;
- buffers: what exists only at some moments: the gradients being produced during the backward, the working
  tensors of one layer's backward, the temporaries of the optimizer step (torch's foreach AdamW builds a
  sqrt(v) list as large as the parameters), autocast's 16-bit weight copies, DeepSpeed's reduce bucket and
  ZeRO-3's gathered layer, and on GPUs the CUDA context and NCCL buffers.

The peak is the largest of three moments of a steady-state step (the first step has no AdamW states yet):
the end of the forward, the backward (walked layer by layer, activations freed as gradients appear), and the
optimizer step. `tests/test_planner_memory.py` and `benchmarks/bench_planner_memory.py` check the total
against the measured peak resident memory of real training steps on CPU.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass

import torch

from phi1.core.activation_checkpointing import activation_checkpointing_mode
from phi1.core.config import ModelConfig

GIB = 2**30
# DeepSpeed's reduce bucket, in elements (phi1.parallel.zero.deepspeed_config sets reduce_bucket_size).
ZERO_REDUCE_BUCKET_ELEMENTS = 50_000_000


@dataclass(frozen=True)
class ParameterCounts:
    """Parameters one TP rank holds, counted from the model itself (meta device, no memory)."""

    per_rank: int
    """All parameters of one TP rank: sharded ones / tp plus replicated ones whole."""
    decay: int
    """Of those, the matrices and embeddings (AdamW's weight-decay group, the larger foreach group)."""
    linear_weights: int
    """Of those, the Linear weights (what autocast keeps 16-bit copies of during forward and backward)."""
    per_layer: int
    """Parameters of one block on one TP rank."""
    largest_layer_full: int
    """The largest module's parameters before ZeRO-3 partitioning (what one ZeRO-3 gather materialises)."""
    lm_head: int
    """lm_head weight and bias on one TP rank."""
    embedding: int
    """Input embedding on one TP rank."""


def _config_key(config: ModelConfig) -> str:
    return json.dumps(config.to_dict(), sort_keys=True)


@functools.lru_cache(maxsize=64)
def _count(config_json: str, tp: int) -> ParameterCounts:
    from phi1.core.model import PhiForCausalLM
    from phi1.parallel.layers import ColumnParallelLinear, RowParallelLinear, tensor_parallel_dims

    config = ModelConfig.from_dict(json.loads(config_json))
    config.validate(tensor_parallel_size=tp)
    with torch.device("meta"):
        model = PhiForCausalLM(config)  # built whole; the TP split is applied from the declared dims
    dims = tensor_parallel_dims(model)
    norm_ids = {id(p) for m in model.modules() if isinstance(m, torch.nn.LayerNorm) for p in m.parameters()}
    linear_ids = {id(m.weight) for m in model.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))}
    per_rank = decay = linear = layer0 = head = embed = 0
    for name, param in model.named_parameters():
        local = param.numel() // tp if dims[name] is not None else param.numel()
        per_rank += local
        if id(param) not in norm_ids and not name.endswith("bias"):
            decay += local
        if id(param) in linear_ids:
            linear += local
        if name.startswith("layers.0."):
            layer0 += local
        if name.startswith("lm_head."):
            head += local
        if name.startswith("embed_tokens."):
            embed += local
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return ParameterCounts(per_rank, decay, linear, layer0, largest, head, embed)


def parameter_counts(config: ModelConfig, tensor_parallel: int = 1) -> ParameterCounts:
    """Parameters per TP rank, counted exactly from a meta-device model and `tensor_parallel_dims`.

    Raises:
        ValueError: the model does not split over `tensor_parallel` ranks (names the ModelConfig field).
    """
    return _count(_config_key(config), tensor_parallel)


@dataclass(frozen=True)
class Layout:
    """One way to run a training step: the choices the memory and time models depend on."""

    tensor_parallel: int = 1
    data_parallel: int = 1
    zero_stage: int = 0
    """0: torch DDP; 1, 2, 3: DeepSpeed ZeRO over the DP group."""
    micro_batch_size: int = 1
    gradient_accumulation: int = 1
    """Micro-batches per optimizer step: from the second one on, the gradients of the first already exist."""
    seq_len: int = 2048
    precision: str = "bf16"
    """'fp32', 'bf16' or 'fp16' (16-bit: autocast under DDP, 16-bit weights under ZeRO)."""
    activation_checkpointing: bool = False
    checkpoint_mode: str = "full"
    """With activation_checkpointing: 'full' (blocks keep their input) or 'selective' (matmul and attention
    outputs kept, the cheap ops recomputed; phi1.core.activation_checkpointing)."""
    checkpoint_every: int = 1
    """Under 'full': blocks 0, k, 2k, ... are checkpointed, the others keep their activations."""
    sequence_parallel: bool = False
    loss_chunk_size: int = 0
    """Tokens per chunk of the fused lm_head + loss (0: the whole micro-batch's logits; TP = 1 only)."""
    fused_attention: bool = True
    """SDPA / FlashAttention (no s x s scores kept); False for the 'math' backend."""
    attn_dropout: float = 0.0
    resid_dropout: float = 0.0
    gpu: bool = True
    """True: CUDA (fused AdamW, runtime overhead); False: a CPU rank (foreach AdamW, no CUDA context)."""
    runtime_overhead_bytes: float = 0.0
    """CUDA context, NCCL buffers, allocator slack: memory no tensor accounts for."""
    pipeline_parallel: int = 1
    """Pipeline stages (parallel.pipeline_parallel); > 1: the estimate is the busiest pipeline rank's
    (phi1.planning.pipeline.pipeline_memory), with gradient_accumulation as the pipeline's micro-batches."""
    pipeline_schedule: str = "1f1b"
    """'1f1b', 'interleaved' or 'gpipe' (parallel.pipeline_schedule)."""
    virtual_stages: int = 1
    """Model chunks per pipeline rank under 'interleaved' (parallel.virtual_stages)."""
    fsdp: bool = False
    """PyTorch FSDP2 over the DP group (parallel.fsdp): parameters, gradients and AdamW states sharded, one block
    all-gathered at a time (phi1.planning.fsdp.fsdp_memory); zero_stage must be 0."""
    fsdp_cpu_offload: bool = False
    """Under fsdp: the sharded parameters, gradients and AdamW states live in CPU memory (parallel.fsdp_cpu_offload);
    on a GPU they leave the device's estimate and are reported as `MemoryEstimate.host`."""


@dataclass
class MemoryEstimate:
    """Bytes per process by part; `total` is the peak of a steady-state step, `peak_moment` says where it is.

    The parts are not all alive at once (gradients appear while the activations are freed; the optimizer's
    temporaries exist only during the step), so `total` is usually less than their sum.
    """

    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits: float
    buffers: float
    total: float
    peak_moment: str
    host: float = 0.0
    """Bytes kept in CPU memory instead of the device's (FSDP2's CPU offload on a GPU); not in `total`."""

    def as_dict(self) -> dict[str, float | str]:
        return asdict(self)

    def gib(self) -> dict[str, float]:
        """The numeric parts in GiB."""
        return {k: v / GIB for k, v in asdict(self).items() if isinstance(v, float)}


def _compute_bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def saved_bytes_per_layer(config: ModelConfig, layout: Layout, micro_batch_size: int | None = None) -> float:
    """Bytes autograd keeps for one block's backward, one micro-batch, one TP rank (no checkpointing).

    Counted tensor by tensor for `phi1.core.model.PhiBlock` in units of sbh = seq x micro-batch x d_model:

        fp32: LayerNorm input 4 (the fp32 residual) + LayerNorm output 4 (one tensor read by qkv and fc1)
              + qkv output 12/t (v is a view of it, so SDPA keeps all of it) + rotated q, k 8/t + attention
              output 4/t + the dense input 4/t (a reshape copy) + fc1 output (gelu input) 4f/h/t
              + gelu output (fc2 input) 4f/h/t                                   = 8 + (28 + 8 f/h) / t
        16-bit autocast: the residual and LayerNorm stay fp32 (input 4); qkv and fc1 each cast the LayerNorm
              output (2 + 2); the rest is halved                                  = 8 + (14 + 4 f/h) / t

    Sequence parallelism splits the LayerNorm input; the gathered LayerNorm output that qkv and fc1 read is
    whole. Residual dropout keeps a 1-byte mask; the 'math' attention backend keeps the fp32 probabilities
    (b, n/t, s, s) (and with attention dropout its mask and the dropped copy).
    """
    s = layout.seq_len
    b = layout.micro_batch_size if micro_batch_size is None else micro_batch_size
    h, f, t = config.d_model, config.d_mlp, layout.tensor_parallel
    sp = layout.sequence_parallel and t > 1
    sbh = s * b * h
    if layout.precision == "fp32":
        replicated = 4 * sbh / (t if sp else 1) + 4 * sbh
        sharded = (28 * sbh + 8 * s * b * f) / t
    else:
        replicated = 4 * sbh / (t if sp else 1) + 4 * sbh
        sharded = (14 * sbh + 4 * s * b * f) / t
    # Small terms, kept so the count is exact: LayerNorm's fp32 mean and 1/std per token, and the fused
    # attention kernel's fp32 log-sum-exp per head and token.
    total = replicated + sharded + 8 * s * b / (t if sp else 1)
    if layout.fused_attention:
        total += 4 * b * (config.n_head / t) * s
    if layout.resid_dropout > 0:
        total += sbh / (t if sp else 1)
    if not layout.fused_attention:
        probs = b * (config.n_head / t) * s * s
        total += 4 * probs
        if layout.attn_dropout > 0:
            total += 5 * probs
    return total


def _logits_bytes(config: ModelConfig, layout: Layout) -> tuple[float, float]:
    """(largest logits memory during the forward's loss, during the start of the backward).

    One TP rank: F.cross_entropy keeps log-probabilities (4 bytes); the backward holds them, the gradient of
    the log-probabilities and the gradient of the logits at once (12; 16-bit adds the logits' own 2-byte copy).
    TP > 1: the vocab-parallel loss holds logits, shifted logits and their exp during the forward (12) and
    keeps the softmax, which becomes the gradient in place (4).
    """
    tokens = layout.seq_len * layout.micro_batch_size
    cells = tokens * config.vocab_size / layout.tensor_parallel
    half = layout.precision != "fp32"
    if layout.loss_chunk_size > 0 and layout.tensor_parallel == 1:
        # phi1.core.chunked_cross_entropy: one chunk's fp32 logits (softmax and gradient in place, plus the
        # 16-bit copy under autocast), an fp32 lm_head weight gradient, and d hidden for the whole micro-batch,
        # all made in the forward and held until the backward.
        chunk = min(layout.loss_chunk_size, tokens) * config.vocab_size * (4 + (2 if half else 0))
        kept = 4 * config.vocab_size * (config.d_model + 1) + (2 if half else 4) * tokens * config.d_model
        return chunk + kept, kept
    if layout.tensor_parallel > 1:
        return cells * (12 + (2 if half else 0)), cells * 4
    return cells * (8 + (6 if half else 0)), cells * (12 + (2 if half else 0))


def selective_saved_bytes_per_layer(config: ModelConfig, layout: Layout) -> float:
    """Bytes one block keeps under selective checkpointing: its input (the fp32 residual) and the outputs the
    policy saves, the matmuls (qkv 3h/t and fc1 f/t; dense and fc2 give full-width partial sums per TP rank)
    and attention (output h/t and log-sum-exp; the 'math' backend's two fp32 bmm outputs instead)."""
    s, b, h, f, t = layout.seq_len, layout.micro_batch_size, config.d_model, config.d_mlp, layout.tensor_parallel
    sp = layout.sequence_parallel and t > 1
    c = _compute_bytes(layout.precision)
    kept = 4 * s * b * h / (t if sp else 1) + c * s * b * ((3 * h + f) / t + 2 * h)
    if layout.fused_attention:
        kept += c * s * b * h / t + 4 * b * (config.n_head / t) * s
    else:
        kept += 4 * b * (config.n_head / t) * s * s + 4 * s * b * h / t
    return kept


def _layer_backward_working_set(config: ModelConfig, layout: Layout) -> float:
    """Gradient tensors alive while one block runs its backward: d(output), d(input) being summed, and the
    two MLP-width gradients (of the fc2 input and of the fc1 output) at once. fp32 on the DDP path's
    residual stream; halved for the 16-bit parts under autocast."""
    s, b, h, f, t = layout.seq_len, layout.micro_batch_size, config.d_model, config.d_mlp, layout.tensor_parallel
    c = _compute_bytes(layout.precision)
    return 8 * s * b * h + 2 * c * s * b * f / t + 3 * c * s * b * h / t


def block_activations(config: ModelConfig, layout: Layout) -> tuple[list[float], list[float], float]:
    """(kept, recomputed, final_norm): per block, the bytes it keeps from its forward until its backward and
    what its recomputation adds while that backward runs (activation checkpointing), and the final LayerNorm's
    saved input and output; one micro-batch, one TP rank."""
    L = config.n_layer
    s, b, h, t = layout.seq_len, layout.micro_batch_size, config.d_model, layout.tensor_parallel
    sp = layout.sequence_parallel and t > 1
    per_layer = saved_bytes_per_layer(config, layout)
    block_input = 4 * s * b * h / (t if sp else 1)
    final_norm = 4 * s * b * h / (t if sp else 1) + (4 if layout.precision == "fp32" else 2) * s * b * h
    if layout.activation_checkpointing and layout.checkpoint_mode == "selective":
        sac_kept = min(per_layer, selective_saved_bytes_per_layer(config, layout))
        return [sac_kept] * L, [per_layer - sac_kept] * L, final_norm
    if layout.activation_checkpointing:
        every = max(1, layout.checkpoint_every)
        kept = [block_input if i % every == 0 else per_layer for i in range(L)]
        recomputed = [per_layer if i % every == 0 else 0.0 for i in range(L)]  # the block's activations again
        return kept, recomputed, final_norm
    return [per_layer] * L, [0.0] * L, final_norm


def model_state_bytes(counts: ParameterCounts, layout: Layout) -> tuple[float, float, float]:
    """(weights, gradients, optimizer states) in bytes for one process."""
    p, dp, zero = counts.per_rank, layout.data_parallel, layout.zero_stage
    if zero == 0:
        return 4.0 * p, 4.0 * p, 8.0 * p
    c = _compute_bytes(layout.precision)
    weights, grads, optim = c * p, c * p, 12.0 * p / dp
    if zero >= 2:
        grads /= dp
    if zero >= 3:
        weights /= dp
    return weights, grads, optim


def estimate_memory(config: ModelConfig, layout: Layout) -> MemoryEstimate:
    """The peak memory of one process during a steady-state training step of `layout`.

    Raises:
        ValueError: an unknown precision or ZeRO stage, or a model that does not split over the TP size.
    """
    if layout.precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be 'fp32', 'bf16' or 'fp16', got {layout.precision!r}")
    if layout.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {layout.zero_stage!r}")
    if layout.pipeline_parallel > 1:
        from phi1.planning.pipeline import pipeline_memory  # it builds on this module

        return pipeline_memory(config, layout)
    if layout.fsdp and layout.zero_stage == 0:  # (the config refuses FSDP2 with ZeRO or pipeline stages)
        from phi1.planning.fsdp import fsdp_memory  # it builds on this module

        return fsdp_memory(config, layout)
    counts = parameter_counts(config, layout.tensor_parallel)
    weights, grads, optim = model_state_bytes(counts, layout)
    L = config.n_layer
    h, t = config.d_model, layout.tensor_parallel
    c = _compute_bytes(layout.precision)
    kept, recomputed, final_norm = block_activations(config, layout)
    activations = sum(kept) + final_norm
    logits_forward, logits_backward = _logits_bytes(config, layout)
    working = _layer_backward_working_set(config, layout)

    # Gradients that exist before the backward starts: DDP's buckets (the gradients themselves, allocated at
    # wrap time), ZeRO's partitioned gradient buffers, and with gradient accumulation those of the earlier
    # micro-batches; on one plain process without accumulation they appear during the backward.
    static_grads = grads if (layout.zero_stage > 0 or layout.data_parallel > 1
                             or layout.gradient_accumulation > 1) else 0.0
    # autocast's 16-bit weight copies live from their first use in the forward to the layer's backward
    autocast_copies = 2.0 * counts.linear_weights if (layout.precision != "fp32" and layout.zero_stage == 0) else 0.0
    zero_buffers = 0.0
    if layout.zero_stage == 2 or (layout.zero_stage == 1 and layout.gpu):
        # DeepSpeed allocates its reduce bucket with torch.empty: allocated memory on a GPU; on a CPU only the
        # pages written count, and ZeRO-1 (no overlap_comm) reduces the gradients in place, never writing it.
        zero_buffers = c * min(ZERO_REDUCE_BUCKET_ELEMENTS, counts.per_rank)
    elif layout.zero_stage == 3:
        zero_buffers = c * (2 * counts.per_layer + counts.largest_layer_full / t)
    states = weights + optim + layout.runtime_overhead_bytes + zero_buffers

    moments = {
        "end of forward": activations + logits_forward + static_grads + autocast_copies,
    }
    # The backward, layer by layer from the top: layers below i still hold their activations, layers from i
    # up have produced their gradients (unless those were allocated already), and layer i works.
    grad_per_layer = 0.0 if static_grads else grads * counts.per_layer / counts.per_rank
    grad_head = 0.0 if static_grads else grads * (counts.lm_head + 2 * h) / counts.per_rank
    copies_per_layer = autocast_copies / L if autocast_copies else 0.0
    start = activations + logits_backward + static_grads + grad_head + autocast_copies
    moments["start of backward"] = start
    for i in range(L - 1, -1, -1):
        below = sum(kept[:i])
        done = (L - 1 - i) * grad_per_layer
        here = kept[i] + recomputed[i] + working + grad_per_layer
        moments[f"backward of layer {i}"] = (below + here + done + static_grads + grad_head
                                             + copies_per_layer * (i + 1))
    step_temporaries = 0.0 if layout.gpu else 4.0 * counts.decay  # foreach AdamW's sqrt(v) list (CPU)
    if layout.zero_stage > 0:
        step_temporaries = 4.0 * counts.per_rank / layout.data_parallel  # the fp32 gradient partition
    moments["optimizer step"] = grads + step_temporaries
    peak_moment = max(moments, key=moments.get)
    peak = states + moments[peak_moment]
    buffers = layout.runtime_overhead_bytes + zero_buffers + autocast_copies + max(working, step_temporaries)
    return MemoryEstimate(
        weights=float(weights), gradients=float(grads), optimizer=float(optim), activations=float(activations),
        logits=float(logits_backward), buffers=float(buffers), total=float(peak), peak_moment=peak_moment,
    )


def make_layout(config: ModelConfig, *, tensor_parallel: int, data_parallel: int, zero_stage: int,
                micro_batch_size: int, gradient_accumulation: int, seq_len: int, precision: str,
                activation_checkpointing: bool | str, sequence_parallel: bool, loss_chunk_size: int, gpu: bool = True,
                runtime_overhead_bytes: float = 0.0, activation_checkpointing_every: int = 1,
                pipeline_parallel: int = 1, pipeline_schedule: str = "1f1b", virtual_stages: int = 1,
                fsdp: bool = False, fsdp_cpu_offload: bool = False) -> Layout:
    """The Layout of one training setup, with what the model decides filled from `config`: whether attention
    keeps s x s scores (`attention_backend == 'math'`) and the dropout masks (`attn_dropout`, `resid_dropout`).

    The one constructor of layouts: `python -m phi1.train --dry-run` (through phi1.training.plan) and the
    layout search of tools/plan.py both build theirs here, so the same setup gets the same estimate.
    `activation_checkpointing` is a mode ('none', 'full', 'selective') or a bool (full / none).
    """
    mode = activation_checkpointing_mode(activation_checkpointing)
    return Layout(
        tensor_parallel=tensor_parallel,
        data_parallel=data_parallel,
        zero_stage=zero_stage,
        micro_batch_size=micro_batch_size,
        gradient_accumulation=max(1, gradient_accumulation),
        seq_len=seq_len,
        precision=precision,
        activation_checkpointing=mode != "none",
        checkpoint_mode="selective" if mode == "selective" else "full",
        checkpoint_every=activation_checkpointing_every if mode == "full" else 1,
        sequence_parallel=sequence_parallel,
        loss_chunk_size=loss_chunk_size,
        fused_attention=config.attention_backend != "math",
        attn_dropout=config.attn_dropout,
        resid_dropout=config.resid_dropout,
        gpu=gpu,
        runtime_overhead_bytes=runtime_overhead_bytes,
        pipeline_parallel=pipeline_parallel,
        pipeline_schedule=pipeline_schedule,
        virtual_stages=virtual_stages,
        fsdp=fsdp,
        fsdp_cpu_offload=fsdp and fsdp_cpu_offload,
    )


def assumptions(layout: Layout, per_layout: bool = True) -> str:
    """What an estimate of `layout` assumes, in one line (printed by --dry-run and tools/plan.py);
    `per_layout=False` leaves out what a table's rows vary (ZeRO stage, activation checkpointing)."""
    attention = ("fused attention (SDPA / FlashAttention: no s x s scores kept)" if layout.fused_attention
                 else "the 'math' attention backend (s x s probabilities kept)")
    chunk = (f"the chunked lm_head + loss ({layout.loss_chunk_size} tokens per chunk)"
             if layout.loss_chunk_size > 0 and layout.tensor_parallel == 1
             else "the whole micro-batch's logits in the loss" + (
                 " (loss_chunk_size applies at tensor_parallel 1 only)" if layout.loss_chunk_size > 0 else ""))
    device = (f"a GPU with {layout.runtime_overhead_bytes / GIB:g} GiB of CUDA context, NCCL buffers and allocator "
              "slack" if layout.gpu else "a CPU rank (no CUDA context)")
    if not per_layout:
        states = ("DDP: fp32 weights, gradients and AdamW states; ZeRO: 16-bit weights and gradients plus fp32 "
                  "master and AdamW states, partitioned as the stage does; FSDP2: fp32 weights, gradients and AdamW "
                  "states sharded over DP, the root's and one block's parameters gathered at a time (two in the "
                  "backward), full fp32 gradients held while accumulating, ")
    elif layout.fsdp:
        offload = (" and kept in CPU memory (fsdp_cpu_offload)" if layout.fsdp_cpu_offload and layout.gpu
                   else "")
        states = (f"FSDP2 over {layout.data_parallel} ranks: fp32 weights, gradients and AdamW states sharded{offload}, "
                  "the root's and one block's parameters gathered at a time (two in the backward: torch's prefetch)"
                  + (", full fp32 gradients held while accumulating" if layout.gradient_accumulation > 1 else "")
                  + ", ")
    elif layout.zero_stage == 0:
        states = "DDP: fp32 weights, gradients and AdamW states, "
    else:
        states = (f"DeepSpeed ZeRO-{layout.zero_stage}: {layout.precision} weights and gradients plus fp32 master and "
                  "AdamW states partitioned as the stage does, ")
    if not per_layout:
        checkpointing = "AC: activation checkpointing of every block; "
    elif layout.activation_checkpointing and layout.checkpoint_mode == "selective":
        checkpointing = "selective activation checkpointing (matmul and attention outputs kept); "
    elif layout.activation_checkpointing and layout.checkpoint_every > 1:
        checkpointing = f"activation checkpointing of every {layout.checkpoint_every}th block; "
    elif layout.activation_checkpointing:
        checkpointing = "activation checkpointing of every block; "
    else:
        checkpointing = "every block's activations kept; "
    return (f"a steady-state step (AdamW states allocated) on {device}; {states}{layout.precision} compute; "
            + checkpointing
            + f"{attention}; {chunk}; dropout masks for attn_dropout {layout.attn_dropout:g} and resid_dropout "
              f"{layout.resid_dropout:g}")


__all__ = [
    "GIB",
    "Layout",
    "MemoryEstimate",
    "ParameterCounts",
    "assumptions",
    "estimate_memory",
    "make_layout",
    "model_state_bytes",
    "parameter_counts",
    "saved_bytes_per_layer",
    "selective_saved_bytes_per_layer",
]
