"""Checkpoint manifests: every file's size and SHA-256 is recorded at save; a damaged file is named at load;
with checkpoint.fallback the run resumes from the previous complete checkpoint."""

from __future__ import annotations

import json

import pytest

from phi1.testing.synthetic import write_synthetic_dataset
from phi1.training.checkpointing import find_checkpoint, find_verified_checkpoint, read_trainer_state
from phi1.training.config import load_config
from phi1.training.fault import MANIFEST, CheckpointCorruptError, verify_checkpoint
from phi1.training.trainer import train

SHARD = "model_tp00-of-01.safetensors"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run directory with checkpoints at iterations 2, 4 and 6."""
    root = tmp_path_factory.mktemp("manifest")
    prefix, tokenizer = write_synthetic_dataset(root / "data")
    run = root / "run"
    train(load_config(None, overrides(prefix, tokenizer, run)))
    return prefix, tokenizer, run


def overrides(prefix, tokenizer, run, **extra) -> list[str]:
    values = {
        "model.preset": "phi-1-nano", "data.path": prefix, "data.tokenizer_model": tokenizer, "data.seq_len": 32,
        "data.split": "100,0,0", "batch.global_batch_size": 4, "batch.micro_batch_size": 2,
        "schedule.train_steps": 6, "schedule.warmup_steps": 1, "checkpoint.dir": run, "checkpoint.interval": 2,
        "checkpoint.keep_last": 0, "logging.interval": 1, "eval.interval": 0, "logging.tensorboard_dir": "",
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def _copy_run(run, target):
    import shutil

    shutil.copytree(run, target)
    return target


def test_every_checkpoint_has_a_manifest_of_every_file(trained) -> None:
    _, _, run = trained
    for iteration in (2, 4, 6):
        directory = run / f"iter_{iteration:07d}"
        files = json.loads((directory / MANIFEST).read_text())["files"]
        on_disk = {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST}
        assert set(files) == on_disk and {SHARD, "optim_tp00.pt", "trainer_state.json"} <= on_disk
        assert verify_checkpoint(directory)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_file_is_named(trained, tmp_path, damage) -> None:
    _, _, run = trained
    copy = _copy_run(run, tmp_path / "run")
    target = copy / "iter_0000006" / ("optim_tp00.pt" if damage == "truncate" else SHARD)
    raw = bytearray(target.read_bytes())
    if damage == "flip":
        raw[len(raw) // 2] ^= 0x10
        target.write_bytes(bytes(raw))
    elif damage == "truncate":
        target.write_bytes(bytes(raw[:-7]))
    else:
        target.unlink()
    with pytest.raises(CheckpointCorruptError, match=target.name) as caught:
        verify_checkpoint(copy / "iter_0000006")
    assert len(caught.value.damaged) == 1
    with pytest.raises(CheckpointCorruptError, match=target.name):
        find_verified_checkpoint(copy, fallback=False)
    assert find_verified_checkpoint(copy, fallback=True) == copy / "iter_0000004"


def test_resume_stops_on_damage_or_falls_back_when_asked(trained, tmp_path, capsys) -> None:
    prefix, tokenizer, run = trained
    copy = _copy_run(run, tmp_path / "run")
    shard = copy / "iter_0000006" / SHARD
    raw = bytearray(shard.read_bytes())
    raw[-3] ^= 0x01
    shard.write_bytes(bytes(raw))
    longer = overrides(prefix, tokenizer, copy, **{"schedule.train_steps": 8})
    with pytest.raises(CheckpointCorruptError, match=SHARD):
        train(load_config(None, longer))
    result = train(load_config(None, longer + ["checkpoint.fallback=true"]))
    assert result.iteration == 8
    out = capsys.readouterr().out
    assert "falling back to" in out and f"resuming from {copy / 'iter_0000004'}" in out
    assert read_trainer_state(find_checkpoint(copy))["iteration"] == 8
    assert verify_checkpoint(copy / "iter_0000006")  # written again, from the resumed run


def test_every_checkpoint_damaged_is_an_error_even_with_fallback(trained, tmp_path) -> None:
    _, _, run = trained
    copy = _copy_run(run, tmp_path / "run")
    for iteration in (2, 4, 6):
        (copy / f"iter_{iteration:07d}" / "trainer_state.json").write_text('{"iteration": 0}\n')
    with pytest.raises(CheckpointCorruptError, match="no checkpoint verifies"):
        find_verified_checkpoint(copy, fallback=True)
