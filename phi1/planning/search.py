"""Every parallel layout of a model on a cluster, with its memory and step time, best first.

The choices: tensor parallel size (divisors of the GPU count that split the heads, MLP and vocabulary and fit
in one node), pipeline parallel size (divisors of GPUs / TP up to the number of blocks, 1F1B; ZeRO 0 or 1
with it, as the trainer allows; at least P micro-batches per step), data parallel = GPUs / (TP x PP), ZeRO stage 0-3, micro-batch (powers of two that divide the per-replica
batch), activation checkpointing on or off, and sequence parallelism when TP > 1 (phi1 supports it with ZeRO 0
and 1). Each choice can be pinned to what a training config says (tools/plan.py does this for `--config` and
for `KEY=VALUE` options). Every layout is built by `phi1.planning.memory.make_layout`, as the dry run's is.
A plan fits when its peak memory is within the GPU's memory; fitting plans come first, fastest first;
among equally fast ones (to the millisecond), the larger micro-batch, then the smaller memory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from phi1.core.config import ModelConfig
from phi1.planning.hardware import Cluster
from phi1.planning.memory import GIB, Layout, MemoryEstimate, estimate_memory, make_layout
from phi1.planning.timing import StepTime, predict_on_cluster

MICRO_BATCHES = (1, 2, 4, 8, 16, 32, 64)


@dataclass
class Plan:
    """One layout with its predicted memory per GPU and step time."""

    layout: Layout
    memory: MemoryEstimate
    time: StepTime
    fits: bool
    gradient_accumulation: int

    def describe(self) -> str:
        """A short name: 'TP2 DP4 ZeRO-1 mb4 AC SP', with 'PP4' after TP under pipeline parallelism."""
        lay = self.layout
        pipeline = [f"PP{lay.pipeline_parallel}"] if lay.pipeline_parallel > 1 else []
        parts = [f"TP{lay.tensor_parallel}", *pipeline, f"DP{lay.data_parallel}",
                 ("FSDP2" + ("-offload" if lay.fsdp_cpu_offload else "") if lay.fsdp
                  else "DDP" if lay.zero_stage == 0 else f"ZeRO-{lay.zero_stage}"), f"mb{lay.micro_batch_size}"]
        if lay.activation_checkpointing:
            parts.append("AC")
        if lay.sequence_parallel:
            parts.append("SP")
        return " ".join(parts)


def tensor_parallel_choices(config: ModelConfig, gpus: int, gpus_per_node: int) -> list[int]:
    """TP sizes that divide the GPU count, fit in one node and split the model's heads, MLP and vocabulary."""
    choices = []
    for tp in range(1, min(gpus, gpus_per_node) + 1):
        if gpus % tp:
            continue
        try:
            config.validate(tensor_parallel_size=tp)
        except ValueError:
            continue
        choices.append(tp)
    return choices


def pipeline_choices(config: ModelConfig, gpus_per_tp_group: int, allowed: tuple[int, ...] | None = None) -> list[int]:
    """Pipeline sizes that divide the GPUs left after TP and give every stage at least one block."""
    sizes = [pp for pp in range(1, gpus_per_tp_group + 1) if gpus_per_tp_group % pp == 0 and pp <= config.n_layer]
    return sizes if allowed is None else [pp for pp in sizes if pp in allowed]


