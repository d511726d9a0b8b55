"""Each component of the trainer on its own (phi1.training.trainer assembles them): the strategy registry, the DDP
strategy's step, the data loader, the metrics processor, the validator, the checkpointer's decisions and
formats, the non-finite guard and the fault-injection hooks. One process, no data files unless needed."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from phi1.parallel.cross_entropy import IGNORE_INDEX
from phi1.parallel.state import ParallelState
from phi1.training.checkpointer import (
    CHECKPOINT_FORMATS,
    Phi1Format,
    format_class,
    format_name,
    format_of,
    save_action,
)
from phi1.training.config import ConfigError, load_config
from phi1.training.data_loading import collate, micro_batches
from phi1.training.fault import NonFiniteTrainingError
from phi1.training.fault_injection import NO_FAULTS, FaultInjector, build_fault_hooks, check_supported
from phi1.training.guard import DIAGNOSIS_FILE, StepGuard
from phi1.training.metrics import MetricsProcessor
from phi1.training.schedule import LRSchedule
from phi1.training.strategies import STRATEGIES, StepStrategy, StrategyContext, strategy_class, strategy_name
from phi1.training.strategies.base import StepResult
from phi1.training.validator import Validator


def one_process() -> ParallelState:
    return ParallelState(rank=0, world_size=1, local_rank=0, tp_size=1, tp_rank=0, dp_size=1, dp_rank=0,
                         tp_group=None, dp_group=None, device=torch.device("cpu"))


def tiny_config(*overrides: str):
    base = ["model.preset=phi-1-nano", "model.vocab_size=128", "data.seq_len=16", "batch.global_batch_size=4",
            "batch.micro_batch_size=2", "schedule.train_steps=6", "schedule.warmup_steps=2", "precision=fp32"]
    return load_config(None, base + list(overrides))


class RecordingSink:
    """A MetricsSink stand-in that keeps what it is given."""

    def __init__(self) -> None:
        self.written: list[tuple[dict, str | None]] = []

    def write(self, record: dict, console: str | None = None) -> None:
        self.written.append((record, console))


# -- strategy registry ---------------------------------------------------------------------------------------------


def test_registry_selects_by_config_and_refuses_unknown_names() -> None:
    assert strategy_name(tiny_config()) == "ddp"
    assert strategy_name(tiny_config("parallel.zero_stage=2")) == "zero"
    assert strategy_name(tiny_config("parallel.pipeline_parallel=2")) == "pipeline"
    assert strategy_name(tiny_config("parallel.fsdp=true")) == "fsdp"
    for name in STRATEGIES:
        cls = strategy_class(name)
        assert issubclass(cls, StepStrategy) and cls.name == name
    with pytest.raises(ConfigError) as refused:
        strategy_class("megatron")
    message = str(refused.value)
    assert "\n" not in message and "'megatron'" in message
    assert all(name in message for name in ("ddp", "zero"))


# -- the DDP strategy, alone ---------------------------------------------------------------------------------------


def ddp_strategy(config, guard: StepGuard, faults=NO_FAULTS):
    schedule = LRSchedule(config.optim.lr, config.optim.min_lr, config.schedule.warmup_steps,
                          config.schedule.train_steps, config.schedule.decay)
    context = StrategyContext(config=config, model_config=config.model.build(), state=one_process(), tokenizer=None,
                              schedule=schedule, guard=guard, faults=faults)
    strategy = strategy_class("ddp")(context)
    strategy.setup()
    return strategy, schedule


def random_batches(count: int, vocab: int = 128, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, (2, 16), generator=generator),
             "labels": torch.randint(0, vocab, (2, 16), generator=generator)} for _ in range(count)]


def test_ddp_step_accumulates_clips_and_updates(tmp_path) -> None:
    config = tiny_config("optim.grad_clip=1.0")
    guard = StepGuard(5, str(tmp_path), 1, True)
    strategy, schedule = ddp_strategy(config, guard)
    assert strategy.accum == 2 and len(strategy.modules) == 1 and strategy.train_model is strategy.modules[0]
    model = strategy.modules[0]
    batches = random_batches(2)
    with torch.no_grad():
        expected = sum(float(model(b["input_ids"], labels=b["labels"]).loss) for b in batches) / 2
    before = model.lm_head.weight.detach().clone()
    result = strategy.train_step(iter(batches), 1)
    assert isinstance(result, StepResult) and not result.skipped
    assert float(result.loss) == pytest.approx(expected, rel=1e-6)  # mean of the two micro-batches
    assert result.lr == schedule.lr_at(1) and schedule.num_updates == 1
    assert math.isfinite(result.grad_norm) and result.grad_norm > 0
    assert not torch.equal(before, model.lm_head.weight)  # AdamW stepped
    assert all(p.grad is None for p in model.parameters())  # zeroed for the next step
    assert guard.total == 0


def test_ddp_step_skips_an_injected_overflow_at_its_iteration(tmp_path) -> None:
    config = tiny_config("faults.inject_overflow_at=[2]")
    guard = StepGuard(5, str(tmp_path), 1, True)
    strategy, schedule = ddp_strategy(config, guard, build_fault_hooks(config, rank=0))
    model = strategy.modules[0]
    first = strategy.train_step(iter(random_batches(2, seed=1)), 1)
    weights = [p.detach().clone() for p in model.parameters()]
    second = strategy.train_step(iter(random_batches(2, seed=2)), 2)
    assert not first.skipped and second.skipped and math.isinf(second.grad_norm)
    assert schedule.num_updates == 1  # the skipped step did not advance the schedule
    assert all(torch.equal(w, p) for w, p in zip(weights, model.parameters()))  # nor touch the weights
    assert guard.total == 1 and strategy.scaler.skipped_steps == 1  # fp32: an inf norm is a bad step


# -- data loading --------------------------------------------------------------------------------------------------


def test_collate_shifts_labels_and_masks_the_prompt() -> None:
    items = [{"tokens": np.arange(6), "loss_mask": np.array([0, 0, 0, 1, 1, 1])},
             {"tokens": np.arange(10, 16), "loss_mask": np.array([0, 1, 1, 1, 1, 1])}]
    batch = collate(items)
    assert batch["input_ids"].tolist() == [[0, 1, 2, 3, 4], [10, 11, 12, 13, 14]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 3, 4, 5], [11, 12, 13, 14, 15]]


def test_micro_batches_resume_at_the_sample_and_leave_the_global_rng_alone() -> None:
    dataset = [{"tokens": np.full(5, i)} for i in range(40)]
    config = tiny_config()
    state = one_process()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    fresh = [b["input_ids"][:, 0].tolist() for b, _ in zip(micro_batches(dataset, config, state, 0), range(6))]
    resumed = [b["input_ids"][:, 0].tolist() for b, _ in zip(micro_batches(dataset, config, state, 4), range(4))]
    assert fresh == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11]]
    assert resumed == fresh[2:]  # 4 consumed samples = 2 micro-batches: neither skipped nor repeated
    assert torch.equal(torch.get_rng_state(), before)  # dropout masks do not shift with iterators


# -- metrics processor ---------------------------------------------------------------------------------------------


def test_metrics_record_and_console_line_from_given_numbers() -> None:
    sink = RecordingSink()
    metrics = MetricsProcessor(sink, train_steps=10, global_batch_size=8, seq_len=128, flops_per_token=1_000_000,
                               world_size=2, peak=1.0, device=torch.device("cpu"), log_interval=4,
                               compile_first_step=True)
    metrics.step_done(1, torch.tensor(3.0), skipped=False, seconds=9.0)  # compile warm-up: its own record
    assert sink.written[0][0] == {"iteration": 1, "compile_time_s": 9.0}
    assert "compile warm-up: the first step took 9.0 s" in sink.written[0][1]
    metrics.step_done(2, torch.tensor(2.0), skipped=True, seconds=0.5)
    metrics.step_done(3, torch.tensor(1.0), skipped=False, seconds=1.5)
    assert [metrics.due(i) for i in (3, 4, 8, 9, 10)] == [False, True, True, False, True]
    losses = metrics.log_interval(4, 32, lr=1e-3, grad_norm=0.25, loss_scale=1.0, skipped_steps=1, nonfinite_steps=0)
    assert losses == [3.0, 2.0, 1.0]
    record, console = sink.written[-1]
    tokens_per_second = 2 * 8 * 128 / 2.0  # two timed steps (the compile step is not) in 2.0 s
    assert record["loss"] == 2.0 and record["step_losses"] == [3.0, 2.0, 1.0] and record["consumed_samples"] == 32
    assert record["step_time_s"] == 1.0 and record["tokens_per_second"] == tokens_per_second
    assert record["skipped_in_interval"] == 1 and record["skipped_steps"] == 1 and record["nonfinite_steps"] == 0
    assert record["tflops_per_device"] == 1_000_000 * tokens_per_second / 2 / 1e12
    assert record["mfu"] == 1_000_000 * tokens_per_second / 2 / 1e12
    assert console.startswith("iteration       4/10 | loss 2.0000 | lr 1.000e-03 | grad norm 0.250 | loss scale 1 | "
                              "skipped 1 | 1,024 tokens/s | 0.001 TFLOP/s/device | MFU 0.1% | memory rss_gib ")
    # The next interval starts empty.
    metrics.step_done(5, torch.tensor(4.0), skipped=False, seconds=2.0)
    assert metrics.log_interval(5, 40, 1e-3, 0.5, 1.0, 1, 0) == [4.0]
    assert sink.written[-1][0]["skipped_in_interval"] == 0
    metrics.log_validation(5, 2.0)
    assert sink.written[-1][0]["val_ppl"] == pytest.approx(math.exp(2.0))
    assert sink.written[-1][1] == f"iteration       5 | validation loss 2.0000 | ppl {math.exp(2.0):.2f}"


def test_console_line_without_a_peak_says_mfu_na() -> None:
    metrics = MetricsProcessor(RecordingSink(), train_steps=3, global_batch_size=1, seq_len=1, flops_per_token=1,
                               world_size=1, peak=None, device=torch.device("cpu"), log_interval=1,
                               compile_first_step=False)
    record = metrics.interval_record(1, 1, [1.0], 1e-3, 1.0, 1.0, 0, 0, 0, 0.0, 0, {"mem_rss_gib": 1.5})
    assert record["mfu"] is None and record["tokens_per_second"] == 0.0 and record["step_time_s"] is None
    assert MetricsProcessor.console_line(record, 3).endswith("MFU n/a | memory rss_gib 1.50 GiB")


# -- validator -----------------------------------------------------------------------------------------------------


class ConstantLossStrategy:
    """Stands in for a strategy: the loss of a batch is its first token; records the mode it was called in."""

    def __init__(self) -> None:
        self.modes: list[str] = []
        self.mode = "train"

    def evaluating(self):
        import contextlib

        @contextlib.contextmanager
        def context():
            self.mode = "eval"
            yield
            self.mode = "train"
        return context()

    def eval_loss(self, batch):
        self.modes.append(self.mode)
        return batch["input_ids"][0, 0].float()


def test_validator_means_eval_iters_batches_and_keeps_the_best() -> None:
    from phi1.training.trainer import RunState

    config = tiny_config("eval.interval=3", "eval.iters=3")
    dataset = [{"tokens": np.full(5, i)} for i in range(20)]
    strategy = ConstantLossStrategy()
    validator = Validator(config, one_process(), strategy, dataset)
    assert [validator.due(i) for i in (1, 3, 5, 6)] == [False, True, False, True]
    run_state = RunState(iteration=3)
    assert validator.validate(run_state) == (0 + 2 + 4) / 3  # first tokens of micro-batches [0,1], [2,3], [4,5]
    assert strategy.modes == ["eval"] * 3 and strategy.mode == "train"
    assert (run_state.last_val_loss, run_state.last_val_iteration, run_state.best_val_loss) == (2.0, 3, 2.0)
    run_state.best_val_loss, run_state.iteration = 1.0, 6
    validator.validate(run_state)
    assert run_state.best_val_loss == 1.0 and run_state.last_val_iteration == 6  # not better: best stays
    assert Validator(config, one_process(), strategy, None).evaluate() is None


# -- checkpointer --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("iteration", "consecutive_nonfinite", "expected"), [
    (3, 0, None),       # not on the interval
    (4, 0, "save"),     # on the interval
    (4, 2, "hold"),     # on the interval, inside a streak of non-finite steps
    (5, 2, "save"),     # exit_at_iteration saves even inside a streak
    (10, 1, "save"),    # the last step always saves
])
def test_save_decisions(iteration, consecutive_nonfinite, expected) -> None:
    assert save_action(iteration, steps=10, interval=4, exit_at=5, consecutive_nonfinite=consecutive_nonfinite) == expected


def test_save_decision_without_an_interval_saves_only_at_the_end() -> None:
    assert [save_action(i, 6, 0, None, 0) for i in range(1, 7)] == [None] * 5 + ["save"]


def test_checkpoint_format_choice(tmp_path) -> None:
    assert format_name(tiny_config()) == "phi1"
    assert format_name(tiny_config("parallel.zero_stage=1")) == "phi1"
    assert format_name(tiny_config("parallel.pipeline_parallel=2")) == "dcp"  # auto under pipeline parallelism
    assert format_class("phi1") is Phi1Format
    with pytest.raises(ConfigError, match=r"checkpoint\.format: 'zip' is not a registered"):
        format_class("zip")
    (tmp_path / "model_tp00-of-01.safetensors").write_bytes(b"")
    assert Phi1Format.recognizes(tmp_path) and isinstance(format_of(tmp_path), Phi1Format)
    assert "phi1" in CHECKPOINT_FORMATS


# -- guard ---------------------------------------------------------------------------------------------------------


def poisoned_model(value: float) -> nn.Module:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    model[1].weight.grad[0, 0] = value
    return model


def test_guard_counts_bad_steps_and_stops_with_a_diagnosis(tmp_path) -> None:
    guard = StepGuard(2, str(tmp_path), world_size=1, is_main=True)
    guard.observe(1, 2.0, float("inf"), skipped=True, can_back_off=True, model=poisoned_model(float("inf")))
    assert guard.total == 0  # an fp16 overflow the scaler can still answer is not a bad step
    guard.observe(2, 2.0, float("nan"), skipped=True, can_back_off=False, model=poisoned_model(float("nan")))
    assert guard.consecutive == 1 and not guard.must_stop
    guard.record_good(3, 1.5, 0.3)
    assert guard.consecutive == 0 and guard.total == 1
    guard.observe(4, float("nan"), 1.0, skipped=True, can_back_off=True, model=poisoned_model(0.0))
    guard.observe(5, 2.0, float("inf"), skipped=True, can_back_off=False, model=poisoned_model(float("inf")))
    assert guard.must_stop and guard.total == 3 and guard.state_dict() == {"total": 3}
    with pytest.raises(NonFiniteTrainingError, match="2 consecutive steps") as stopped:
        guard.stop()
    diagnosis = json.loads((tmp_path / DIAGNOSIS_FILE).read_text())
    assert diagnosis == stopped.value.diagnosis
    assert (diagnosis["first_bad_iteration"], diagnosis["last_bad_iteration"]) == (4, 5)
    assert diagnosis["nonfinite_gradients"] == ["1.weight"] and diagnosis["last_good_checkpoint"] is None


def test_guard_weight_check_names_the_parameter(tmp_path) -> None:
    guard = StepGuard(5, str(tmp_path), world_size=1, is_main=False)
    model = poisoned_model(0.0)
    guard.check_weights(model, 7, 1e-3)  # finite: nothing happens
    with torch.no_grad():
        model[0].bias[1] = float("nan")
    with pytest.raises(NonFiniteTrainingError, match="iteration 7") as stopped:
        guard.check_weights(model, 7, 1e-3)
    assert stopped.value.diagnosis["nonfinite_weights"] == ["0.bias"] and stopped.value.diagnosis["lr"] == 1e-3
    assert not (tmp_path / DIAGNOSIS_FILE).exists()  # only the main rank writes it


# -- fault injection -----------------------------------------------------------------------------------------------


def test_no_faults_configured_means_the_null_hooks() -> None:
    assert build_fault_hooks(tiny_config(), rank=0) is NO_FAULTS
    assert not NO_FAULTS.active and NO_FAULTS.kill_during_save(3) is False
    assert isinstance(build_fault_hooks(tiny_config("faults.kill_during_save_at=3"), rank=0), FaultInjector)


def test_fault_hooks_fire_at_their_iteration_only() -> None:
    config = tiny_config("faults.inject_overflow_at=[2]", "faults.inject_nan_at=[3]",
                         "faults.inject_nan_weights_at=[4]", "faults.inject_nan_param=1.weight",
                         "faults.kill_during_save_at=5")
    faults = build_fault_hooks(config, rank=0)
    model = poisoned_model(0.0)
    faults.check_model([model])
    faults.on_gradients(1, [model])
    faults.on_update(1, [model])
    assert all(bool(torch.isfinite(p.grad).all()) and bool(torch.isfinite(p).all()) for p in model.parameters())
    faults.on_gradients(2, [model])
    assert bool(torch.isinf(model[0].weight.grad).all())  # the first gradient
    faults.on_gradients(3, [model])
    assert bool(torch.isnan(model[1].weight.grad).all())
    faults.on_update(4, [model])
    weight = model[1].weight.detach().view(-1)
    assert math.isnan(float(weight[0])) and bool(torch.isfinite(weight[1:]).all())
    assert [faults.kill_during_save(i) for i in (4, 5, 6)] == [False, True, False]
    with pytest.raises(ConfigError, match=r"faults\.inject_nan_param: 'nope' is not a parameter"):
        build_fault_hooks(tiny_config("faults.inject_nan_at=[1]", "faults.inject_nan_param=nope"), 0).check_model([model])


def test_faults_the_zero_strategy_cannot_inject_are_refused() -> None:
    check_supported(tiny_config("faults.inject_nan_at=[2]"))
    for option in ("inject_overflow_at", "inject_nan_at", "inject_nan_weights_at"):
        with pytest.raises(ConfigError, match=rf"faults\.{option}: only supported with parallel\.zero_stage=0"):
            check_supported(tiny_config("parallel.zero_stage=1", f"faults.{option}=[2]"))


KILL_SCRIPT = textwrap.dedent("""
    import sys
    from phi1.training.config import load_config
    from phi1.training.fault_injection import build_fault_hooks
    faults = build_fault_hooks(load_config(None, ["faults.kill_at_iteration=3", "faults.kill_rank=1"]), int(sys.argv[1]))
    for iteration in (1, 2, 3, 4):
        print(iteration, flush=True)
        faults.after_step(iteration)
""")


@pytest.mark.parametrize(("rank", "restarts", "killed"), [(1, "0", True), (0, "0", False), (1, "1", False)])
def test_kill_at_iteration_kills_its_rank_in_the_first_launch_only(rank, restarts, killed) -> None:
    env = {**os.environ, "TORCHELASTIC_RESTART_COUNT": restarts}
    done = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(rank)], capture_output=True, text=True, env=env,
                          timeout=120)
    if killed:
        assert done.returncode == -9 and done.stdout.split() == ["1", "2", "3"]
    else:
        assert done.returncode == 0 and done.stdout.split() == ["1", "2", "3", "4"]
