"""AdamW state of a phi1 `iter_*` checkpoint, merged across TP ranks and keyed by parameter name.

Today's format stores the optimizer as `optim_tp{r}.pt`: `optimizer.state_dict()` of TP rank r (written by DP
rank 0), keyed by the optimizer's parameter INDEX over `phi1.parallel.optim.param_groups(model)` (decay group,
then no-decay group, each in `named_parameters` order) and holding rank r's shards. An index means nothing at
another layout (a pipeline stage holds other parameters, another TP size other shard shapes), so resuming at a
new layout, and converting to the any-layout DCP format (`tools/export_dcp.py convert`), go through names:

    merged = optimizer_state_by_name(checkpoint_dir, model_config)
    merged["transformer.h.0.mixer.Wqkv.weight"] == {"exp_avg": whole tensor, "exp_avg_sq": ..., "step": 0-d}

The full model is rebuilt on the meta device (no memory) to recover the index -> name order and each
parameter's TP split dim (`partition_dims`); every file is read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from phi1.core.config import ModelConfig
from phi1.loading.paths import inside, regular_file

ADAMW_KEYS = ("exp_avg", "exp_avg_sq")


def load_pt(path: str | os.PathLike, map_location=None):
    """`torch.load(path, weights_only=True)` of a regular file inside its checkpoint directory, with a damaged
    file or a refused pickle payload named.

    Raises:
        ValueError: the file leaves its directory (a symlink pointing out), is not a regular file, is truncated,
            is not a torch file, or holds objects other than tensors and plain containers (weights_only refuses
            to run their code).
    """
    path = Path(path)
    regular_file(inside(path.parent, path.name, "file"), path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # pickle.UnpicklingError, RuntimeError from the zip reader, EOFError, ...
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        refused = "Weights only load failed" in str(e)
        why = ("holds objects other than tensors (a pickle payload?); refused by weights_only loading"
               if refused else f"damaged or not a torch file ({type(e).__name__}: {first_line})")
        raise ValueError(f"{path}: {why}") from None


def optimizer_files(checkpoint: str | os.PathLike) -> list[Path]:
    """The `optim_tpNN.pt` files of a checkpoint, in TP-rank order (empty under ZeRO or before any save of one)."""
    return sorted(Path(checkpoint).glob("optim_tp[0-9][0-9]*.pt"))


def optimizer_state_by_name(checkpoint: str | os.PathLike,
                            config: ModelConfig) -> dict[str, dict[str, torch.Tensor]] | None:
    """AdamW state of an `iter_*` checkpoint as whole CPU tensors keyed by parameter name; None when it has none.

    Returns:
        {name: {"exp_avg": whole tensor, "exp_avg_sq": whole tensor, "step": 0-d float32 tensor}} for every
        parameter that has state (a checkpoint written before any update has none).
    Raises:
        ValueError: naming the checkpoint, when the files do not describe this model's optimizer (another
            parameter count, a missing key, shards that do not concatenate to the parameter's shape).
    """
    from phi1.core.model import PhiForCausalLM
    from phi1.parallel.layers import tensor_parallel_dims
    from phi1.parallel.optim import param_groups

    checkpoint = Path(checkpoint)
    files = optimizer_files(checkpoint)
    if not files:
        return None
    with torch.device("meta"):
        model = PhiForCausalLM(config)
    names_of = {id(p): name for name, p in model.named_parameters()}
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    dims = tensor_parallel_dims(model)
    order = [names_of[id(p)] for group in param_groups(model, weight_decay=0.1) for p in group["params"]]
    per_rank = [load_pt(path, map_location="cpu") for path in files]
    for path, state in zip(files, per_rank):
        if not isinstance(state, dict) or not isinstance(state.get("state"), dict):
            raise ValueError(f"{path}: not an optimizer state_dict (no 'state' mapping)")
        indices = [i for group in state.get("param_groups", []) for i in group.get("params", [])]
        if len(indices) != len(order):
            raise ValueError(f"{path}: optimizer state covers {len(indices)} parameters, the model has "
                             f"{len(order)}; it was not written by phi1's trainer for this model")
    merged: dict[str, dict[str, torch.Tensor]] = {}
    for position, name in enumerate(order):
        slots = [state["state"].get(position) for state in per_rank]
        if all(slot is None for slot in slots):
            continue
        if any(not isinstance(slot, dict) or "step" not in slot or any(k not in slot for k in ADAMW_KEYS)
               for slot in slots):
            raise ValueError(f"{checkpoint}: the AdamW state of {name} (index {position}) is missing on some TP rank "
                             "or lacks step / exp_avg / exp_avg_sq")
        dim = dims[name]
        entry = {}
        for key in ADAMW_KEYS:
            parts = [slot[key] for slot in slots]
            if not all(torch.is_tensor(p) for p in parts):
                raise ValueError(f"{checkpoint}: {key} of {name} is not a tensor")
            try:
                whole = parts[0] if dim is None or len(parts) == 1 else torch.cat(parts, dim=dim)
            except RuntimeError:
                whole = None
            if whole is None or tuple(whole.shape) != shapes[name]:
                raise ValueError(f"{checkpoint}: {key} of {name} does not make the parameter's shape "
                                 f"{shapes[name]} from {len(parts)} TP shards; not this model's optimizer")
            entry[key] = whole
        step = slots[0]["step"]
        entry["step"] = step.detach().float().cpu().reshape(()) if torch.is_tensor(step) else torch.tensor(float(step))
        merged[name] = entry
    return merged


__all__ = ["load_pt", "optimizer_files", "optimizer_state_by_name"]
