"""FSDP2 (`parallel.fsdp=true`): sharded training equals one process, alone and composed with TP; checkpoints
written under FSDP2 load at other layouts and the reverse; resume is bit-exact; HF export loads in transformers.

Library level (phi1.parallel.fsdp, a plain PhiForCausalLM + AdamW loop): 10 steps at DP 2 (FSDP2), with
gradient accumulation, and at TP 2 x FSDP2 2 (with and without sequence parallelism) against one process on the
same global batch, fp32, dropout off, global-norm clipping that acts on every step.

Trainer level (`python -m phi1.train` under torchrun, the synthetic counting corpus, fp32): the same through the
fsdp step strategy, the DCP checkpoints it writes, and the non-finite guard.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from phi1.core.config import get_preset
from phi1.core.model import PhiForCausalLM
from phi1.parallel import fsdp
from phi1.parallel.optim import param_groups
from phi1.parallel.state import init_distributed
from phi1.testing.hostile import assert_clear_error, python, run_bounded
from phi1.testing.runs import (
    REPO,
    assert_succeeded,
    counting_batches,
    one_process_reference,
    run_overrides,
    run_train,
    step_losses,
    synthetic_data_dir,
    train_env,
)
from phi1.testing.spawn import run_on_gloo
from phi1.training.checkpointing import find_checkpoint, read_trainer_state
from phi1.training.metrics import read_jsonl

STEPS, GLOBAL_BATCH, SEQ = 10, 4, 32
LR, WEIGHT_DECAY, MAX_NORM = 3e-3, 0.1, 0.5
# eps above torch's 1e-8: AdamW turns round-off in gradients that are (almost) zero in exact arithmetic into steps
# of up to lr; with 1e-8 the compiled blocks' final embedding weights differed from one process by 1.06e-4 (2
# elements of 32,768), with 1e-6 by 1.0e-5, well inside the 1e-4 bound below.
EPS = 1e-6
REL_TOL = 1e-5


def _batches(vocab: int) -> torch.Tensor:
    return counting_batches(vocab, STEPS, GLOBAL_BATCH, SEQ)


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(model, WEIGHT_DECAY), lr=LR, eps=EPS, foreach=True)


def _reference() -> tuple[list[float], list[float], dict[str, torch.Tensor]]:
    """Losses, pre-clip norms and final weights of one process over the whole global batch (torch's clipping)."""
    return one_process_reference(_optimizer, MAX_NORM, steps=STEPS, global_batch=GLOBAL_BATCH, seq_len=SEQ)


def _fsdp_train(rank: int, world_size: int, tp: int, sequence_parallel: bool, accum: int, checkpointing: str = "none",
                compile_blocks: bool = False) -> dict:
    state = init_distributed(tp)
    model = PhiForCausalLM(get_preset("phi-1-nano"), tp_group=state.tp_group, sequence_parallel=sequence_parallel)
    model.activation_checkpointing = checkpointing
    if compile_blocks:
        model.compile_blocks()
    fsdp.shard_model(model, state, "fp32")
    assert fsdp.is_sharded(model)
    optimizer = _optimizer(model)
    per_rank = GLOBAL_BATCH // state.dp_size
    micro = per_rank // accum
    losses, norms = [], []
    for batch in _batches(model.config.vocab_size):
        mine = batch[state.dp_rank * per_rank:(state.dp_rank + 1) * per_rank]
        total = torch.zeros(())
        for m in range(accum):
            fsdp.set_gradient_sync(model, m == accum - 1)
            part = mine[m * micro:(m + 1) * micro]
            loss = model(part[:, :-1], labels=part[:, 1:]).loss
            (loss / accum).backward()
            total += loss.detach() / accum
        fsdp.allreduce_sequence_parallel_grads(model, state.tp_group)
        norms.append(fsdp.clip_grad_norm_(model, MAX_NORM, state))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.distributed.all_reduce(total, group=state.dp_group)
        losses.append(float(total) / state.dp_size)
    # Every parameter is a DTensor sharded over DP; its local slice is about 1 / dp of the TP-local tensor.
    sharded = all(isinstance(p, torch.distributed.tensor.DTensor) for p in model.parameters())
    local_numel = sum(fsdp.local(p).numel() for p in model.parameters())
    # The TP-local whole tensors (all-gathered over DP) of the final weights.
    weights = {name: p.detach().full_tensor() for name, p in model.named_parameters()}
    return {"losses": losses, "norms": norms, "weights": weights, "sharded": sharded, "local_numel": local_numel,
            "tp_rank": state.tp_rank}


def _fsdp_policies(rank: int, world_size: int) -> dict:
    """bf16 mixed precision (gathered weights in bf16 inside the forward, fp32 shards, gradients and moments) and
    CPU offload (fp32: the same losses as without it)."""
    state = init_distributed(1)
    per_rank = GLOBAL_BATCH // state.dp_size
    out = {}
    for name, precision, offload in (("bf16", "bf16", False), ("offload", "fp32", True)):
        model = PhiForCausalLM(get_preset("phi-1-nano"))
        fsdp.shard_model(model, state, precision, cpu_offload=offload)
        seen = []
        hook = model.layers[0].attn.qkv.register_forward_pre_hook(lambda m, args, seen=seen: seen.append(m.weight.dtype))
        optimizer = _optimizer(model)
        losses = []
        for batch in _batches(model.config.vocab_size):
            mine = batch[state.dp_rank * per_rank:(state.dp_rank + 1) * per_rank]
            loss = model(mine[:, :-1], labels=mine[:, 1:]).loss
            loss.backward()
            grad_dtypes = {p.grad.dtype for p in model.parameters()}
            fsdp.clip_grad_norm_(model, MAX_NORM, state)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            total = loss.detach().float()
            torch.distributed.all_reduce(total, group=state.dp_group)
            losses.append(float(total) / state.dp_size)
        hook.remove()
        out[name] = {
            "losses": losses, "compute_dtypes": sorted({str(d) for d in seen}),
            "param_dtypes": sorted({str(p.dtype) for p in model.parameters()}),
            "grad_dtypes": sorted(str(d) for d in grad_dtypes),
            "moment_dtypes": sorted({str(optimizer.state[p]["exp_avg"].dtype) for p in model.parameters()}),
            "devices": sorted({fsdp.local(p).device.type for p in model.parameters()}),
        }
    return out


@pytest.mark.slow
def test_fsdp_mixed_precision_and_cpu_offload(reference):
    ref_losses = reference[0]
    result = run_on_gloo(_fsdp_policies, 2, timeout_s=600)[0]
    bf16 = result["bf16"]
    assert bf16["compute_dtypes"] == ["torch.bfloat16"]  # blocks compute with bf16 weights
    assert bf16["param_dtypes"] == bf16["grad_dtypes"] == bf16["moment_dtypes"] == ["torch.float32"]  # fp32 master
    assert _relative(bf16["losses"], ref_losses) < 2e-2  # bf16 rounding, the same run
    offload = result["offload"]
    assert offload["devices"] == ["cpu"] and offload["compute_dtypes"] == ["torch.float32"]
    assert _relative(offload["losses"], ref_losses) < REL_TOL


def _relative(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def reference():
    return _reference()


@pytest.mark.slow
@pytest.mark.parametrize("world_size,tp,sequence_parallel,accum,checkpointing,compiled", [
    (2, 1, False, 1, "none", False),       # FSDP2 over 2 ranks
    (2, 1, False, 2, "none", False),       # with gradient accumulation (no reduce-scatter before the last micro-batch)
    (2, 1, False, 1, "full", False),       # activation checkpointing recomputes inside FSDP2's gathered blocks
    (2, 1, False, 1, "selective", False),
    (2, 1, False, 1, "none", True),        # compiled blocks, then fully_shard (as the trainer does)
    (4, 2, False, 1, "none", False),       # TP 2 x FSDP2 2
    (4, 2, True, 1, "none", False),        # TP 2 (sequence parallel) x FSDP2 2
], ids=["fsdp2", "fsdp2-accum2", "fsdp2-full-ckpt", "fsdp2-selective-ckpt", "fsdp2-compile", "tp2xfsdp2",
        "tp2-sp-xfsdp2"])
def test_fsdp_training_equals_one_process(reference, world_size, tp, sequence_parallel, accum, checkpointing,
                                          compiled):
    ref_losses, ref_norms, ref_weights = reference
    results = run_on_gloo(_fsdp_train, world_size, tp, sequence_parallel, accum, checkpointing, compiled,
                          timeout_s=900)
    assert ref_losses[-1] < 0.9 * ref_losses[0]  # the run learns: the comparison is not between two constants
    for r in results:
        assert r["sharded"]
        assert _relative(r["losses"], ref_losses) < REL_TOL, (r["losses"], ref_losses)
        assert _relative(r["norms"], ref_norms) < REL_TOL, (r["norms"], ref_norms)
        assert min(r["norms"]) > MAX_NORM  # clipping acted on every step
    # Final weights: the TP-local whole tensors put together equal the one-process weights. (Looser than the
    # losses: AdamW still turns round-off in gradients that are zero in exact arithmetic into larger steps; see EPS.)
    dp = world_size // tp
    total = sum(v.numel() for v in ref_weights.values())
    assert results[0]["local_numel"] <= total / (tp * dp) + 4096
    for name, whole in ref_weights.items():
        parts = [results[r]["weights"][name] for r in range(tp)]
        dims = [d for d in range(whole.dim()) if parts[0].shape[d] != whole.shape[d]]
        joined = torch.cat(parts, dim=dims[0]) if dims else parts[0]
        assert (joined - whole).abs().max() < 1e-4, name


# -- through the trainer -------------------------------------------------------------------------------------------

TRAIN_STEPS = 10


def _args(data_dir: Path, run_dir: Path, **extra) -> list[str]:
    return run_overrides(data_dir, run_dir, **{
        "batch.global_batch_size": 8, "schedule.train_steps": TRAIN_STEPS, "optim.grad_clip": 1.0,
        "checkpoint.interval": 5, "checkpoint.keep_last": 0, **extra})


def _train(args: list[str], nproc: int) -> subprocess.CompletedProcess:
    result = run_train(args, nproc)
    assert_succeeded(result)
    return result


def _close(got: dict[int, float], expected: dict[int, float], iterations) -> None:
    assert sorted(got) == list(iterations), sorted(got)
    for i in iterations:
        assert abs(got[i] - expected[i]) <= REL_TOL * abs(expected[i]), f"iteration {i}: {got[i]!r} != {expected[i]!r}"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return synthetic_data_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def one_process(data_dir, tmp_path_factory) -> dict[int, float]:
    """10 steps in one process (the DDP strategy, no process group): the reference losses."""
    run = tmp_path_factory.mktemp("one")
    _train(_args(data_dir, run), 1)
    losses = step_losses(run)
    assert losses[TRAIN_STEPS] < 0.9 * losses[1]  # it learns: equal losses are not two constants
    return losses


@pytest.fixture(scope="module")
def fsdp_run(data_dir, tmp_path_factory) -> Path:
    """10 steps at 2 processes under FSDP2, checkpoints at 5 and 10."""
    run = tmp_path_factory.mktemp("fsdp")
    result = _train(_args(data_dir, run, **{"parallel.fsdp": "true"}), 2)
    assert "data parallel 2 (FSDP2)" in result.stdout
    return run


@pytest.mark.slow
def test_trainer_fsdp_equals_one_process(one_process, fsdp_run):
    _close(step_losses(fsdp_run), one_process, range(1, TRAIN_STEPS + 1))
    state = read_trainer_state(find_checkpoint(fsdp_run))
    assert state["iteration"] == TRAIN_STEPS and state["consumed_samples"] == TRAIN_STEPS * 8
    assert (find_checkpoint(fsdp_run) / ".metadata").is_file()  # written in the any-layout (DCP) format


@pytest.mark.slow
def test_trainer_tp2_by_fsdp2_equals_one_process(data_dir, tmp_path, one_process):
    result = _train(_args(data_dir, tmp_path, **{"parallel.fsdp": "true", "parallel.tensor_parallel": 2}), 4)
    assert "tensor parallel 2 x data parallel 2 (FSDP2)" in result.stdout
    _close(step_losses(tmp_path), one_process, range(1, TRAIN_STEPS + 1))


@pytest.mark.slow
@pytest.mark.parametrize("layout,nproc", [({"parallel.tensor_parallel": 2}, 2),
                                          ({"parallel.tensor_parallel": 2, "parallel.fsdp": "true"}, 4)],
                         ids=["tp2", "tp2xfsdp2"])
def test_fsdp_checkpoint_resumes_at_tp2(data_dir, tmp_path, fsdp_run, layout, nproc):
    """Saved under FSDP2 (DP 2) at step 5, resumed at TP 2 (the DDP strategy) and at TP 2 x FSDP2 2: steps 6-10
    as if never stopped."""
    result = _train(_args(data_dir, tmp_path, **layout, **{"checkpoint.format": "dcp",
                                                         "checkpoint.load": fsdp_run / "iter_0000005"}), nproc)
    assert "resuming from" in result.stdout
    _close(step_losses(tmp_path), step_losses(fsdp_run), range(6, TRAIN_STEPS + 1))


@pytest.mark.slow
def test_tp2_checkpoint_resumes_under_fsdp(data_dir, tmp_path, one_process):
    """The reverse: saved at TP 2 (any-layout format) at step 5, resumed under FSDP2 at DP 2."""
    tp2 = tmp_path / "tp2"
    _train(_args(data_dir, tp2, **{"parallel.tensor_parallel": 2, "checkpoint.format": "dcp"}), 2)
    resumed = tmp_path / "fsdp"
    result = _train(_args(data_dir, resumed, **{"parallel.fsdp": "true", "checkpoint.load": tp2 / "iter_0000005"}), 2)
    assert "resuming from" in result.stdout
    _close(step_losses(resumed), step_losses(tp2), range(6, TRAIN_STEPS + 1))
    _close(step_losses(resumed), one_process, range(6, TRAIN_STEPS + 1))


@pytest.mark.slow
def test_fsdp_resume_is_bit_exact_with_dropout(data_dir, tmp_path):
    """Dropout on, gradient accumulation 2: stopped at step 4 and resumed under FSDP2, the same loss bits."""
    dropout = {"parallel.fsdp": "true", "model.attn_dropout": 0.1, "model.resid_dropout": 0.1,
               "model.embd_dropout": 0.1, "schedule.train_steps": 8, "checkpoint.interval": 4}
    full, split = tmp_path / "full", tmp_path / "split"
    _train(_args(data_dir, full, **dropout), 2)
    _train(_args(data_dir, split, **dropout, **{"checkpoint.exit_at_iteration": 4}), 2)
    second = _train(_args(data_dir, split, **dropout), 2)
    assert "resuming from" in second.stdout
    expected, got = step_losses(full), step_losses(split)
    assert sorted(got) == sorted(expected) == list(range(1, 9))
    for i in range(1, 9):
        assert got[i] == expected[i], f"iteration {i}: {got[i]!r} != {expected[i]!r}"


@pytest.mark.slow
def test_fsdp_nonfinite_gradient_is_skipped_and_named(data_dir, tmp_path):
    """A NaN gradient under FSDP2: the step is skipped and counted, the run goes on; two in a row with
    guard.max_consecutive_nonfinite=2 stop it with a diagnosis naming the parameter."""
    run = tmp_path / "skip"
    _train(_args(data_dir, run, **{"parallel.fsdp": "true", "faults.inject_nan_at": "[3]",
                                   "faults.inject_nan_param": "layers.0.mlp.fc1.weight"}), 2)
    records = {r["iteration"]: r for r in read_jsonl(run / "metrics.jsonl") if "step_losses" in r}
    assert records[TRAIN_STEPS]["nonfinite_steps"] == 1
    assert records[3]["skipped_in_interval"] == 1 and records[4]["skipped_in_interval"] == 0
    stop = tmp_path / "stop"
    result = run_train(_args(data_dir, stop, **{"parallel.fsdp": "true", "faults.inject_nan_at": "[3,4]",
                                                 "guard.max_consecutive_nonfinite": 2,
                                                 "faults.inject_nan_param": "layers.0.mlp.fc1.weight"}), 2)
    assert result.returncode != 0
    diagnosis = (stop / "nonfinite_diagnosis.json").read_text()
    assert "layers.0.mlp.fc1.weight" in diagnosis


@pytest.mark.parametrize("overrides,world_size,names", [
    (["parallel.fsdp=true", "parallel.zero_stage=1"], 2, "parallel.fsdp: FSDP2 and DeepSpeed ZeRO-1"),
    (["parallel.fsdp=true", "parallel.pipeline_parallel=2"], 2, "parallel.fsdp: phi1's pipeline strategy"),
    (["parallel.fsdp=true"], 1, "parallel.fsdp: FSDP2 shards over the data-parallel ranks"),
    (["parallel.fsdp_cpu_offload=true"], 2, "parallel.fsdp_cpu_offload: offloads FSDP2's shards"),
    (["parallel.fsdp=true", "optim.impl=apex"], 2, "optim.impl: apex's FusedAdam"),
    (["parallel.fsdp=yes please"], 2, "parallel.fsdp"),
], ids=["with-zero", "with-pipeline", "one-replica", "offload-alone", "apex", "not-a-bool"])
def test_fsdp_combinations_refused(data_dir, tmp_path, overrides, world_size, names):
    """Combinations that cannot run: one line naming the option and the reason, exit 2, before any work."""
    args = _args(data_dir, tmp_path / "run", **{"batch.global_batch_size": 8, "batch.micro_batch_size": 1})
    outcome = run_bounded(python("-m", "phi1.train", "--dry-run", "--world-size", str(world_size), *args, *overrides),
                          timeout_s=120, memory_mb=4096, env=train_env())
    assert_clear_error(outcome, names=names)


@pytest.mark.slow
def test_throughput_benchmark_fsdp_row(tmp_path):
    out = tmp_path / "rows.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               str(REPO / "benchmarks" / "train_throughput.py"), "--preset", "phi-1-nano", "--micro-batch", "2",
               "--steps", "2", "--warmup", "1", "--fsdp", "--json-out", str(out)]
    result = subprocess.run(command, cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    import json

    row = json.loads(out.read_text())["rows"][0]
    assert row["data_parallel"] == "FSDP2 x2" and row["tokens_per_second"] > 0 and row["peak_memory_gib"] > 0


def test_throughput_benchmark_fsdp_needs_processes():
    outcome = run_bounded(python(str(REPO / "benchmarks" / "train_throughput.py"), "--fsdp"), timeout_s=120,
                          memory_mb=4096)
    assert outcome.returncode == 2
    assert "--fsdp shards over data-parallel processes: launch with torchrun" in outcome.stderr


@pytest.mark.slow
def test_hf_export_of_fsdp_checkpoint_loads_in_transformers(fsdp_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    from phi1.loading import load_pretrained

    out = tmp_path / "hf"
    outcome = run_bounded(python(str(REPO / "tools" / "export_dcp.py"), "export", str(find_checkpoint(fsdp_run)),
                                 str(out), "--format", "hf"), timeout_s=300, memory_mb=8192)
    assert outcome.returncode == 0, outcome.describe()
    hf = transformers.PhiForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ours = load_pretrained(find_checkpoint(fsdp_run)).eval()
    tokens = torch.arange(24).view(2, 12) % 100
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, ours(tokens).logits, atol=1e-5, rtol=1e-5)
    trained = dict(ours.named_parameters())["layers.0.mlp.fc1.weight"]
    fresh = dict(PhiForCausalLM(ours.config, init_seed=1234).named_parameters())["layers.0.mlp.fc1.weight"]
    assert not torch.equal(trained, fresh)  # the export holds the trained weights, not an initialisation
