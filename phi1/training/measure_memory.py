"""Measured peak memory of real training steps on CPU, to check `phi1.planning.memory` against.

It lives in `training`, not `planning`, because it runs the Trainer (phi1.planning never imports training).

`measure_peak_memory` launches fresh processes (torchrun for more than one) that each build the real
`phi1.training.trainer.Trainer` from TrainConfig overrides, take their resident memory as the baseline, run a few
steps of its strategy (`trainer.strategy.train_step`), and report the peak resident memory above that baseline
next to the planner's prediction for the same layout. Every process runs with `MALLOC_MMAP_THRESHOLD_=65536`, so every tensor larger
than 64 KiB is its own mmap returned to the kernel when freed and the resident set follows the live tensors;
the peak is reset at the baseline (`phi1.planning.rss`: 5 written to /proc/self/clear_refs on Linux), so the
import and start-up transients do not count.

    python -m phi1.training.measure_memory model.n_layer=4 batch.micro_batch_size=4 ...   (one worker; see below)
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

from phi1.planning.memory import estimate_memory
from phi1.planning.rss import MALLOC_ENV, peak_resident_bytes, reset_peak, resident_bytes

REPO = Path(__file__).resolve().parents[2]
RESULT_PREFIX = "PHI1_MEMORY_RESULT "


def _warm_up_runtime() -> None:
    """One step of a throwaway nano model and AdamW, so that what torch imports and initialises lazily on first
    use (the optimizer's compile machinery, kernels' scratch space) is in the baseline, not in the peak."""
    import torch

    from phi1.core.config import get_preset
    from phi1.core.model import PhiForCausalLM

    model = PhiForCausalLM(get_preset("phi-1-nano"))
    optimizer = torch.optim.AdamW(model.parameters(), foreach=True)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def worker(overrides: list[str], steps: int) -> dict:
    """Run inside one launched process: build the Trainer, run `steps` steps, return measured and predicted bytes."""
    import torch.distributed as dist

    from phi1.parallel.state import destroy_distributed, init_distributed
    from phi1.training.config import load_config, validate_config
    from phi1.training.data_loading import micro_batches
    from phi1.training.trainer import Trainer, launched_world_size, resolve_config

    config = load_config(None, overrides)
    world_size = launched_world_size()
    resolve_config(config, world_size)
    model_config = validate_config(config, world_size)
    state = init_distributed(config.parallel.tensor_parallel)
    try:
        _warm_up_runtime()
        baseline = resident_bytes()
        reset = reset_peak()
        trainer = Trainer(config, model_config, state)
        data = micro_batches(trainer.train_data, config, state, 0)
        for step in range(steps):
            trainer.strategy.train_step(data, step + 1)
        peak = peak_resident_bytes()
        trainer.close()
        from phi1.training.plan import memory_layout

        layout = memory_layout(config, model_config, world_size, gpu=False)
        estimate = estimate_memory(model_config, layout)
        result = {"rank": state.rank, "measured": peak - baseline, "baseline": baseline, "peak_reset": reset,
                  "predicted": estimate.total, "peak_moment": estimate.peak_moment, "parts": estimate.as_dict()}
        if layout.fsdp:  # what the planner counted before it modelled FSDP2: the same layout as DDP
            result["as_ddp"] = estimate_memory(model_config, dataclasses.replace(layout, fsdp=False)).total
        if dist.is_initialized():
            gathered = [None] * state.world_size
            dist.all_gather_object(gathered, result)
            result = max(gathered, key=lambda r: r["measured"])
        return result
    finally:
        destroy_distributed()


def measure_peak_memory(overrides: list[str], nproc: int = 1, steps: int = 3, timeout: float = 300,
                        threads: int = 1) -> dict:
    """Launch `nproc` fresh processes training with `overrides`; return the worst rank's measured peak bytes
    above its baseline (`measured`), the planner's `predicted` bytes, and the estimate's parts.

    Raises:
        RuntimeError: the workers failed (their output is in the message).
        subprocess.TimeoutExpired: they ran longer than `timeout` seconds.
    """
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(threads), DS_ACCELERATOR="cpu", **MALLOC_ENV)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    module = ["-m", "phi1.training.measure_memory", f"--steps={steps}", *overrides]
    if nproc > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *module]
    else:
        command = [sys.executable, *module]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    for line in result.stdout.splitlines():
        at = line.find(RESULT_PREFIX)
        if at >= 0:  # another rank's output may share the line: take the one JSON object after the prefix
            return json.JSONDecoder().raw_decode(line[at + len(RESULT_PREFIX):])[0]
    raise RuntimeError(f"memory measurement failed (exit {result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    steps = 3
    for item in list(args):
        if item.startswith("--steps="):
            steps = int(item.split("=", 1)[1])
            args.remove(item)
    result = worker(args, steps)
    if result["rank"] == 0 or int(os.environ.get("RANK", "0")) == 0:
        print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())


# ----------------------------------------------------------------------------------------------------------------
# The configurations benchmarks/bench_planner_memory.py measures (and tests/test_planner_memory.py one of)

MODEL = ["model.preset=phi-1-tiny", "model.n_layer=4", "model.d_model=512", "model.n_head=8", "model.d_mlp=2048",
         "model.vocab_size=8192", "model.max_seq_len=256"]

# name: (processes, overrides)
CONFIGS: dict[str, tuple[int, list[str]]] = {
    "mb4": (1, ["batch.micro_batch_size=4", "batch.global_batch_size=4"]),
    "mb8": (1, ["batch.micro_batch_size=8", "batch.global_batch_size=8"]),
    "mb8-ac": (1, ["batch.micro_batch_size=8", "batch.global_batch_size=8", "activation_checkpointing=true"]),
    "mb8-chunked-loss": (1, ["batch.micro_batch_size=8", "batch.global_batch_size=8", "loss_chunk_size=256"]),
    "mb4-accum2": (1, ["batch.micro_batch_size=4", "batch.global_batch_size=8"]),
    "mb4-bf16": (1, ["batch.micro_batch_size=4", "batch.global_batch_size=4", "precision=bf16"]),
    "tp2-mb4": (2, ["batch.micro_batch_size=4", "batch.global_batch_size=4", "parallel.tensor_parallel=2"]),
    "dp2-mb4": (2, ["batch.micro_batch_size=4", "batch.global_batch_size=8"]),
}
# FSDP2 (parallel.fsdp=true) over 2 processes, measured by benchmarks/bench_fsdp_memory.py (and
# tests/test_planner_fsdp.py one of): the planner's phi1.planning.fsdp against the peak.
FSDP_CONFIGS: dict[str, tuple[int, list[str]]] = {
    "fsdp-dp2-mb4": (2, ["batch.micro_batch_size=4", "batch.global_batch_size=8", "parallel.fsdp=true"]),
    "fsdp-dp2-mb4-accum2": (2, ["batch.micro_batch_size=4", "batch.global_batch_size=16", "parallel.fsdp=true"]),
    "fsdp-dp2-mb8-ac": (2, ["batch.micro_batch_size=8", "batch.global_batch_size=16", "parallel.fsdp=true",
                            "activation_checkpointing=true"]),
    "fsdp-dp2-mb4-bf16": (2, ["batch.micro_batch_size=4", "batch.global_batch_size=8", "parallel.fsdp=true",
                              "precision=bf16"]),
}
ZERO_CONFIGS: dict[str, tuple[int, list[str]]] = {
    "dp2-zero1-mb4": (2, ["batch.micro_batch_size=4", "batch.global_batch_size=8", "parallel.zero_stage=1"]),
}


def base_overrides(data_dir: Path, run_dir: Path, seq_len: int = 256) -> list[str]:
    """TrainConfig overrides shared by every configuration: the model, the synthetic data, no logging."""
    return MODEL + [
        f"data.path={data_dir / 'counting_text_document'}", f"data.tokenizer_model={data_dir / 'tokenizer.json'}",
        f"data.seq_len={seq_len}", "data.split=100,0,0", "eval.interval=0", f"checkpoint.dir={run_dir}",
        "checkpoint.resume=false", "logging.jsonl=", "logging.tensorboard_dir=", "schedule.train_steps=20",
        "schedule.warmup_steps=1",
    ]
