"""Run a function on N local CPU processes joined by a gloo process group (tests, benchmarks, examples).

Each worker gets its rank, a fresh gloo group on a free port, one intra-op thread (N processes share the
cores), and its return value is sent back to the caller. A worker that raises fails the whole run with its
traceback; a run that exceeds `timeout_s` is killed rather than left to hang CI.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException


def free_port() -> int:
    """A TCP port nobody listens on now (bound to port 0 and released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, result_dir: str, timeout_s: float) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank)
    )
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, Path(result_dir) / f"rank{rank}.pt")
    except BaseException:
        # The traceback of the failing rank, not the collective timeout of the others, is what the reader needs.
        (Path(result_dir) / f"rank{rank}.error").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def run_on_gloo(fn: Callable, world_size: int, *args: Any, timeout_s: float = 180.0) -> list[Any]:
    """Call `fn(rank, world_size, *args)` on `world_size` spawned processes; return their results by rank.

    `fn` must be importable (a module-level function) and its results loadable with `weights_only=True`
    (tensors, numbers, strings, lists, dicts). Raises RuntimeError with the first failing rank's traceback, or
    TimeoutError after `timeout_s` seconds.
    """
    with tempfile.TemporaryDirectory(prefix="phi1-gloo-") as result_dir:
        context = mp.start_processes(
            _worker,
            args=(world_size, free_port(), fn, args, result_dir, timeout_s),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        end = time.monotonic() + timeout_s
        try:
            while not context.join(timeout=1.0):
                if time.monotonic() > end:
                    raise TimeoutError(f"{fn.__name__} on {world_size} gloo processes ran past {timeout_s} s")
        except ProcessException as e:
            errors = sorted(Path(result_dir).glob("rank*.error"))
            detail = errors[0].read_text() if errors else str(e)
            raise RuntimeError(f"{fn.__name__} failed on {errors[0].stem if errors else 'a rank'}:\n{detail}") from None
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
                    process.join()
        return [torch.load(Path(result_dir) / f"rank{r}.pt", weights_only=True) for r in range(world_size)]
