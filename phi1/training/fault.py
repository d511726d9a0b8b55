"""Fault tolerance helpers: the non-finite step guard and the checkpoint manifest.

Non-finite steps. Every step the loop checks the data-parallel mean loss and the global gradient norm (both
the same number on every rank, so every rank takes the same decision). A step with either non-finite is
skipped (no update, the schedule does not advance) and counted. Under fp16 a finite loss with a non-finite
gradient norm is an ordinary overflow that the loss scaler answers by halving the scale; it counts as bad only
once the scale is at its floor. After `max_consecutive` bad steps in a row the run stops with a
`NonFiniteTrainingError` whose diagnosis names the steps, the losses and the parameters whose gradients were
not finite (gathered from every rank); nothing is saved, so the last good checkpoint is left as it was.

Non-finite weights. A step can leave finite losses and norms behind and still write NaN or Inf into the
weights (an infinite learning rate, a corrupted optimizer state). Before every save each rank reduces its own
weights (its TP shard, or under ZeRO-3 its partition) to one flag with a fused max-abs reduction, and the flags
are all-reduced: if any rank holds a non-finite value nothing is written, `latest` keeps pointing at the last
good checkpoint, and the run stops with a `NonFiniteTrainingError` (exit status 3) whose diagnosis names the
parameters, in the same `nonfinite_diagnosis.json` the step guard writes.

Checkpoint manifest. `manifest.json` in each checkpoint lists every other file with its size and SHA-256.
`verify_checkpoint` recomputes them and raises `CheckpointCorruptError` naming each missing, resized or
altered file; the loader can then fall back to the previous complete checkpoint.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

# Manifests are written and verified by phi1.loading.manifest (the loaders verify checkpoints too, and may not
# import training); re-exported here for the trainer and its tests.
from phi1.loading.manifest import (
    MANIFEST,
    CheckpointCorruptError,
    file_sha256,
    verify_checkpoint,
    write_manifest,
)

logger = logging.getLogger("phi1.train")



# ----------------------------------------------------------------------------------------------------------------
# Non-finite steps


class NonFiniteTrainingError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient norm; `diagnosis` holds the details."""

    def __init__(self, message: str, diagnosis: dict) -> None:
        super().__init__(message)
        self.diagnosis = diagnosis


def nonfinite_gradients(model: nn.Module) -> list[str]:
    """Names of this rank's parameters whose gradient holds a NaN or an Inf (a DDP / DeepSpeed wrapper is
    looked through by its `module`)."""
    inner = getattr(model, "module", model)
    names = []
    for name, param in inner.named_parameters():
        grad = param.grad
        grad = grad.to_local() if isinstance(grad, DTensor) else grad  # FSDP2: this rank's shard
        if grad is not None and not bool(torch.isfinite(grad).all()):
            names.append(name)
    return names


