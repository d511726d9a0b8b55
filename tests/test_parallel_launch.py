"""`init_distributed` from each launcher's environment (torchrun, Open MPI, PMI), in fresh processes that
initialise torch.distributed themselves: at TP = 2, 4 ranks form TP groups {0,1} {2,3} and DP groups
{0,2} {1,3}; 2 ranks form one TP group. The three launches run at once (process start-up dominates)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from phi1.testing.spawn import free_port

REPO = Path(__file__).resolve().parents[1]
WORLDS = {"torchrun": 4, "openmpi": 2, "pmi": 2}

SCRIPT = """
import json, torch, torch.distributed as dist
torch.set_num_threads(1)
from phi1.parallel.state import init_distributed, destroy_distributed
s = init_distributed(tensor_parallel_size=2)
print(json.dumps({"rank": s.rank, "tp_rank": s.tp_rank, "dp_rank": s.dp_rank, "world": s.world_size,
                  "tp": dist.get_process_group_ranks(s.tp_group), "dp": dist.get_process_group_ranks(s.dp_group)}))
destroy_distributed()
"""


def _launcher_env(kind: str, rank: int, world: int) -> dict[str, str]:
    if kind == "torchrun":
        return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)}
    if kind == "openmpi":
        return {
            "OMPI_COMM_WORLD_RANK": str(rank),
            "OMPI_COMM_WORLD_SIZE": str(world),
            "OMPI_COMM_WORLD_LOCAL_RANK": str(rank),
        }
    return {"PMI_RANK": str(rank), "PMI_SIZE": str(world)}


@pytest.mark.slow
def test_init_distributed_builds_adjacent_tp_groups():
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OMPI_", "PMI_")) and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    base.update(MASTER_ADDR="127.0.0.1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    procs: dict[str, list[subprocess.Popen]] = {}
    try:
        for kind, world in WORLDS.items():
            env = {**base, "MASTER_PORT": str(free_port())}
            procs[kind] = [
                subprocess.Popen(
                    [sys.executable, "-c", SCRIPT], env={**env, **_launcher_env(kind, r, world)},
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                )
                for r in range(world)
            ]
        for kind, world in WORLDS.items():
            for r, p in enumerate(procs[kind]):
                out, err = p.communicate(timeout=120)
                assert p.returncode == 0, f"{kind} rank {r}: {err[-3000:]}"
                info = json.loads(out.strip().splitlines()[-1])
                assert info["rank"] == r and info["world"] == world, (kind, info)
                assert (info["tp_rank"], info["dp_rank"]) == (r % 2, r // 2), (kind, info)
                assert info["tp"] == [r - r % 2, r - r % 2 + 1], (kind, info)
                assert info["dp"] == list(range(r % 2, world, 2)), (kind, info)
    finally:
        for p in (p for group in procs.values() for p in group):
            if p.poll() is None:
                p.kill()
                p.wait()
