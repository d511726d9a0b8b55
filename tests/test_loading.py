"""phi1.loading's pieces, in-process and fast: names kept inside their directory, safetensors headers checked
against the file, expected shapes equal to the models' own, and one line for a path that is no model."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from phi1.core.config import get_preset
from phi1.core.hf_interop import config_to_hf, hf_expected_shapes
from phi1.core.model import PhiForCausalLM
from phi1.core.pretrained import expected_shapes, save_pretrained
from phi1.loading import ACCEPTED, inside, load_state, resolve_model_path
from phi1.loading.safetensors_file import MAX_HEADER_BYTES, read_header


def test_inside_keeps_names_in_their_directory(tmp_path) -> None:
    base = tmp_path / "base"
    (base / "sub").mkdir(parents=True)
    (base / "link_in").symlink_to(base / "sub")
    (base / "link_out").symlink_to(tmp_path)
    assert inside(base, "sub/x.bin", "entry") == (base / "sub" / "x.bin").resolve()
    assert inside(base, "link_in/x.bin", "entry") == (base / "sub" / "x.bin").resolve()
    for name, why in (("/etc/passwd", "absolute"), ("../base/x", "'..'"), ("sub/../../x", "'..'"),
                      ("link_out/x", "symlink pointing out"), ("", "not a file name")):
        with pytest.raises(ValueError, match=why) as caught:
            inside(base, name, "entry")
        assert str(tmp_path / "x") not in str(caught.value) and "passwd" not in str(caught.value)


def test_header_check_agrees_with_safetensors_on_an_honest_file(tmp_path) -> None:
    tensors = {"a": torch.randn(3, 4), "b": torch.zeros(0, dtype=torch.bfloat16), "c": torch.arange(5)}
    save_file(tensors, str(tmp_path / "x.safetensors"), metadata={"k": "v"})
    header = read_header(tmp_path / "x.safetensors")
    assert header.metadata == {"k": "v"}
    assert {n: (e.dtype, e.shape) for n, e in header.tensors.items()} == {
        "a": ("F32", (3, 4)), "b": ("BF16", (0,)), "c": ("I64", (5,))}


@pytest.mark.parametrize("lie", ["header_length", "not_json", "list", "bad_metadata", "negative_dim", "rank_9",
                                 "gap", "trailing_bytes"])
def test_header_lies_name_the_file(tmp_path, lie) -> None:
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.ones(2, 2), "b": torch.ones(3)}, str(path))
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8:8 + length]), raw[8 + length:]
    if lie == "header_length":
        raw = struct.pack("<Q", MAX_HEADER_BYTES + 1) + raw[8:]
    else:
        if lie == "not_json":
            text = b"{" + b" " * 10
        else:
            if lie == "list":
                header = [header]
            elif lie == "bad_metadata":
                header["__metadata__"] = {"k": 3}
            elif lie == "negative_dim":
                header["a"]["shape"] = [-2, -2]
            elif lie == "rank_9":
                header["a"]["shape"] = [1] * 9
            elif lie == "gap":
                header["b"]["data_offsets"] = [o + 4 for o in header["b"]["data_offsets"]]
                data += bytes(4)
            elif lie == "trailing_bytes":
                data += bytes(16)
            text = json.dumps(header).encode()
        raw = struct.pack("<Q", len(text)) + text + data
    path.write_bytes(raw)
    with pytest.raises(ValueError, match=str(path)):
        read_header(path)


@pytest.mark.parametrize("preset", ["phi-1-nano", "phi-1-tiny"])
def test_expected_shapes_are_the_models_own(preset) -> None:
    import transformers

    config = get_preset(preset, d_mlp=192 if preset == "phi-1-nano" else None)
    with torch.device("meta"):
        ours = PhiForCausalLM(config)
        hf_config = transformers.PhiConfig(**{k: v for k, v in config_to_hf(config).items() if k != "architectures"})
        theirs = transformers.PhiForCausalLM(hf_config)
    assert expected_shapes(config) == {n: tuple(p.shape) for n, p in ours.named_parameters()}
    assert hf_expected_shapes(config) == {n: tuple(t.shape) for n, t in theirs.state_dict().items()}


def test_a_path_that_is_no_model_says_what_was_found(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("x")
    (tmp_path / "file.bin").write_bytes(b"x")
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    os.mkfifo(tmp_path / "fifo")
    expected = {"empty": "an empty directory", "notes": "a directory holding readme.txt",
                "file.bin": "is a regular file, not a directory", "fifo": "is a FIFO", "llama": "model_type 'llama'",
                "absent": "no such file or directory"}
    for name, found in expected.items():
        with pytest.raises((ValueError, FileNotFoundError)) as caught:
            resolve_model_path(tmp_path / name)
        message = str(caught.value)
        assert found in message and ACCEPTED in message and "\n" not in message, message


def test_phi1_and_hf_directories_resolve_and_load_alike(tmp_path) -> None:
    config = get_preset("phi-1-nano")
    state = PhiForCausalLM(config, init_seed=3).state_dict()
    save_pretrained(state, config, tmp_path / "phi1")
    save_pretrained(state, config, tmp_path / "hf", fmt="hf", dtype=torch.bfloat16)
    assert resolve_model_path(tmp_path / "phi1").kind == "phi1"
    assert resolve_model_path(tmp_path / "hf").kind == "hf"
    _, ours = load_state(tmp_path / "phi1")
    _, from_hf = load_state(tmp_path / "hf")
    for name, tensor in state.items():
        assert torch.equal(ours[name], tensor)
        assert torch.equal(from_hf[name], tensor.to(torch.bfloat16)), name


def test_fallback_passes_over_a_latest_that_cannot_be_followed(tmp_path) -> None:
    from phi1.loading import write_manifest
    from phi1.parallel.checkpoint import save_model_shard
    from phi1.parallel.state import init_distributed
    from phi1.training.checkpointing import find_verified_checkpoint

    state = init_distributed(1)
    run = tmp_path / "run"
    for iteration in (2, 4):
        directory = run / f"iter_{iteration:07d}"
        save_model_shard(PhiForCausalLM(get_preset("phi-1-nano")), directory, state)
        (directory / "trainer_state.json").write_text("{}")
        write_manifest(directory)
    (run / "latest").write_text("../../elsewhere\n")
    with pytest.raises(ValueError, match="latest"):
        find_verified_checkpoint(run, fallback=False)
    assert find_verified_checkpoint(run, fallback=True) == run / "iter_0000004"
    (run / "latest").unlink()
    (run / "latest").symlink_to(Path("/dev/zero"))
    assert find_verified_checkpoint(run, fallback=True) == run / "iter_0000004"


def test_a_dcp_checkpoint_loads_like_the_others(tmp_path) -> None:
    """An iter_* checkpoint in the DCP format (any layout) is one more kind of path the one loader reads."""
    from phi1.loading import write_manifest
    from phi1.parallel.distributed_checkpoint import save_full_checkpoint

    config = get_preset("phi-1-nano")
    state = PhiForCausalLM(config, init_seed=4).state_dict()
    run = tmp_path / "run"
    save_full_checkpoint(run / "iter_0000003", state, trainer_state={"iteration": 3},
                         model_config=config.to_dict(), seal=write_manifest)
    (run / "latest").write_text("3\n")
    source = resolve_model_path(run)
    assert (source.kind, source.directory) == ("run", run / "iter_0000003")
    loaded_config, loaded = load_state(run)
    assert loaded_config == config and set(loaded) == set(state)
    assert all(torch.equal(loaded[name], tensor) for name, tensor in state.items())
    wrong = config.to_dict() | {"d_mlp": 128}
    (run / "iter_0000003" / "model_config.json").write_text(json.dumps(wrong))
    write_manifest(run / "iter_0000003")
    with pytest.raises(ValueError, match="do not fit the model config"):
        load_state(run)
