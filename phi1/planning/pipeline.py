"""Pipeline parallelism in the planner: the bubble, per-stage memory, and the bytes sent between stages.

These model the schedules `phi1.parallel.pipeline` runs (torch.distributed.pipelining's), with P pipeline ranks,
m micro-batches per step and V virtual stages (model chunks) per rank under the interleaved schedule:

- bubble: the share of a step a rank idles, (P-1)/(m+P-1) for 1F1B and GPipe, (P-1)/(V m+P-1) for interleaved
  1F1B (Narayanan et al. 2021), for stages of equal work;
- activations in flight: under 1F1B pipeline rank r runs min(m, P-r) forwards before its first backward, so the
  first rank holds P micro-batches of activations for its layers and the last holds one; GPipe holds all m, but
  before its first backward, so without the gradients (the runner frees them before each step) that 1F1B's
  steady state holds next to its P micro-batches;
  interleaved rank r holds min((V-1) x m/rounds + 2 (P-1-r) + 1, V m) chunk micro-batches, each 1/V of its
  layers (torch's `_get_warmup_ops` plus the forward of the 1F1B phase, rounds = max(1, m // P));
- P2P: each micro-batch's activation crosses P V - 1 stage boundaries forward and its gradient the same
  boundaries backward; without a scatter/gather over the TP group (Megatron's optimisation, not done here) every
  TP rank sends its own copy, the whole (b, s, d) tensor, or its (b, s/t, d) shard under sequence parallelism;
- receive buffers: torch's `PipelineStage` allocates, once, a receive buffer for every micro-batch's input
  activation (stages but the first) and output gradient (stages but the last): 2 m activation-sized buffers per
  chunk that live for the whole run.

Call from the dry run or tools/plan.py:

    bubble_fraction(pp, m, "1f1b")                                         -> 0.2
    stage_memory(config, layout, pp=4, pp_rank=0, micro_batches=8)         -> StageMemory (bytes by part)
    p2p_bytes_per_step(config, layout, pp=4, micro_batches=8)              -> P2PBytes

`layout` is the planner's `Layout` (micro-batch size, TP, SP, precision, checkpointing, ZeRO stage, DP size).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from phi1.core.config import ModelConfig
from phi1.core.pipeline_stage import layer_ranges
from phi1.parallel.pipeline import SCHEDULES, check_schedule, stages_of_rank
from phi1.planning.memory import (
    Layout,
    MemoryEstimate,
    _layer_backward_working_set,
    _logits_bytes,
    model_state_bytes,
    parameter_counts,
    saved_bytes_per_layer,
)


def bubble_fraction(pipeline_parallel: int, micro_batches: int, schedule: str = "1f1b", virtual_stages: int = 1) -> float:
    """Share of a step each pipeline rank is idle: (P-1)/(m+P-1), or (P-1)/(V m+P-1) for 'interleaved'.

    Raises:
        ValueError: an unknown schedule, or P, m or V < 1.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"pipeline schedule must be one of {SCHEDULES}, got {schedule!r}")
    if min(pipeline_parallel, micro_batches, virtual_stages) < 1:
        raise ValueError(f"P, m and V must be >= 1, got P={pipeline_parallel} m={micro_batches} V={virtual_stages}")
    p, m = pipeline_parallel, micro_batches
    v = virtual_stages if schedule == "interleaved" else 1
    return (p - 1) / (v * m + p - 1)


