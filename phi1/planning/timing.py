"""Predicted time of one training step: compute at a stated utilisation plus ring-collective communication.

- compute: the step's FLOPs (`6 N + 12 L d T` per token, the MFU count; with activation checkpointing the
  blocks' forward again, 2 N_blocks + 4 L d T per token) over the GPUs at `utilisation` x peak. The utilisation
  is the fraction of peak the kernels reach on the work they do; the MFU a run reports is that same fraction
  without checkpointing, and 6/8 of it (roughly) with it;
- ring collectives over n ranks on a link of bus bandwidth B and per-hop latency a:
      all-reduce                      2 (n - 1) / n x bytes / B + 2 (n - 1) a
      reduce-scatter, all-gather      (n - 1) / n x bytes / B + (n - 1) a
- tensor parallelism, per micro-batch: phi's fused block does ONE all-reduce of the (b, s, h) block output in
  the forward and ONE of the LayerNorm output's gradient in the backward (sequence parallelism turns each into
  a reduce-scatter plus an all-gather: the same bytes), plus one for the embedding and one for the lm_head's
  input gradient; checkpointing repeats the forward one. These sit on the critical path (not overlapped);
- data parallelism: DDP all-reduces the fp32 gradients once per step, overlapped with the last micro-batch's
  backward (what exceeds it, or at least one bucket, is exposed); ZeRO-1 reduce-scatters the gradients once per
  step and all-gathers the updated weights; ZeRO-2 reduce-scatters after every micro-batch; ZeRO-3 also
  all-gathers every layer's weights in the forward and again in the backward of every micro-batch. phi1 runs
  DeepSpeed with overlap_comm off, so ZeRO's collectives are counted as exposed;
- the optimizer step: AdamW reads and writes weights, gradients and two moments: memory-bound, ~28 bytes per
  fp32 parameter of the partition over HBM bandwidth;
- pipeline parallelism (P stages, m = gradient accumulation micro-batches, V virtual stages): each rank
  computes 1/P of the layers, and the step stretches by the bubble, compute / (1 - bubble) with the bubble
  (P-1)/(m+P-1) (1F1B, GPipe) or (P-1)/(V m+P-1) (interleaved); TP collectives count only the rank's layers,
  the DP reduction only its parameters; the P2P sends of the busiest rank (phi1.planning.pipeline) are counted
  as exposed on the link between pipeline neighbours.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from phi1.core.config import ModelConfig
from phi1.planning.hardware import Cluster, Link
from phi1.planning.memory import Layout, parameter_counts


def all_reduce_seconds(nbytes: float, ranks: int, link: Link) -> float:
    """Ring all-reduce of `nbytes` over `ranks` ranks: 2 (n-1)/n x bytes / bandwidth, plus latency."""
    if ranks <= 1:
        return 0.0
    return 2 * (ranks - 1) / ranks * nbytes / (link.gbps * 1e9) + 2 * (ranks - 1) * link.latency_us * 1e-6


def reduce_scatter_seconds(nbytes: float, ranks: int, link: Link) -> float:
    """Ring reduce-scatter (or all-gather) of `nbytes` in total: (n-1)/n x bytes / bandwidth, plus latency."""
    if ranks <= 1:
        return 0.0
    return (ranks - 1) / ranks * nbytes / (link.gbps * 1e9) + (ranks - 1) * link.latency_us * 1e-6


all_gather_seconds = reduce_scatter_seconds


@dataclass
class StepTime:
    """Seconds of one optimizer step, by part, and what they mean for a run."""

    compute: float
    tensor_parallel_comm: float
    data_parallel_comm: float
    optimizer: float
    total: float
    tokens_per_second: float
    """Of the whole job."""
    model_flops_utilisation: float
    """MFU as phi1 logs it: model FLOPs (no recomputation) per second over the peak of all devices."""
    pipeline_bubble: float = 0.0
    """Seconds of the step a pipeline rank idles (0 without pipeline parallelism)."""
    pipeline_comm: float = 0.0
    """Seconds of point-to-point sends between pipeline stages, busiest rank."""

    def days_for(self, tokens: float) -> float:
        """Days to train on `tokens` tokens at this rate."""
        return tokens / self.tokens_per_second / 86400

    def as_dict(self) -> dict:
        return asdict(self)


def step_flops(config: ModelConfig, layout: Layout, global_batch: int) -> tuple[float, float]:
    """(model FLOPs, FLOPs actually run) of one optimizer step over all devices."""
    tokens = global_batch * layout.seq_len
    model = config.flops_per_token(layout.seq_len) * tokens
    if not layout.activation_checkpointing:
        return float(model), float(model)
    block_params = config.n_layer * parameter_counts(config, 1).per_layer
    recompute = (2 * block_params + 4 * config.n_layer * config.d_model * layout.seq_len) * tokens
    return float(model), float(model + recompute)


def predict_step_time(
    config: ModelConfig,
    layout: Layout,
    global_batch: int,
    flops_per_second_per_device: float,
    peak_flops_per_device: float,
    tp_link: Link,
    dp_link: Link,
    memory_gbps: float,
    ddp_bucket_mb: float = 25.0,
    pp_link: Link | None = None,
) -> StepTime:
    """Seconds of one step of `layout` with `global_batch` sequences.

    Args:
        flops_per_second_per_device: what one device's kernels achieve (peak x utilisation).
        peak_flops_per_device: the device's peak, for the MFU figure.
        tp_link, dp_link: the links the TP group's and the DP group's rings run on.
        pp_link: the link between pipeline neighbours (default dp_link); used when layout.pipeline_parallel > 1.
        memory_gbps: device memory bandwidth (the optimizer step is memory-bound).
    Raises:
        ValueError: global_batch is not a multiple of micro-batch x data-parallel size.
    """
    tp, dp = layout.tensor_parallel, layout.data_parallel
    if global_batch % (layout.micro_batch_size * dp) != 0:
        raise ValueError(f"global batch {global_batch} is not a multiple of micro-batch {layout.micro_batch_size} "
                         f"x data parallel {dp}")
    accum = global_batch // (layout.micro_batch_size * dp)
    pp = layout.pipeline_parallel
    devices = tp * dp * pp
    model_flops, run_flops = step_flops(config, layout, global_batch)
    compute = run_flops / devices / flops_per_second_per_device
    bubble = pp_comm = 0.0
    if pp > 1:
        from phi1.planning.pipeline import bubble_fraction, p2p_bytes_per_step

        fraction = bubble_fraction(pp, accum, layout.pipeline_schedule, layout.virtual_stages)
        bubble = compute * fraction / (1 - fraction)
        link = pp_link or dp_link
        sent = p2p_bytes_per_step(config, layout, pp, accum, layout.virtual_stages).per_rank
        messages = 2 * layout.virtual_stages * accum
        pp_comm = sent / (link.gbps * 1e9) + messages * link.latency_us * 1e-6
    # The backward is ~2/3 of each micro-batch's compute: the window DDP's all-reduce hides in.
    backward_of_last_micro = compute / accum * (2 / 3)

    c = 4 if layout.precision == "fp32" else 2
    activation_bytes = layout.micro_batch_size * layout.seq_len * config.d_model * c
    layers = config.n_layer / pp  # this rank's share (the embedding and lm_head ones counted as if on every rank)
    tp_collectives = 2 * layers + 2 + (layers if layout.activation_checkpointing else 0)
    tp_comm = accum * tp_collectives * all_reduce_seconds(activation_bytes, tp, tp_link)

    counts = parameter_counts(config, tp)
    p = counts.per_rank / pp
    if layout.fsdp:
        # FSDP2: every micro-batch all-gathers the parameters (compute dtype) for its forward and again for its
        # backward; the fp32 gradients are reduce-scattered once, after the last micro-batch
        dp_comm = accum * 2 * all_gather_seconds(c * p, dp, dp_link) + reduce_scatter_seconds(4.0 * p, dp, dp_link)
    elif layout.zero_stage == 0:
        full = all_reduce_seconds(4.0 * p, dp, dp_link)  # fp32 gradients (autocast keeps them fp32)
        bucket = min(ddp_bucket_mb * 2**20, 4.0 * p) / (dp_link.gbps * 1e9) if dp > 1 else 0.0
        dp_comm = max(full - backward_of_last_micro, bucket)
    elif layout.zero_stage == 1:
        dp_comm = reduce_scatter_seconds(c * p, dp, dp_link) + all_gather_seconds(c * p, dp, dp_link)
    elif layout.zero_stage == 2:
        dp_comm = accum * reduce_scatter_seconds(c * p, dp, dp_link) + all_gather_seconds(c * p, dp, dp_link)
    else:
        per_micro = reduce_scatter_seconds(c * p, dp, dp_link) + 2 * all_gather_seconds(c * p, dp, dp_link)
        dp_comm = accum * per_micro
    partition = p / dp if layout.zero_stage > 0 or layout.fsdp else p
    optimizer = 28.0 * partition / (memory_gbps * 1e9)

    total = compute + tp_comm + dp_comm + optimizer + bubble + pp_comm
    tokens_per_second = global_batch * layout.seq_len / total
    mfu = model_flops / total / (devices * peak_flops_per_device)
    return StepTime(compute, tp_comm, dp_comm, optimizer, total, tokens_per_second, mfu, bubble, pp_comm)


def predict_on_cluster(config: ModelConfig, layout: Layout, global_batch: int, cluster: Cluster,
                       utilisation: float) -> StepTime:
    """`predict_step_time` on `cluster`'s GPUs at `utilisation` of their peak (in the layout's precision).

    TP ranks are adjacent (one node when they fit); the DP ring strides over them, so it crosses nodes as soon
    as the job has more GPUs than a node.
    """
    if not 0 < utilisation <= 1:
        raise ValueError(f"utilisation must be in (0, 1], got {utilisation}")
    peak = cluster.gpu.peak_tflops(layout.precision) * 1e12
    return predict_step_time(
        config, layout, global_batch,
        flops_per_second_per_device=peak * utilisation,
        peak_flops_per_device=peak,
        tp_link=cluster.ring_link(layout.tensor_parallel),
        # ranks laid out TP, then PP, then DP: a pipeline's ranks are tp apart, a DP group's tp x pp apart
        dp_link=cluster.ring_link(layout.data_parallel, stride=layout.tensor_parallel * layout.pipeline_parallel),
        memory_gbps=cluster.gpu.hbm_gbps,
        pp_link=cluster.ring_link(layout.pipeline_parallel, stride=layout.tensor_parallel),
    )


__all__ = [
    "StepTime",
    "all_gather_seconds",
    "all_reduce_seconds",
    "predict_on_cluster",
    "predict_step_time",
    "reduce_scatter_seconds",
    "step_flops",
]
