"""Pipeline parallelism: the (dp, pp, tp) rank layout, and a runner that steps a rank's pipeline stages.

Layout. The world is a `DeviceMesh` with named dims ("dp", "pp", "tp"). Global ranks are laid out TP adjacent,
then PP, then DP (`order="tp-pp-dp"`, the order this project fixes), so the TP group, which talks on every
layer, is always whole on one node:

    world 8, tp 2, pp 2:   TP {0,1} {2,3} {4,5} {6,7}   PP {0,2} {1,3} {4,6} {5,7}   DP {0,4} {1,5} {2,6} {3,7}

Megatron-core's own default (`order="tp-cp-ep-dp-pp"` in `megatron/core/parallel_state.py`) puts DP before PP:
`order="tp-dp-pp"` gives that layout (PP {0,4} ...), which keeps a stage's DP all-reduce inside a node and sends
only the (small) pipeline activations between nodes. `rank_grid` and `groups_along` are pure functions, so
multi-node layouts are tested without processes.

Stages. A rank holds one stage, or V virtual stages under the interleaved schedule (Megatron's assignment: rank
r holds stages r, r + P, ..., `stages_of_rank`). The stage modules and their loss function come from the caller
(`phi1.core.pipeline_stage` builds phi's); this package does not import the model.

Schedules. `PipelineRunner` runs torch.distributed.pipelining's `PipelineStage` with `Schedule1F1B` ('1f1b'),
`ScheduleInterleaved1F1B` ('interleaved', Megatron's interleaved 1F1B) and `ScheduleGPipe` ('gpipe'). Each one
served as it is, so no schedule of our own is written here. Measured on CPU gloo: they give the one-process
losses within 1e-5 and the same gradients for PP 2 and 4, interleaved V = 2, with TP + SP, DDP and ZeRO-1
(tests/test_parallel_pipeline.py); a rank holds exactly the micro-batches of activations the planner predicts
(P - r under 1F1B); the measured bubble is the formula's plus a per-operation overhead
(benchmarks/bench_pipeline_bubble.py). What to know about them:

- Stage shapes are given up front (static metadata, from the stage's `example_io`). Without them torch infers
  shapes by running an extra forward and backward of the first micro-batch at the first step, which costs a
  step's worth of compute per stage and advances the tensor-parallel dropout RNG that torch's own RNG fork does
  not cover (`phi1.parallel.random` keeps it apart), so a resumed run would draw other masks than an
  uninterrupted one.
- The loss is the mean over micro-batches of each micro-batch's mean loss, with torch's `scale_grads=True`
  dividing the gradients by the micro-batch count: exactly the trainer's gradient accumulation
  (`loss / accum` per micro-batch), so micro-batches are pipeline micro-batches.
- torch's `PipelineStage` allocates, once, a receive buffer for every micro-batch's input activation and output
  gradient (2 m activation-sized buffers per chunk, for the whole run); `phi1.planning.pipeline` counts them.

Around the schedule: data parallelism is torch DDP over each stage's DP group (torch's stage runs every
micro-batch but the last under `no_sync`, then all-reduces once). ZeRO-1 is the caller's optimizer: torch's
`ZeroRedundancyOptimizer` over `groups.dp_group` (DeepSpeed's engine cannot wrap a stage that torch's schedule
drives; ZeRO-2/3 are refused with pipelines, as DeepSpeed refuses them). The sequence-parallel gradients are
summed over the TP group, the gradient norm is global over every stage, TP rank and DP rank, and the last
stage's loss is broadcast over the PP group (and averaged over DP) so every rank logs the same number.

`StageTiming` (per-stage compute vs. idle time) measures the pipeline bubble (benchmarks/bench_pipeline_bubble.py).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ProcessGroup
from torch.nn.parallel import DistributedDataParallel

from phi1.parallel.grads import clip_to_global_norm_, squared_grad_sum, sum_over_group_

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.pipelining import PipelineStage

# torch.distributed.pipelining and device_mesh are imported where they are used: together they take seconds to
# import (FSDP and DTensor come with them), and the config validator reads SCHEDULES from this module.

SCHEDULES = ("1f1b", "interleaved", "gpipe")
"""Values of `parallel.pipeline_schedule`."""
MESH_DIM_NAMES = ("dp", "pp", "tp")
"""Named dims of the device mesh, outermost first."""
LAUNCH_ORDERS = ("tp-pp-dp", "tp-dp-pp")
"""Rank orders, fastest-varying dim first: this project's (default) and Megatron-core's default."""


# ----------------------------------------------------------------------------------------------------------------
# Layout (pure functions: no process group needed)


def rank_grid(world_size: int, tensor_parallel: int, pipeline_parallel: int, order: str = "tp-pp-dp") -> torch.Tensor:
    """Global rank at every (dp, pp, tp) coordinate, as an int64 tensor of shape (dp, pp, tp).

    Args:
        order: 'tp-pp-dp' (TP fastest, then PP, then DP) or 'tp-dp-pp' (Megatron-core's default).
    Raises:
        ValueError: a size < 1, a world size that tp x pp does not divide, or an unknown order.
    """
    if order not in LAUNCH_ORDERS:
        raise ValueError(f"rank order {order!r} is unknown; known orders are {LAUNCH_ORDERS}")
    for name, size in (("tensor_parallel", tensor_parallel), ("pipeline_parallel", pipeline_parallel), ("world size", world_size)):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"{name} must be a positive integer, got {size!r}")
    if world_size % (tensor_parallel * pipeline_parallel) != 0:
        raise ValueError(
            f"tensor_parallel x pipeline_parallel = {tensor_parallel} x {pipeline_parallel} does not divide the "
            f"world size {world_size}: launch a multiple of {tensor_parallel * pipeline_parallel} processes"
        )
    dp = world_size // (tensor_parallel * pipeline_parallel)
    ranks = torch.arange(world_size)
    if order == "tp-pp-dp":
        return ranks.reshape(dp, pipeline_parallel, tensor_parallel)
    return ranks.reshape(pipeline_parallel, dp, tensor_parallel).permute(1, 0, 2).contiguous()


def groups_along(grid: torch.Tensor, dim: str) -> list[list[int]]:
    """Every process group of mesh dim `dim` ('dp', 'pp' or 'tp'): ranks that differ only in that coordinate."""
    axis = MESH_DIM_NAMES.index(dim)
    return [row.tolist() for row in grid.movedim(axis, -1).reshape(-1, grid.shape[axis])]


def groups_spanning_nodes(grid: torch.Tensor, dim: str, ranks_per_node: int) -> list[list[int]]:
    """The groups of `dim` whose ranks sit on more than one node, nodes holding consecutive global ranks."""
    if ranks_per_node < 1:
        raise ValueError(f"ranks per node must be >= 1, got {ranks_per_node}")
    return [group for group in groups_along(grid, dim) if len({rank // ranks_per_node for rank in group}) > 1]


def stages_of_rank(pp_rank: int, pp_size: int, virtual_stages: int = 1) -> list[int]:
    """Stage indices pipeline rank `pp_rank` holds: pp_rank + v x pp_size for v < virtual_stages (Megatron's
    interleaved assignment; one stage without virtual stages).

    Raises:
        ValueError: pp_rank outside 0 .. pp_size - 1 or virtual_stages < 1.
    """
    if not 0 <= pp_rank < pp_size:
        raise ValueError(f"pipeline rank {pp_rank} is not in 0 .. {pp_size - 1}")
    if virtual_stages < 1:
        raise ValueError(f"virtual_stages must be >= 1, got {virtual_stages}")
    return [pp_rank + v * pp_size for v in range(virtual_stages)]


# ----------------------------------------------------------------------------------------------------------------
# Process groups


@dataclass
class PipelineGroups:
    """Where this process sits in the (dp, pp, tp) mesh, and the groups it talks through."""

    mesh: DeviceMesh
    """The whole world's mesh, dims named ("dp", "pp", "tp")."""
    rank: int
    dp_size: int
    pp_size: int
    tp_size: int
    dp_rank: int
    pp_rank: int
    tp_rank: int
    dp_group: ProcessGroup
    pp_group: ProcessGroup
    tp_group: ProcessGroup
    device: torch.device

    @property
    def last_stage_rank(self) -> int:
        """Global rank of this PP group's last pipeline rank (the one that computes the loss)."""
        return dist.get_global_rank(self.pp_group, self.pp_size - 1)


def build_pipeline_groups(tensor_parallel: int, pipeline_parallel: int, order: str = "tp-pp-dp") -> PipelineGroups:
    """The mesh and this rank's dp, pp and tp groups (every rank must call this, with the same arguments).

    Raises:
        RuntimeError: torch.distributed is not initialised.
        ValueError: the layout does not fit the world (see `rank_grid`).
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("build_pipeline_groups needs an initialised torch.distributed process group")
    from torch.distributed.device_mesh import DeviceMesh

    world, rank = dist.get_world_size(), dist.get_rank()
    grid = rank_grid(world, tensor_parallel, pipeline_parallel, order)
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = DeviceMesh(device_type, grid, mesh_dim_names=MESH_DIM_NAMES)
    dp_rank, pp_rank, tp_rank = mesh.get_coordinate()
    device = torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    return PipelineGroups(
        mesh=mesh, rank=rank, dp_size=grid.shape[0], pp_size=pipeline_parallel, tp_size=tensor_parallel,
        dp_rank=dp_rank, pp_rank=pp_rank, tp_rank=tp_rank, dp_group=mesh.get_group("dp"),
        pp_group=mesh.get_group("pp"), tp_group=mesh.get_group("tp"), device=device,
    )


# ----------------------------------------------------------------------------------------------------------------
# The runner


class PipelineChunk(Protocol):
    """What the runner needs of a stage module (`phi1.core.pipeline_stage.PhiPipelineStage` is one)."""

    stage_index: int
    num_stages: int
    is_first: bool
    is_last: bool

    def example_io(self, micro_batch_size: int, seq_len: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(input, output) of one micro-batch; meta tensors are enough."""

    def sequence_parallel_param_names(self) -> list[str]:
        """Parameters whose gradients are partial sums over the TP group's sequence shards."""


def check_schedule(schedule: str, pp_size: int, virtual_stages: int, n_microbatches: int) -> None:
    """Raise ValueError, naming the option, when `schedule` cannot run this pipeline.

    1F1B and interleaved need at least as many micro-batches as pipeline ranks (torch's schedules require it; fewer
    leave ranks idle anyway); interleaved needs virtual_stages >= 2 and a micro-batch count that is a multiple of
    the pipeline size (Megatron's rule; torch's relaxed rule then holds too).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"parallel.pipeline_schedule must be one of {SCHEDULES}, got {schedule!r}")
    if schedule == "interleaved" and virtual_stages < 2:
        raise ValueError(f"parallel.pipeline_schedule=interleaved needs parallel.virtual_stages >= 2, got {virtual_stages}")
    if schedule != "interleaved" and virtual_stages != 1:
        raise ValueError(f"parallel.virtual_stages={virtual_stages} needs parallel.pipeline_schedule=interleaved")
    if schedule in ("1f1b", "interleaved") and n_microbatches < pp_size:
        raise ValueError(
            f"{schedule} needs at least parallel.pipeline_parallel={pp_size} micro-batches per step, got "
            f"{n_microbatches}: raise batch.global_batch_size or lower batch.micro_batch_size"
        )
    if schedule == "interleaved" and n_microbatches % pp_size != 0:
        raise ValueError(
            f"interleaved needs micro-batches per step ({n_microbatches}) to be a multiple of "
            f"parallel.pipeline_parallel={pp_size}"
        )


@dataclass
class StageTiming:
    """Time one rank spent in the last step's schedule: computing its stages vs. waiting."""

    compute_s: float
    """Forward, backward and loss of this rank's stages."""
    wall_s: float
    """The whole schedule, between two barriers of the PP group (the same step time for every rank)."""
    peak_in_flight: int = 0
    """Most chunk micro-batches whose forward had run and backward had not, at once (activations held)."""

    @property
    def idle_fraction(self) -> float:
        """Share of the step this rank did not compute: its pipeline bubble (plus communication)."""
        return max(0.0, 1.0 - self.compute_s / self.wall_s) if self.wall_s > 0 else 0.0


@dataclass
class PipelineStepResult:
    loss: float
    """Mean loss of the step's micro-batches, averaged over DP; the same on every rank."""
    grad_norm: float
    """Global gradient norm before clipping (nan when the step was not asked to clip or step)."""
    skipped: bool = False
    """True when the gradient norm was not finite and the optimizer did not step."""


class PipelineRunner:
    """Runs one rank's pipeline stages through a schedule, with DP, SP gradient sums, clipping and the update.

    Args:
        chunks: this rank's stage modules, in `stages_of_rank` order (one, or V for 'interleaved').
        groups: from `build_pipeline_groups`.
        loss_fn: (last stage output, labels micro-batch) -> mean loss of that micro-batch.
        n_microbatches: micro-batches per step (gradient accumulation steps).
        micro_batch_size, seq_len: the shape of one micro-batch of input ids.
        schedule: '1f1b', 'interleaved' or 'gpipe'.
        activation_dtype: dtype of the activations sent between stages.
        optimizer: stepped by `step`; None to drive the update yourself after `forward_backward`.
        grad_clip: clip the global gradient norm to this in `step` (0: measure only).
        timed: record `last_timing` (per-stage compute vs. idle); adds a barrier per step.
        autocast: a factory of the context the forward runs in (mixed precision: the trainer's `autocast`);
            entered around each schedule call, so every stage forward and the loss run inside it.
    groups may be a `PipelineGroups` or the trainer's `phi1.parallel.state.ParallelState` (the same fields).
    Raises:
        ValueError: a schedule that cannot run this pipeline, or chunks that are not this rank's stages.
    """

    def __init__(
        self,
        chunks: Sequence[nn.Module],
        groups: PipelineGroups,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        *,
        n_microbatches: int,
        micro_batch_size: int,
        seq_len: int,
        schedule: str = "1f1b",
        activation_dtype: torch.dtype = torch.float32,
        optimizer: torch.optim.Optimizer | None = None,
        grad_clip: float = 0.0,
        timed: bool = False,
        autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
    ) -> None:
        from torch.distributed.pipelining import (
            PipelineStage,
            Schedule1F1B,
            ScheduleGPipe,
            ScheduleInterleaved1F1B,
        )

        virtual_stages = len(chunks)
        check_schedule(schedule, groups.pp_size, virtual_stages, n_microbatches)
        expected = stages_of_rank(groups.pp_rank, groups.pp_size, virtual_stages)
        held = [chunk.stage_index for chunk in chunks]
        if held != expected:
            raise ValueError(f"pipeline rank {groups.pp_rank} must hold stages {expected}, was given {held}")
        if any(chunk.num_stages != groups.pp_size * virtual_stages for chunk in chunks):
            raise ValueError(f"every chunk must belong to a pipeline of {groups.pp_size * virtual_stages} stages")
        if grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 (0: measure only), got {grad_clip}")
        self.groups = groups
        self.n_microbatches = n_microbatches
        self.schedule_name = schedule
        self.optimizer = optimizer
        self.grad_clip = grad_clip
        self.timed = timed
        self.autocast = autocast or contextlib.nullcontext
        self.last_stage_rank = dist.get_global_rank(groups.pp_group, groups.pp_size - 1)
        self.last_timing: StageTiming | None = None
        self._compute_s = 0.0
        self._in_flight = self._peak_in_flight = 0
        self.modules = [
            DistributedDataParallel(chunk, process_group=groups.dp_group, broadcast_buffers=False,
                                    device_ids=[groups.device.index] if groups.device.type == "cuda" else None)
            if groups.dp_size > 1 else chunk
            for chunk in chunks
        ]
        self.chunks = list(chunks)
        self.holds_first = any(chunk.is_first for chunk in chunks)
        self.holds_last = any(chunk.is_last for chunk in chunks)
        self.stages = []
        for chunk, module in zip(chunks, self.modules):
            example_in, example_out = chunk.example_io(micro_batch_size, seq_len, activation_dtype)
            stage = PipelineStage(
                module, chunk.stage_index, chunk.num_stages, groups.device,
                input_args=(example_in,), output_args=(example_out,), group=groups.pp_group,
            )
            if timed:
                self._time_methods(stage)
            self.stages.append(stage)
        timed_loss = self._timed(loss_fn) if timed else loss_fn
        if schedule == "interleaved":
            self.schedule = ScheduleInterleaved1F1B(self.stages, n_microbatches, loss_fn=timed_loss)
        else:
            schedule_class = Schedule1F1B if schedule == "1f1b" else ScheduleGPipe
            self.schedule = schedule_class(self.stages[0], n_microbatches, loss_fn=timed_loss)

    # -- timing -------------------------------------------------------------------------------------------------

    def _timed(self, fn: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._compute_s += time.perf_counter() - start

        return wrapper

    def _time_methods(self, stage: PipelineStage) -> None:
        # The schedule calls these two for every micro-batch's compute; receives and sends happen outside them.
        forward, backward = self._timed(stage.forward_one_chunk), self._timed(stage.backward_one_chunk)

        def counted_forward(*args, **kwargs):
            self._in_flight += 1
            self._peak_in_flight = max(self._peak_in_flight, self._in_flight)
            return forward(*args, **kwargs)

        def counted_backward(*args, **kwargs):
            self._in_flight -= 1
            return backward(*args, **kwargs)

        stage.forward_one_chunk = counted_forward
        stage.backward_one_chunk = counted_backward

    # -- the step -----------------------------------------------------------------------------------------------

    def parameters(self) -> list[nn.Parameter]:
        """This rank's parameters, over all its chunks."""
        return [p for chunk in self.chunks for p in chunk.parameters()]

    def forward_backward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> float:
        """Run the schedule over this DP rank's batch; leave the gradients (DP-averaged, SP-summed) in `.grad`.

        Args:
            input_ids, labels: (n_microbatches x micro_batch_size, seq_len), this DP rank's share of the global
                batch. Every rank may pass them; only the first stage reads input_ids and the last labels.
        Returns:
            The mean loss of the micro-batches, averaged over DP, on every rank.
        """
        for p in self.parameters():
            p.grad = None
        losses: list[torch.Tensor] = []
        args = (input_ids.to(self.groups.device),) if self.holds_first else ()
        target = labels.to(self.groups.device) if self.holds_last else None
        if self.timed:
            dist.barrier(group=self.groups.pp_group)
            self._compute_s, self._in_flight, self._peak_in_flight = 0.0, 0, 0
            start = time.perf_counter()
        with self.autocast():
            self.schedule.step(*args, target=target, losses=losses, return_outputs=False)
        if self.timed:
            # The step ends when the last rank is done: a rank that finishes early idles until then too.
            dist.barrier(group=self.groups.pp_group)
            self.last_timing = StageTiming(compute_s=self._compute_s, wall_s=time.perf_counter() - start,
                                           peak_in_flight=self._peak_in_flight)
        self._allreduce_sequence_parallel_grads()
        return self._broadcast_loss(losses)

    def step(self, input_ids: torch.Tensor, labels: torch.Tensor) -> PipelineStepResult:
        """One optimizer step: `forward_backward`, global-norm clipping, then the optimizer (skipped when the norm
        is not finite).

        Raises:
            RuntimeError: the runner was built without an optimizer.
        """
        if self.optimizer is None:
            raise RuntimeError("PipelineRunner.step needs an optimizer; use forward_backward to update yourself")
        loss = self.forward_backward(input_ids, labels)
        norm = self.clip_grad_norm_(self.grad_clip) if self.grad_clip > 0 else self.grad_norm()
        if not math.isfinite(norm):
            return PipelineStepResult(loss=loss, grad_norm=norm, skipped=True)
        self.optimizer.step()
        return PipelineStepResult(loss=loss, grad_norm=norm)

    @torch.no_grad()
    def eval_loss(self, input_ids: torch.Tensor, labels: torch.Tensor) -> float:
        """Forward only (validation): the mean loss of the micro-batches, averaged over DP, on every rank."""
        return self._broadcast_loss(self._eval(input_ids, labels))

    @torch.no_grad()
    def eval_losses(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Forward only: each micro-batch's mean loss, (n_microbatches,) float32, the same on every rank of this
        pipeline (not averaged over DP: the caller may count only some micro-batches)."""
        losses = self._eval(input_ids, labels)
        groups = self.groups
        if self.holds_last:
            out = torch.stack([loss.detach().float().reshape(()) for loss in losses])
        else:
            out = torch.zeros(self.n_microbatches, device=groups.device)
        dist.broadcast(out, src=self.last_stage_rank, group=groups.pp_group)
        return out

    def _eval(self, input_ids: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
        losses: list[torch.Tensor] = []
        args = (input_ids.to(self.groups.device),) if self.holds_first else ()
        target = labels.to(self.groups.device) if self.holds_last else None
        with self.autocast():
            self.schedule.eval(*args, target=target, losses=losses)
        return losses

    def _broadcast_loss(self, losses: list[torch.Tensor]) -> float:
        groups = self.groups
        if self.holds_last:
            loss = torch.stack([loss.detach().float() for loss in losses]).mean().reshape(1)
        else:
            loss = torch.zeros(1, device=groups.device)
        dist.broadcast(loss, src=self.last_stage_rank, group=groups.pp_group)
        if groups.dp_size > 1:
            dist.all_reduce(loss, group=groups.dp_group)
            loss /= groups.dp_size
        return loss.item()

    def _allreduce_sequence_parallel_grads(self) -> None:
        if self.groups.tp_size == 1:
            return
        grads = []
        for chunk in self.chunks:
            params = dict(chunk.named_parameters())
            grads += [params[n].grad for n in chunk.sequence_parallel_param_names() if params[n].grad is not None]
        if not grads:
            return
        sum_over_group_(grads, self.groups.tp_group)

    # -- clipping -----------------------------------------------------------------------------------------------

    def grad_norm(self) -> float:
        """Global L2 norm of the whole model's gradients, over every stage, TP rank and DP rank.

        TP-sharded parameters' squares are summed over the TP group, replicated ones counted once; then the
        stages' totals are summed over the PP group. DP replicas hold the same averaged gradients, so DP needs no
        reduction. Every rank returns the same number.
        """
        total = squared_grad_sum(self.chunks, self.groups.tp_group, self.groups.device)
        if self.groups.pp_size > 1:
            dist.all_reduce(total, group=self.groups.pp_group)
        return math.sqrt(total.item())

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> float:
        """Scale every gradient so that the global norm is at most `max_norm`; return the norm before clipping.

        A non-finite norm is returned as it is and nothing is scaled (the caller skips the step).
        """
        return clip_to_global_norm_(max_norm, self.grad_norm,
                                    lambda: [p.grad for p in self.parameters() if p.grad is not None])