def in_flight_chunks(pp_rank: int, pipeline_parallel: int, micro_batches: int, schedule: str = "1f1b",
                     virtual_stages: int = 1) -> int:
    """Chunk micro-batches whose activations pipeline rank `pp_rank` holds at its peak (see the module docstring).

    A chunk is one of the rank's V model chunks (its whole share of layers without virtual stages), so the
    activations held are this count x the layers of one chunk.
    """
    p, m, v = pipeline_parallel, micro_batches, virtual_stages
    if not 0 <= pp_rank < p:
        raise ValueError(f"pipeline rank {pp_rank} is not in 0 .. {p - 1}")
    if schedule == "gpipe":
        return m * v
    if schedule == "1f1b":
        return min(m, p - pp_rank)
    if schedule == "interleaved":
        rounds = max(1, m // p)
        warmup = min((v - 1) * (m // rounds) + 2 * (p - 1 - pp_rank), m * v)
        return min(warmup + 1, m * v)
    raise ValueError(f"pipeline schedule must be one of {SCHEDULES}, got {schedule!r}")


def _activation_bytes(layout: Layout) -> int:
    """Bytes per element of the hidden states sent between stages: the fp32 residual stream. Under a pipeline
    the weights stay fp32 (ZeRO-1 is torch's ZeroRedundancyOptimizer, not DeepSpeed's 16-bit weights) and
    16-bit precision is autocast, whose residual stream stays fp32; the trainer sends fp32 activations."""
    return 4


def activation_message_bytes(config: ModelConfig, layout: Layout) -> float:
    """Bytes of one micro-batch's hidden states one TP rank sends across one stage boundary."""
    t = layout.tensor_parallel
    local_seq = layout.seq_len / t if layout.sequence_parallel and t > 1 else layout.seq_len
    return layout.micro_batch_size * local_seq * config.d_model * _activation_bytes(layout)


@dataclass(frozen=True)
class P2PBytes:
    """Point-to-point traffic of one optimizer step."""

    message: float
    """One micro-batch's activation (or its gradient) across one boundary, one TP rank."""
    per_rank: float
    """Sent by the busiest rank (activations forward plus gradients backward), bytes per step."""
    total: float
    """Sent by every rank of the whole job together, bytes per step."""


def p2p_bytes_per_step(config: ModelConfig, layout: Layout, pipeline_parallel: int, micro_batches: int,
                       virtual_stages: int = 1) -> P2PBytes:
    """Bytes sent between pipeline stages in one step (the schedule does not change them, only their timing).

    A rank holding V chunks sends forward from every chunk but the pipeline's last and backward from every
    chunk but the first: 2 V m messages for a middle rank, (2V - 1) m for the first and last ranks.
    """
    p, m, v = pipeline_parallel, micro_batches, virtual_stages
    message = activation_message_bytes(config, layout)
    if p == 1:
        return P2PBytes(message=message, per_rank=0.0, total=0.0)
    boundaries = p * v - 1
    busiest = (2 * v if p > 2 else 2 * v - 1) * m * message
    replicas = layout.tensor_parallel * layout.data_parallel
    return P2PBytes(message=message, per_rank=busiest, total=2 * boundaries * m * message * replicas)


@dataclass(frozen=True)
class StageMemory:
    """Bytes of one pipeline rank at the peak of a step, by part (see `stage_memory`)."""

    layers: int
    """Blocks this rank holds (over its chunks)."""
    in_flight: int
    """Chunk micro-batches of activations held at the peak."""
    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits: float
    """The loss's logits on the last rank (0 elsewhere)."""
    p2p_buffers: float
    """torch's receive buffers for every micro-batch's input activation and output gradient."""
    working: float
    """One block's backward working set."""
    total: float
    """The peak: model states, receive buffers (and DDP's buckets under DP), and the larger of the two moments
    `stage_memory` compares."""
    peak_moment: str = ""
    """'first backward' (the most activations, gradients only of the chunk being back-propagated) or 'steady
    state (gradients allocated)'."""

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def stage_memory(config: ModelConfig, layout: Layout, pipeline_parallel: int, pp_rank: int, micro_batches: int,
                 schedule: str = "1f1b", virtual_stages: int = 1, split: Sequence[int] | None = None) -> StageMemory:
    """Peak bytes of pipeline rank `pp_rank` in a steady-state step.

    Model states of the rank's own parameters (its blocks, plus the embedding on the first rank and the final
    LayerNorm and lm_head on the last) by ZeRO stage as `phi1.planning.memory` counts them; the activations of
    `in_flight_chunks` chunk micro-batches (block inputs only under activation checkpointing, plus one block
    recomputed); the logits of the micro-batches in flight on the last rank; torch's receive buffers; one block's
    backward working set; DDP's gradient buckets under DP on a GPU. Gradients are set to None before each step
    and appear with the rank's first backward, so the peak is the larger of two moments: that first backward
    (every micro-batch in flight, gradients only of the chunk being back-propagated: GPipe's peak) and the steady
    state that follows it (the micro-batches in flight again, every gradient allocated: 1F1B's peak).

    Raises:
        ValueError: a schedule that cannot run (see `phi1.parallel.pipeline.check_schedule`) or a split that does
            not fit the model.
    """
    p, m, v = pipeline_parallel, micro_batches, virtual_stages
    check_schedule(schedule, p, v, m)
    ranges = layer_ranges(config.n_layer, p * v, split)
    held = stages_of_rank(pp_rank, p, v)
    n_layers = sum(len(ranges[s]) for s in held)
    first, last = 0 in held, p * v - 1 in held
    counts = parameter_counts(config, layout.tensor_parallel)
    params = n_layers * counts.per_layer
    params += counts.embedding if first else 0
    params += counts.lm_head + 2 * config.d_model if last else 0
    if layout.zero_stage == 1:
        # torch's ZeroRedundancyOptimizer: fp32 weights and gradients, AdamW's two fp32 moments split over DP
        weights, grads, optim = 4.0 * params, 4.0 * params, 8.0 * params / layout.data_parallel
    else:
        weights, grads, optim = model_state_bytes(dataclasses.replace(counts, per_rank=params), layout)

    in_flight = in_flight_chunks(pp_rank, p, m, schedule, v)
    t = layout.tensor_parallel
    sp = layout.sequence_parallel and t > 1
    s, b, h = layout.seq_len, layout.micro_batch_size, config.d_model
    per_layer = saved_bytes_per_layer(config, layout)
    block_input = 4 * s * b * h / (t if sp else 1)
    kept_per_layer = block_input if layout.activation_checkpointing else per_layer
    recompute = per_layer if layout.activation_checkpointing else 0.0
    chunk_layers = n_layers / v
    activations = in_flight * chunk_layers * kept_per_layer + recompute

    # When do the gradients exist? The runner sets every .grad to None before the schedule runs, so they appear
    # only with the rank's first backward. If a forward still follows that backward (1F1B while m > P - r,
    # interleaved while m V exceeds its warmup), the rank holds `in_flight` chunk micro-batches again with every
    # gradient allocated: the peak of the steady state. If not (GPipe, which runs all m forwards first), the most
    # activations (all m) never meet the gradients: the first backward frees its micro-batch's activations layer
    # by layer as that chunk's gradients appear, and afterwards at most in_flight - 1 are held.
    forwards_remain = in_flight < m * v
    with_gradients = in_flight if forwards_remain else in_flight - 1

    logits_forward = logits_backward = 0.0
    with_logits = 0
    if last:
        logits_forward, logits_backward = _logits_bytes(config, layout)
        last_in_flight = in_flight_chunks(p - 1, p, m, schedule, v)
        # Only the pipeline's last chunk carries logits. Under 1F1B and interleaved 1F1B the last rank runs each
        # last-chunk forward right before its backward (its warmup forwards, (V-1) P of them, are all of its
        # earlier chunks), so one micro-batch's logits are alive at a time; GPipe keeps all m.
        with_logits = last_in_flight if schedule == "gpipe" else 1

    def held_logits(count: int) -> float:
        # the micro-batches waiting for their backward keep what the loss's forward saved; one is in its backward
        return (count - 1) * logits_forward + max(logits_forward, logits_backward) if count > 0 else 0.0

    logits = held_logits(with_logits)
    head_grads = grads * (counts.lm_head + 2 * config.d_model) / params if last else 0.0
    grads_per_layer = grads * counts.per_layer / params
    first_chunk_layers = len(ranges[held[-1]])  # the first backward is of the rank's last chunk
    working = _layer_backward_working_set(config, layout)
    # The first backward: at its start every chunk micro-batch in flight and no block gradient yet (the last
    # rank has produced its head's); at its end that chunk's layers have traded their activations for their
    # gradients (both change linearly in between, so the two ends bound it).
    # (the embedding's gradient comes last, when the first backward is of stage 0).
    embedding_grads = grads * counts.embedding / params if held[-1] == 0 else 0.0
    first_backward = activations + working + head_grads + max(
        logits, first_chunk_layers * (grads_per_layer - kept_per_layer) + embedding_grads
        + held_logits(with_logits - 1))
    logits_later = held_logits(with_logits if forwards_remain else with_logits - 1)
    steady = with_gradients * chunk_layers * kept_per_layer + recompute + grads + logits_later + working
    peak = max(first_backward, steady)

    message = activation_message_bytes(config, layout)
    receive_buffers = sum((s_ != 0) + (s_ != p * v - 1) for s_ in held) * m * message
    # Under DP the runner wraps each chunk in torch DDP, which allocates its gradient buckets (as large as the
    # gradients) once, with torch.empty, and keeps them; without gradient_as_bucket_view they are apart from the
    # .grad tensors. On a GPU that is allocated memory. On a CPU only written pages count, and the buckets are
    # written only by the last micro-batch's backward (the others run under no_sync), when one micro-batch is
    # in flight: measured, PP2 x DP2 peaks as PP2 does (benchmarks/bench_pipeline_memory.py, pp2-dp2-m4).
    ddp_buckets = grads if layout.data_parallel > 1 and layout.gpu else 0.0
    total = weights + optim + ddp_buckets + peak + receive_buffers
    moment = "first backward" if first_backward >= steady else "steady state (gradients allocated)"
    return StageMemory(layers=n_layers, in_flight=in_flight, weights=weights, gradients=grads, optimizer=optim,
                       activations=activations, logits=logits, p2p_buffers=receive_buffers, working=working,
                       total=total, peak_moment=moment)


def rank_memory(config: ModelConfig, layout: Layout, split: Sequence[int] | None = None) -> list[tuple[StageMemory, float]]:
    """Every pipeline rank's `stage_memory` and its peak bytes with the runtime overhead and, under 16-bit
    autocast, the 16-bit copies of its matrices (the layout's schedule, virtual stages, and
    gradient_accumulation as the micro-batches; `split`: blocks per stage, default balanced)."""
    counts = parameter_counts(config, layout.tensor_parallel)
    out = []
    for rank in range(layout.pipeline_parallel):
        stage = stage_memory(config, layout, layout.pipeline_parallel, rank, layout.gradient_accumulation,
                             layout.pipeline_schedule, layout.virtual_stages, split)
        copies = 2.0 * counts.linear_weights * stage.layers / config.n_layer if layout.precision != "fp32" else 0.0
        out.append((stage, stage.total + copies + layout.runtime_overhead_bytes))
    return out


def pipeline_memory(config: ModelConfig, layout: Layout) -> MemoryEstimate:
    """The busiest pipeline rank's peak, as a `MemoryEstimate` (what `estimate_memory` returns for a layout with
    pipeline_parallel > 1): `stage_memory` of every rank with the layout's schedule, virtual stages and
    gradient_accumulation micro-batches, plus the runtime overhead and, under 16-bit autocast, the 16-bit copies
    of the rank's matrices. `peak_moment` names the rank.

    Raises:
        ValueError: see `stage_memory`.
    """
    p = layout.pipeline_parallel
    ranks = rank_memory(config, layout)
    best_rank = max(range(p), key=lambda rank: ranks[rank][1])
    stage, best_total = ranks[best_rank]
    copies = best_total - stage.total - layout.runtime_overhead_bytes
    return MemoryEstimate(
        weights=stage.weights, gradients=stage.gradients, optimizer=stage.optimizer, activations=stage.activations,
        logits=stage.logits, buffers=stage.p2p_buffers + stage.working + copies + layout.runtime_overhead_bytes,
        total=best_total, peak_moment=f"pipeline rank {best_rank} of {p} ({stage.in_flight} chunk micro-batches in "
                                      f"flight, {stage.layers} blocks)",
    )
