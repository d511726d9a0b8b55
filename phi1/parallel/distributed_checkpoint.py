"""One checkpoint format for every layout: `torch.distributed.checkpoint` (DCP) over a (dp, pp, tp) DeviceMesh.

Every rank writes its own tensors in parallel, and the checkpoint loads at any other TP x PP x DP layout, or in
one process, with identical whole tensors:

    iter_0001000/
        .metadata                      DCP: every tensor's whole shape and the chunks each file holds
        __0_0.distcp __1_0.distcp ...  DCP: each rank's chunks (a replica's copy is written once, dp deduplicated)
        rank_state/rank00000.json      this rank's plain state (RNG states...) with tensors stored beside it in
        rank_state/rank00000.safetensors
        format.json                    {"format": "phi1-dcp", "format_version": 1, "layout": {dp, pp, tp}}
        model_config.json              the ModelConfig as a dict, so export needs no model
        trainer_state.json             iteration, consumed samples, schedule... (written last: marks completeness)
        manifest.json                  every other file's size and SHA-256 (the caller's `seal`, see below)

What the DCP state dict holds, by NAME (never by optimizer index, so it survives any regrouping):

    model.{name}               the parameter: a DTensor on the (dp, tp) submesh of this rank's pipeline stage,
                               [Replicate(), Shard(dim)] when the layer declares a TP split dim in
                               `partition_dims` (phi1.parallel.layers), else [Replicate(), Replicate()]
    optim.{name}.exp_avg       AdamW's moments, sharded exactly like their parameter
    optim.{name}.exp_avg_sq
    optim.{name}.step          AdamW's step count (a 0-d tensor, the same on every rank)

A pipeline stage holds (and saves, and asks for) only its own names: the modules of a rank are passed as a list
(the stage modules of `phi1.core.pipeline_stage`, which keep the full model's names), so PP needs nothing else.
Loading builds the same dict for the new layout and lets DCP read, from whatever chunks were written, exactly
the slice each rank now holds.

Non-tensor state never goes through DCP: DCP stores it as pickled bytes and its default load planner reads those
with the unpickler's weights_only off, which could run code from the checkpoint. `trainer_state` and
`model_config` are JSON; each rank's `rank_state` (RNG states: tensors and plain values) is split into a JSON
tree and a safetensors file. A checkpoint whose metadata lists any bytes entry is refused before any read.

What is still unpickled, and how it is kept safe: DCP's `.metadata` file is a pickle (`FileSystemReader` calls
`pickle.load`). `SafeFileSystemReader` reads it with an unpickler that only builds DCP's own metadata classes,
torch.Size, dtypes, layouts and memory formats (an allowlist, as `torch.load(weights_only=True)` does); every
file name in it must be a plain relative name of a regular file inside the checkpoint (no absolute path, no
`..`, no symlink leaving it). Tensor payloads (`*.distcp`) are read by DCP with `torch.load(weights_only=True)`;
a payload holding any other pickle is refused there and named in one line. `.metadata` (at most 1 GiB) and the JSON
files (at most 16 MiB, nesting bounded) are size-checked before they are read.

Atomic and verifiable: everything is written into `<directory>.tmp/` (DCP fsyncs its files); after a barrier,
rank 0 writes the JSON files (fsynced), calls `seal(tmp)` (the trainer passes `phi1.training.fault.write_manifest`)
and renames the directory into place. Loading calls `verify(directory)` first (`fault.verify_checkpoint`, which
raises `CheckpointCorruptError`, the signal `find_verified_checkpoint(..., fallback=True)` uses to fall back to
the previous checkpoint). The manifest functions are passed in rather than imported because they live in
`phi1.loading`, above this package.

Asynchronous save: `save_checkpoint(..., asynchronous=True)` stages the tensors to CPU (DCP's `async_save`),
returns a `PendingSave` at once and writes in a background thread; training continues, and `PendingSave.wait()`
(collective: every rank calls it, before the next save or at exit) finishes the files and renames the directory.

The exact data position: the trainer puts `consumed_samples` (and its scheduler state) into `trainer_state`;
the data sampler of the new layout restarts from that global sample count, so no sample is skipped or repeated
whatever the new DP size. Rank states (RNG) come back by global rank; `LoadedCheckpoint.same_layout` tells the
caller whether they still mean the same thing (they do only when the layout is unchanged).

Existing phi1 checkpoints (`iter_*` directories with `model_tp*.safetensors` and `optim_tp*.pt`) need no
conversion to resume: the trainer reads both formats (`phi1.training.checkpoint_dcp`), the phi1 one at any TP
size or pipeline layout too. `tools/export_dcp.py convert ITER_DIR OUT_DIR` (`phi1.loading.convert`) still writes
one as DCP: it merges the TP shards to whole tensors (phi1.loading), maps each `optim_tp*.pt` entry from its
optimizer index to its parameter name (`phi1.loading.optimizer_state`) and writes them with `save_full_checkpoint`.

How a trainer uses it (every rank; `grid` from `phi1.parallel.pipeline.rank_grid`):

    mesh = checkpoint_mesh(grid) if world_size > 1 else None          # once, at start-up
    pending = save_checkpoint(run_dir / f"iter_{it:07d}", stages_or_[model], optimizer, mesh,
                              trainer_state={...,"consumed_samples": n}, model_config=config.to_dict(),
                              rank_state=capture_rng_states(), seal=fault.write_manifest,
                              asynchronous=True, async_group=save_group)
    ...                                                                # next steps run meanwhile
    pending.wait()                                                     # then rank 0 writes `latest`
    found = find_verified_checkpoint(run_dir, fallback)                # at resume
    loaded = load_checkpoint(found, stages_or_[model], optimizer, mesh, verify=fault.verify_checkpoint)
    if loaded.same_layout: restore_rng_states(loaded.rank_state)

FSDP2: a parameter that already is a DTensor over the dp dimension (`fully_shard`) is saved as it is without
TP (each DP rank writes its rows), and under TP gathered over dp to its TP shard first; loading puts each DP
rank's rows back (`_copy_into`). torch's ZeroRedundancyOptimizer (ZeRO-1 beside pipeline stages): each
parameter's moments are saved and loaded by the DP rank that owns them.

Not covered: DeepSpeed ZeRO keeps its own optimizer format, and ZeRO-3's partitioned parameters are refused (they
are empty placeholders between gathers).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import shutil
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    StorageMeta,
    TensorStorageMetadata,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from phi1.parallel.layers import tensor_parallel_dims

DCP_FORMAT = "phi1-dcp"
DCP_FORMAT_VERSION = 1
MESH_DIMS = ("dp", "pp", "tp")
FORMAT_FILE = "format.json"
MODEL_CONFIG_FILE = "model_config.json"
TRAINER_STATE_FILE = "trainer_state.json"
RANK_STATE_DIR = "rank_state"
# Caps on what is read whole from an untrusted checkpoint, checked before the read: the JSON files are a few KB,
# and `.metadata` grows with tensors x chunks (a 7B model saved by 1,024 ranks needs some 100 MB); a forged
# multi-gigabyte file is refused by its size instead of being read into memory.
MAX_JSON_BYTES = 16 << 20
MAX_METADATA_BYTES = 1 << 30
MODEL_PREFIX = "model."
OPTIM_PREFIX = "optim."
ADAMW_KEYS = ("exp_avg", "exp_avg_sq")


# ----------------------------------------------------------------------------------------------------------------
# Layout


def checkpoint_mesh(rank_grid: torch.Tensor, device_type: str = "cpu") -> DeviceMesh:
    """The (dp, pp, tp) DeviceMesh over the global ranks of `rank_grid` (shape (dp, pp, tp), as
    `phi1.parallel.pipeline.rank_grid` returns). Collective: every rank calls it, in the same order."""
    if rank_grid.dim() != 3:
        raise ValueError(f"rank grid must have shape (dp, pp, tp), got {tuple(rank_grid.shape)}")
    return DeviceMesh(device_type, rank_grid, mesh_dim_names=MESH_DIMS)


def _layout(mesh: DeviceMesh | None) -> dict[str, int]:
    if mesh is None:
        return {"dp": 1, "pp": 1, "tp": 1}
    return {name: mesh.size(mesh.mesh_dim_names.index(name)) for name in MESH_DIMS}


def _named_parameters(modules: Sequence[nn.Module]) -> dict[str, tuple[nn.Parameter, int | None]]:
    """{name: (parameter, TP split dim)} over this rank's modules (its pipeline stages, or the whole model)."""
    named: dict[str, tuple[nn.Parameter, int | None]] = {}
    for module in modules:
        module = getattr(module, "module", module)  # a DDP wrapper
        dims = tensor_parallel_dims(module)
        for name, param in module.named_parameters():
            if hasattr(param, "ds_id"):
                raise ValueError(f"parameter {name} is partitioned by DeepSpeed ZeRO-3; this checkpoint format takes "
                                 "TP / PP / DP-replicated and FSDP2 parameters (save ZeRO-3 runs with "
                                 "phi1.parallel.checkpoint)")
            if name in named:
                raise ValueError(f"parameter {name} is held by two of this rank's modules")
            named[name] = (param, dims[name])
    return named


