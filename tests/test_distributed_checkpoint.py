"""DCP checkpoints that reshard to any layout (issue 15): weights and AdamW state identical across TP x PP x DP
layouts and one process, training continuing exactly, async equal to sync, HF export, conversion of iter_*
checkpoints, and hostile checkpoints refused with one clear line."""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from phi1.core.config import get_preset
from phi1.core.model import PhiForCausalLM
from phi1.core.pipeline_stage import build_stages
from phi1.data.samplers import MicroBatchSampler
from phi1.parallel import distributed_checkpoint as dck
from phi1.parallel.layers import tensor_parallel_dims
from phi1.testing.hostile import assert_clear_error, python, run_bounded
from phi1.testing.spawn import run_on_gloo
from phi1.training.checkpointing import capture_rng_states, restore_rng_states
from phi1.training.fault import CheckpointCorruptError, verify_checkpoint, write_manifest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = get_preset("phi-1-nano")
LR = 1e-2


def _batch(step: int) -> torch.Tensor:
    return torch.randint(0, CONFIG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(100 + step))


def _loss(model, tokens: torch.Tensor) -> torch.Tensor:
    return model(tokens[:, :-1], labels=tokens[:, 1:]).loss  # vocab-parallel cross entropy under TP


def _step(model, optimizer, step: int) -> None:
    optimizer.zero_grad()
    _loss(model, _batch(step)).backward()
    optimizer.step()


def _continue(model, optimizer) -> list[float]:
    """Loss of batch 1, one AdamW step on it, loss of batch 2: how a run goes on after a resume."""
    with torch.no_grad():
        before = _loss(model, _batch(1)).item()
    _step(model, optimizer, step=1)
    with torch.no_grad():
        after = _loss(model, _batch(2)).item()
    return [before, after]


def _optimizer(model) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)


def _full_state(model, optimizer) -> dict[str, torch.Tensor]:
    """{model.NAME / optim.NAME.KEY: tensor} of a one-process model and its optimizer."""
    out = {}
    for name, param in model.named_parameters():
        out[f"model.{name}"] = param.detach().clone()
        for key, value in optimizer.state.get(param, {}).items():
            out[f"optim.{name}.{key}"] = value.detach().clone()
    return out


def _local_state(modules, optimizer, tp_rank: int, tp_size: int) -> dict:
    """What a worker sends back: its local shards under the same keys, with each tensor's TP split dim."""
    out, dims = {}, {}
    for module in modules:
        module_dims = tensor_parallel_dims(module)
        for name, param in module.named_parameters():
            out[f"model.{name}"] = param.detach().clone()
            dims[f"model.{name}"] = module_dims[name]
            for key, value in optimizer.state.get(param, {}).items() if optimizer is not None else ():
                out[f"optim.{name}.{key}"] = value.detach().clone()
                dims[f"optim.{name}.{key}"] = module_dims[name] if key != "step" else None
    return {"tensors": out, "dims": dims, "tp_rank": tp_rank, "tp_size": tp_size}


def _assert_shards_equal(result: dict, full: dict[str, torch.Tensor], where: str) -> None:
    assert result["tensors"], where
    for key, local in result["tensors"].items():
        dim = result["dims"][key]
        expected = full[key] if dim is None else full[key].chunk(result["tp_size"], dim=dim)[result["tp_rank"]]
        assert torch.equal(local, expected), f"{where}: {key} differs"


