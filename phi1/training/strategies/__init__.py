"""Step strategies, and the choice of one from the config.

    ddp       phi1.training.strategies.ddp        torch DDP (or one process), fp16 loss scaling, SP grads, clipping
    zero      phi1.training.strategies.zero       DeepSpeed ZeRO-1/2/3: the engine accumulates, clips and steps
    pipeline  phi1.training.strategies.pipeline   pipeline stages (1F1B, interleaved, GPipe) x TP x DDP / ZeRO-1
    fsdp      phi1.training.strategies.fsdp       FSDP2 (fully_shard over the data-parallel group) x TP

The registry maps a name to "module:Class" and imports the module only when that strategy is built, so a run
never imports DeepSpeed (or a pipeline schedule) it does not use. A new strategy is a module with a StepStrategy
subclass and one line in STRATEGIES; `strategy_name` says when the config selects it. The trainer is not touched.
"""

from __future__ import annotations

import importlib

from phi1.training.config import ConfigError, TrainConfig
from phi1.training.strategies.base import Batch, StepResult, StepStrategy, StrategyContext

STRATEGIES: dict[str, str] = {
    "ddp": "phi1.training.strategies.ddp:DDPStrategy",
    "zero": "phi1.training.strategies.zero:ZeroStrategy",
    "pipeline": "phi1.training.strategies.pipeline:PipelineStrategy",
    "fsdp": "phi1.training.strategies.fsdp:FSDPStrategy",
}
"""Registry: strategy name -> "module:Class" of its StepStrategy subclass."""


def strategy_name(config: TrainConfig) -> str:
    """The strategy `config` selects: 'pipeline' when parallel.pipeline_parallel > 1 (its DP side may be DDP or
    ZeRO-1), 'fsdp' when parallel.fsdp, 'zero' when parallel.zero_stage > 0, else 'ddp'."""
    parallel = config.parallel
    if parallel.pipeline_parallel > 1:
        return "pipeline"
    if parallel.fsdp:
        return "fsdp"
    if parallel.zero_stage > 0:
        return "zero"
    return "ddp"


def strategy_class(name: str) -> type[StepStrategy]:
    """The StepStrategy subclass registered as `name`.

    Raises:
        ConfigError: no strategy of that name is registered (one line naming the known ones).
    """
    target = STRATEGIES.get(name)
    if target is None:
        raise ConfigError(f"step strategy {name!r} is not registered; known: {', '.join(sorted(STRATEGIES))} "
                          "(phi1.training.strategies.STRATEGIES)")
    module_name, class_name = target.split(":")
    return getattr(importlib.import_module(module_name), class_name)


def build_strategy(context: StrategyContext, name: str | None = None) -> StepStrategy:
    """Build the strategy `name` (default: the one context.config selects); it builds this rank's modules.

    Raises:
        ConfigError: `name` is not registered.
    """
    return strategy_class(name or strategy_name(context.config))(context)


__all__ = ["STRATEGIES", "Batch", "StepResult", "StepStrategy", "StrategyContext", "build_strategy",
           "strategy_class", "strategy_name"]
