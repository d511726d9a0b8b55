"""RNG tracking for tensor parallelism.

Dropout inside the TP region (attention probabilities of this rank's heads; activations that are sequence
shards under sequence parallelism) must differ per TP rank, while dropout on replicated activations must agree
across TP ranks. The default generator is seeded identically on all TP ranks; a second, named state seeded with
`seed + 2718 + tp_rank` (Megatron's offset) is swapped in by `fork()` around the TP-region dropout.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

TENSOR_PARALLEL_RNG = "tensor-parallel"
_TP_SEED_OFFSET = 2718


class RNGStatesTracker:
    """Named RNG states (CPU, and CUDA when present) that can be swapped in around a region of code."""

    def __init__(self) -> None:
        self.states: dict[str, dict[str, torch.Tensor]] = {}

    def reset(self) -> None:
        self.states = {}

    def add(self, name: str, seed: int) -> None:
        if name in self.states:
            raise ValueError(f"RNG state {name!r} is already tracked")
        saved = _capture()
        torch.manual_seed(seed)  # seeds CPU and every CUDA device
        self.states[name] = _capture()
        _restore(saved)

    def get_states(self) -> dict[str, dict[str, torch.Tensor]]:
        return {name: {k: v.clone() for k, v in state.items()} for name, state in self.states.items()}

    def set_states(self, states: dict[str, dict[str, torch.Tensor]]) -> None:
        self.states = {name: {k: v.clone() for k, v in state.items()} for name, state in states.items()}

    @contextlib.contextmanager
    def fork(self, name: str = TENSOR_PARALLEL_RNG) -> Iterator[None]:
        """Run the block with the named state; a no-op when that state was never added (no TP)."""
        if name not in self.states:
            yield
            return
        saved = _capture()
        _restore(self.states[name])
        try:
            yield
        finally:
            self.states[name] = _capture()
            _restore(saved)


def _capture() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _restore(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def checkpoint_rng_contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """`context_fn` for `torch.utils.checkpoint.checkpoint(..., use_reentrant=False)` that makes recomputation
    replay the tracker's named states.

    torch's checkpoint restores the default generator before recomputing, but not the states this tracker swaps
    in with `fork()`; without this, dropout inside the TP region would draw a new mask on recompute and the
    gradients would belong to a different forward. Returns (forward context, recompute context): the states are
    captured now (just before the forward), set back for the recompute, and the states the later forward
    passes advanced to are restored after it.
    """
    tracker = _TRACKER
    states_at_forward = tracker.get_states()

    @contextlib.contextmanager
    def replay() -> Iterator[None]:
        states_now = tracker.get_states()
        tracker.set_states(states_at_forward)
        try:
            yield
        finally:
            tracker.set_states(states_now)

    return contextlib.nullcontext(), replay()


# One per process, like the generators it wraps.
_TRACKER = RNGStatesTracker()


def get_rng_tracker() -> RNGStatesTracker:
    return _TRACKER


def seed_everything(seed: int, tp_rank: int = 0) -> None:
    """Seed the default generators (same on all TP ranks) and the TP-region state (different per TP rank)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    _TRACKER.reset()
    _TRACKER.add(TENSOR_PARALLEL_RNG, seed + _TP_SEED_OFFSET + tp_rank)