def _local_weights(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of the weights this rank holds: its TP shard of every parameter, or under ZeRO-3 (where a
    parameter is an empty placeholder between gathers) DeepSpeed's partition of it (`ds_tensor`)."""
    inner = getattr(model, "module", model)
    weights = []
    for name, param in inner.named_parameters():
        partition = getattr(param, "ds_tensor", None)
        tensor = partition if partition is not None else param
        tensor = tensor.to_local() if isinstance(tensor, DTensor) else tensor  # FSDP2: this rank's shard
        if tensor.numel() > 0:
            weights.append((name, tensor.detach()))
    return weights


def weights_are_finite(model: nn.Module, group_size: int) -> bool:
    """True when no rank holds a NaN or Inf in its weights; every rank must call it (one all-reduce).

    Cost: one fused max-abs reduction over this rank's weights (`torch._foreach_norm` with ord=inf, which
    propagates NaN and is finite for every finite fp16 / bf16 / fp32 value), one tiny isfinite, and one
    all-reduce of a single flag. No copy of the weights is made.
    """
    tensors = [tensor for _, tensor in _local_weights(model)]
    device = tensors[0].device if tensors else torch.device("cpu")
    bad = torch.zeros((), device=device, dtype=torch.float32)
    if tensors:
        maxima = torch.stack([m.float() for m in torch._foreach_norm(tensors, float("inf"))])
        bad = (~torch.isfinite(maxima)).any().float()
    if group_size > 1 and dist.is_initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return not bool(bad)


def nonfinite_weights(model: nn.Module) -> list[str]:
    """Names of this rank's parameters holding a NaN or an Inf (the slow, per-tensor check of the error path)."""
    return [name for name, tensor in _local_weights(model) if not bool(torch.isfinite(tensor).all())]


def gather_names(names: list[str], group_size: int) -> list[str]:
    """The union of every rank's `names` (sorted); `names` itself in a single process."""
    if group_size <= 1 or not dist.is_initialized():
        return sorted(set(names))
    gathered: list[list[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, names)
    return sorted({name for part in gathered for name in (part or [])})


@dataclass
class NonFiniteGuard:
    """Counts bad steps and decides when the run must stop."""

    max_consecutive: int
    """Stop after this many bad steps in a row; 0 never stops."""
    total: int = 0
    """Bad steps in the whole run (restored from checkpoints)."""
    consecutive: int = 0
    """Bad steps in a row, up to now."""
    history: list[dict] = field(default_factory=list)
    """The current streak: iteration, loss, grad norm and non-finite parameter names of each bad step."""

    @staticmethod
    def is_bad(loss: float, grad_norm: float, fp16_overflow_can_back_off: bool) -> bool:
        """A non-finite loss is always bad; a non-finite gradient norm is bad unless it is an fp16 overflow the
        loss scaler can still answer by lowering the scale."""
        if not math.isfinite(loss):
            return True
        return not math.isfinite(grad_norm) and not fp16_overflow_can_back_off

    def record(self, iteration: int, bad: bool, loss: float, grad_norm: float, parameters: list[str]) -> None:
        """Account for one step (`parameters`: names with non-finite gradients, for bad steps)."""
        if not bad:
            self.consecutive = 0
            self.history = []
            return
        self.total += 1
        self.consecutive += 1
        self.history.append({"iteration": iteration, "loss": _json_float(loss), "grad_norm": _json_float(grad_norm),
                             "nonfinite_gradients": parameters})
        logger.warning("iteration %d: non-finite %s, step skipped (%d in a row; non-finite gradients in %s)",
                       iteration, "loss" if not math.isfinite(loss) else "gradient norm", self.consecutive,
                       _short(parameters))

    @property
    def must_stop(self) -> bool:
        return self.max_consecutive > 0 and self.consecutive >= self.max_consecutive

    def error(self, last_checkpoint: str | None) -> NonFiniteTrainingError:
        """The error that stops the run, with its diagnosis."""
        first, last = self.history[0]["iteration"], self.history[-1]["iteration"]
        parameters = sorted({name for step in self.history for name in step["nonfinite_gradients"]})
        diagnosis = {"first_bad_iteration": first, "last_bad_iteration": last, "consecutive": self.consecutive,
                     "steps": self.history, "nonfinite_gradients": parameters,
                     "last_good_checkpoint": last_checkpoint}
        message = (f"training stopped: {self.consecutive} consecutive steps with a non-finite loss or gradient norm "
                   f"(iterations {first} to {last}, guard.max_consecutive_nonfinite={self.max_consecutive}); "
                   f"losses {[s['loss'] for s in self.history]}; non-finite gradients in {_short(parameters, 12)}; "
                   f"the last good checkpoint {last_checkpoint or '(none saved)'} is untouched")
        return NonFiniteTrainingError(message, diagnosis)

    def weights_error(self, iteration: int, parameters: list[str], lr: float | None,
                      last_checkpoint: str | None) -> NonFiniteTrainingError:
        """The error that stops a run whose weights are not finite at a save, with its diagnosis."""
        diagnosis = {"reason": "non-finite weights", "iteration": iteration, "nonfinite_weights": parameters,
                     "lr": _json_float(lr) if lr is not None else None, "nonfinite_steps_total": self.total,
                     "steps": self.history, "last_good_checkpoint": last_checkpoint}
        message = (f"training stopped at iteration {iteration}: the weights are not finite (NaN or Inf in "
                   f"{_short(parameters, 12)}; learning rate of the last step {lr}); nothing was saved and the last "
                   f"good checkpoint {last_checkpoint or '(none saved)'} is untouched; lower optim.lr or look for "
                   "the first bad step in the metrics")
        return NonFiniteTrainingError(message, diagnosis)

    def state_dict(self) -> dict:
        return {"total": self.total}

    def load_state_dict(self, state: dict) -> None:
        self.total = int(state.get("total", 0))


def _json_float(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)


def _short(names: list[str], limit: int = 6) -> str:
    if not names:
        return "no parameter (the loss itself)"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


__all__ = [
    "CheckpointCorruptError",
    "MANIFEST",
    "NonFiniteGuard",
    "NonFiniteTrainingError",
    "file_sha256",
    "gather_names",
    "nonfinite_gradients",
    "nonfinite_weights",
    "verify_checkpoint",
    "weights_are_finite",
    "write_manifest",
]