def _tp_size(mesh: DeviceMesh | None) -> int:
    return 1 if mesh is None else mesh.size(mesh.mesh_dim_names.index("tp"))


def _as_global(local: torch.Tensor, dim: int | None, mesh: DeviceMesh | None) -> torch.Tensor:
    """This rank's shard presented as the whole tensor it is a slice of: a DTensor on the (dp, tp) submesh.

    An FSDP2 parameter (or moment) already is a DTensor over the dp dimension: without TP its global shape is
    the whole tensor and it is saved as it is (each DP rank writes its own rows); with TP its global shape is
    only this TP rank's shard, so it is gathered over dp to that shard and presented as TP shards like any other.
    """
    if isinstance(local, DTensor):
        if _tp_size(mesh) == 1:
            return local
        local = local.full_tensor()
    if mesh is None:
        return local
    placement = Shard(dim) if dim is not None else Replicate()
    return DTensor.from_local(local, mesh["dp", "tp"], [Replicate(), placement], run_check=False)


def _empty_like(tensor: torch.Tensor, mesh: DeviceMesh | None) -> torch.Tensor:
    """A tensor to load into, shaped as `_as_global` will present `tensor` (before wrapping)."""
    if isinstance(tensor, DTensor) and _tp_size(mesh) > 1:
        return torch.empty(tensor.shape, dtype=tensor.dtype, device=tensor.to_local().device)
    return torch.empty_like(tensor)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _copy_into(target: torch.Tensor, loaded: torch.Tensor) -> None:
    """Copy what DCP loaded into a parameter or moment. An FSDP2 DTensor takes its local rows: directly when it
    was loaded as itself (no TP), else from the whole TP shard that was loaded (this DP rank's slice of it)."""
    if not isinstance(target, DTensor):
        target.copy_(_local(loaded))
        return
    if not (isinstance(loaded, DTensor) and loaded.device_mesh == target.device_mesh
            and tuple(loaded.placements) == tuple(target.placements)):
        from torch.distributed.tensor import distribute_tensor

        loaded = distribute_tensor(_local(loaded).to(target.to_local().device), target.device_mesh, target.placements,
                                   src_data_rank=None)
    target.to_local().copy_(loaded.to_local())