def enumerate_plans(
    config: ModelConfig,
    cluster: Cluster,
    global_batch: int,
    seq_len: int,
    precision: str,
    utilisation: float,
    zero_stages: tuple[int, ...] = (0, 1, 2, 3),
    *,
    tensor_parallel: tuple[int, ...] | None = None,
    micro_batches: tuple[int, ...] | None = None,
    activation_checkpointing: tuple[bool, ...] = (False, True),
    sequence_parallel: tuple[bool, ...] | None = None,
    loss_chunk_size: int = 0,
    pipeline_parallel: tuple[int, ...] | None = None,
    fsdp: tuple[bool, ...] = (False,),
) -> list[Plan]:
    """Every layout choice with its memory and time, best first (see the module docstring).

    Args:
        config: the model (its attention backend and dropout count in the memory).
        zero_stages, tensor_parallel, micro_batches, activation_checkpointing, sequence_parallel: the values to
            try for each choice; None tries every valid one (sequence parallelism: both where TP > 1 and
            ZeRO <= 1).
        loss_chunk_size: tokens per chunk of the fused lm_head + loss, as `loss_chunk_size` in a training config.
        pipeline_parallel: pipeline sizes to try (1F1B schedule); None tries every divisor of GPUs / TP that is
            at most n_layer.
        fsdp: with True, FSDP2 (parallel.fsdp, ZeRO stage 0) is tried too wherever it can run (DP > 1, no
            pipeline); (True,) alone tries only FSDP2 layouts.

    Raises:
        ValueError: seq_len beyond the model's max_seq_len, or no layout divides the global batch.
    """
    if seq_len > config.max_seq_len:
        raise ValueError(f"seq_len {seq_len} exceeds the model's max_seq_len {config.max_seq_len}")
    capacity = cluster.gpu.memory_gib * GIB
    overhead = cluster.gpu.runtime_overhead_gib * GIB
    valid_tp = tensor_parallel_choices(config, cluster.count, cluster.gpus_per_node)
    plans = []
    layouts = [(tp, pp) for tp in (valid_tp if tensor_parallel is None else [t for t in tensor_parallel if t in valid_tp])
               for pp in pipeline_choices(config, cluster.count // tp, pipeline_parallel)]
    for tp, pp in layouts:
        dp = cluster.count // (tp * pp)
        per_replica, remainder = divmod(global_batch, dp)
        if remainder:
            continue
        sharding = [(zero, False) for zero in zero_stages if False in fsdp]
        if True in fsdp and dp > 1 and pp == 1:  # FSDP2 shards over DP; phi1 runs it without pipeline stages
            sharding.append((0, True))
        for zero, fully_sharded in sharding:
            if zero > 0 and dp == 1:
                continue  # ZeRO partitions over DP: nothing to partition
            if zero > 1 and pp > 1:
                continue  # ZeRO-2/3 cannot run with pipeline stages (the trainer refuses it, as DeepSpeed does)
            for micro in (MICRO_BATCHES if micro_batches is None else micro_batches):
                if per_replica % micro or per_replica // micro < pp:
                    continue  # 1F1B needs at least P micro-batches per step
                for checkpointing in activation_checkpointing:
                    allowed_sp = (False, True) if tp > 1 and zero <= 1 else (False,)
                    for sp in (allowed_sp if sequence_parallel is None
                               else [v for v in sequence_parallel if v in allowed_sp]):
                        layout = make_layout(
                            config, tensor_parallel=tp, data_parallel=dp, zero_stage=zero, micro_batch_size=micro,
                            gradient_accumulation=per_replica // micro, seq_len=seq_len, precision=precision,
                            activation_checkpointing=checkpointing, sequence_parallel=sp,
                            loss_chunk_size=loss_chunk_size, gpu=True, runtime_overhead_bytes=overhead,
                            pipeline_parallel=pp, fsdp=fully_sharded,
                        )
                        memory = estimate_memory(config, layout)
                        time = predict_on_cluster(config, layout, global_batch, cluster, utilisation)
                        plans.append(Plan(layout, memory, time, memory.total <= capacity, per_replica // micro))
    if not plans:
        raise ValueError(f"no layout of {cluster.count} GPUs with the chosen options divides the global batch "
                         f"{global_batch}")
    # Among equally fast plans the larger micro-batch first (the stated utilisation is the same for all, but
    # real kernels run closer to it on bigger GEMMs), then the smaller memory.
    plans.sort(key=lambda p: (not p.fits, round(p.time.total, 3), -p.layout.micro_batch_size, p.memory.total))
    return plans


__all__ = ["MICRO_BATCHES", "Plan", "enumerate_plans", "pipeline_choices", "tensor_parallel_choices"]


def largest_fitting(fits: Callable[[int], bool], upper: int) -> int:
    """The largest m in [1, upper] with fits(m), assuming fits is monotone (true up to a point, then false).

    Doubles from 1 until a failure or `upper`, then bisects the gap: O(log upper) trials. 0 if fits(1) fails.
    """
    if not fits(1):
        return 0
    good, bad = 1, None
    while bad is None:
        candidate = min(good * 2, upper)
        if candidate == good:
            return good
        if fits(candidate):
            good = candidate
        else:
            bad = candidate
    while bad - good > 1:
        middle = (good + bad) // 2
        if fits(middle):
            good = middle
        else:
            bad = middle
    return good
