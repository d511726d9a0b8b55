"""Measure the all-reduce of this machine's processes (gloo on CPU, NCCL on GPUs), for the timing model.

Run under a launcher; rank 0 prints one JSON line:

    torchrun --standalone --nproc-per-node 2 -m phi1.planning.collectives

It times ring all-reduces of several sizes and fits `t = 2 (n-1)/n x bytes / bandwidth + 2 (n-1) x latency`
(phi1.planning.timing.all_reduce_seconds) by least squares, so the prediction uses the same formula it was
measured with.
"""

from __future__ import annotations

import json
import sys
import time

import torch
import torch.distributed as dist

RESULT_PREFIX = "PHI1_ALLREDUCE_RESULT "
SIZES = (1 << 16, 1 << 20, 1 << 22, 1 << 24)


def fit_link(sizes: list[int], seconds: list[float], ranks: int) -> tuple[float, float]:
    """(bus bandwidth GB/s, per-hop latency us) of the ring model that fits the timings best."""
    x = torch.tensor([2 * (ranks - 1) / ranks * s for s in sizes], dtype=torch.float64)
    y = torch.tensor(seconds, dtype=torch.float64)
    design = torch.stack([x, torch.full_like(x, 2 * (ranks - 1))], dim=1)
    slope, intercept = torch.linalg.lstsq(design, y.unsqueeze(1)).solution.squeeze(1).tolist()
    bandwidth = 1.0 / max(slope, 1e-15) / 1e9
    return bandwidth, max(intercept, 0.0) * 1e6


def measure(repeats: int = 5) -> dict:
    """Median all-reduce seconds per size over `repeats`, and the fitted link (every rank calls this)."""
    from phi1.parallel.state import destroy_distributed, init_distributed

    state = init_distributed(1)
    try:
        device = state.device
        medians = []
        for size in SIZES:
            tensor = torch.ones(size // 4, dtype=torch.float32, device=device)
            dist.all_reduce(tensor)  # warm-up: connections, buffers
            times = []
            for _ in range(repeats):
                dist.barrier()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                dist.all_reduce(tensor)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - start)
            medians.append(sorted(times)[len(times) // 2])
        bandwidth, latency = fit_link(list(SIZES), medians, state.world_size)
        return {"rank": state.rank, "ranks": state.world_size, "sizes": list(SIZES), "seconds": medians,
                "gbps": bandwidth, "latency_us": latency, "backend": dist.get_backend()}
    finally:
        destroy_distributed()


def main() -> int:
    result = measure()
    if result["rank"] == 0:
        print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
