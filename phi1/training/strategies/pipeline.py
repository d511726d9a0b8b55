"""The pipeline step strategy: this rank's phi-1 stages run through a pipeline schedule (parallel.pipeline_parallel).

Selected when `parallel.pipeline_parallel` > 1 (`strategies.strategy_name`). The rank sits at (dp, pp, tp) of the
`ParallelState` mesh (TP adjacent, then PP, then DP) and holds pipeline stage `pp_rank`, or under
`parallel.pipeline_schedule=interleaved` the `parallel.virtual_stages` chunks pp_rank, pp_rank + P, ...
(`phi1.core.pipeline_stage.build_stages`: the embedding on the first stage, the final LayerNorm, lm_head and
loss on the last, blocks balanced between them or as `parallel.pipeline_split` says, every parameter under the
one-process model's name).

One step:

    the step's `accum` micro-batches of this DP rank, stacked (every rank of a pipeline reads the same ones;
    the first stage uses the input ids, the last the labels)
    -> PipelineRunner.forward_backward: torch.distributed.pipelining's 1F1B / interleaved 1F1B / GPipe runs
       them as the pipeline's micro-batches (gradient accumulation = pipeline micro-batches; each micro-batch's
       loss / accum, exactly as the DDP strategy accumulates), DDP over each stage's DP group all-reduces once,
       sequence-parallel gradients are summed over TP, and the last stage's loss is broadcast over the pipeline
       and averaged over DP, so every rank logs the same loss
    -> faults.on_gradients -> global gradient norm over every stage, TP rank and DP rank; clip to optim.grad_clip
    -> a non-finite loss or norm skips the update on every rank alike (the norm and loss are the same on all
       ranks), and the guard counts it; else set the lr and step AdamW (ZeRO-1: torch's ZeroRedundancyOptimizer,
       AdamW states sharded over the stage's DP group): `StepStrategy.update_or_skip` (strategies/base.py),
       the same end of the step as under DDP and FSDP2

Precision: fp32 or bf16 (autocast around the schedule; the residual stream that crosses stages stays fp32).
fp16's dynamic loss scaling is not run under a pipeline and is refused by validation, as ZeRO-2/3 are.

Validation runs one micro-batch at a time (the validator's unit) with a plain sequential forward through the
stages: point-to-point sends of one activation from stage to stage and the last stage's loss broadcast. This is
written here rather than taken from torch's schedules because their `eval` runs a fixed number of micro-batches
(the training step's), and one micro-batch has no bubble to hide.

Checkpoints: `modules` are the stage chunks (their parameters named as one process names them) and `optimizer`
the AdamW (or ZeRO-1) optimizer; the checkpointer writes them in the layout-free DCP format
(`checkpoint.format=auto` picks it under pipeline parallelism), so a PP run resumes at any other layout.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from phi1.core.pipeline_stage import StageParameters, build_stages, stage_loss_fn
from phi1.core.pretrained import load_state_dict_into
from phi1.parallel.optim import param_groups
from phi1.parallel.pipeline import PipelineRunner
from phi1.training.optimizer import build_adamw
from phi1.training.precision import NoLossScaler, autocast
from phi1.training.strategies.base import Batch, StepResult, StepStrategy, configure_model, dp_mean


class PipelineStrategy(StepStrategy):
    """Pipeline-parallel stages, composed with TP/SP inside each stage and DDP or ZeRO-1 across replicas."""

    name = "pipeline"

    # -- building ---------------------------------------------------------------------------------------------------

    def build_modules(self) -> list[nn.Module]:
        config, state = self.config, self.state
        par = config.parallel
        chunks = build_stages(
            self.context.model_config, state.pp_rank, state.pp_size, par.virtual_stages,
            tp_group=state.tp_group if state.tp_size > 1 else None, sequence_parallel=par.sequence_parallel,
            init_seed=config.seed, split=list(par.pipeline_split) or None,
        )
        for chunk in chunks:
            configure_model(chunk, self.context)
        self.view = StageParameters(chunks)
        """All of this rank's parameters under the full model's names (guard, finite checks, optimizer)."""
        self.holds_first = any(chunk.is_first for chunk in chunks)
        self.holds_last = any(chunk.is_last for chunk in chunks)
        return chunks

    def setup(self) -> None:
        config, state = self.config, self.state
        if config.parallel.zero_stage == 1:
            self.optimizer, self.optimizer_kind = self._zero1_optimizer(), "torch ZeroRedundancyOptimizer (AdamW, ZeRO-1)"
        else:
            self.optimizer, self.optimizer_kind = build_adamw(self.view, config.optim, self.device)
        self.scaler = NoLossScaler()
        precision, device = config.precision, self.device
        self.runner = PipelineRunner(
            self.modules, state, stage_loss_fn(self.modules), n_microbatches=self.accum,
            micro_batch_size=config.batch.micro_batch_size, seq_len=config.data.seq_len,
            schedule=config.parallel.pipeline_schedule, activation_dtype=torch.float32,
            grad_clip=config.optim.grad_clip, autocast=lambda: autocast(precision, device),
        )

    def _zero1_optimizer(self) -> torch.optim.Optimizer:
        """AdamW with its states sharded over this stage's DP group (DeepSpeed's engine cannot wrap a stage that
        torch's schedule drives; torch's ZeroRedundancyOptimizer does ZeRO-1's partitioning of the states)."""
        from torch.distributed.optim import ZeroRedundancyOptimizer

        optim = self.config.optim
        groups = param_groups(self.view, optim.weight_decay)
        for group in groups:
            group.pop("name")
        optimizer = ZeroRedundancyOptimizer(
            groups[0]["params"], optimizer_class=torch.optim.AdamW, process_group=self.state.dp_group,
            lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, weight_decay=groups[0]["weight_decay"],
            foreach=True,
        )
        for group in groups[1:]:
            optimizer.add_param_group(group)
        return optimizer

    def load_model_state(self, weights: dict[str, torch.Tensor], source: str) -> None:
        """Full weights by the one-process model's names: each chunk takes its own (and its TP shard of them)."""
        for chunk in self.modules:
            names = {name for name, _ in chunk.named_parameters()}
            load_state_dict_into(chunk, {k: v for k, v in weights.items() if k in names}, source=source)

    @property
    def train_model(self) -> nn.Module:
        """The stage parameters under their full names (no wrapper: DDP lives inside the runner)."""
        return self.view

    def layout_state(self) -> dict:
        s, par = self.state, self.config.parallel
        return {"world_size": s.world_size, "tensor_parallel": s.tp_size, "data_parallel": s.dp_size,
                "pipeline_parallel": s.pp_size, "pipeline_schedule": par.pipeline_schedule,
                "virtual_stages": par.virtual_stages}

    def layout_phrase(self) -> str:
        s, par = self.state, self.config.parallel
        schedule = par.pipeline_schedule + (f", {par.virtual_stages} virtual stages" if par.pipeline_schedule == "interleaved" else "")
        return (f"tensor parallel {s.tp_size} x pipeline parallel {s.pp_size} ({schedule}) x data parallel "
                f"{s.dp_size}")

    # -- one step ---------------------------------------------------------------------------------------------------

    def train_step(self, data: Iterator[Batch], iteration: int) -> StepResult:
        batches = [next(data) for _ in range(self.accum)]
        input_ids = torch.cat([batch["input_ids"] for batch in batches])
        labels = torch.cat([batch["labels"] for batch in batches])
        loss = self.runner.forward_backward(input_ids, labels)  # the same on every rank: PP broadcast, DP mean
        self.context.faults.on_gradients(iteration, self.modules)
        clip = self.config.optim.grad_clip
        norm = self.runner.clip_grad_norm_(clip) if clip > 0 else self.runner.grad_norm()
        return self.update_or_skip(iteration, torch.tensor(loss, dtype=torch.float32), loss, norm)

    # -- validation -------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def eval_loss(self, batch: Batch) -> torch.Tensor:
        """The loss of one micro-batch, forwarded stage by stage through the pipeline; every rank of the pipeline
        returns the last stage's number (not yet averaged over DP)."""
        state = self.state
        input_ids, labels = batch["input_ids"].to(self.device), batch["labels"].to(self.device)
        chunks = {chunk.stage_index: chunk for chunk in self.modules}
        num_stages = self.modules[0].num_stages
        activation = None
        loss = torch.zeros((), dtype=torch.float32, device=self.device)
        with autocast(self.config.precision, self.device):
            for stage in range(num_stages):
                owner = stage % state.pp_size
                if owner != state.pp_rank:
                    continue
                chunk = chunks[stage]
                if stage == 0:
                    x = input_ids
                else:
                    x = torch.empty(self._activation_shape(chunk, input_ids), dtype=torch.float32, device=self.device)
                    dist.recv(x, src=self._global((stage - 1) % state.pp_size), group=state.pp_group)
                out = chunk(x)
                if chunk.is_last:
                    loss = chunk.loss(out, labels).float().reshape(())
                else:
                    dist.send(out.float().contiguous(), dst=self._global((stage + 1) % state.pp_size),
                              group=state.pp_group)
                activation = out
        del activation
        loss = loss.reshape(1)
        dist.broadcast(loss, src=self._global(state.pp_size - 1), group=state.pp_group)
        return loss.reshape(())

    def _activation_shape(self, chunk, input_ids: torch.Tensor) -> tuple[int, int, int]:
        """(B, T, d), or (B, T / tp, d) under sequence parallelism: what the previous stage sends."""
        batch, seq = input_ids.shape
        local = seq // self.state.tp_size if chunk.sequence_parallel else seq
        return batch, local, self.context.model_config.d_model

    def _global(self, pp_rank: int) -> int:
        return dist.get_global_rank(self.state.pp_group, pp_rank)


__all__ = ["PipelineStrategy", "dp_mean"]
