"""Training checkpoints that reshard to any layout (issue 15): the dcp run-directory format
(phi1.training.checkpoint_dcp) on its own, the phi1 format read at another layout (optimizer state included),
and, through the trainer, continued losses equal to the uninterrupted run after a layout change."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from phi1.core.config import ModelConfig, get_preset
from phi1.core.model import PhiForCausalLM
from phi1.core.pipeline_stage import build_stages
from phi1.loading.checkpoints import find_checkpoint, iteration_dir, read_trainer_state
from phi1.loading.manifest import CheckpointCorruptError, verify_checkpoint, write_manifest
from phi1.parallel.layers import tensor_parallel_dims
from phi1.parallel.optim import param_groups
from phi1.parallel.state import ParallelState
from phi1.testing.runs import (
    REPO,
    assert_succeeded,
    run_overrides,
    run_train,
    step_losses,
    synthetic_data_dir,
    train_env,
)
from phi1.training import checkpoint_dcp, checkpointing
from phi1.training.checkpointing import SaveRequest

CONFIG = get_preset("phi-1-nano")
ONE = ParallelState(0, 1, 0, 1, 0, 1, 0, None, None, torch.device("cpu"))


def _batch(step: int) -> torch.Tensor:
    return torch.randint(0, CONFIG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(300 + step))


def _step(model, optimizer, step: int) -> float:
    optimizer.zero_grad()
    tokens = _batch(step)
    loss = model(tokens[:, :-1], labels=tokens[:, 1:]).loss
    loss.backward()
    optimizer.step()
    return loss.item()


def _adamw(model) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, 0.1), lr=1e-2)


def _full_state(modules, optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for module in modules:
        for name, param in module.named_parameters():
            out[f"model.{name}"] = param.detach().clone()
            for key, value in optimizer.state.get(param, {}).items():
                out[f"optim.{name}.{key}"] = value.detach().clone()
    return out


def _request(iteration: int, tokenizer: Path, val_loss: float | None = None, keep_last: int = 2,
             kill_midway: bool = False) -> SaveRequest:
    return SaveRequest(
        iteration=iteration,
        trainer_state={"iteration": iteration, "consumed_samples": 8 * iteration, "model_config": CONFIG.to_dict(),
                       "world_size": 1, "tensor_parallel": 1, "data_parallel": 1, "val_loss": val_loss},
        config_yaml=f"# run config at {iteration}\n", tokenizer={"tokenizer.json": tokenizer}, keep_last=keep_last,
        keep_best=True, val_loss=val_loss, kill_midway=kill_midway)


@pytest.fixture
def tokenizer(tmp_path) -> Path:
    path = tmp_path / "source_tokenizer.json"
    path.write_text('{"model": "stand-in"}\n')
    return path


# ----------------------------------------------------------------------------------------------------------------
# The dcp run-directory format, one process


def test_dcp_run_directory_rules(tmp_path, tokenizer):
    """latest, best, keep_last pruning, manifest, tokenizer copy, config.yaml, trainer and model config."""
    run = tmp_path / "run"
    model = PhiForCausalLM(CONFIG, init_seed=1)
    optimizer = _adamw(model)
    for iteration, val in ((1, 3.0), (2, 2.0), (3, 2.5), (4, None)):
        _step(model, optimizer, iteration)
        path = checkpoint_dcp.save(run, _request(iteration, tokenizer, val), [model], optimizer, ONE).wait()
        assert path == iteration_dir(run, iteration)
    assert (run / "latest").read_text().strip() == "4"
    assert (run / "best").read_text().split()[0] == "2"
    # keep_last 2 keeps 3 and 4, and the best (2) is spared
    assert sorted(p.name for p in run.glob("iter_*")) == ["iter_0000002", "iter_0000003", "iter_0000004"]
    latest = find_checkpoint(run)
    assert latest == run / "iter_0000004" and checkpoint_dcp.format_of(latest) == "dcp"
    verify_checkpoint(latest)
    assert (latest / "tokenizer.json").read_text() == tokenizer.read_text()
    assert (latest / "config.yaml").read_text() == "# run config at 4\n"
    assert json.loads((latest / "model_config.json").read_text()) == CONFIG.to_dict()
    state = read_trainer_state(latest)
    assert state["consumed_samples"] == 32 and state["pipeline_parallel"] == 1
    assert json.loads((latest / "format.json").read_text())["layout"] == {"dp": 1, "pp": 1, "tp": 1}
    manifest = json.loads((latest / "manifest.json").read_text())
    assert {"config.yaml", "tokenizer.json", "trainer_state.json", ".metadata"} <= set(json.dumps(manifest).split('"'))


def test_dcp_exact_resume_same_layout(tmp_path, tokenizer):
    """Weights, AdamW state and every RNG state come back; the next steps are bit-identical."""
    run = tmp_path / "run"
    model = PhiForCausalLM(CONFIG, init_seed=2)
    optimizer = _adamw(model)
    _step(model, optimizer, 0)
    checkpoint_dcp.save(run, _request(1, tokenizer), [model], optimizer, ONE).wait()
    saved = _full_state([model], optimizer)
    draws = [random.random(), float(np.random.rand()), float(torch.rand(()))]
    losses = [_step(model, optimizer, s) for s in (1, 2)]

    random.seed(99), np.random.seed(99), torch.manual_seed(99)  # scrambled: the load must restore them
    restored = PhiForCausalLM(CONFIG, init_seed=7)
    checkpoint_dcp.load_weights(run / "iter_0000001", [restored], ONE)
    restored_optimizer = _adamw(restored)
    checkpoint_dcp.load_optimizer(run / "iter_0000001", [restored], restored_optimizer, None, ONE)
    state = _full_state([restored], restored_optimizer)
    assert state.keys() == saved.keys() and all(torch.equal(state[k], saved[k]) for k in saved)
    assert checkpoint_dcp.load_rng_states(run / "iter_0000001", ONE)
    assert [random.random(), float(np.random.rand()), float(torch.rand(()))] == draws
    assert [_step(restored, restored_optimizer, s) for s in (1, 2)] == losses


def test_dcp_rng_not_restored_at_another_layout(tmp_path, tokenizer, caplog):
    run = tmp_path / "run"
    model = PhiForCausalLM(CONFIG, init_seed=2)
    checkpoint_dcp.save(run, _request(1, tokenizer), [model], None, ONE).wait()
    format_file = run / "iter_0000001" / "format.json"
    info = json.loads(format_file.read_text())
    info["layout"] = {"dp": 2, "pp": 1, "tp": 2}  # as a TP2 x DP2 job writes it
    format_file.write_text(json.dumps(info))
    torch.manual_seed(5)
    expected = torch.rand(())
    torch.manual_seed(5)
    assert not checkpoint_dcp.load_rng_states(run / "iter_0000001", ONE)
    assert "RNG states not restored" in caplog.text
    assert torch.equal(torch.rand(()), expected)  # the generators were left alone


def test_dcp_fallback_and_stale_temporaries(tmp_path, tokenizer):
    """A damaged newest checkpoint falls back to the previous one; a save's leftover .tmp is cleaned."""
    run = tmp_path / "run"
    model = PhiForCausalLM(CONFIG, init_seed=3)
    for iteration in (1, 2):
        checkpoint_dcp.save(run, _request(iteration, tokenizer), [model], None, ONE).wait()
    (run / "iter_0000002" / "__0_0.distcp").write_bytes(b"damaged")
    with pytest.raises(CheckpointCorruptError):
        checkpointing.find_verified_checkpoint(run, fallback=False)
    assert checkpointing.find_verified_checkpoint(run, fallback=True) == run / "iter_0000001"
    (run / "iter_0000003.tmp").mkdir()
    assert checkpointing.remove_stale_temporaries(run) == [run / "iter_0000003.tmp"]
    assert not (run / "iter_0000003.tmp").exists()