def _optimizer_holding_state(optimizer: torch.optim.Optimizer | None) -> tuple[torch.optim.Optimizer | None, set | None]:
    """(the optimizer whose `.state` holds the AdamW moments, ids of the parameters this rank keeps state for, or
    None for all). torch's ZeroRedundancyOptimizer (ZeRO-1 under pipeline parallelism) keeps each parameter's
    state on one DP rank, in its local optimizer: that rank saves and loads it, the others skip it."""
    if optimizer is None:
        return None, None
    from torch.distributed.optim import ZeroRedundancyOptimizer

    if isinstance(optimizer, ZeroRedundancyOptimizer):
        inner = optimizer.optim
        return inner, {id(p) for group in inner.param_groups for p in group["params"]}
    return optimizer, None


def _state_dict(modules: Sequence[nn.Module], optimizer: torch.optim.Optimizer | None, mesh: DeviceMesh | None,
                for_load: bool) -> dict[str, torch.Tensor]:
    """The DCP state dict of this rank: parameters and AdamW state by name. For loading, fresh tensors of the
    same shapes (filled by DCP, then copied in by `_apply`)."""
    state: dict[str, torch.Tensor] = {}
    holder, owned = _optimizer_holding_state(optimizer)
    for name, (param, dim) in _named_parameters(modules).items():
        local = _empty_like(param.detach(), mesh) if for_load else param.detach()
        state[MODEL_PREFIX + name] = _as_global(local, dim, mesh)
        if holder is None or (owned is not None and id(param) not in owned):
            continue
        slot = holder.state.get(param, {})
        if for_load:
            slot = {"step": torch.zeros((), dtype=torch.float32), **{k: param.detach() for k in ADAMW_KEYS}}
        elif not slot:
            continue  # no step taken yet: nothing to save for this parameter
        for key in ADAMW_KEYS:
            if key in slot:
                local = _empty_like(slot[key], mesh) if for_load else slot[key].detach()
                state[f"{OPTIM_PREFIX}{name}.{key}"] = _as_global(local, dim, mesh)
        if "step" in slot:
            step = slot["step"]
            state[f"{OPTIM_PREFIX}{name}.step"] = torch.zeros((), dtype=torch.float32) if for_load else (
                _local(step).detach().float().cpu() if torch.is_tensor(step) else torch.tensor(float(step)))
    return state


# ----------------------------------------------------------------------------------------------------------------
# Plain per-rank state: JSON with tensors beside it in safetensors (no pickle)


