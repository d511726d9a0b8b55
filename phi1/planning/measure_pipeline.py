"""Measured peak memory of each pipeline stage on CPU, next to `phi1.planning.pipeline.stage_memory`.

`measure_stage_memory` launches P fresh gloo processes (one per pipeline rank). Each builds its stages of phi-1
(`phi1.core.pipeline_stage.build_stages`), torch AdamW (foreach, as phi1 uses on CPU) and a
`phi1.parallel.pipeline.PipelineRunner`, and runs a few optimizer steps of m micro-batches through the schedule.
Its peak resident memory above the baseline taken just before the stages were built is what the stage used.
The processes start with `MALLOC_MMAP_THRESHOLD_=65536`, so every tensor over 64 KiB is its own mmap returned to
the kernel when freed and the resident set follows the live tensors; the peak is reset at the baseline
(`phi1.planning.rss`, shared with `phi1.training.measure_memory`, which does the same for whole-model runs).

It drives the runner rather than the trainer so that what is measured is the stage itself: weights, gradients,
AdamW states, the activations the schedule keeps in flight (the first rank holds P micro-batches under 1F1B),
torch's receive buffers, the last stage's logits. The trainer adds only its data loader to that.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from phi1.core.config import ModelConfig
from phi1.planning.memory import make_layout
from phi1.planning.pipeline import stage_memory
from phi1.planning.rss import MALLOC_ENV, peak_resident_bytes, reset_peak, resident_bytes


def _warm_up(config: ModelConfig) -> None:
    """One forward, backward and AdamW step of a throwaway one-block stage, so what torch initialises lazily on
    first use (autograd and optimizer machinery, kernels' scratch space) is in the baseline, not in the peak."""
    import torch

    from phi1.core.pipeline_stage import PhiPipelineStage

    stage = PhiPipelineStage(config.replace(n_layer=1, d_model=64, n_head=2, d_mlp=128, rotary_dim=16), 0, 1, [0])
    optimizer = torch.optim.AdamW(stage.parameters(), foreach=True)
    ids = torch.randint(0, config.vocab_size, (2, 16))
    stage.loss(stage(ids), ids).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _worker(rank: int, world_size: int, config_values: dict, pipeline_parallel: int, micro_batches: int,
            micro_batch_size: int, seq_len: int, schedule: str, virtual_stages: int, checkpointing: str,
            steps: int) -> dict:
    import torch
    from torch import nn

    from phi1.core.pipeline_stage import build_stages, stage_loss_fn
    from phi1.parallel.optim import param_groups
    from phi1.parallel.pipeline import PipelineRunner, build_pipeline_groups

    config = ModelConfig(**config_values)
    groups = build_pipeline_groups(1, pipeline_parallel)
    _warm_up(config)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (micro_batches * micro_batch_size, seq_len + 1), generator=generator)
    input_ids, labels = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    baseline = resident_bytes()
    reset = reset_peak()
    chunks = build_stages(config, groups.pp_rank, pipeline_parallel, virtual_stages)
    for chunk in chunks:
        chunk.activation_checkpointing = checkpointing
    optimizer = torch.optim.AdamW(param_groups(nn.ModuleList(chunks), 0.1), lr=1e-4, foreach=True)
    runner = PipelineRunner(chunks, groups, stage_loss_fn(chunks), n_microbatches=micro_batches,
                            micro_batch_size=micro_batch_size, seq_len=seq_len, schedule=schedule,
                            optimizer=optimizer, grad_clip=1.0)
    for _ in range(steps):
        runner.step(input_ids, labels)
    peak = peak_resident_bytes()
    return {"pp_rank": groups.pp_rank, "dp_rank": groups.dp_rank, "measured": peak - baseline, "peak_reset": reset}


@dataclass
class StageMeasurement:
    pp_rank: int
    measured: float
    """Peak resident bytes above the baseline."""
    predicted: float
    """`stage_memory(...).total`."""
    in_flight: int
    """Chunk micro-batches of activations the planner says this rank holds at its peak."""

    @property
    def error(self) -> float:
        """predicted / measured - 1."""
        return self.predicted / self.measured - 1


def measure_stage_memory(config: ModelConfig, pipeline_parallel: int, micro_batches: int, micro_batch_size: int,
                         seq_len: int, schedule: str = "1f1b", virtual_stages: int = 1, checkpointing: str = "none",
                         steps: int = 2, timeout_s: float = 600, data_parallel: int = 1) -> list[StageMeasurement]:
    """Measured and predicted peak bytes of every pipeline rank (fp32, CPU, no TP), by pipeline rank.

    `data_parallel` > 1 launches that many pipelines (P x D processes; the runner wraps each stage in DDP) and
    reports each pipeline rank's largest peak over its DP replicas.

    Raises:
        RuntimeError: a worker failed; TimeoutError: they ran past `timeout_s`.
    """
    from phi1.testing.spawn import run_on_gloo

    previous = {key: os.environ.get(key) for key in MALLOC_ENV}
    os.environ.update(MALLOC_ENV)  # read by glibc when each spawned worker starts
    try:
        results = run_on_gloo(_worker, pipeline_parallel * data_parallel, config.to_dict(), pipeline_parallel,
                              micro_batches, micro_batch_size, seq_len, schedule, virtual_stages, checkpointing, steps,
                              timeout_s=timeout_s)
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    layout = make_layout(config, tensor_parallel=1, data_parallel=data_parallel, zero_stage=0,
                         micro_batch_size=micro_batch_size,
                         gradient_accumulation=micro_batches, seq_len=seq_len, precision="fp32",
                         activation_checkpointing=checkpointing, sequence_parallel=False, loss_chunk_size=0, gpu=False)
    out = []
    worst: dict[int, dict] = {}
    for result in results:
        if result["pp_rank"] not in worst or result["measured"] > worst[result["pp_rank"]]["measured"]:
            worst[result["pp_rank"]] = result
    for result in sorted(worst.values(), key=lambda r: r["pp_rank"]):
        predicted = stage_memory(config, layout, pipeline_parallel, result["pp_rank"], micro_batches, schedule,
                                 virtual_stages)
        out.append(StageMeasurement(result["pp_rank"], float(result["measured"]), predicted.total, predicted.in_flight))
    return out


__all__ = ["StageMeasurement", "measure_stage_memory"]
