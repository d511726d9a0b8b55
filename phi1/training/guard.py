"""The non-finite guard component: what the trainer does about steps and weights that are not finite.

The counting (how many bad steps in a row, what a bad step is) is phi1.training.fault.NonFiniteGuard; this
component adds what a running job needs around it:

- `observe(...)`: a strategy reports every step; a bad one has the names of the parameters whose gradients were
  not finite gathered from every rank, and is counted (the run goes on, the update was skipped).
- `stop()`: once `must_stop`, raise NonFiniteTrainingError with the diagnosis; rank 0 also writes it to
  `nonfinite_diagnosis.json` beside the checkpoints. Nothing is saved, so `latest` stays the last good one.
- `check_weights(...)`: before every save, one fused reduction per rank and one all-reduce; if any rank holds
  a NaN or Inf the error names the parameters and nothing is written.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from torch import nn

from phi1.training import checkpointing
from phi1.training.fault import (
    NonFiniteGuard,
    NonFiniteTrainingError,
    gather_names,
    nonfinite_gradients,
    nonfinite_weights,
    weights_are_finite,
)

logger = logging.getLogger("phi1.train")

DIAGNOSIS_FILE = "nonfinite_diagnosis.json"


class StepGuard:
    """Counts non-finite steps of one run and stops it with a diagnosis (every rank holds one, and every rank
    takes the same decisions, since the losses and norms it is given are the same on every rank)."""

    def __init__(self, max_consecutive: int, checkpoint_dir: str, world_size: int, is_main: bool) -> None:
        """
        Args:
            max_consecutive: guard.max_consecutive_nonfinite (0: never stop).
            checkpoint_dir: checkpoint.dir, where the diagnosis goes and the last good checkpoint is looked up.
            world_size: processes of the job (names are gathered from all of them).
            is_main: this rank writes the diagnosis file.
        """
        self.counter = NonFiniteGuard(max_consecutive)
        self.checkpoint_dir = checkpoint_dir
        self.world_size = world_size
        self.is_main = is_main

    # -- steps ----------------------------------------------------------------------------------------------------

    @property
    def total(self) -> int:
        """Bad steps in the whole run (saved in checkpoints as trainer_state.json "nonfinite")."""
        return self.counter.total

    @property
    def consecutive(self) -> int:
        """Bad steps in a row, up to now (the checkpointer does not save inside such a run)."""
        return self.counter.consecutive

    @property
    def must_stop(self) -> bool:
        return self.counter.must_stop

    def observe(self, iteration: int, loss: float, grad_norm: float, skipped: bool, can_back_off: bool,
                model: nn.Module) -> None:
        """Account for one step. A skipped step is bad unless it is an fp16 overflow the loss scaler can still
        answer (`can_back_off`); a bad step gathers the names of `model`'s parameters with non-finite
        gradients from every rank (a collective: every rank calls this)."""
        bad = skipped and NonFiniteGuard.is_bad(loss, grad_norm, can_back_off)
        names = gather_names(nonfinite_gradients(model), self.world_size) if bad else []
        self.counter.record(iteration, bad, loss, grad_norm, names)

    def record_good(self, iteration: int, loss: float, grad_norm: float) -> None:
        """Account for a step known to be fine (ends a run of bad steps)."""
        self.counter.record(iteration, False, loss, grad_norm, [])

    def stop(self) -> None:
        """Raise the error of too many consecutive bad steps, after writing its diagnosis (rank 0).

        Raises:
            NonFiniteTrainingError: always.
        """
        error = self.counter.error(self._last_checkpoint())
        self._write_diagnosis(error)
        raise error

    # -- weights --------------------------------------------------------------------------------------------------

    def check_weights(self, model: nn.Module, iteration: int, last_lr: float | None) -> None:
        """Stop the run if any rank's weights hold a NaN or Inf (every rank calls this, before a save).

        Raises:
            NonFiniteTrainingError: the weights are not finite; the diagnosis names the parameters.
        """
        if weights_are_finite(model, self.world_size):
            return
        names = gather_names(nonfinite_weights(model), self.world_size)
        error = self.counter.weights_error(iteration, names, last_lr, self._last_checkpoint())
        self._write_diagnosis(error)
        raise error

    # -- state ----------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return self.counter.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.counter.load_state_dict(state)

    def _last_checkpoint(self) -> str | None:
        latest = checkpointing.find_checkpoint(self.checkpoint_dir)
        return str(latest) if latest is not None else None

    def _write_diagnosis(self, error: NonFiniteTrainingError) -> None:
        """Rank 0 writes `error.diagnosis` to nonfinite_diagnosis.json in checkpoint.dir and logs where."""
        if self.is_main:
            path = Path(self.checkpoint_dir) / DIAGNOSIS_FILE
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(error.diagnosis, indent=1) + "\n")
            logger.error("%s; diagnosis in %s", error, path)


__all__ = ["DIAGNOSIS_FILE", "StepGuard"]
