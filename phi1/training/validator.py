"""The validator component: the validation loss every eval.interval iterations (and at the last one).

Each data-parallel rank takes `eval.iters` micro-batches of the validation split from its start (the same
samples every time, so the numbers are comparable across a run and across resumes), with dropout off; the
losses are averaged over those micro-batches and then over the data-parallel ranks. The validator keeps the
last and the best validation loss in the run state (saved in trainer_state.json; `best` points at the best).
"""

from __future__ import annotations

import torch

from phi1.parallel.state import ParallelState
from phi1.training.config import TrainConfig
from phi1.training.data_loading import micro_batches
from phi1.training.strategies.base import StepStrategy, dp_mean


class Validator:
    """Evaluates one run's model on its validation split."""

    def __init__(self, config: TrainConfig, state: ParallelState, strategy: StepStrategy, valid_data) -> None:
        """
        Args:
            valid_data: the validation dataset, or None when evaluation is off (eval.interval or eval.iters 0).
        """
        self.config, self.state, self.strategy, self.valid_data = config, state, strategy, valid_data

    def due(self, iteration: int) -> bool:
        """True when step `iteration` is followed by validation."""
        interval = self.config.eval.interval
        return interval > 0 and (iteration % interval == 0 or iteration == self.config.schedule.train_steps)

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean validation loss over `eval.iters` micro-batches per DP rank; None without validation data
        (every rank calls this: one all-reduce)."""
        if self.valid_data is None:
            return None
        strategy = self.strategy
        total = torch.zeros((), device=self.state.device, dtype=torch.float32)
        count = 0
        with strategy.evaluating():
            data = micro_batches(self.valid_data, self.config, self.state, 0)
            for _ in range(self.config.eval.iters):
                batch = next(data, None)
                if batch is None:
                    break
                total += strategy.eval_loss(batch).float()
                count += 1
        return float(dp_mean(total / max(count, 1), self.state))

    def validate(self, run_state) -> float | None:
        """Evaluate, and record the loss as the run's last (and best, when lower) at run_state.iteration."""
        val = self.evaluate()
        if val is not None:
            run_state.last_val_loss, run_state.last_val_iteration = val, run_state.iteration
            if run_state.best_val_loss is None or val < run_state.best_val_loss:
                run_state.best_val_loss = val
        return val


__all__ = ["Validator"]
