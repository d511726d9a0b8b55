"""Optimizer parameter groups: weight decay on matrices, none on biases and LayerNorm weights."""

from __future__ import annotations

from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW parameter groups.

    Embedding and linear weights are decayed; biases and LayerNorm weights are not (decaying a LayerNorm gain
    toward 0 or a bias toward 0 has no regularising meaning). Empty groups are left out. Each group carries a
    `name` ("decay" / "no_decay") for logs; torch optimizers and DeepSpeed keep extra keys.

    Args:
        model: the model, or a DDP / DeepSpeed wrapper of it.
        weight_decay: the decay of the first group.
    Raises:
        ValueError: weight_decay < 0.
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    norm_params = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in norm_params or name.endswith("bias"):
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    return [g for g in groups if g["params"]]
