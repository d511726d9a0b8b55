"""Fault injection (the `faults.*` options): hooks that strategies and the trainer call at named points.

    on_gradients(iteration, modules)   after the gradients are synced and unscaled, before clipping:
                                       faults.inject_overflow_at (first gradient := inf),
                                       faults.inject_nan_at (gradient of faults.inject_nan_param := NaN)
    on_update(iteration, modules)      after the update (or the skip): faults.inject_nan_weights_at
                                       (one element of faults.inject_nan_param := NaN)
    after_step(iteration)              after the iteration counter advanced: faults.kill_at_iteration
                                       (SIGKILL of faults.kill_rank, first launch only)
    kill_during_save(iteration)        asked by the checkpointer: faults.kill_during_save_at

Off the hot path: a run without faults gets `NO_FAULTS`, whose hooks return at once; only a run that
configures one gets a FaultInjector, and nothing in a step tests the faults.* lists otherwise.
They exist for the tests of the recovery paths (resume after SIGKILL, overflow skipping, the non-finite guard).
"""

from __future__ import annotations

import logging
import os
import signal

import torch
from torch import nn

from phi1.training.config import ConfigError, FaultsSection, TrainConfig

logger = logging.getLogger("phi1.train")


class FaultHooks:
    """The hooks with no fault configured: each does nothing."""

    active = False

    def on_gradients(self, iteration: int, modules: list[nn.Module]) -> None:
        """Called with the step's unscaled, synced gradients in place, before clipping."""

    def on_update(self, iteration: int, modules: list[nn.Module]) -> None:
        """Called after the optimizer update of step `iteration` (or its skip)."""

    def after_step(self, iteration: int) -> None:
        """Called once step `iteration` is counted, before logging, validation and saving."""

    def kill_during_save(self, iteration: int) -> bool:
        """True when the save of `iteration` must SIGKILL this process half-way (checkpointing does it)."""
        return False

    def check_model(self, modules: list[nn.Module]) -> None:
        """Refuse options that name something the model does not have (ConfigError)."""


NO_FAULTS = FaultHooks()


class FaultInjector(FaultHooks):
    """The hooks of a run that configures faults.*."""

    active = True

    def __init__(self, faults: FaultsSection, rank: int) -> None:
        self.faults = faults
        self.rank = rank

    def on_gradients(self, iteration: int, modules: list[nn.Module]) -> None:
        if iteration in self.faults.inject_overflow_at:
            first = next(p.grad for module in modules for p in module.parameters() if p.grad is not None)
            first.fill_(float("inf"))
        if iteration in self.faults.inject_nan_at:
            parameter = self._parameter(modules)
            if parameter is not None:
                parameter.grad.fill_(float("nan"))

    def on_update(self, iteration: int, modules: list[nn.Module]) -> None:
        if iteration in self.faults.inject_nan_weights_at:
            parameter = self._parameter(modules)
            if parameter is not None:
                with torch.no_grad():
                    parameter.view(-1)[0] = float("nan")

    def after_step(self, iteration: int) -> None:
        """faults.kill_at_iteration: SIGKILL one rank after this step, in the first launch only (torchrun counts
        restarts in TORCHELASTIC_RESTART_COUNT), so the restarted job runs through."""
        faults = self.faults
        if (faults.kill_at_iteration == iteration and self.rank == faults.kill_rank
                and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0):
            logger.warning("faults.kill_at_iteration=%d: killing rank %d", iteration, self.rank)
            for handler in logging.getLogger().handlers:
                handler.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    def kill_during_save(self, iteration: int) -> bool:
        return self.faults.kill_during_save_at == iteration

    def check_model(self, modules: list[nn.Module]) -> None:
        faults = self.faults
        if not (faults.inject_nan_at or faults.inject_nan_weights_at):
            return
        # On the modules' device: NCCL reduces only CUDA tensors.
        device = next((p.device for m in modules for p in m.parameters()), torch.device("cpu"))
        held = torch.tensor([float(self._parameter(modules) is not None)], device=device)
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            # Under pipeline parallelism one stage holds the parameter: ask every rank, so all decide alike.
            torch.distributed.all_reduce(held, op=torch.distributed.ReduceOp.MAX)
        if held.item() == 0:
            raise ConfigError(f"faults.inject_nan_param: {faults.inject_nan_param!r} is not a parameter of the model")

    def _parameter(self, modules: list[nn.Module]) -> nn.Parameter | None:
        for module in modules:
            parameter = dict(module.named_parameters()).get(self.faults.inject_nan_param)
            if parameter is not None:
                return parameter
        return None


def faults_configured(faults: FaultsSection) -> bool:
    """True when any faults.* option asks for a fault."""
    return bool(faults.inject_overflow_at or faults.inject_nan_at or faults.inject_nan_weights_at
                or faults.kill_at_iteration is not None or faults.kill_during_save_at is not None)


def build_fault_hooks(config: TrainConfig, rank: int) -> FaultHooks:
    """NO_FAULTS for an ordinary run, else the FaultInjector of config.faults for this rank."""
    return FaultInjector(config.faults, rank) if faults_configured(config.faults) else NO_FAULTS


def check_supported(config: TrainConfig) -> None:
    """Refuse the faults the selected step strategy cannot inject (before any process group exists).

    Raises:
        ConfigError: one line naming the option.
    """
    faults = config.faults
    if faults.inject_overflow_at and config.parallel.zero_stage > 0:
        raise ConfigError("faults.inject_overflow_at: only supported with parallel.zero_stage=0")
    if faults.inject_nan_at and config.parallel.zero_stage > 0:
        raise ConfigError("faults.inject_nan_at: only supported with parallel.zero_stage=0")
    if faults.inject_nan_weights_at and config.parallel.zero_stage > 0:
        raise ConfigError("faults.inject_nan_weights_at: only supported with parallel.zero_stage=0")


__all__ = ["NO_FAULTS", "FaultHooks", "FaultInjector", "build_fault_hooks", "check_supported", "faults_configured"]
