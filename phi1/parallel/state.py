"""Process groups for tensor parallelism (TP) and data parallelism (DP).

The world of `world_size` ranks is a (dp_size, tp_size) grid with TP ranks adjacent, so that on one node the
TP group (which talks on every layer) shares the fastest links:

    world 4, tp 2:   TP groups {0, 1} {2, 3}      DP groups {0, 2} {1, 3}

`init_distributed` returns a `ParallelState` that callers pass on explicitly (to the model, the DP wrapper,
the gradient clipper, the checkpoint code); nothing in phi1 reads the groups from a global.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from phi1.core.config import ModelConfig


@dataclass
class ParallelState:
    """Where this process sits in the (dp, tp) grid, and the groups it talks through."""

    rank: int
    """Global rank, 0 .. world_size - 1."""
    world_size: int
    """Number of processes in the job."""
    local_rank: int
    """Rank on this node; selects the CUDA device."""
    tp_size: int
    """Tensor-parallel size: ranks that split each layer between them."""
    tp_rank: int
    """Rank inside the TP group (rank % tp_size)."""
    dp_size: int
    """Data-parallel size: world_size / tp_size model replicas."""
    dp_rank: int
    """Replica index (rank // tp_size); selects the data shard."""
    tp_group: ProcessGroup | None
    """TP process group; None in a single-process run."""
    dp_group: ProcessGroup | None
    """DP process group; None in a single-process run."""
    device: torch.device
    """cuda:local_rank when CUDA is present, else cpu."""

    @property
    def is_main(self) -> bool:
        """True on global rank 0 (the rank that logs)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def validate_layout(world_size: int, tensor_parallel_size: int, model_config: ModelConfig | None = None) -> None:
    """Raise ValueError naming the option when the layout is impossible; touches no process group.

    Args:
        world_size: number of processes launched.
        tensor_parallel_size: the `tensor_parallel_size` option.
        model_config: when given, its heads, d_mlp and vocab_size must split over the TP group.
    Raises:
        ValueError: tensor_parallel_size < 1, world_size not a multiple of it, or a model dimension not
            divisible by it.
    """
    if not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size must be a positive integer, got {tensor_parallel_size!r}")
    if world_size < 1:
        raise ValueError(f"world size must be >= 1, got {world_size}")
    if world_size % tensor_parallel_size != 0:
        raise ValueError(
            f"tensor_parallel_size={tensor_parallel_size} does not divide the world size {world_size}: launch a "
            f"multiple of {tensor_parallel_size} processes or change tensor_parallel_size"
        )
    if model_config is not None:
        try:
            model_config.validate(tensor_parallel_size=tensor_parallel_size)
        except ValueError as e:
            raise ValueError(f"tensor_parallel_size={tensor_parallel_size} does not fit the model: {e}") from None


def _launch_env() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) from torchrun or an MPI launcher; None for a plain `python` run."""
    env = os.environ
    if "WORLD_SIZE" in env and "RANK" in env:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        return rank, world, int(env.get("LOCAL_RANK", rank))
    if "OMPI_COMM_WORLD_SIZE" in env:
        rank, world = int(env["OMPI_COMM_WORLD_RANK"]), int(env["OMPI_COMM_WORLD_SIZE"])
        return rank, world, int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", rank))
    if "PMI_SIZE" in env:
        rank, world = int(env["PMI_RANK"]), int(env["PMI_SIZE"])
        local = env.get("MPI_LOCALRANKID", env.get("PMI_LOCAL_RANK", rank))
        return rank, world, int(local)
    return None


def _device_for(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def build_groups(rank: int, world_size: int, tp_size: int) -> tuple[ProcessGroup, ProcessGroup]:
    """Create every TP and DP group (all ranks must call this, in the same order) and return this rank's two."""
    dp_size = world_size // tp_size
    tp_group = dp_group = None
    for replica in range(dp_size):
        ranks = list(range(replica * tp_size, (replica + 1) * tp_size))
        group = dist.new_group(ranks)
        if rank in ranks:
            tp_group = group
    for tp_rank in range(tp_size):
        ranks = list(range(tp_rank, world_size, tp_size))
        group = dist.new_group(ranks)
        if rank in ranks:
            dp_group = group
    assert tp_group is not None and dp_group is not None
    return tp_group, dp_group


def init_distributed(
    tensor_parallel_size: int = 1,
    backend: str | None = None,
    *,
    timeout: timedelta = timedelta(minutes=10),
) -> ParallelState:
    """Initialise torch.distributed from the launcher's environment and build the TP and DP groups.

    Launches recognised: torchrun (RANK, WORLD_SIZE, LOCAL_RANK), Open MPI (OMPI_COMM_WORLD_*) and PMI
    (PMI_RANK, PMI_SIZE); MASTER_ADDR defaults to 127.0.0.1 and MASTER_PORT to 29500. A process group that
    is already initialised (e.g. by a test harness) is used as it is. Without any of these the run is one
    process and the returned state has no groups.

    Args:
        tensor_parallel_size: ranks per TP group (adjacent global ranks).
        backend: torch.distributed backend; default nccl with CUDA, gloo otherwise.
        timeout: collective timeout, so that a dead rank fails the job instead of hanging it.
    Raises:
        ValueError: the world size is not a multiple of tensor_parallel_size (raised before any process-group
            work).
    """
    launch = _launch_env()
    if dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = launch[2] if launch is not None else rank
        validate_layout(world_size, tensor_parallel_size)
    elif launch is None or launch[1] == 1:
        validate_layout(1, tensor_parallel_size)
        local_rank = launch[2] if launch is not None else 0
        return ParallelState(
            rank=0, world_size=1, local_rank=local_rank, tp_size=1, tp_rank=0, dp_size=1, dp_rank=0,
            tp_group=None, dp_group=None, device=_device_for(local_rank),
        )
    else:
        rank, world_size, local_rank = launch
        validate_layout(world_size, tensor_parallel_size)
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(world_size)
        os.environ["LOCAL_RANK"] = str(local_rank)
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and restart is not None:
            # torchrun's agent store outlives a restart (--max-restarts): without a per-attempt prefix, a rank
            # of the new attempt can read a peer address the previous attempt wrote and fail to connect.
            agent_store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                                        is_master=False, timeout=timeout)
            store = dist.PrefixStore(f"phi1/attempt_{restart}", agent_store)
            dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
        else:
            dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=timeout)

    device = _device_for(local_rank)
    tp_group, dp_group = build_groups(rank, world_size, tensor_parallel_size)
    return ParallelState(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        tp_size=tensor_parallel_size,
        tp_rank=rank % tensor_parallel_size,
        dp_size=world_size // tensor_parallel_size,
        dp_rank=rank // tensor_parallel_size,
        tp_group=tp_group,
        dp_group=dp_group,
        device=device,
    )


def destroy_distributed() -> None:
    """Tear down every process group (a no-op when none was initialised)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
