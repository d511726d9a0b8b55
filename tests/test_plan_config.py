"""One memory model for `tools/plan.py` and `python -m phi1.train --dry-run`: given the same training config and
GPU count both print the same peak per GPU, and plan.py takes activation checkpointing, the chunked loss, the
ZeRO stage and TP as the training config does."""

from __future__ import annotations

import re
import sys

import pytest

from phi1.planning.hardware import cluster
from phi1.planning.memory import GIB, estimate_memory
from phi1.planning.search import enumerate_plans
from phi1.testing.hostile import REPO, assert_clear_error, python, run_bounded
from phi1.training.config import load_config, validate_config
from phi1.training.plan import memory_estimate, memory_layout

DRY_RUN_PEAK = re.compile(r"^memory .*; peak (\d+\.\d+) GiB$", re.M)
PLAN_PEAK = re.compile(r"^memory +per GPU: .*; peak (\d+\.\d+) GiB \(", re.M)

CASES = {
    # the paper's recipe as written: TP 1, ZeRO-2, micro 8, fp16, activation checkpointing, dropout 0.1
    "paper": ("configs/pretrain_phi1.yaml", 8, []),
    "paper-no-checkpointing": ("configs/pretrain_phi1.yaml", 8, ["activation_checkpointing=false"]),
    "paper-chunked-loss-zero1": ("configs/pretrain_phi1.yaml", 8, ["loss_chunk_size=1024", "parallel.zero_stage=1"]),
    "small-tp2-sp": ("configs/pretrain_phi1_small.yaml", 4, ["parallel.tensor_parallel=2", "parallel.zero_stage=1",
                                                            "parallel.sequence_parallel=true"]),
    "small-fsdp2-offload": ("configs/pretrain_phi1_small.yaml", 4, ["parallel.zero_stage=0", "parallel.fsdp=true",
                                                                   "parallel.fsdp_cpu_offload=true"]),
}


def _peak(pattern: re.Pattern, text: str) -> str:
    found = pattern.findall(text)
    assert len(found) == 1, text
    return found[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_plan_py_prints_the_dry_runs_number(case: str) -> None:
    config_file, gpus, overrides = CASES[case]
    dry = run_bounded(python("-m", "phi1.train", "--config", config_file, "--dry-run", "--world-size", str(gpus),
                             "--device", "cuda", *overrides), timeout_s=180, memory_mb=None)
    plan = run_bounded(python("tools/plan.py", "--config", config_file, "--gpus", str(gpus), "--top", "3",
                              *overrides), timeout_s=180, memory_mb=None)
    assert dry.returncode == 0, dry.describe()
    assert plan.returncode == 0, plan.describe()
    dry_peak, plan_peak = _peak(DRY_RUN_PEAK, dry.stdout), _peak(PLAN_PEAK, plan.stdout)
    assert plan_peak == dry_peak
    config = load_config(REPO / config_file, overrides)
    model_config = validate_config(config, gpus, check_files=False, device="cuda")
    assert dry_peak == f"{memory_estimate(config, model_config, gpus)['total'] / GIB:.2f}"
    assert "assumes" in plan.stdout and "assumes" in dry.stdout  # both say what they assume


def test_paper_recipe_number_and_what_made_the_old_disagreement() -> None:
    """configs/pretrain_phi1.yaml at 8 GPUs: ~20.7 GiB with its activation checkpointing; the same layout without
    it (what plan.py used to show for 'TP1 DP8 ZeRO-2 mb8', having no checkpointing option) is ~46 GiB."""
    config = load_config(REPO / "configs/pretrain_phi1.yaml")
    model_config = validate_config(config, 8, check_files=False, device="cuda")
    with_ac = estimate_memory(model_config, memory_layout(config, model_config, 8)).total / GIB
    config.activation_checkpointing = False
    without = estimate_memory(model_config, memory_layout(config, model_config, 8)).total / GIB
    assert 19 < with_ac < 22 and 45 < without < 48


def test_the_search_row_of_the_config_layout_is_the_config_estimate() -> None:
    """The search builds its layouts with the same constructor: its row for the config's layout is identical."""
    config = load_config(REPO / "configs/pretrain_phi1.yaml")
    model_config = validate_config(config, 8, check_files=False, device="cuda")
    layout = memory_layout(config, model_config, 8)
    plans = enumerate_plans(model_config, cluster("A100-80GB", 8), config.batch.global_batch_size,
                            config.data.seq_len, config.precision, 0.5)
    rows = [p for p in plans if p.layout == layout]
    assert len(rows) == 1
    assert rows[0].memory.total == estimate_memory(model_config, layout).total


@pytest.mark.parametrize("option, check", [
    ("activation_checkpointing=true", lambda row: row.endswith(" AC") or " AC " in row),
    ("parallel.tensor_parallel=2", lambda row: row.startswith("TP2 ")),
    ("parallel.zero_stage=3", lambda row: " ZeRO-3 " in row),
    ("batch.micro_batch_size=2", lambda row: " mb2" in row),
])
def test_plan_py_pins_a_layout_option_given_as_in_the_training_config(option: str, check) -> None:
    result = run_bounded(python("tools/plan.py", "--top", "0", "--all", option), timeout_s=180, memory_mb=None)
    assert result.returncode == 0, result.describe()
    rows = [line.split("  ")[0] for line in result.stdout.splitlines() if line.startswith("TP")]
    assert rows and all(check(row) for row in rows), rows


def test_loss_chunk_size_is_counted_like_training() -> None:
    """loss_chunk_size=N shrinks the logits of TP-1 rows, as the dry run counts it."""
    def logits_of_first_tp1_row(*options: str) -> float:
        result = run_bounded(python("tools/plan.py", "--top", "0", "--all", "parallel.tensor_parallel=1",
                                    "parallel.zero_stage=0", "batch.micro_batch_size=8",
                                    "activation_checkpointing=false", *options), timeout_s=180, memory_mb=None)
        assert result.returncode == 0, result.describe()
        row = next(line for line in result.stdout.splitlines() if line.startswith("TP1 DP8 DDP mb8"))
        return float(row.split()[9])  # the logits column
    assert logits_of_first_tp1_row("loss_chunk_size=1024") < logits_of_first_tp1_row() / 5


@pytest.mark.parametrize("argv, names", [
    (["--config", "no/such/config.yaml"], "no/such/config.yaml"),
    (["--config", "configs/pretrain_phi1.yaml", "optim.nonsense=1"], "optim.nonsense"),
    (["--config", "configs/pretrain_phi1.yaml", "--gpus", "3"], "batch.global_batch_size"),
    (["optim.lr=1e-3"], "optim.lr"),
    (["activation_checkpointing=maybe"], "activation_checkpointing"),
    (["--mfu", "7"], "--mfu"),
])
def test_plan_py_bad_input_is_one_clear_line(argv: list[str], names: str) -> None:
    outcome = run_bounded([sys.executable, "tools/plan.py", *argv], timeout_s=120, memory_mb=None)
    assert_clear_error(outcome, names=names)
