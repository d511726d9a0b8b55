"""The pipeline bubble measured with per-stage timers, against (P-1)/(m+P-1) and (P-1)/(V m+P-1), on CPU gloo.

    python benchmarks/bench_pipeline_bubble.py [--workload fixed|phi|both] [--steps 3] [--forward-ms 50]

Each pipeline rank times the forward, backward and loss of its own stages inside the schedule
(`phi1.parallel.pipeline.StageTiming`); its bubble is the rest of the step: 1 - compute / wall, the wall clock
starting at a barrier of the pipeline group. The table gives the mean over ranks (and the range), the median over
`--steps` steps after one warm-up step, next to the formula, for P = 2 and 4 pipeline ranks, m = 4 and 8
micro-batches, and the 1F1B, interleaved (V = 2) and GPipe schedules. `in flight` is the most micro-batches of
activations the first rank held at once (`phi1.planning.pipeline.in_flight_chunks` predicts it).

Two workloads:

- `fixed`: every stage's forward takes `--forward-ms` and its backward twice that, by sleeping (split over the V
  chunks under interleaving). Sleeping uses no CPU, so P processes on fewer cores still behave like P devices:
  this measures the schedule itself.
- `phi`: real phi stages (8 blocks of d_model 256, vocabulary 512, micro-batches of 2 x 128 tokens). On a
  machine with fewer cores than pipeline ranks, ranks that compute at the same time share cores, which stretches
  the steady state more than the ramps, so the measured bubble comes out below the formula there.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch import nn

from phi1.parallel.pipeline import PipelineRunner, build_pipeline_groups, stages_of_rank
from phi1.planning.pipeline import bubble_fraction, in_flight_chunks
from phi1.testing.spawn import run_on_gloo

CASES = [("1f1b", 1), ("interleaved", 2), ("gpipe", 1)]
MICRO_BATCHES = (4, 8)
WIDTH = 64  # features of the fixed workload's activations


class _Sleep(torch.autograd.Function):
    """Identity that takes a fixed time forward and twice that backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, seconds: float) -> torch.Tensor:
        ctx.seconds = seconds
        time.sleep(seconds)
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        time.sleep(2 * ctx.seconds)
        return grad, None


class FixedTimeStage(nn.Module):
    """A stage whose compute takes a known time (see the module docstring); meets `PipelineChunk`."""

    def __init__(self, stage_index: int, num_stages: int, seconds: float) -> None:
        super().__init__()
        self.stage_index, self.num_stages, self.seconds = stage_index, num_stages, seconds
        self.is_first, self.is_last = stage_index == 0, stage_index == num_stages - 1
        self.weight = nn.Parameter(torch.ones(WIDTH))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Sleep.apply(x * self.weight, self.seconds)

    def example_io(self, micro_batch_size: int, seq_len: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        example = torch.empty(micro_batch_size, WIDTH, dtype=dtype, device="meta", requires_grad=not self.is_first)
        return example, torch.empty(micro_batch_size, WIDTH, dtype=dtype, device="meta", requires_grad=True)

    def sequence_parallel_param_names(self) -> list[str]:
        return []


def _mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (output - target).pow(2).mean()


def _phi_setup(pp_rank: int, pp: int, virtual: int):
    from phi1.core.config import get_preset
    from phi1.core.pipeline_stage import build_stages, stage_loss_fn

    config = get_preset("phi-1-nano", n_layer=8, d_model=256, n_head=4, d_mlp=1024, rotary_dim=32)
    chunks = build_stages(config, pp_rank, pp, virtual)
    return chunks, stage_loss_fn(chunks), config.vocab_size


def _measure(rank: int, world_size: int, workload: str, steps: int, forward_ms: float) -> list[dict]:
    groups = build_pipeline_groups(tensor_parallel=1, pipeline_parallel=world_size)
    micro, seq_len = 2, 128
    rows = []
    for schedule, virtual in CASES:
        for m in MICRO_BATCHES:
            if workload == "fixed":
                chunks = [FixedTimeStage(s, world_size * virtual, forward_ms / 1000 / virtual)
                          for s in stages_of_rank(groups.pp_rank, world_size, virtual)]
                loss_fn = _mse
                inputs = torch.randn(m * micro, WIDTH)
                labels = torch.randn(m * micro, WIDTH)
            else:
                chunks, loss_fn, vocab = _phi_setup(groups.pp_rank, world_size, virtual)
                g = torch.Generator().manual_seed(0)
                inputs = torch.randint(0, vocab, (m * micro, seq_len), generator=g)
                labels = torch.randint(0, vocab, (m * micro, seq_len), generator=g)
            runner = PipelineRunner(chunks, groups, loss_fn, n_microbatches=m, micro_batch_size=micro,
                                    seq_len=seq_len, schedule=schedule, timed=True)
            runner.forward_backward(inputs, labels)  # warm-up: buffers, first-touch allocations
            idle, in_flight = [], []
            for _ in range(steps):
                runner.forward_backward(inputs, labels)
                idle.append(runner.last_timing.idle_fraction)
                in_flight.append(runner.last_timing.peak_in_flight)
            rows.append({"schedule": schedule, "virtual": virtual, "m": m, "idle": statistics.median(idle),
                         "in_flight": max(in_flight), "pp_rank": groups.pp_rank})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", choices=("fixed", "phi", "both"), default="both")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per case (after one warm-up step)")
    parser.add_argument("--forward-ms", type=float, default=50.0, help="fixed workload: forward time of a stage")
    parser.add_argument("--pipeline-sizes", type=int, nargs="+", default=[2, 4])
    args = parser.parse_args()
    if args.steps < 1 or args.forward_ms <= 0 or min(args.pipeline_sizes) < 2:
        parser.error("--steps >= 1, --forward-ms > 0 and pipeline sizes >= 2")
    workloads = ["fixed", "phi"] if args.workload == "both" else [args.workload]
    print(f"one intra-op thread per rank; {os.cpu_count()} cores on this machine; median of {args.steps} steps")
    print("| workload | P | schedule | m | formula | measured mean (min-max over ranks) | in flight, rank 0 (predicted) |")
    print("|---|---|---|---|---|---|---|")
    for workload in workloads:
        for pp in args.pipeline_sizes:
            per_rank = run_on_gloo(_measure, pp, workload, args.steps, args.forward_ms, timeout_s=900)
            for index, case in enumerate(per_rank[0]):
                idle = [rows[index]["idle"] for rows in per_rank]
                schedule, virtual, m = case["schedule"], case["virtual"], case["m"]
                formula = bubble_fraction(pp, m, schedule, virtual)
                predicted = in_flight_chunks(0, pp, m, schedule, virtual)
                name = f"{schedule} V={virtual}" if virtual > 1 else schedule
                print(f"| {workload} | {pp} | {name} | {m} | {formula:.3f} | {statistics.mean(idle):.3f} "
                      f"({min(idle):.3f}-{max(idle):.3f}) | {case['in_flight']} ({predicted}) |")


if __name__ == "__main__":
    main()
