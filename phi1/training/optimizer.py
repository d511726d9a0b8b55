"""AdamW for the DDP path: torch's fused kernel on CUDA, apex's FusedAdam on request, torch foreach elsewhere.

Under ZeRO, DeepSpeed owns the optimizer (see `phi1.parallel.zero.initialize_zero`).
"""

from __future__ import annotations

import torch
from torch import nn

from phi1.parallel.optim import param_groups
from phi1.training.config import OptimSection


def apex_available() -> bool:
    try:
        import apex.optimizers  # noqa: F401
    except ImportError:
        return False
    return True


def build_adamw(model: nn.Module, optim: OptimSection, device: torch.device) -> tuple[torch.optim.Optimizer, str]:
    """AdamW over `model`'s parameters (no decay on biases and LayerNorms); returns it and the kind chosen.

    'auto' picks torch's fused AdamW on CUDA (one kernel for all parameters; as fast as apex's on current GPUs
    and always installed) and the foreach implementation elsewhere.

    Raises:
        ValueError: 'torch-fused' without CUDA, or 'apex' when apex is not installed or there is no CUDA.
    """
    groups = param_groups(model, optim.weight_decay)
    for group in groups:
        group.pop("name")
    kind = optim.impl
    if kind == "auto":
        kind = "torch-fused" if device.type == "cuda" else "torch"
    common = dict(lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)
    if kind == "apex":
        if device.type != "cuda" or not apex_available():
            raise ValueError("optim.impl=apex needs CUDA and NVIDIA apex (pip install apex from source); use 'auto'")
        from apex.optimizers import FusedAdam

        return FusedAdam(groups, adam_w_mode=True, **common), "apex FusedAdam"
    if kind == "torch-fused":
        if device.type != "cuda":
            raise ValueError("optim.impl=torch-fused needs a CUDA device; use 'auto' or 'torch'")
        return torch.optim.AdamW(groups, fused=True, **common), "torch AdamW (fused)"
    return torch.optim.AdamW(groups, foreach=True, **common), "torch AdamW (foreach)"