def _async_worker(rank: int, world: int, run_dir: str, tokenizer: str) -> dict:
    """The trainer's DCPFormat with checkpoint.async_save at DP2: the save returns before the checkpoint is in
    place, a training step runs meanwhile, `wait()` finishes it."""
    from types import SimpleNamespace

    from phi1.parallel.distributed_checkpoint import checkpoint_mesh

    mesh = checkpoint_mesh(torch.arange(world).reshape(world, 1, 1))
    state = ParallelState(rank, world, rank, 1, 0, world, rank, None, mesh.get_group("dp"), torch.device("cpu"),
                          mesh=mesh)
    model = PhiForCausalLM(CONFIG, init_seed=1)
    optimizer = _adamw(model)
    _step(model, optimizer, 0)
    saved = _full_state([model], optimizer)
    strategy = SimpleNamespace(config=SimpleNamespace(checkpoint=SimpleNamespace(async_save=True)), modules=[model],
                               optimizer=optimizer, engine=None)
    writer = checkpoint_dcp.DCPFormat()
    path = writer.save(Path(run_dir), _request(1, Path(tokenizer)), strategy, state)
    in_flight = not path.exists() and not (Path(run_dir) / "latest").exists()
    _step(model, optimizer, 1)  # the next step runs while the files are written
    final = writer.wait()
    return {"in_flight": in_flight, "saved": saved, "final": str(final), "path": str(path)}


