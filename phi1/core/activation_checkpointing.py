"""Activation checkpointing of the phi blocks: none, full (every block, or every k-th), or selective.

    full       the block keeps only its input; its whole forward runs again in the backward.
    selective  op-level (torch's `create_selective_checkpoint_contexts`, as torchtitan's op-level SAC): the
               outputs of matmuls (aten.mm / addmm / bmm) and attention kernels are saved, the cheap ops between
               them (LayerNorm, rotary, gelu, adds, casts, reshapes) are recomputed. Every op that draws random
               numbers (dropout, and an attention kernel with dropout) is recomputed, never saved: checkpoint
               restores the generator before recomputing, so replaying all draws in order gives the forward's
               masks, while saving one of them would leave the generator behind for the draws after it.

The TP dropout-mask replay of `phi1.parallel.random.checkpoint_rng_contexts` is entered together with the
selective contexts, so dropout inside the TP region draws the forward's masks on recomputation in both modes.

The mode is normalised by `activation_checkpointing_mode` (torch-free, so the config validator can use it):
True / 'true' / 'on' mean 'full' and False / 'false' / 'off' mean 'none', so existing configs keep working.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

MODES = ("none", "full", "selective")
_ALIASES = {"true": "full", "on": "full", "yes": "full", "1": "full", "false": "none", "off": "none", "no": "none",
            "0": "none"}


def activation_checkpointing_mode(value: Any) -> str:
    """'none', 'full' or 'selective' from a mode name or the booleans of older configs.

    Raises:
        ValueError: anything else, naming the accepted values.
    """
    if isinstance(value, bool):
        return "full" if value else "none"
    if value is None:
        return "none"
    if isinstance(value, str):
        text = value.strip().lower()
        text = _ALIASES.get(text, text)
        if text in MODES:
            return text
    raise ValueError(f"activation_checkpointing must be one of {MODES} (or true / false), got {value!r}")


def _saved_ops() -> set:
    import torch

    aten = torch.ops.aten
    ops = {aten.mm.default, aten.addmm.default, aten.bmm.default}
    for name in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu"):
        if hasattr(aten, name):
            ops.add(getattr(aten, name).default)
    try:  # flash-attn registers its kernels as torch ops (flash_attn >= 2.6); older builds are opaque to SAC
        ops.add(torch.ops.flash_attn._flash_attn_forward.default)
        ops.add(torch.ops.flash_attn._flash_attn_varlen_forward.default)
    except (AttributeError, RuntimeError):
        pass
    return ops


_SAVED: set | None = None


def _draws_random_numbers(op, args: tuple, kwargs: dict) -> bool:
    """Whether an attention kernel runs with dropout (its `dropout_p` argument is positive)."""
    for index, argument in enumerate(op._schema.arguments):
        if argument.name == "dropout_p":
            value = kwargs.get("dropout_p", args[index] if index < len(args) else argument.default_value)
            return bool(value)
    return False


def selective_policy(ctx, op, *args, **kwargs):
    """The SAC policy: save matmul and attention outputs (attention only without dropout); recompute the rest."""
    from torch.utils.checkpoint import CheckpointPolicy

    global _SAVED
    if _SAVED is None:
        _SAVED = _saved_ops()
    if op in _SAVED and not _draws_random_numbers(op, args, kwargs):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


@contextlib.contextmanager
def _both(first: contextlib.AbstractContextManager, second: contextlib.AbstractContextManager) -> Iterator[None]:
    with first, second:
        yield


def selective_contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """`context_fn` for `checkpoint(..., use_reentrant=False)`: the selective policy and the TP RNG replay."""
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    from phi1.parallel.random import checkpoint_rng_contexts

    rng_forward, rng_recompute = checkpoint_rng_contexts()
    sac_forward, sac_recompute = create_selective_checkpoint_contexts(selective_policy)
    return _both(rng_forward, sac_forward), _both(rng_recompute, sac_recompute)


def checkpointed(mode: str, every: int, layer_index: int) -> bool:
    """Whether block `layer_index` runs under checkpointing: all blocks under 'selective'; under 'full' the
    blocks 0, k, 2k, ... for every k-th (k = 1: all)."""
    if mode == "selective":
        return True
    return mode == "full" and layer_index % max(1, every) == 0


def run_block(block: Callable, mode: str, *args: Any) -> Any:
    """block(*args) under `mode` ('full' or 'selective'), non-reentrant, replaying the TP RNG states."""
    from torch.utils.checkpoint import checkpoint

    from phi1.parallel.random import checkpoint_rng_contexts

    context_fn = selective_contexts if mode == "selective" else checkpoint_rng_contexts
    return checkpoint(block, *args, use_reentrant=False, context_fn=context_fn)