def _split_tensors(tree: Any, tensors: dict[str, torch.Tensor], path: str = "") -> Any:
    """`tree` with every tensor replaced by {"__tensor__": key} and stored in `tensors[key]` (keys are numbered,
    so no dict key of the tree can collide with another); `path` names the place in messages."""
    if torch.is_tensor(tree):
        key = f"tensor{len(tensors)}"
        tensors[key] = tree.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(tree, dict):
        if not all(isinstance(k, str) for k in tree):
            raise ValueError(f"rank state {path or '(root)'}: dict keys must be strings")
        return {k: _split_tensors(v, tensors, f"{path}.{k}" if path else k) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_split_tensors(v, tensors, f"{path}.{i}") for i, v in enumerate(tree)]
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree
    raise ValueError(f"rank state {path or '(root)'}: {type(tree).__name__} is neither a tensor nor plain JSON data")


def _join_tensors(tree: Any, tensors: dict[str, torch.Tensor], source: Path) -> Any:
    if isinstance(tree, dict):
        if set(tree) == {"__tensor__"}:
            if tree["__tensor__"] not in tensors:
                raise ValueError(f"{source}: names tensor {tree['__tensor__']!r}, which its safetensors file lacks")
            return tensors[tree["__tensor__"]]
        return {k: _join_tensors(v, tensors, source) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_join_tensors(v, tensors, source) for v in tree]
    return tree


def _write_json(path: Path, value: Any) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(value, handle, indent=1)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _write_rank_state(directory: Path, rank: int, rank_state: dict) -> None:
    tensors: dict[str, torch.Tensor] = {}
    tree = _split_tensors(rank_state, tensors)
    folder = directory / RANK_STATE_DIR
    folder.mkdir(exist_ok=True)
    save_file(tensors, str(folder / f"rank{rank:05d}.safetensors"))
    _fsync_file(folder / f"rank{rank:05d}.safetensors")
    _write_json(folder / f"rank{rank:05d}.json", tree)


# ----------------------------------------------------------------------------------------------------------------
# Reading untrusted metadata