@pytest.mark.slow
def test_async_save_overlaps_the_next_step(tmp_path, tokenizer):
    """checkpoint.async_save: the save returns with the checkpoint not yet in place (no `latest` yet), training
    goes on, and the finished checkpoint holds the state of the moment it was taken."""
    from phi1.parallel.distributed_checkpoint import read_full_state_dict
    from phi1.testing.spawn import run_on_gloo

    run = tmp_path / "run"
    results = run_on_gloo(_async_worker, 2, str(run), str(tokenizer), timeout_s=600)
    assert all(r["in_flight"] for r in results)
    assert results[0]["final"] == results[0]["path"] == str(run / "iter_0000001")
    assert (run / "latest").read_text().strip() == "1"
    verify_checkpoint(run / "iter_0000001")
    saved = results[0]["saved"]
    for prefix in ("model.", "optim."):
        whole = read_full_state_dict(run / "iter_0000001", prefix)
        assert whole.keys() == {k[len(prefix):] for k in saved if k.startswith(prefix)}
        assert all(torch.equal(whole[k], saved[prefix + k]) for k in whole)


def test_phi1_format_resumes_at_another_layout_with_its_optimizer(tmp_path):
    """A phi1-format checkpoint written at TP2 (shards + per-TP-rank optimizer files) resumes in one process and
    in pipeline stages: weights and AdamW state are the whole tensors of the TP2 run, found by name."""
    from safetensors.torch import save_file

    from phi1.parallel.checkpoint import SHARD_FORMAT, shard_file_name

    model = PhiForCausalLM(CONFIG, init_seed=4)
    optimizer = _adamw(model)
    _step(model, optimizer, 0)
    full = _full_state([model], optimizer)
    dims = tensor_parallel_dims(model)
    iter_dir = tmp_path / "run" / "iter_0000001"
    iter_dir.mkdir(parents=True)
    names_in_order = [n for g in param_groups(model, 0.1) for n, p in model.named_parameters()
                      if any(p is q for q in g["params"])]
    for tp_rank in range(2):  # what a TP2 run writes, sliced from the one-process state
        def shard(tensor, name, tp_rank=tp_rank):
            return tensor if dims[name] is None else tensor.chunk(2, dim=dims[name])[tp_rank].contiguous()
        save_file({n: shard(p.detach(), n) for n, p in model.named_parameters()},
                  str(iter_dir / shard_file_name(tp_rank, 2)),
                  metadata={"format": SHARD_FORMAT, "format_version": "1", "tp_size": "2", "tp_rank": str(tp_rank),
                            "partition_dims": json.dumps(dims), "model_config": json.dumps(CONFIG.to_dict())})
        optim_state = optimizer.state_dict()
        optim_state["state"] = {i: {k: (shard(v, names_in_order[i]) if k != "step" else v) for k, v in s.items()}
                                for i, s in optim_state["state"].items()}
        torch.save(optim_state, iter_dir / f"optim_tp{tp_rank:02d}.pt")
    (iter_dir / "trainer_state.json").write_text(json.dumps({"iteration": 1, "consumed_samples": 8,
                                                             "world_size": 2, "tensor_parallel": 2}))
    write_manifest(iter_dir)
    assert checkpoint_dcp.format_of(iter_dir) == "phi1"

    restored = PhiForCausalLM(CONFIG, init_seed=9)
    checkpoint_dcp.load_weights(iter_dir, [restored], ONE)
    restored_optimizer = _adamw(restored)
    checkpoint_dcp.load_optimizer(iter_dir, [restored], restored_optimizer, None, ONE)
    state = _full_state([restored], restored_optimizer)
    assert state.keys() == full.keys() and all(torch.equal(state[k], full[k]) for k in full)
    assert not checkpoint_dcp.load_rng_states(iter_dir, ONE)  # another world size: not restored

    # Both pipeline stages in one process: each takes its own names, weights and moments.
    stages = [build_stages(CONFIG, pp_rank=r, pp_size=2, init_seed=5)[0] for r in range(2)]
    checkpoint_dcp.load_weights(iter_dir, stages, ParallelState(0, 1, 0, 1, 0, 1, 0, None, None,
                                                                torch.device("cpu"), pp_size=2))
    stage_optimizer = torch.optim.AdamW([p for s in stages for p in s.parameters()], lr=1e-2)
    checkpoint_dcp.load_optimizer(iter_dir, stages, stage_optimizer, None,
                                  ParallelState(0, 1, 0, 1, 0, 1, 0, None, None, torch.device("cpu"), pp_size=2))
    state = _full_state(stages, stage_optimizer)
    assert state.keys() == full.keys() and all(torch.equal(state[k], full[k]) for k in full)