def _mesh(world: int, pp: int, tp: int):
    return dck.checkpoint_mesh(torch.arange(world).reshape(world // (pp * tp), pp, tp))


# ----------------------------------------------------------------------------------------------------------------
# Workers (run on gloo processes)


def _two_process_worker(rank: int, world: int, one_process_ckpt: str, tp2_out: str, pp2_out: str) -> dict:
    """At TP2: load the one-process checkpoint, save it again at TP2; at PP2: load it (stages by name), save it."""
    mesh = _mesh(world, pp=1, tp=2)
    model = PhiForCausalLM(CONFIG, tp_group=mesh["tp"].get_group(), init_seed=999)
    optimizer = _optimizer(model)
    loaded = dck.load_checkpoint(one_process_ckpt, [model], optimizer, mesh, verify=verify_checkpoint)
    tp2 = _local_state([model], optimizer, mesh.get_local_rank("tp"), 2)
    dck.save_checkpoint(tp2_out, [model], optimizer, mesh, trainer_state=loaded.trainer_state,
                        model_config=CONFIG.to_dict(), rank_state={"rank": torch.tensor(rank)},
                        seal=write_manifest).wait()
    # Training continues at TP2: the losses of the next step and of the one after it.
    losses = _continue(model, optimizer)

    pp_mesh = _mesh(world, pp=2, tp=1)
    stages = build_stages(CONFIG, pp_rank=pp_mesh.get_local_rank("pp"), pp_size=2, init_seed=7)
    stage_optimizer = torch.optim.AdamW([p for s in stages for p in s.parameters()], lr=LR)
    dck.load_checkpoint(one_process_ckpt, stages, stage_optimizer, pp_mesh)
    pp2 = _local_state(stages, stage_optimizer, 0, 1)
    dck.save_checkpoint(pp2_out, stages, stage_optimizer, pp_mesh, trainer_state=loaded.trainer_state,
                        model_config=CONFIG.to_dict(), seal=write_manifest).wait()
    return {"tp2": tp2, "losses": losses, "pp2": pp2, "trainer_state": loaded.trainer_state,
            "same_layout": loaded.same_layout}


def _four_process_worker(rank: int, world: int, tp2_ckpt: str, pp2_ckpt: str, sync_out: str, async_out: str) -> dict:
    """At PP2 x DP2 and at TP2 x DP2: load the PP2 checkpoint; at TP2 x DP2: load the TP2 checkpoint and save it
    synchronously and asynchronously."""
    pp_mesh = _mesh(world, pp=2, tp=1)
    stages = build_stages(CONFIG, pp_rank=pp_mesh.get_local_rank("pp"), pp_size=2, init_seed=8)
    stage_optimizer = torch.optim.AdamW([p for s in stages for p in s.parameters()], lr=LR)
    dck.load_checkpoint(pp2_ckpt, stages, stage_optimizer, pp_mesh, verify=verify_checkpoint)
    pp2dp2 = _local_state(stages, stage_optimizer, 0, 1)

    mesh = _mesh(world, pp=1, tp=2)
    model = PhiForCausalLM(CONFIG, tp_group=mesh["tp"].get_group(), init_seed=4)
    optimizer = _optimizer(model)
    dck.load_checkpoint(pp2_ckpt, [model], optimizer, mesh)
    from_pp2 = _local_state([model], optimizer, mesh.get_local_rank("tp"), 2)

    model = PhiForCausalLM(CONFIG, tp_group=mesh["tp"].get_group(), init_seed=3)
    optimizer = _optimizer(model)
    loaded = dck.load_checkpoint(tp2_ckpt, [model], optimizer, mesh, verify=verify_checkpoint)
    local = _local_state([model], optimizer, mesh.get_local_rank("tp"), 2)
    state = {"trainer_state": loaded.trainer_state}
    dck.save_checkpoint(sync_out, [model], optimizer, mesh, trainer_state=state["trainer_state"],
                        model_config=CONFIG.to_dict(), seal=write_manifest).wait()
    pending = dck.save_checkpoint(async_out, [model], optimizer, mesh, trainer_state=state["trainer_state"],
                                  model_config=CONFIG.to_dict(), seal=write_manifest, asynchronous=True,
                                  async_group=torch.distributed.new_group(backend="gloo"))
    with torch.no_grad():  # training goes on while the files are written: the save must hold the old values
        for param in model.parameters():
            param.add_(1.0)
    pending.wait()
    return {"local": local, "rank_state": loaded.rank_state, "pp2dp2": pp2dp2, "from_pp2": from_pp2}


# ----------------------------------------------------------------------------------------------------------------
# Tests


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory) -> dict:
    """A one-process model after one AdamW step, saved, and the same run continued one more step."""
    root = tmp_path_factory.mktemp("dcp")
    model = PhiForCausalLM(CONFIG, init_seed=1)
    optimizer = _optimizer(model)
    _step(model, optimizer, step=0)
    saved = _full_state(model, optimizer)
    rng_states = capture_rng_states()
    directory = dck.save_checkpoint(root / "one" / "iter_0000001", [model], optimizer, None,
                                    trainer_state={"iteration": 1, "consumed_samples": 2},
                                    model_config=CONFIG.to_dict(), rank_state={"rng": rng_states},
                                    seal=write_manifest).wait()
    restore_rng_states(rng_states)
    draws = _draws()
    losses = _continue(model, optimizer)
    return {"root": root, "ckpt": directory, "saved": saved, "continued": _full_state(model, optimizer),
            "losses": losses, "draws": draws}


def test_one_process_round_trip_and_exact_continuation(one_process_run):
    model = PhiForCausalLM(CONFIG, init_seed=5)
    optimizer = _optimizer(model)
    loaded = dck.load_checkpoint(one_process_run["ckpt"], [model], optimizer, None, verify=verify_checkpoint)
    assert loaded.trainer_state == {"iteration": 1, "consumed_samples": 2} and loaded.same_layout
    restore_rng_states(loaded.rank_state["rng"])  # python, numpy, torch and TP-tracker generators
    assert _draws() == one_process_run["draws"]
    state = _full_state(model, optimizer)
    assert state.keys() == one_process_run["saved"].keys()
    assert all(torch.equal(state[k], one_process_run["saved"][k]) for k in state)
    assert _continue(model, optimizer) == one_process_run["losses"]
    continued = _full_state(model, optimizer)
    assert all(torch.equal(continued[k], one_process_run["continued"][k]) for k in continued)


def _draws() -> list[float]:
    return [random.random(), float(np.random.rand()), float(torch.rand(()))]


@pytest.mark.parametrize("dp_before,dp_after", [(2, 1), (2, 4), (1, 2)])
def test_data_position_carries_over_layout_change(tmp_path, dp_before, dp_after):
    """consumed_samples saved at one DP size and resumed at another: no sample skipped or repeated."""
    total, global_batch = 96, 8
    seen = []
    samplers = [MicroBatchSampler(total, 0, global_batch // dp_before, r, dp_before) for r in range(dp_before)]
    for batches in list(zip(*samplers))[:3]:  # three global steps
        seen += [i for batch in batches for i in batch]
    model = PhiForCausalLM(CONFIG, init_seed=3)
    directory = dck.save_checkpoint(tmp_path / "iter_0000003", [model], None, None,
                                    trainer_state={"iteration": 3, "consumed_samples": len(seen)}).wait()
    consumed = dck.load_checkpoint(directory, [model], None, None).trainer_state["consumed_samples"]
    samplers = [MicroBatchSampler(total, consumed, global_batch // dp_after, r, dp_after) for r in range(dp_after)]
    for batches in zip(*samplers):
        seen += [i for batch in batches for i in batch]
    assert seen == list(range(total))


@pytest.mark.slow
def test_reshard_across_layouts(one_process_run):
    """1 process -> TP2 and PP2; TP2 -> TP2 x DP2; TP2 x DP2 -> 1 process; async == sync; exact continuation."""
    root, saved = one_process_run["root"], one_process_run["saved"]
    tp2_ckpt, pp2_ckpt = root / "tp2" / "iter_0000001", root / "pp2" / "iter_0000001"
    two = run_on_gloo(_two_process_worker, 2, str(one_process_run["ckpt"]), str(tp2_ckpt), str(pp2_ckpt),
                      timeout_s=600)
    for rank, result in enumerate(two):
        _assert_shards_equal(result["tp2"], saved, f"1 process -> TP2, rank {rank}")
        _assert_shards_equal(result["pp2"], saved, f"1 process -> PP2, rank {rank}")
        assert not result["same_layout"] and result["trainer_state"]["consumed_samples"] == 2
        # TP sums in another order, so not bitwise (weights that get no gradient, like the key bias, get float
        # noise that AdamW scales up): the losses of the continued run agree within 1e-5.
        torch.testing.assert_close(result["losses"], one_process_run["losses"], rtol=1e-5, atol=0)
    stage_names = [{k for k in r["pp2"]["tensors"] if k.startswith("model.")} for r in two]
    assert not stage_names[0] & stage_names[1], "a PP stage loaded another stage's parameters"
    assert stage_names[0] | stage_names[1] == {k for k in saved if k.startswith("model.")}

    sync_ckpt, async_ckpt = root / "tp2dp2" / "iter_0000001", root / "tp2dp2_async" / "iter_0000001"
    four = run_on_gloo(_four_process_worker, 4, str(tp2_ckpt), str(pp2_ckpt), str(sync_ckpt), str(async_ckpt),
                       timeout_s=600)
    for rank, result in enumerate(four):
        _assert_shards_equal(result["local"], saved, f"TP2 -> TP2 x DP2, rank {rank}")
        _assert_shards_equal(result["pp2dp2"], saved, f"PP2 -> PP2 x DP2, rank {rank}")
        _assert_shards_equal(result["from_pp2"], saved, f"PP2 -> TP2 x DP2, rank {rank}")
        # rank states come back by global rank (ranks 2, 3 did not exist in the TP2 job)
        assert (result["rank_state"] is None) == (rank >= 2)
        if rank < 2:
            assert int(result["rank_state"]["rank"]) == rank

    # Every rank wrote its own file, in parallel (a DP replica's copy of a shard is written by one of them).
    assert sorted(p.name for p in sync_ckpt.glob("*.distcp")) == [f"__{r}_0.distcp" for r in range(4)]
    # Asynchronous save: same file names and the same tensors as the synchronous one, despite the later update.
    sync_files = sorted(p.name for p in sync_ckpt.iterdir() if p.is_file() and p.name != "manifest.json")
    assert sync_files == sorted(p.name for p in async_ckpt.iterdir() if p.is_file() and p.name != "manifest.json")
    for prefix in ("model.", "optim."):
        a, b = dck.read_full_state_dict(sync_ckpt, prefix), dck.read_full_state_dict(async_ckpt, prefix)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    verify_checkpoint(async_ckpt)

    # TP2 x DP2 -> one process: identical weights and optimizer state, and the next step equals the uninterrupted run.
    model = PhiForCausalLM(CONFIG, init_seed=11)
    optimizer = _optimizer(model)
    loaded = dck.load_checkpoint(sync_ckpt, [model], optimizer, None, verify=verify_checkpoint)
    assert loaded.saved_layout == {"dp": 2, "pp": 1, "tp": 2}
    state = _full_state(model, optimizer)
    assert state.keys() == saved.keys() and all(torch.equal(state[k], saved[k]) for k in state)
    assert _continue(model, optimizer) == one_process_run["losses"]
    continued = _full_state(model, optimizer)
    assert all(torch.equal(continued[k], one_process_run["continued"][k]) for k in continued)

    # PP2 -> one process, exactly, optimizer state included.
    model = PhiForCausalLM(CONFIG, init_seed=12)
    optimizer = _optimizer(model)
    dck.load_checkpoint(pp2_ckpt, [model], optimizer, None, verify=verify_checkpoint)
    state = _full_state(model, optimizer)
    assert state.keys() == saved.keys() and all(torch.equal(state[k], saved[k]) for k in state)


def _fsdp_model(mesh, init_seed: int):
    from torch.distributed.fsdp import fully_shard

    tp_group = mesh["tp"].get_group() if mesh["tp"].size() > 1 else None
    model = PhiForCausalLM(CONFIG, init_seed=init_seed, tp_group=tp_group)
    for block in model.layers:
        fully_shard(block, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    return model


def _fsdp_worker(rank: int, world: int, one_process_ckpt: str, out: str, tp: int = 1) -> dict:
    """FSDP2 over dp=2 (parameters and moments are DTensors sharded by rows), with TP `tp` inside: load the
    one-process checkpoint, save it again, load that into a fresh FSDP2 model; return the whole tensors (this TP
    rank's shards under TP) each time."""
    mesh = _mesh(world, pp=1, tp=tp)
    model = _fsdp_model(mesh, init_seed=21)
    optimizer = _optimizer(model)
    dck.load_checkpoint(one_process_ckpt, [model], optimizer, mesh, verify=verify_checkpoint)

    def whole(module, opt):
        out = {}
        for name, param in module.named_parameters():
            out[f"model.{name}"] = param.full_tensor().clone()
            for key, value in opt.state[param].items():
                out[f"optim.{name}.{key}"] = value.full_tensor().clone() if key != "step" else value.clone()
        return out

    loaded = whole(model, optimizer)
    dck.save_checkpoint(out, [model], optimizer, mesh, trainer_state={"iteration": 1}, model_config=CONFIG.to_dict(),
                        seal=write_manifest).wait()
    again = _fsdp_model(mesh, init_seed=22)
    again_optimizer = _optimizer(again)
    dck.load_checkpoint(out, [again], again_optimizer, mesh, verify=verify_checkpoint)
    return {"loaded": loaded, "reloaded": whole(again, again_optimizer), "tp_rank": mesh.get_local_rank("tp"),
            "dims": tensor_parallel_dims(model)}


@pytest.mark.slow
def test_fsdp2_parameters_save_and_load_at_any_layout(one_process_run, tmp_path):
    """FSDP2 (issue 16): a one-process checkpoint loads into fully_shard'ed parameters and AdamW moments, an
    FSDP2 save (each DP rank writing its rows) reads back whole in one process and into FSDP2 again, identical."""
    saved = one_process_run["saved"]
    out = tmp_path / "fsdp2" / "iter_0000001"
    results = run_on_gloo(_fsdp_worker, 2, str(one_process_run["ckpt"]), str(out), timeout_s=600)
    for rank, result in enumerate(results):
        for what in ("loaded", "reloaded"):
            assert result[what].keys() == saved.keys()
            for key, value in saved.items():
                assert torch.equal(result[what][key], value), f"rank {rank}, {what}: {key}"
    assert sorted(p.name for p in out.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    for prefix in ("model.", "optim."):
        whole = dck.read_full_state_dict(out, prefix)
        assert all(torch.equal(whole[k], saved[prefix + k]) for k in whole)
    model = PhiForCausalLM(CONFIG, init_seed=23)  # and at one process, with the optimizer
    optimizer = _optimizer(model)
    dck.load_checkpoint(out, [model], optimizer, None, verify=verify_checkpoint)
    state = _full_state(model, optimizer)
    assert state.keys() == saved.keys() and all(torch.equal(state[k], saved[k]) for k in saved)


@pytest.mark.slow
def test_tp2_fsdp2_checkpoint_is_the_whole_model(one_process_run, tmp_path):
    """TP2 x FSDP2 (4 processes): each TP shard is gathered over dp and saved as TP shards, so the checkpoint
    reads back whole in one process, and loads into TP2 x FSDP2 again, identical."""
    saved = one_process_run["saved"]
    out = tmp_path / "tp2fsdp2" / "iter_0000001"
    results = run_on_gloo(_fsdp_worker, 4, str(one_process_run["ckpt"]), str(out), 2, timeout_s=900)
    for rank, result in enumerate(results):
        for what in ("loaded", "reloaded"):
            assert result[what].keys() == saved.keys()
            for key, value in saved.items():
                name = key.split(".", 1)[1].rsplit(".", 1)[0] if key.startswith("optim.") else key[len("model."):]
                dim = result["dims"][name]
                expected = value if dim is None or value.dim() == 0 else value.chunk(2, dim=dim)[result["tp_rank"]]
                assert torch.equal(result[what][key], expected), f"rank {rank}, {what}: {key}"
    for prefix in ("model.", "optim."):
        whole = dck.read_full_state_dict(out, prefix)
        assert whole.keys() == {k[len(prefix):] for k in saved if k.startswith(prefix)}
        assert all(torch.equal(whole[k], saved[prefix + k]) for k in whole)


def test_fallback_to_previous_checkpoint(one_process_run, tmp_path):
    """The trainer's fallback (find_verified_checkpoint) passes over a damaged DCP checkpoint to the previous one."""
    from phi1.training.checkpointing import find_verified_checkpoint

    run = tmp_path / "run"
    model = PhiForCausalLM(CONFIG, init_seed=3)
    for iteration in (1, 2):
        dck.save_checkpoint(run / f"iter_{iteration:07d}", [model], None, None, trainer_state={"iteration": iteration},
                            seal=write_manifest).wait()
    (run / "latest").write_text("2\n")
    (run / "iter_0000002" / "__0_0.distcp").write_bytes(b"damaged")
    with pytest.raises(CheckpointCorruptError):
        find_verified_checkpoint(run, fallback=False)
    found = find_verified_checkpoint(run, fallback=True)
    assert found == run / "iter_0000001"
    assert dck.load_checkpoint(found, [model], None, None, verify=verify_checkpoint).trainer_state["iteration"] == 1


def test_export_hf_logits_equal(one_process_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "hf"
    outcome = run_bounded(python(str(ROOT / "tools" / "export_dcp.py"), "export", str(one_process_run["ckpt"]),
                                 str(out)), timeout_s=300, memory_mb=8192)
    assert outcome.returncode == 0, outcome.describe()
    hf = transformers.PhiForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ours = PhiForCausalLM(CONFIG, init_seed=1).eval()
    with torch.no_grad():
        for name, param in ours.named_parameters():
            param.copy_(one_process_run["saved"][f"model.{name}"])
        tokens = _batch(7)
        torch.testing.assert_close(hf(tokens).logits, ours(tokens).logits, atol=1e-5, rtol=1e-5)


def test_convert_iter_checkpoint(tmp_path):
    """Today's iter_* format (TP2 shards, per-TP-rank optimizer files) converts to DCP with identical tensors."""
    from safetensors.torch import save_file

    from phi1.loading.convert import convert_to_dcp
    from phi1.parallel.checkpoint import SHARD_FORMAT, shard_file_name
    from phi1.parallel.optim import param_groups

    model = PhiForCausalLM(CONFIG, init_seed=4)
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=LR)
    _step(model, optimizer, step=0)
    full = _full_state(model, optimizer)
    dims = tensor_parallel_dims(model)
    iter_dir = tmp_path / "run" / "iter_0000001"
    iter_dir.mkdir(parents=True)
    # Write what a TP2 run writes, by slicing the one-process state (the layout test above covers real TP).
    names_in_order = [n for g in param_groups(model, 0.1) for n, p in model.named_parameters()
                      if any(p is q for q in g["params"])]
    for tp_rank in range(2):
        def shard(tensor, name, tp_rank=tp_rank):
            return tensor if dims[name] is None else tensor.chunk(2, dim=dims[name])[tp_rank].contiguous()
        tensors = {n: shard(p.detach(), n) for n, p in model.named_parameters()}
        save_file(tensors, str(iter_dir / shard_file_name(tp_rank, 2)), metadata={
            "format": SHARD_FORMAT, "format_version": "1", "tp_size": "2", "tp_rank": str(tp_rank),
            "partition_dims": json.dumps(dims), "model_config": json.dumps(CONFIG.to_dict())})
        optim_state = optimizer.state_dict()
        optim_state["state"] = {i: {k: (shard(v, names_in_order[i]) if k != "step" else v) for k, v in s.items()}
                                for i, s in optim_state["state"].items()}
        torch.save(optim_state, iter_dir / f"optim_tp{tp_rank:02d}.pt")
    (iter_dir / "trainer_state.json").write_text(json.dumps({"iteration": 1, "consumed_samples": 2,
                                                             "tensor_parallel": 2}))
    write_manifest(iter_dir)

    out = convert_to_dcp(iter_dir, tmp_path / "dcp")
    verify_checkpoint(out)
    restored = PhiForCausalLM(CONFIG, init_seed=9)
    restored_optimizer = _optimizer(restored)
    loaded = dck.load_checkpoint(out, [restored], restored_optimizer, None)
    assert loaded.trainer_state["consumed_samples"] == 2
    state = _full_state(restored, restored_optimizer)
    assert state.keys() == full.keys() and all(torch.equal(state[k], full[k]) for k in state)


# ----------------------------------------------------------------------------------------------------------------
# Hostile checkpoints


def _rewrite_metadata(directory: Path, change) -> None:
    metadata = dck.read_metadata(directory)
    change(metadata)
    (directory / ".metadata").write_bytes(pickle.dumps(metadata))


def _escape_dotdot(directory: Path) -> None:
    def change(metadata):
        for info in metadata.storage_data.values():
            info.relative_path = "../outside.distcp"
    (directory.parent / "outside.distcp").write_bytes((directory / "__0_0.distcp").read_bytes())
    _rewrite_metadata(directory, change)


def _escape_absolute(directory: Path) -> None:
    def change(metadata):
        for info in metadata.storage_data.values():
            info.relative_path = str((directory / "__0_0.distcp").resolve())
    _rewrite_metadata(directory, change)


def _escape_symlink(directory: Path) -> None:
    outside = directory.parent / "elsewhere.distcp"
    shutil.move(directory / "__0_0.distcp", outside)
    os.symlink(outside, directory / "__0_0.distcp")


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _code_in_metadata(directory: Path) -> None:
    buffer = io.BytesIO()
    pickle.dump(_RunsCode(), buffer)
    (directory / ".metadata").write_bytes(buffer.getvalue())


def _bytes_entry(directory: Path) -> None:
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    def change(metadata):
        metadata.state_dict_metadata["model.extra"] = BytesStorageMetadata()
    _rewrite_metadata(directory, change)


def _not_dcp(directory: Path) -> None:
    (directory / "format.json").unlink()


def _truncated_data(directory: Path) -> None:
    data = (directory / "__0_0.distcp").read_bytes()
    (directory / "__0_0.distcp").write_bytes(data[: len(data) // 2])


def _chunk_outside(directory: Path) -> None:
    def change(metadata):
        entry = metadata.state_dict_metadata["model.lm_head.bias"]
        entry.chunks[0].offsets = torch.Size([10 ** 9])
    _rewrite_metadata(directory, change)


def _huge_config(directory: Path) -> None:
    config = json.loads((directory / "model_config.json").read_text())
    config["vocab_size"] = 2 ** 31
    (directory / "model_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("damage,names", [
    (_escape_dotdot, "leaves the checkpoint directory"),
    (_escape_absolute, "leaves the checkpoint directory"),
    (_escape_symlink, "symlink leaving the checkpoint directory"),
    (_code_in_metadata, "is not part of DCP metadata"),
    (_bytes_entry, "pickled object"),
    (_not_dcp, "format.json"),
    (_truncated_data, "truncated or altered"),
    (_chunk_outside, "outside its shape"),
], ids=["dotdot", "absolute", "symlink", "pickled-code", "bytes-entry", "not-dcp", "truncated", "chunk-outside"])
def test_hostile_checkpoint_refused(one_process_run, tmp_path, damage, names):
    directory = tmp_path / "iter_0000001"
    shutil.copytree(one_process_run["ckpt"], directory)
    (directory / "manifest.json").unlink()  # a forger rewrites the manifest too: the reader must hold on its own
    damage(directory)
    outcome = run_bounded(python(str(ROOT / "tools" / "export_dcp.py"), "export", str(directory),
                                 str(tmp_path / "out")), timeout_s=300)
    assert_clear_error(outcome, names=[names])
    assert "pwned" not in outcome.stdout
    with pytest.raises(ValueError, match=names):
        dck.load_checkpoint(directory, [PhiForCausalLM(CONFIG)], None, None)


def test_export_refuses_config_that_does_not_fit(one_process_run, tmp_path):
    directory = tmp_path / "iter_0000001"
    shutil.copytree(one_process_run["ckpt"], directory)
    (directory / "manifest.json").unlink()
    _huge_config(directory)
    outcome = run_bounded(python(str(ROOT / "tools" / "export_dcp.py"), "export", str(directory),
                                 str(tmp_path / "out")), timeout_s=300)
    assert_clear_error(outcome, names=["model_config.json", "do not fit"])


def test_damaged_file_caught_by_manifest(one_process_run, tmp_path):
    directory = tmp_path / "iter_0000001"
    shutil.copytree(one_process_run["ckpt"], directory)
    data = bytearray((directory / "__0_0.distcp").read_bytes())
    data[-100] ^= 0xFF
    (directory / "__0_0.distcp").write_bytes(bytes(data))
    with pytest.raises(CheckpointCorruptError, match="__0_0.distcp"):
        dck.load_checkpoint(directory, [PhiForCausalLM(CONFIG)], None, None, verify=verify_checkpoint)


def test_interrupted_save_leaves_old_checkpoint(one_process_run, tmp_path):
    """A save that fails midway leaves only `.tmp`; the complete checkpoint under the real name is untouched."""
    directory = tmp_path / "iter_0000001"
    shutil.copytree(one_process_run["ckpt"], directory)
    model = PhiForCausalLM(CONFIG, init_seed=3)

    def crash(_tmp: Path) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        dck.save_checkpoint(directory, [model], None, None, trainer_state={"iteration": 9}, seal=crash).wait()
    assert (directory.with_name(directory.name + ".tmp")).exists()
    verify_checkpoint(directory)
    assert dck.load_checkpoint(directory, [model], None, None).trainer_state["iteration"] == 1


@pytest.mark.parametrize("command,names", [
    ("export-missing", "not a directory"),
    ("convert-missing", "not a directory"),
    ("convert-out-exists", "already exists"),
], ids=["export-missing", "convert-missing", "convert-out-exists"])
def test_tool_bad_arguments(one_process_run, tmp_path, command, names):
    tool = str(ROOT / "tools" / "export_dcp.py")
    missing = str(tmp_path / "no_such_iter")
    argv = {
        "export-missing": python(tool, "export", missing, str(tmp_path / "out")),
        "convert-missing": python(tool, "convert", missing, str(tmp_path / "out")),
        "convert-out-exists": python(tool, "convert", str(one_process_run["ckpt"]), str(one_process_run["ckpt"])),
    }[command]
    assert_clear_error(run_bounded(argv, timeout_s=300), names=[names])