def _inside(directory: Path, name: object, what: str) -> Path:
    """`directory/name` when `name` is a plain relative path naming a regular file inside `directory`.

    (phi1.loading.paths.inside does the same for the loaders; this package sits below it.)"""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise ValueError(f"{directory}: {what} {name!r} is not a file name")
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts:
        raise ValueError(f"{directory}: {what} {name!r} leaves the checkpoint directory (absolute or '..'); refused")
    path = directory / relative
    root = directory.resolve()
    if not path.resolve().is_relative_to(root):
        raise ValueError(f"{directory}: {what} {name!r} is a symlink leaving the checkpoint directory; refused")
    if not path.is_file():
        raise ValueError(f"{directory}: {what} {name!r} is missing or not a regular file")
    return path


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only what DCP's `.metadata` holds; any other global (a callable that would run code) is refused."""

    ALLOWED = {
        ("torch.distributed.checkpoint.metadata", name) for name in (
            "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
            "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
    } | {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch._utils", "_get_layout"),
        ("torch.serialization", "_get_layout"),
        ("collections", "OrderedDict"),
        ("pathlib", "PosixPath"),
        ("pathlib", "WindowsPath"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not part of DCP metadata")


class SafeFileSystemReader(dcp.FileSystemReader):
    """DCP's file reader with its `.metadata` pickle read through an allowlist and every file it names checked
    to stay inside the checkpoint; a bytes (pickled object) entry is refused before anything is read."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        directory = Path(self.path)
        path = _inside(directory, ".metadata", "DCP metadata")
        data = _read_bounded(path, MAX_METADATA_BYTES, "DCP metadata")
        try:
            metadata = _MetadataUnpickler(io.BytesIO(data)).load()
        except Exception as e:  # UnpicklingError, EOFError, a class with the wrong fields...
            raise ValueError(f"{path}: unreadable DCP metadata ({type(e).__name__}: {e}); refused") from None
        if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
            raise ValueError(f"{path}: not DCP metadata; refused")
        for key, entry in metadata.state_dict_metadata.items():
            if isinstance(entry, BytesStorageMetadata) or not isinstance(entry, TensorStorageMetadata):
                raise ValueError(f"{path}: entry {key!r} is a pickled object, not a tensor; phi1 never writes one, "
                                 "refused (loading it would unpickle code)")
            _check_chunks(path, key, entry)
        for info in metadata.storage_data.values():
            file = _inside(directory, getattr(info, "relative_path", None), "file named in .metadata")
            offset, length = getattr(info, "offset", None), getattr(info, "length", None)
            if not all(isinstance(v, int) and v >= 0 for v in (offset, length)) or \
                    offset + length > file.stat().st_size:
                raise ValueError(f"{path}: names bytes {offset}..{offset}+{length} of {info.relative_path}, which "
                                 f"has {file.stat().st_size}; a truncated or altered checkpoint, refused")
            if getattr(info, "transform_descriptors", None):
                raise ValueError(f"{path}: {info.relative_path} is stored through transforms "
                                 f"{info.transform_descriptors!r}; phi1 writes plain tensors only, refused")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _check_chunks(path: Path, key: str, entry: TensorStorageMetadata) -> None:
    """Every chunk of a tensor lies inside its whole shape (a forged one would make DCP slice out of bounds)."""
    size = entry.size
    dtype = getattr(entry.properties, "dtype", None)
    if not isinstance(dtype, torch.dtype) or not all(isinstance(n, int) and n >= 0 for n in size):
        raise ValueError(f"{path}: entry {key!r} has a malformed shape {tuple(size)!r} or dtype {dtype!r}; refused")
    for chunk in entry.chunks:
        offsets, sizes = tuple(chunk.offsets), tuple(chunk.sizes)
        if len(offsets) != len(size) or len(sizes) != len(size) or any(
                not isinstance(o, int) or not isinstance(n, int) or o < 0 or n < 0 or o + n > whole
                for o, n, whole in zip(offsets, sizes, size)):
            raise ValueError(f"{path}: entry {key!r} has a chunk at {offsets} of {sizes} outside its shape "
                             f"{tuple(size)}; refused")


def read_metadata(directory: str | os.PathLike) -> Metadata:
    """The checked DCP metadata of a checkpoint (no process group needed)."""
    return SafeFileSystemReader(str(directory)).read_metadata()


# ----------------------------------------------------------------------------------------------------------------
# Saving


@contextlib.contextmanager
def _single_process_warning_silenced() -> Iterator[None]:
    """DCP warns that it 'assumes the intent' of a single process; here one process is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class PendingSave:
    """A save in flight. `wait()` (every rank calls it) blocks until the files are written, then rank 0 writes
    the JSON files and the manifest and renames the directory into place; returns the final directory."""

    def __init__(self, future: Any, finish: Callable[[], Path]) -> None:
        self._future = future
        self._finish = finish
        self._result: Path | None = None

    def written(self) -> None:
        """Block until this rank's tensor files are written (not yet renamed into place; not collective)."""
        if self._future is not None:
            # async_save returns a Future, or (newer torch) a response holding one
            future = getattr(self._future, "upload_completion", self._future)
            future.result()
            self._future = None

    def wait(self) -> Path:
        if self._result is None:
            self.written()
            self._result = self._finish()
        return self._result


def save_checkpoint(
    directory: str | os.PathLike,
    modules: Sequence[nn.Module],
    optimizer: torch.optim.Optimizer | None,
    mesh: DeviceMesh | None,
    *,
    trainer_state: dict,
    model_config: dict | None = None,
    rank_state: dict | None = None,
    seal: Callable[[Path], object] | None = None,
    asynchronous: bool = False,
    async_group: dist.ProcessGroup | None = None,
) -> PendingSave:
    """Write a checkpoint of this rank's modules and AdamW state collectively (every rank calls it).

    Args:
        directory: the final checkpoint directory (e.g. run_dir/iter_0001000); written as `directory.tmp` first.
            An existing `directory` is replaced only once the new one is complete.
        modules: the modules this rank holds: `[model]`, or its pipeline stages (full-model parameter names).
        optimizer: an Adam/AdamW optimizer over those parameters, or None.
        mesh: the (dp, pp, tp) mesh of `checkpoint_mesh`; None in a single process.
        trainer_state: JSON-ready state (iteration, consumed samples, scheduler...), written by rank 0.
        model_config: the ModelConfig as a dict (`config.to_dict()`), for export.
        rank_state: this rank's state (tensors and plain values, e.g. RNG states), written by every rank.
        seal: called by rank 0 on the temporary directory once every file is in place (write the manifest).
        asynchronous: stage to CPU and write in the background (DCP `async_save`); in one process (no process
            group) the save is synchronous.
        async_group: the process group the background save coordinates over. Create one gloo group once
            (`dist.new_group(backend="gloo")`, collectively) and pass it to every asynchronous save, so that the
            background thread's collectives never interleave with the training step's on the default group.
    Returns:
        A `PendingSave`; call `.wait()` on every rank (a synchronous save is already written, wait() renames).
    Raises:
        ValueError: state that is not a tensor or plain JSON data.
    """
    final = Path(directory)
    tmp = final.with_name(final.name + ".tmp")
    rank = _rank()
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)  # a crash left it: its contents are not trusted
        tmp.mkdir(parents=True)
    _barrier()
    state = _state_dict(modules, optimizer, mesh, for_load=False)
    no_dist = not (dist.is_available() and dist.is_initialized())
    writer = dcp.FileSystemWriter(str(tmp), sync_files=True)
    if rank_state is not None:
        _write_rank_state(tmp, rank, rank_state)

    def finish() -> Path:
        _barrier()  # every rank's files are on disk
        if rank == 0:
            _write_json(tmp / FORMAT_FILE, {"format": DCP_FORMAT, "format_version": DCP_FORMAT_VERSION,
                                            "layout": _layout(mesh)})
            if model_config is not None:
                _write_json(tmp / MODEL_CONFIG_FILE, model_config)
            _write_json(tmp / TRAINER_STATE_FILE, trainer_state)  # last: a directory holding it is complete
            if seal is not None:
                seal(tmp)
            if final.exists():
                old = final.with_name(final.name + ".old")
                if old.exists():
                    shutil.rmtree(old)
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old)
            else:
                os.replace(tmp, final)
            dir_fd = os.open(final.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)  # the rename itself survives a power cut
            finally:
                os.close(dir_fd)
        _barrier()
        return final

    if asynchronous and not no_dist:
        future = dcp.async_save(state, storage_writer=writer, process_group=async_group)
        return PendingSave(future, finish)
    with _single_process_warning_silenced():
        dcp.save(state, storage_writer=writer, no_dist=no_dist)
    return PendingSave(None, finish)


def save_full_checkpoint(directory: str | os.PathLike, tensors: dict[str, torch.Tensor], *,
                         optimizer_state: dict[str, dict[str, torch.Tensor]] | None = None,
                         trainer_state: dict, model_config: dict | None = None,
                         seal: Callable[[Path], object] | None = None) -> Path:
    """Write whole tensors (one process, no process group) as a DCP checkpoint: the converter's back end.

    Args:
        tensors: {parameter name: whole tensor}.
        optimizer_state: {parameter name: {"exp_avg", "exp_avg_sq": whole tensors, "step": 0-d tensor}}.
    """
    if dist.is_available() and dist.is_initialized():
        raise ValueError("save_full_checkpoint runs in one process; call it without a process group")
    holder = nn.Module()
    params = {}
    for name, tensor in tensors.items():
        params[name] = nn.Parameter(tensor.detach().clone(), requires_grad=False)
    _register_dotted(holder, params)
    optimizer = None
    if optimizer_state:
        optimizer = torch.optim.AdamW([p for p in params.values()], lr=0.0)
        for name, slot in optimizer_state.items():
            if name not in params:
                raise ValueError(f"optimizer state names {name!r}, which is not a model tensor")
            optimizer.state[params[name]] = {k: v.clone() for k, v in slot.items()}
    return save_checkpoint(directory, [holder], optimizer, None, trainer_state=trainer_state,
                           model_config=model_config, seal=seal).wait()


def _register_dotted(root: nn.Module, params: dict[str, nn.Parameter]) -> None:
    """Register `params` under their dotted names, creating the intermediate modules: a module whose
    `named_parameters()` gives back exactly these names."""
    for name, param in params.items():
        *parents, leaf = name.split(".")
        module = root
        for part in parents:
            if not hasattr(module, part):
                module.add_module(part, nn.Module())
            module = getattr(module, part)
        module.register_parameter(leaf, param)


# ----------------------------------------------------------------------------------------------------------------
# Loading


@dataclass
class LoadedCheckpoint:
    """What a load returns besides the tensors it copied into the modules and optimizer."""

    trainer_state: dict
    model_config: dict | None
    rank_state: dict | None
    """This global rank's saved state, or None when the saving job had no such rank."""
    saved_layout: dict[str, int]
    same_layout: bool
    """True when saved at this very (dp, pp, tp) layout: rank states mean the same thing."""


def read_format(directory: str | os.PathLike) -> dict:
    """`format.json`, checked: the format name and a version this reader knows.

    Raises:
        ValueError: naming the file and what to do.
    """
    directory = Path(directory)
    info = _read_json(directory, FORMAT_FILE, "format file")
    path = directory / FORMAT_FILE
    if not isinstance(info, dict) or info.get("format") != DCP_FORMAT:
        raise ValueError(f"{path}: not a {DCP_FORMAT} checkpoint (an iter_* shard checkpoint converts with "
                         "tools/export_dcp.py convert)")
    if info.get("format_version") != DCP_FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {info.get('format_version')!r}, this reader knows "
                         f"{DCP_FORMAT_VERSION}; load it with the phi1 version that wrote it")
    return info