def test_phi1_format_optimizer_that_does_not_fit_is_named(tmp_path):
    """Optimizer files of another model are one clear error naming the checkpoint, not a shape crash."""
    from phi1.loading.optimizer_state import optimizer_state_by_name

    model = PhiForCausalLM(CONFIG, init_seed=4)
    optimizer = _adamw(model)
    _step(model, optimizer, 0)
    state = optimizer.state_dict()
    first = next(iter(state["state"]))
    state["state"][first]["exp_avg"] = torch.zeros(3)
    torch.save(state, tmp_path / "optim_tp00.pt")
    with pytest.raises(ValueError, match="does not make the parameter's shape"):
        optimizer_state_by_name(tmp_path, CONFIG)


@pytest.mark.parametrize("before,after", [((2, 1), (1, 4)), ((1, 4), (2, 2)), ((2, 2), (4, 1)), ((1, 1), (2, 4))],
                         ids=["M2xD1-to-M1xD4", "M1xD4-to-M2xD2", "M2xD2-to-M4xD1", "M1xD1-to-M2xD4"])
def test_global_batch_is_the_same_samples_at_every_layout(before, after):
    """MicroBatchSampler: global step k takes exactly samples [k G, (k+1) G) whatever the micro-batch size M,
    DP size D and accumulation A = G / (M D); so `consumed_samples` resumes at any other layout with no sample
    skipped or repeated (only which rank sees which sample of the step changes, and the step's loss is their
    mean)."""
    from phi1.data.samplers import MicroBatchSampler

    total, global_batch, steps_before = 96, 8, 3

    def global_steps(consumed: int, micro: int, dp: int, steps: int) -> list[set[int]]:
        accum = global_batch // (micro * dp)
        iterators = [iter(MicroBatchSampler(total, consumed, micro, rank, dp)) for rank in range(dp)]
        out = []
        for _ in range(steps):
            out.append({i for _ in range(accum) for it in iterators for i in next(it)})
        return out

    first = global_steps(0, *before, steps_before)
    consumed = steps_before * global_batch  # what trainer_state.json records
    rest = global_steps(consumed, *after, total // global_batch - steps_before)
    for k, samples in enumerate(first + rest):
        assert samples == set(range(k * global_batch, (k + 1) * global_batch)), f"global step {k + 1}"


@pytest.mark.parametrize("override,names", [
    (["checkpoint.format=zip"], "checkpoint.format"),
    (["checkpoint.format=phi1", "checkpoint.async_save=true"], "checkpoint.async_save"),
    (["checkpoint.format=dcp", "parallel.zero_stage=2"], "checkpoint.format"),
], ids=["unknown-format", "async-without-dcp", "dcp-with-deepspeed-zero"])
def test_checkpoint_options_that_cannot_work_are_one_line(data_dir, tmp_path, override, names):
    from phi1.testing.hostile import assert_clear_error, python, run_bounded

    args = _args(data_dir, tmp_path / "run") + override
    outcome = run_bounded(python("-m", "phi1.train", *args), timeout_s=120, memory_mb=4096, cwd=REPO, env=_env())
    assert_clear_error(outcome, names=names)
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------------------------
# Through the trainer (python -m phi1.train under torchrun, gloo): save at one layout, resume at another


STEPS, SAVED_AT, GLOBAL_BATCH = 6, 3, 8


def _env() -> dict:
    return train_env(DS_ACCELERATOR="cpu")


def _args(data_dir: Path, run_dir: Path, **extra) -> list[str]:
    """A phi-1-nano run: fp32, dropout off, no evaluation, a checkpoint every SAVED_AT steps, all kept."""
    return run_overrides(data_dir, run_dir, **{
        "batch.global_batch_size": GLOBAL_BATCH, "schedule.train_steps": STEPS, "checkpoint.interval": SAVED_AT,
        "checkpoint.keep_last": 0, **extra})


def _train(args: list[str], nproc: int, timeout: float = 600):
    return run_train(args, nproc, env=_env(), timeout=timeout)


LAYOUTS = {
    "1": (1, {}),
    "TP2": (2, {"parallel.tensor_parallel": 2}),
    "TP2xDP2": (4, {"parallel.tensor_parallel": 2}),
    "PP2": (2, {"parallel.pipeline_parallel": 2}),
    "PP2xDP2": (4, {"parallel.pipeline_parallel": 2}),
    "PP2xDP2-ZeRO1": (4, {"parallel.pipeline_parallel": 2, "parallel.zero_stage": 1}),
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return synthetic_data_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory) -> Path:
    """The uninterrupted run: one process, dcp checkpoints at iterations 3 and 6."""
    run = tmp_path_factory.mktemp("reference") / "run"
    assert_succeeded(_train(_args(data_dir, run, **{"checkpoint.format": "dcp"}), 1))
    assert sorted(step_losses(run)) == list(range(1, STEPS + 1))
    return run


@pytest.mark.slow
@pytest.mark.parametrize("saved_at,resumed_at,fmt,async_save", [
    ("1", "TP2", "dcp", False),
    ("TP2xDP2", "1", "dcp", False),
    ("1", "PP2xDP2", "dcp", False),
    ("PP2", "TP2", "dcp", True),
    ("TP2", "1", "phi1", False),
    ("PP2xDP2-ZeRO1", "1", "dcp", False),
], ids=["1-to-TP2", "TP2xDP2-to-1", "1-to-PP2xDP2", "PP2-async-to-TP2", "phi1-format-TP2-to-1",
        "PP2xDP2-ZeRO1-to-1"])
def test_resume_at_another_layout_continues_the_run(data_dir, reference, tmp_path, saved_at, resumed_at, fmt,
                                                    async_save):
    """Saved at iteration 3 at one layout, resumed at another: the continued losses equal the uninterrupted
    one-process run's within 1e-5 (weights, AdamW state and the data position carried over), and so does the
    optimizer state at the end."""
    from phi1.parallel.distributed_checkpoint import read_format, read_full_state_dict

    if saved_at == "1":
        source = reference / f"iter_{SAVED_AT:07d}"  # the reference run's own checkpoint
    else:
        nproc, layout = LAYOUTS[saved_at]
        first = tmp_path / "first"
        extra = {**layout, "checkpoint.format": fmt, "checkpoint.exit_at_iteration": SAVED_AT}
        if async_save:
            extra["checkpoint.async_save"] = "true"
        result = _train(_args(data_dir, first, **extra), nproc)
        assert_succeeded(result)
        if async_save:
            assert "in the background" in result.stdout
        source = find_checkpoint(first)
        assert source == first / f"iter_{SAVED_AT:07d}"
        verify_checkpoint(source)
        before = step_losses(first)
        for iteration in range(1, SAVED_AT + 1):  # the layouts agree before the save too
            assert before[iteration] == pytest.approx(step_losses(reference)[iteration], rel=1e-5, abs=0)
    assert checkpoint_dcp.format_of(source) == fmt

    nproc, layout = LAYOUTS[resumed_at]
    second = tmp_path / "second"
    result = _train(_args(data_dir, second, **layout, **{"checkpoint.load": source, "checkpoint.format": "dcp"}), nproc)
    assert_succeeded(result)
    assert f"resuming from {source}" in result.stdout
    expected, got = step_losses(reference), step_losses(second)
    assert sorted(got) == list(range(SAVED_AT + 1, STEPS + 1))
    for iteration in got:
        assert got[iteration] == pytest.approx(expected[iteration], rel=1e-5, abs=0), \
            f"iteration {iteration}: {got[iteration]!r} != {expected[iteration]!r} ({saved_at} -> {resumed_at})"
    final = find_checkpoint(second)
    assert read_trainer_state(final)["consumed_samples"] == STEPS * GLOBAL_BATCH
    assert read_format(final)["layout"] == {"dp": nproc // (layout.get("parallel.tensor_parallel", 1)
                                                           * layout.get("parallel.pipeline_parallel", 1)),
                                            "pp": layout.get("parallel.pipeline_parallel", 1),
                                            "tp": layout.get("parallel.tensor_parallel", 1)}
    # The optimizer went on from the saved moments: its state at the end is the uninterrupted run's.
    ours = read_full_state_dict(final, "optim.")
    theirs = read_full_state_dict(reference / f"iter_{STEPS:07d}", "optim.")
    assert ours.keys() == theirs.keys() and len(ours) > 0
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-7, msg=key)


