"""Process groups for tensor (TP), pipeline (PP) and data parallelism (DP), from torch's `DeviceMesh`.

The world of `world_size` ranks is a `DeviceMesh` of shape (dp, pp, tp) with named dims ("dp", "pp", "tp"),
global ranks laid out TP adjacent, then PP, then DP (Megatron's launch order, `phi1.parallel.pipeline.rank_grid`),
so that a node holds whole TP groups (the TP group talks on every layer and needs the fastest links):

    world 4, tp 2:          TP groups {0, 1} {2, 3}       DP groups {0, 2} {1, 3}
    world 8, tp 2, pp 2:    TP {0,1} {2,3} {4,5} {6,7}    PP {0,2} {1,3} {4,6} {5,7}    DP {0,4} {1,5} {2,6} {3,7}

`init_distributed` returns a `ParallelState` that callers pass on explicitly (to the model, the DP wrapper,
the gradient clipper, the checkpoint code); nothing in phi1 reads the groups from a global. The groups are the
mesh's own (`mesh.get_group(dim)`), not hand-built lists.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Protocol

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from phi1.parallel.pipeline import MESH_DIM_NAMES, rank_grid

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


class SplittableModel(Protocol):
    """What `validate_layout` needs of a model configuration (`phi1.core.config.ModelConfig` is one): a check
    that its heads, MLP and vocabulary split over a TP group. Taken as a protocol so that `parallel` does not
    import `core`."""

    def validate(self, tensor_parallel_size: int = 1) -> None:
        """Raise ValueError naming the dimension that `tensor_parallel_size` does not divide."""


@dataclass
class ParallelState:
    """Where this process sits in the (dp, pp, tp) mesh, and the groups it talks through.

    The first ten fields keep their meaning from before pipeline parallelism (tp_rank is the rank inside the TP
    group, dp_rank the replica index that selects the data shard); the pipeline fields default to no pipeline.
    """

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
    """Data-parallel size: world_size / (tp_size x pp_size) model replicas."""
    dp_rank: int
    """Replica index (rank // (tp_size x pp_size)); selects the data shard."""
    tp_group: ProcessGroup | None
    """TP process group; None in a single-process run."""
    dp_group: ProcessGroup | None
    """DP process group; None in a single-process run."""
    device: torch.device
    """cuda:local_rank when CUDA is present, else cpu."""
    pp_size: int = 1
    """Pipeline-parallel size: stages the blocks are split into."""
    pp_rank: int = 0
    """Pipeline rank: which stage (or, interleaved, which stages) this rank runs."""
    pp_group: ProcessGroup | None = None
    """PP process group (this rank's pipeline); None in a single-process run."""
    mesh: DeviceMesh | None = None
    """The whole world's DeviceMesh, dims ("dp", "pp", "tp"); None in a single-process run."""

    @property
    def is_main(self) -> bool:
        """True on global rank 0 (the rank that logs)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_first_stage(self) -> bool:
        """True on pipeline rank 0 (holds the embedding)."""
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        """True on the last pipeline rank (holds the lm_head and computes the loss)."""
        return self.pp_rank == self.pp_size - 1


def validate_layout(world_size: int, tensor_parallel_size: int, model_config: SplittableModel | None = None,
                    pipeline_parallel_size: int = 1) -> None:
    """Raise ValueError naming the option when the layout is impossible; touches no process group.

    Args:
        world_size: number of processes launched.
        tensor_parallel_size: the `tensor_parallel_size` option.
        model_config: when given, its heads, d_mlp and vocab_size must split over the TP group (anything with
            `validate(tensor_parallel_size=...)`, such as `phi1.core.config.ModelConfig`).
        pipeline_parallel_size: pipeline stages; tp x pp must divide the world size.
    Raises:
        ValueError: tensor_parallel_size or pipeline_parallel_size < 1, world_size not a multiple of tp x pp,
            or a model dimension not divisible by tp.
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
    if not isinstance(pipeline_parallel_size, int) or pipeline_parallel_size < 1:
        raise ValueError(f"pipeline_parallel_size must be a positive integer, got {pipeline_parallel_size!r}")
    if world_size % (tensor_parallel_size * pipeline_parallel_size) != 0:
        raise ValueError(
            f"tensor_parallel_size x pipeline_parallel_size = {tensor_parallel_size} x {pipeline_parallel_size} "
            f"does not divide the world size {world_size}: launch a multiple of "
            f"{tensor_parallel_size * pipeline_parallel_size} processes or change the sizes"
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


def build_mesh(world_size: int, tp_size: int, pp_size: int = 1) -> DeviceMesh:
    """The (dp, pp, tp) DeviceMesh of the world, TP adjacent, then PP, then DP (every rank must call this).

    DeviceMesh creates one process group per slice of every dim (all ranks take part in each creation, as
    torch requires); `mesh.get_group(dim)` is this rank's.
    """
    from torch.distributed.device_mesh import DeviceMesh

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    return DeviceMesh(device_type, rank_grid(world_size, tp_size, pp_size), mesh_dim_names=MESH_DIM_NAMES)


def init_distributed(
    tensor_parallel_size: int = 1,
    backend: str | None = None,
    *,
    pipeline_parallel_size: int = 1,
    timeout: timedelta = timedelta(minutes=10),
) -> ParallelState:
    """Initialise torch.distributed from the launcher's environment and build the (dp, pp, tp) mesh.

    Launches recognised: torchrun (RANK, WORLD_SIZE, LOCAL_RANK), Open MPI (OMPI_COMM_WORLD_*) and PMI
    (PMI_RANK, PMI_SIZE); MASTER_ADDR defaults to 127.0.0.1 and MASTER_PORT to 29500. A process group that
    is already initialised (e.g. by a test harness) is used as it is. Without any of these the run is one
    process and the returned state has no groups.

    Args:
        tensor_parallel_size: ranks per TP group (adjacent global ranks).
        pipeline_parallel_size: pipeline stages (ranks tp apart form a pipeline).
        backend: torch.distributed backend; default nccl with CUDA, gloo otherwise.
        timeout: collective timeout, so that a dead rank fails the job instead of hanging it.
    Raises:
        ValueError: the world size is not a multiple of tensor_parallel_size x pipeline_parallel_size (raised
            before any process-group work).
    """
    launch = _launch_env()
    if dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = launch[2] if launch is not None else rank
        validate_layout(world_size, tensor_parallel_size, pipeline_parallel_size=pipeline_parallel_size)
    elif launch is None or launch[1] == 1:
        validate_layout(1, tensor_parallel_size, pipeline_parallel_size=pipeline_parallel_size)
        local_rank = launch[2] if launch is not None else 0
        return ParallelState(
            rank=0, world_size=1, local_rank=local_rank, tp_size=1, tp_rank=0, dp_size=1, dp_rank=0,
            tp_group=None, dp_group=None, device=_device_for(local_rank),
        )
    else:
        rank, world_size, local_rank = launch
        validate_layout(world_size, tensor_parallel_size, pipeline_parallel_size=pipeline_parallel_size)
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
    mesh = build_mesh(world_size, tensor_parallel_size, pipeline_parallel_size)
    dp_rank, pp_rank, tp_rank = mesh.get_coordinate()
    return ParallelState(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        tp_size=tensor_parallel_size,
        tp_rank=tp_rank,
        dp_size=world_size // (tensor_parallel_size * pipeline_parallel_size),
        dp_rank=dp_rank,
        tp_group=mesh.get_group("tp"),
        dp_group=mesh.get_group("dp"),
        device=device,
        pp_size=pipeline_parallel_size,
        pp_rank=pp_rank,
        pp_group=mesh.get_group("pp"),
        mesh=mesh,
    )


def destroy_distributed() -> None:
    """Tear down every process group (a no-op when none was initialised)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