def _read_bounded(path: Path, limit: int, what: str) -> bytes:
    """The bytes of a regular file of at most `limit` bytes (its size checked before the read)."""
    size = path.stat().st_size
    if size > limit:
        raise ValueError(f"{path}: {size} bytes, over the {limit}-byte limit for a checkpoint's {what}; a forged or "
                         "damaged checkpoint, refused")
    with open(path, "rb") as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:  # grew between the check and the read
        raise ValueError(f"{path}: over the {limit}-byte limit for a checkpoint's {what}; refused")
    return data


def _read_json(directory: Path, name: str, what: str) -> Any:
    path = _inside(directory, name, what)
    try:
        return json.loads(_read_bounded(path, MAX_JSON_BYTES, what).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deeply; a forged or damaged checkpoint, refused") from None


def read_rank_state(directory: str | os.PathLike, rank: int) -> dict | None:
    """The state global rank `rank` saved (tensors and plain values, e.g. RNG states), or None when the saving
    job had no such rank.

    Raises:
        ValueError: a file that leaves the directory, is not JSON, or names a tensor its safetensors file lacks.
    """
    directory = Path(directory)
    base = f"{RANK_STATE_DIR}/rank{rank:05d}"
    if not (directory / f"{base}.json").exists():
        return None
    tree = _read_json(directory, f"{base}.json", "rank state")
    tensors_path = _inside(directory, f"{base}.safetensors", "rank state tensors")
    try:
        tensors = load_file(str(tensors_path))
    except Exception as e:  # safetensors' SafetensorError, OSError: a damaged or forged file
        raise ValueError(f"{tensors_path}: not a readable safetensors file ({type(e).__name__}: {str(e)[:200]}); "
                         "a damaged checkpoint: load an older one") from None
    try:
        return _join_tensors(tree, tensors, directory / f"{base}.json")
    except RecursionError:
        raise ValueError(f"{directory / base}.json: nested too deeply; a forged or damaged checkpoint, refused") from None


def _check_against_metadata(directory: Path, state: dict[str, torch.Tensor], metadata: Metadata) -> None:
    problems = []
    for key, tensor in state.items():
        entry = metadata.state_dict_metadata.get(key)
        if entry is None:
            problems.append(f"{key} missing")
        elif tuple(entry.size) != tuple(tensor.shape):
            problems.append(f"{key} has shape {tuple(entry.size)}, this model needs {tuple(tensor.shape)}")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ValueError(f"{directory}: does not fit this model: {'; '.join(problems[:5])}{more}")


def load_checkpoint(
    directory: str | os.PathLike,
    modules: Sequence[nn.Module],
    optimizer: torch.optim.Optimizer | None,
    mesh: DeviceMesh | None,
    *,
    verify: Callable[[Path], object] | None = None,
    weights: bool = True,
) -> LoadedCheckpoint:
    """Load a checkpoint written at any layout into this rank's modules (and AdamW state), collectively.

    Args:
        modules: the modules this rank holds (as for `save_checkpoint`), at the NEW layout.
        optimizer: the optimizer over their parameters; its state is replaced by the saved one (None: weights
            only). A checkpoint saved before any step has no optimizer state: the optimizer is left as it is.
        mesh: the new layout's mesh; None in a single process.
        verify: called first on the directory (the trainer passes `phi1.training.fault.verify_checkpoint`).
        weights: False reads only the optimizer state (the weights were loaded before the optimizer existed).
    Raises:
        ValueError: a file that leaves the directory, an unknown format, a pickled entry, a missing tensor or a
            shape that does not fit (naming the checkpoint and the tensor).
    """
    directory = Path(directory)
    if verify is not None:
        verify(directory)
    info = read_format(directory)
    reader = SafeFileSystemReader(str(directory))
    metadata = reader.read_metadata()
    with_optimizer = optimizer is not None and any(k.startswith(OPTIM_PREFIX) for k in metadata.state_dict_metadata)
    state = _state_dict(modules, optimizer if with_optimizer else None, mesh, for_load=True)
    if not weights:
        state = {k: v for k, v in state.items() if not k.startswith(MODEL_PREFIX)}
    _check_against_metadata(directory, {k: v for k, v in state.items()}, metadata)
    no_dist = not (dist.is_available() and dist.is_initialized())
    if state:
        _read_tensors(directory, state, no_dist)
    _apply(state, modules, optimizer if with_optimizer else None)
    rank = _rank()
    saved_layout = info.get("layout", {})
    config_path = directory / MODEL_CONFIG_FILE
    return LoadedCheckpoint(
        trainer_state=_read_json(directory, TRAINER_STATE_FILE, "trainer state"),
        model_config=_read_json(directory, MODEL_CONFIG_FILE, "model config") if config_path.exists() else None,
        rank_state=read_rank_state(directory, rank),
        saved_layout=saved_layout,
        same_layout=saved_layout == _layout(mesh),
    )


def _read_tensors(directory: Path, state: dict[str, torch.Tensor], no_dist: bool) -> None:
    """DCP's load of `state` in place, with a damaged payload named instead of a traceback from DCP's insides."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with _single_process_warning_silenced(), warnings.catch_warnings():
            # torch.load(weights_only=True) warns about the pickle protocol of a forged payload before refusing it
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            dcp.load(state, storage_reader=SafeFileSystemReader(str(directory)), no_dist=no_dist)
    except ValueError:
        raise
    # CheckpointException (every rank's failures, a BaseException), RuntimeError from a damaged payload
    except (Exception, CheckpointException) as e:
        text = str(e)
        if "Weights only load failed" in text:
            raise ValueError(f"{directory}: a tensor file (*.distcp) holds a pickled object that is not a tensor; "
                             "refused by torch.load(weights_only=True), nothing in it ran. A forged or damaged "
                             "checkpoint: load an older one") from None
        lines = [line for line in text.splitlines() if line.strip()]
        detail = next((line.strip() for line in reversed(lines) if "Error" in line), lines[-1] if lines else "")
        raise ValueError(f"{directory}: its tensor files cannot be read ({type(e).__name__}: {detail[:300]}); "
                         "the checkpoint is damaged: load an older one") from None


def _apply(state: dict[str, torch.Tensor], modules: Sequence[nn.Module], optimizer: torch.optim.Optimizer | None) -> None:
    """Copy the loaded shards into the parameters and rebuild the optimizer's per-parameter state."""
    holder, owned = _optimizer_holding_state(optimizer)
    with torch.no_grad():
        for name, (param, _) in _named_parameters(modules).items():
            if MODEL_PREFIX + name in state:
                _copy_into(param, state[MODEL_PREFIX + name])
            if holder is None or (owned is not None and id(param) not in owned):
                continue
            step_key = f"{OPTIM_PREFIX}{name}.step"
            if step_key not in state:
                continue
            set_adamw_state(holder, param, *(state[f"{OPTIM_PREFIX}{name}.{key}"] for key in ADAMW_KEYS),
                            state[step_key])


def set_adamw_state(optimizer: torch.optim.Optimizer, param: nn.Parameter, exp_avg: torch.Tensor,
                    exp_avg_sq: torch.Tensor, step: torch.Tensor) -> None:
    """Make `optimizer` hold this AdamW state for `param` (copies shaped and placed like the parameter: on its
    device, as a DTensor like it for FSDP2; `step` as AdamW keeps it: a 0-d float32 tensor on the CPU, on the
    parameter's device when fused or capturable).

    Raises:
        ValueError: `param` is not one of the optimizer's parameters, or a moment's shape is not the parameter's.
    """
    group = next((g for g in optimizer.param_groups if any(p is param for p in g["params"])), None)
    if group is None:
        raise ValueError("set_adamw_state: the parameter is not in the optimizer")
    moments = {}
    for key, moment in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if isinstance(param, DTensor):
            target = torch.zeros_like(param.detach())
            _copy_into(target, moment)
            moments[key] = target
            continue
        moment = _local(moment)
        if tuple(moment.shape) != tuple(param.shape):
            raise ValueError(f"AdamW state of shape {tuple(moment.shape)} for a parameter of shape {tuple(param.shape)}")
        moments[key] = moment.detach().to(param.device, param.dtype).clone()
    step = _local(step).detach().float().reshape(()).clone().cpu()
    device = param.to_local().device if isinstance(param, DTensor) else param.device
    optimizer.state[param] = {"step": step.to(device) if group.get("capturable") or group.get("fused") else step,
                              **moments}


def read_full_state_dict(directory: str | os.PathLike, prefix: str = MODEL_PREFIX,
                         expected: dict[str, tuple[int, ...]] | None = None) -> dict[str, torch.Tensor]:
    """Whole CPU tensors of every entry under `prefix` (prefix removed), from a checkpoint of any layout, in this
    process alone: no process group, no GPU (the export tool and the tests use it).

    Args:
        expected: {name: whole shape} the entries must have exactly (checked before any memory is allocated).

    Raises:
        ValueError: as `load_checkpoint`.
    """
    directory = Path(directory)
    read_format(directory)
    metadata = read_metadata(directory)
    shapes = {key[len(prefix):]: tuple(entry.size) for key, entry in metadata.state_dict_metadata.items()
              if key.startswith(prefix)}
    if not shapes:
        raise ValueError(f"{directory}: holds no tensor under {prefix!r}")
    if expected is not None and shapes != expected:  # checked before allocating what the metadata asks for
        wrong = sorted(set(shapes) ^ set(expected)) or sorted(n for n in shapes if shapes[n] != expected[n])
        raise ValueError(f"{directory}: its tensors do not fit the model config (first differences: {wrong[:4]})")
    state = {prefix + name: torch.empty(shape, dtype=metadata.state_dict_metadata[prefix + name].properties.dtype)
             for name, shape in shapes.items()}
    _read_tensors(directory, state, no_dist=True)
    return {key[len(prefix):]: tensor for key, tensor in state.items()}


__all__ = [
    "DCP_FORMAT",
    "LoadedCheckpoint",
    "MESH_DIMS",
    "PendingSave",
    "SafeFileSystemReader",
    "checkpoint_mesh",
    "load_checkpoint",
    "read_format",
    "read_full_state_dict",
    "read_metadata",
    "read_rank_state",
    "save_checkpoint",
    "save_full_checkpoint",
    "set_adamw_state",
]