@pytest.mark.slow
def test_export_of_a_trainer_checkpoint_loads_in_transformers(reference, tmp_path):
    """tools/export_dcp.py on a DCP checkpoint the trainer wrote: transformers' PhiForCausalLM gives our logits."""
    transformers = pytest.importorskip("transformers")
    import subprocess
    import sys

    from phi1.parallel.distributed_checkpoint import read_full_state_dict

    checkpoint, out = reference / f"iter_{STEPS:07d}", tmp_path / "hf"
    result = subprocess.run([sys.executable, str(REPO / "tools" / "export_dcp.py"), "export", str(checkpoint), str(out)],
                            cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert_succeeded(result)
    hf = transformers.PhiForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    config = ModelConfig.from_dict(json.loads((checkpoint / "model_config.json").read_text()))
    ours = PhiForCausalLM(config).eval()
    with torch.no_grad():
        for name, tensor in read_full_state_dict(checkpoint).items():
            dict(ours.named_parameters())[name].copy_(tensor)
        tokens = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(hf(tokens).logits, ours(tokens).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_kill_during_dcp_save_leaves_previous_checkpoint(data_dir, tmp_path):
    """SIGKILL once iteration 4's tensors are written, before the rename: `latest` still names iteration 2,
    the next launch removes the leftover and resumes from 2, and the run finishes."""
    import signal

    run = tmp_path / "run"
    args = _args(data_dir, run, **{"checkpoint.format": "dcp", "checkpoint.interval": 2, "checkpoint.keep_last": 1})
    killed = _train(args + ["faults.kill_during_save_at=4"], 1)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-2000:]
    assert (run / "iter_0000004.tmp" / "__0_0.distcp").is_file()  # the interrupted save, under its temporary name
    assert not (run / "iter_0000004").exists()
    assert (run / "latest").read_text().strip() == "2" and find_checkpoint(run) == run / "iter_0000002"
    verify_checkpoint(run / "iter_0000002")

    resumed = _train(args, 1)
    assert_succeeded(resumed)
    assert f"resuming from {run / 'iter_0000002'}" in resumed.stdout
    assert not (run / "iter_0000004.tmp").exists()
    assert read_trainer_state(find_checkpoint(run))["iteration"] == STEPS
    assert sorted(p.name for p in run.glob("iter_*")) == [f"iter_{STEPS:07d}"]  # keep_last 1
