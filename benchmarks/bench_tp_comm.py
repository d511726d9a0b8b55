"""Bytes all-reduced per training step at TP = 2: one reduction per phi block (attention + MLP summed first)
versus two (one per branch), with the wall time of each, on CPU gloo processes.

    python benchmarks/bench_tp_comm.py [--preset phi-1-tiny] [--batch-size 2] [--seq-len 512] [--steps 5]

A step is forward + backward of the training loss. Bytes are the TP activation all-reduces counted by
`phi1.parallel.mappings.COMM_BYTES` (the payload each rank hands to the collective); the vocab-parallel
cross-entropy's three reductions of B*T numbers are the same in both layouts and not counted. With
`--sequence-parallel` the reduce-scatter and all-gather bytes are reported instead.
"""

from __future__ import annotations

import argparse
import time

import torch

from phi1.core.config import get_preset
from phi1.core.model import PhiForCausalLM
from phi1.parallel.mappings import COMM_BYTES, reset_comm_bytes
from phi1.parallel.state import init_distributed
from phi1.testing.spawn import run_on_gloo


def _measure(rank: int, world_size: int, preset: str, batch_size: int, seq_len: int, steps: int, sp: bool) -> dict:
    state = init_distributed(tensor_parallel_size=world_size)
    config = get_preset(preset)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (batch_size, seq_len + 1), generator=g)
    results = {}
    for fused in (True, False):
        model = PhiForCausalLM(config, tp_group=state.tp_group, fused_tp_reduce=fused, sequence_parallel=sp)
        model.train()

        def step(model: PhiForCausalLM = model) -> None:
            model(tokens[:, :-1], labels=tokens[:, 1:]).loss.backward()
            model.zero_grad(set_to_none=True)

        step()  # warm-up: allocator and gloo buffers
        torch.distributed.barrier()
        reset_comm_bytes()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        torch.distributed.barrier()
        seconds = (time.perf_counter() - start) / steps
        results["fused" if fused else "per-branch"] = {
            **{kind: count // steps for kind, count in COMM_BYTES.items()},
            "seconds": seconds,
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="phi-1-tiny")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--tensor-parallel-size", type=int, default=2)
    parser.add_argument("--sequence-parallel", action="store_true")
    args = parser.parse_args()
    config = get_preset(args.preset)
    if args.seq_len > config.max_seq_len:
        parser.error(f"--seq-len {args.seq_len} exceeds the {args.preset} max_seq_len {config.max_seq_len}")

    results = run_on_gloo(
        _measure, args.tensor_parallel_size, args.preset, args.batch_size, args.seq_len, args.steps,
        args.sequence_parallel, timeout_s=600,
    )[0]
    kinds = ("reduce_scatter", "all_gather") if args.sequence_parallel else ("all_reduce",)
    print(
        f"{args.preset}: {config.n_layer} layers, d_model {config.d_model}; TP={args.tensor_parallel_size}"
        f"{' + sequence parallel' if args.sequence_parallel else ''}; batch {args.batch_size} x {args.seq_len} "
        f"tokens; fp32; per training step (forward + backward), per rank, mean of {args.steps} steps"
    )
    header = f"{'reduction per block':<22}" + "".join(f"{k + ' MiB':>20}" for k in kinds) + f"{'step ms':>12}"
    print(header)
    for name, label in (("fused", "one (attn + MLP)"), ("per-branch", "two (attn, MLP)")):
        row = results[name]
        print(f"{label:<22}" + "".join(f"{row[k] / 2**20:>20.2f}" for k in kinds) + f"{row['seconds'] * 1e3:>12.1f}")
    saved = 1 - sum(results["fused"][k] for k in kinds) / sum(results["per-branch"][k] for k in kinds)
    print(f"one reduction per block moves {saved:.1%} fewer bytes")


if __name__ == "__main__":
    main()
