"""Set-up shared by the tests that train phi-1-nano and compare losses (not used by the library itself).

Two kinds of test use it:

- Library-level equivalence tests (a plain PhiForCausalLM and AdamW loop on N gloo processes against one
  process): `counting_batches` gives every run the same global batches, `one_process_reference` the reference
  losses, gradient norms and weights.
- Trainer-level tests (`python -m phi1.train`, under torchrun for N > 1, on the synthetic counting corpus of
  phi1.testing.synthetic): `synthetic_data_dir` writes the corpus once per test module, `run_overrides` builds the
  `key=value` overrides of a small fp32 run on it, `run_train` launches it, `assert_succeeded` checks the exit with
  the output tail in the message, and `step_losses` reads the losses back from the run's metrics.jsonl.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from phi1.core.config import get_preset
from phi1.core.model import PhiForCausalLM
from phi1.testing.synthetic import write_synthetic_dataset

REPO = Path(__file__).resolve().parents[2]
"""The checkout the tests run from (launched runs import phi1 from it)."""


# -- library-level runs --------------------------------------------------------------------------------------------


def counting_batches(vocab_size: int, steps: int = 10, global_batch: int = 4, seq_len: int = 32) -> torch.Tensor:
    """Arithmetic sequences from random starts (seed 2024): learnable within a few steps, so the losses fall.

    Returns:
        (steps, global_batch, seq_len + 1) token ids: step k's inputs are [k, :, :-1], its labels [k, :, 1:].
    """
    g = torch.Generator().manual_seed(2024)
    starts = torch.randint(0, vocab_size, (steps, global_batch, 1), generator=g)
    return (starts + 3 * torch.arange(seq_len + 1)) % vocab_size


def one_process_reference(make_optimizer: Callable[[nn.Module], torch.optim.Optimizer], max_norm: float,
                          **batch_shape: int) -> tuple[list[float], list[float], dict[str, torch.Tensor]]:
    """Train phi-1-nano (default init, one process) over `counting_batches(**batch_shape)` with torch's own
    `clip_grad_norm_`: the reference a parallel run must reproduce.

    Args:
        make_optimizer: builds the optimizer of the model (the same one the parallel run builds).
        max_norm: the clipping threshold.
        batch_shape: steps / global_batch / seq_len of `counting_batches`.
    Returns:
        (the loss of every step, the pre-clip gradient norm of every step, the final weights by name).
    """
    model = PhiForCausalLM(get_preset("phi-1-nano"))
    optimizer = make_optimizer(model)
    losses, norms = [], []
    for batch in counting_batches(model.config.vocab_size, **batch_shape):
        loss = model(batch[:, :-1], labels=batch[:, 1:]).loss
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, norms, {k: v.detach().clone() for k, v in model.state_dict().items()}


# -- trainer-level runs --------------------------------------------------------------------------------------------


def synthetic_data_dir(tmp_path_factory) -> Path:
    """A new directory under pytest's `tmp_path_factory` holding the synthetic counting corpus and its tokenizer
    (phi1.testing.synthetic.write_synthetic_dataset): call it from a module-scoped fixture."""
    directory = tmp_path_factory.mktemp("data")
    write_synthetic_dataset(directory)
    return directory


def run_overrides(data_dir: Path, run_dir: Path, **values) -> list[str]:
    """The `key=value` overrides of a phi-1-nano run on the synthetic corpus in `data_dir`, writing to `run_dir`:
    fp32, 32-token sequences, micro-batches of 2, 2 warm-up steps, a log record every step, no validation and no
    TensorBoard; `values` (by dotted key, e.g. `**{"schedule.train_steps": 10}`) add to or replace these."""
    base = {
        "model.preset": "phi-1-nano", "data.path": data_dir / "counting_text_document",
        "data.tokenizer_model": data_dir / "tokenizer.json", "data.seq_len": 32, "data.split": "90,10,0",
        "batch.micro_batch_size": 2, "schedule.warmup_steps": 2, "precision": "fp32", "checkpoint.dir": run_dir,
        "logging.interval": 1, "eval.interval": 0, "logging.tensorboard_dir": "",
    }
    base.update(values)
    return [f"{k}={v}" for k, v in base.items()]


def train_env(**extra: str) -> dict[str, str]:
    """This process's environment for a launched run: phi1 from the checkout, one intra-op thread per process,
    no torchrun variables left over from the caller; `extra` added (e.g. DS_ACCELERATOR="cpu")."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **extra)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT"):
        env.pop(key, None)
    return env


def train_command(args: list[str], nproc: int) -> list[str]:
    """`python -m phi1.train ARGS`, under `torch.distributed.run --standalone` with `nproc` processes when > 1."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
                if nproc > 1 else [sys.executable])
    return [*launcher, "-m", "phi1.train", *args]


def run_train(args: list[str], nproc: int, env: dict[str, str] | None = None,
              timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `train_command(args, nproc)` from the checkout, output captured; it is not checked (`assert_succeeded`).

    Raises:
        subprocess.TimeoutExpired: it ran past `timeout` seconds.
    """
    return subprocess.run(train_command(args, nproc), cwd=REPO, env=train_env() if env is None else env,
                          capture_output=True, text=True, timeout=timeout)


def assert_succeeded(result: subprocess.CompletedProcess, tail: int = 4000) -> None:
    """Assert that a launched run exited 0, with the last `tail` characters of its stdout and stderr if not."""
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-tail:]}\n{result.stderr[-tail:]}"


def step_losses(run_dir: Path) -> dict[int, float]:
    """The loss of each logged step of a run (its last micro-batch's), by iteration, from run_dir/metrics.jsonl."""
    # Read here rather than with phi1.training.metrics.read_jsonl: phi1.testing stays below phi1.training (the
    # planner runs phi1.testing.spawn, and planning never imports training).
    with open(run_dir / "metrics.jsonl", encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    return {r["iteration"]: r["step_losses"][-1] for r in records if "step_losses" in r}


__all__ = [
    "REPO",
    "assert_succeeded",
    "counting_batches",
    "one_process_reference",
    "run_overrides",
    "run_train",
    "step_losses",
    "synthetic_data_dir",
    "train_command",
    "train_env",
]
