"""Hostile model paths and checkpoint files against the real command lines (issue 13: "Paths stay inside their
directory", "Safetensors and model directories").

Each case damages one copy of a real model path (a training run, a phi1 directory, a HuggingFace directory,
sharded or not) in one way, then runs `python -m phi1.eval --model X`, `tools/convert_checkpoint.py --input X`
and training (`checkpoint.load=X` for runs and checkpoints, `finetune.init_from=X` for model directories) on it,
bounded in time and memory. Each must end with exit status 2, one line naming the file (and tensor) inside the
path, no traceback, and nothing outside the path named or read: the outside targets are a FIFO (reading it
hangs, which the time limit turns into a failure) and a file of a telltale size, whose name and size must not
appear in the output.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from phi1.core.pretrained import save_pretrained
from phi1.loading import load_state, write_manifest
from phi1.testing.hostile import assert_clear_error, python, run_bounded

ROOT = Path(__file__).resolve().parents[1]
SECRET_BYTES = 7919  # the outside file's size: must never appear in a message
SHARD = "model_tp00-of-01.safetensors"


def _synthetic_dataset(directory: Path) -> tuple[str, str]:
    try:
        from phi1.testing.synthetic import write_synthetic_dataset
    except ImportError:  # before the fixture moved out of the library
        from phi1.testing.synthetic import write_synthetic_dataset
    return write_synthetic_dataset(directory)


def train_overrides(prefix: str, tokenizer: str, run: Path, **extra) -> list[str]:
    values = {
        "model.preset": "phi-1-nano", "data.path": prefix, "data.tokenizer_model": tokenizer, "data.seq_len": 32,
        "data.split": "100,0,0", "batch.global_batch_size": 4, "batch.micro_batch_size": 2,
        "schedule.train_steps": 2, "schedule.warmup_steps": 1, "checkpoint.dir": run, "checkpoint.interval": 2,
        "checkpoint.keep_last": 0, "logging.interval": 1, "eval.interval": 0, "logging.tensorboard_dir": "",
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def read_safetensors(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def write_safetensors(path: Path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict:
    """Valid model paths of every kind, holding the same weights, and an outside directory."""
    from phi1.training.config import load_config
    from phi1.training.trainer import train

    root = tmp_path_factory.mktemp("bases")
    prefix, tokenizer = _synthetic_dataset(root / "data")
    run = root / "run"
    train(load_config(None, train_overrides(prefix, tokenizer, run)))
    config, state = load_state(run)
    phi1_dir = save_pretrained(state, config, root / "phi1")
    hf_dir = save_pretrained(state, config, root / "hf", fmt="hf")
    for directory in (phi1_dir, hf_dir):
        shutil.copyfile(tokenizer, directory / "tokenizer.json")
    sharded = root / "hf_sharded"
    shutil.copytree(hf_dir, sharded)
    header, data = read_safetensors(sharded / "model.safetensors")
    os.remove(sharded / "model.safetensors")
    names = sorted(k for k in header if k != "__metadata__")
    weight_map = {}
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(hf_dir / "model.safetensors"))
    for part, chunk in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        file = f"model-{part + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in chunk}, str(sharded / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(chunk, file))
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    outside = root / "outside"
    outside.mkdir()
    os.mkfifo(outside / "pipe")
    (outside / "secret.bin").write_bytes(b"s" * SECRET_BYTES)
    shutil.copytree(run / "iter_0000002", outside / "stolen_iter")
    return {"run": run, "checkpoint": run / "iter_0000002", "phi1": phi1_dir, "hf": hf_dir, "hf_sharded": sharded,
            "outside": outside, "prefix": prefix, "tokenizer": tokenizer, "state": state}


# -- the cases: (base kind, mutation returning (path to give, a name the message must hold)) -------------------


def _symlink(link: Path, target: Path) -> None:
    if link.exists() or link.is_symlink():
        if link.is_dir() and not link.is_symlink():
            shutil.rmtree(link)
        else:
            link.unlink()
    link.symlink_to(target)


def _edit_manifest(checkpoint: Path, edit: Callable[[dict], None]) -> None:
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    edit(manifest["files"])
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


def _edit_header(file: Path, edit: Callable[[dict, bytes], tuple[dict, bytes]]) -> None:
    header, data = read_safetensors(file)
    write_safetensors(file, *edit(header, data))


def _first_tensor(header: dict) -> str:
    return sorted(k for k in header if k != "__metadata__")[0]


def _offsets_out_of_range(header, data):
    name = _first_tensor(header)
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [begin, end + 10**12]
    return header, data


def _offsets_overlap(header, data):
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    header[names[1]]["data_offsets"] = [header[names[0]]["data_offsets"][0],
                                        header[names[0]]["data_offsets"][0] + header[names[1]]["data_offsets"][1]
                                        - header[names[1]]["data_offsets"][0]]
    return header, data


def _unknown_dtype(header, data):
    header[_first_tensor(header)]["dtype"] = "F99"
    return header, data


def _shape_overflow(header, data):
    header[_first_tensor(header)]["shape"] = [2**62, 2**62, 2**62]
    return header, data


def _shape_disagrees(header, data):
    name = _first_tensor(header)
    header[name]["shape"] = [*header[name]["shape"][:-1], header[name]["shape"][-1] + 1]
    return header, data


def _wrong_dtype(header, data):
    # Same bytes, read as int32: a tensor no model weight can be.
    header[_first_tensor(header)]["dtype"] = "I32"
    return header, data


def _wrong_shape(header, data):
    name = next(k for k in sorted(header) if k.endswith("fc1.weight"))
    rows, cols = header[name]["shape"]
    header[name]["shape"] = [cols, rows]  # same bytes, transposed shape
    return header, data


def _missing_tensor(header, data):
    """lm_head.bias and its bytes taken out, the other offsets moved up: an honest file that lacks a tensor."""
    gone = next(k for k in sorted(header) if k.endswith("lm_head.bias"))
    begin, end = header.pop(gone)["data_offsets"]
    for name, entry in header.items():
        if name != "__metadata__" and entry["data_offsets"][0] >= end:
            entry["data_offsets"] = [o - (end - begin) for o in entry["data_offsets"]]
    return header, data[:begin] + data[end:]


def _extra_tensor(header, data):
    """A tensor the model does not have, with honest offsets."""
    header["not_a_phi_tensor.weight"] = {"dtype": "F32", "shape": [2], "data_offsets": [len(data), len(data) + 8]}
    return header, data + bytes(8)


def _absurd_metadata_config(header, data):
    config = json.loads(header["__metadata__"]["model_config"])
    config["n_layer"] = 10**9
    header["__metadata__"]["model_config"] = json.dumps(config)
    return header, data


def _huge_header(file: Path) -> None:
    with open(file, "wb") as handle:
        handle.write(struct.pack("<Q", 100 << 20))
        handle.truncate(8 + (100 << 20) + 16)  # sparse: the 100 MB header costs no disk


def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _set_config(directory: Path, key_path: tuple[str, ...], value) -> None:
    config = json.loads((directory / "config.json").read_text())
    node = config
    for key in key_path[:-1]:
        node = node[key]
    node[key_path[-1]] = value
    (directory / "config.json").write_text(json.dumps(config))


def _weights(kind: str, d: Path) -> Path:
    return d / SHARD if kind in ("run", "checkpoint") else d / "model.safetensors"


def _in_checkpoint(kind: str, d: Path) -> Path:
    return d / "iter_0000002" if kind == "run" else d


def _remanifest(kind: str, d: Path) -> None:
    if kind in ("run", "checkpoint"):
        write_manifest(_in_checkpoint(kind, d))


def case_table(outside: Path) -> dict[str, tuple[str, Callable[[Path], tuple[Path, str]]]]:
    """name -> (base kind, mutate(copied base) -> (path to pass, a name the message must hold))."""
    cases: dict[str, tuple[str, Callable[[Path], tuple[Path, str]]]] = {}

    def add(name: str, kind: str, mutate: Callable[[Path], tuple[Path, str]]) -> None:
        cases[name] = (kind, mutate)

    # Paths leaving their directory.
    add("latest_symlink_out", "run", lambda d: (_symlink(d / "latest", outside / "pipe"), (d, "latest"))[1])
    add("latest_holds_a_path", "run", lambda d: ((d / "latest").write_text("../outside/stolen_iter\n"), (d, "latest"))[1])
    add("latest_is_fifo", "run", lambda d: (os.remove(d / "latest"), os.mkfifo(d / "latest"), (d, "latest"))[2])
    add("iter_symlink_out", "run",
        lambda d: (_symlink(d / "iter_0000002", outside / "stolen_iter"), (d, "iter_0000002"))[1])
    add("manifest_absolute", "checkpoint", lambda d: (_edit_manifest(d, lambda f: f.update(
        {str(outside / "secret.bin"): {"bytes": 1, "sha256": "0" * 64}})), (d, "manifest.json"))[1])
    add("manifest_dotdot", "run", lambda d: (_edit_manifest(d / "iter_0000002", lambda f: f.update(
        {"../../outside/secret.bin": {"bytes": 1, "sha256": "0" * 64}})), (d, "manifest.json"))[1])
    add("manifest_entry_symlink_out", "checkpoint",
        lambda d: (_symlink(d / "optim_tp00.pt", outside / "secret.bin"), (d, "optim_tp00.pt"))[1])
    add("manifest_entry_dev_zero", "checkpoint",
        lambda d: (_symlink(d / "optim_tp00.pt", Path("/dev/zero")), (d, "optim_tp00.pt"))[1])
    add("manifest_huge_size", "checkpoint", lambda d: (_edit_manifest(d, lambda f: f[SHARD].update(
        {"bytes": 200 * 10**9})), (d, SHARD))[1])
    add("fifo_in_checkpoint", "checkpoint",
        lambda d: (os.remove(d / "optim_tp00.pt"), os.mkfifo(d / "optim_tp00.pt"), (d, "optim_tp00.pt"))[2])
    add("shard_symlink_out", "checkpoint", lambda d: (_symlink(d / SHARD, outside / "pipe"), (d, SHARD))[1])
    add("index_dotdot", "hf_sharded", lambda d: ((d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"lm_head.weight": "../outside/pipe"}})), (d, "model.safetensors.index.json"))[1])
    add("index_absolute", "hf_sharded", lambda d: ((d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"lm_head.weight": str(outside / "pipe")}})), (d, "model.safetensors.index.json"))[1])
    add("index_shard_symlink_out", "hf_sharded",
        lambda d: (_symlink(d / "model-00001-of-00002.safetensors", outside / "pipe"),
                   (d, "model-00001-of-00002.safetensors"))[1])
    add("weights_symlink_dev_zero", "phi1",
        lambda d: (_symlink(d / "model.safetensors", Path("/dev/zero")), (d, "model.safetensors"))[1])
    add("config_is_fifo", "hf", lambda d: (os.remove(d / "config.json"), os.mkfifo(d / "config.json"),
                                            (d, "config.json"))[2])
    add("weights_is_directory", "phi1", lambda d: (os.remove(d / "model.safetensors"),
                                                   (d / "model.safetensors").mkdir(), (d, "model.safetensors"))[2])
    add("path_is_fifo", "phi1", lambda d: (os.mkfifo(d / "a_fifo"), (d / "a_fifo", "a_fifo"))[1])
    add("path_is_dev_zero", "phi1", lambda d: (Path("/dev/zero"), "/dev/zero"))
    add("path_holds_nothing_known", "phi1", lambda d: (shutil.rmtree(d), d.mkdir(), (d / "x.txt").write_text("x"),
                                                       (d, "no config.json"))[3])

    # Safetensors headers that lie, in every kind of weights file.
    lies = {"offsets_out_of_range": _offsets_out_of_range, "offsets_overlap": _offsets_overlap,
            "unknown_dtype": _unknown_dtype, "shape_overflow": _shape_overflow, "shape_disagrees": _shape_disagrees,
            "wrong_dtype": _wrong_dtype, "wrong_shape": _wrong_shape, "missing_tensor": _missing_tensor,
            "extra_tensor": _extra_tensor}
    # Checkpoints get a manifest rewritten to match (a hostile file can come with its own manifest), so the header
    # checks themselves are what catches them.
    for lie, edit in lies.items():
        for kind in ("phi1", "hf", "checkpoint"):
            add(f"{lie}_{kind}", kind, lambda d, kind=kind, edit=edit: (
                _edit_header(_weights(kind, d), edit), _remanifest(kind, d), (d, _weights(kind, d).name))[2])
    for kind in ("phi1", "run"):
        file_kind = "checkpoint" if kind == "run" else kind
        add(f"huge_header_{kind}", kind, lambda d, kind=kind, file_kind=file_kind: (
            _huge_header(_weights(file_kind, _in_checkpoint(kind, d))), _remanifest(kind, d),
            (d, _weights(file_kind, d).name))[2])
        add(f"truncated_{kind}", kind, lambda d, kind=kind, file_kind=file_kind: (
            _truncate(_weights(file_kind, _in_checkpoint(kind, d))), _remanifest(kind, d),
            (d, _weights(file_kind, d).name))[2])

    add("shard_metadata_absurd_layers", "run", lambda d: (
        _edit_header(d / "iter_0000002" / SHARD, _absurd_metadata_config), _remanifest("run", d), (d, "n_layer"))[2])

    # config.json values that are not finite or absurd.
    add("config_nan_eps_phi1", "phi1", lambda d: (_set_config(d, ("model", "layer_norm_eps"), float("nan")),
                                                  (d, "layer_norm_eps"))[1])
    add("config_absurd_layers_phi1", "phi1", lambda d: (_set_config(d, ("model", "n_layer"), 10**9), (d, "n_layer"))[1])
    add("config_inf_theta_hf", "hf", lambda d: (_set_config(d, ("rope_theta",), float("inf")), (d, "rope_theta"))[1])
    add("config_string_width_hf", "hf", lambda d: (_set_config(d, ("hidden_size",), "64"), (d, "hidden_size"))[1])
    add("config_absurd_vocab_hf", "hf", lambda d: (_set_config(d, ("vocab_size",), 2**40), (d, ["vocab_size", "config.json"]))[1])
    return cases


# The training command is the slowest (it builds datasets); it runs for the path classes, eval and convert for all.
TRAIN_CASES = {"latest_symlink_out", "latest_holds_a_path", "iter_symlink_out", "manifest_dotdot",
               "manifest_entry_symlink_out", "manifest_huge_size", "fifo_in_checkpoint", "index_dotdot",
               "weights_symlink_dev_zero", "wrong_shape_checkpoint", "unknown_dtype_hf", "huge_header_run"}
CASE_NAMES = list(case_table(Path("/nonexistent")))
COMMANDS = ("eval", "convert", "train")


def command(which: str, kind: str, target: Path, scratch: Path, bases: dict) -> list[str]:
    if which == "eval":
        return python("-m", "phi1.eval", "--model", str(target), "--limit", "1", "--no-execute", "--quiet",
                      "--output-dir", str(scratch / "eval"), "--device", "cpu")
    if which == "convert":
        return python(str(ROOT / "tools" / "convert_checkpoint.py"), "--input", str(target),
                      "--output", str(scratch / "converted"), "--output-format", "hf")
    key = "checkpoint.load" if kind in ("run", "checkpoint") else "finetune.init_from"
    return python("-m", "phi1.train", *train_overrides(bases["prefix"], bases["tokenizer"], scratch / "train_run",
                                                        **{key: target}))


# Convert reads weights through the same loader as eval: every lie is tried on each kind of file through eval,
# and through convert on one kind each (rotating), besides every path case.
CONVERT_LIES = {"offsets_out_of_range_phi1", "offsets_overlap_hf", "unknown_dtype_checkpoint", "shape_overflow_phi1",
                "shape_disagrees_hf", "wrong_dtype_checkpoint", "wrong_shape_phi1", "missing_tensor_hf",
                "extra_tensor_checkpoint"}
_LIE_PREFIXES = ("offsets_", "unknown_dtype_", "shape_overflow_", "shape_disagrees_", "wrong_", "missing_tensor_",
                 "extra_tensor_")


def _runs(name: str, which: str) -> bool:
    if which == "train":
        return name in TRAIN_CASES
    if which == "convert" and name.startswith(_LIE_PREFIXES):
        return name in CONVERT_LIES
    return True


CASES = [pytest.param(name, which, id=f"{name}-{which}",
                      marks=[pytest.mark.slow] if which != "eval" else [])
         for name in CASE_NAMES for which in COMMANDS if _runs(name, which)]


@pytest.mark.parametrize(("name", "which"), CASES)
def test_hostile_model_path_is_a_clear_error(bases, tmp_path, name, which) -> None:
    kind, mutate = case_table(bases["outside"])[name]
    copy = tmp_path / "model"
    shutil.copytree(bases[kind], copy, symlinks=True)
    target, needle = mutate(copy)
    outcome = run_bounded(command(which, kind, target, tmp_path, bases), timeout_s=120, memory_mb=6144)
    assert_clear_error(outcome, names=needle)
    output = outcome.stdout + outcome.stderr
    for secret in (str(bases["outside"]), "secret.bin", "stolen_iter", "/dev/zero" if needle != "/dev/zero" else "\x00"):
        assert secret not in output, outcome.describe()
    assert str(SECRET_BYTES) not in output, outcome.describe()
    assert not (tmp_path / "converted" / "model.safetensors").exists()


def test_accepted_paths_load_the_same_weights(bases) -> None:
    """Every accepted kind of model path gives the very tensors the training run saved."""
    from phi1.loading import resolve_model_path

    expected = bases["state"]
    kinds = {name: resolve_model_path(bases[name]).kind for name in ("run", "checkpoint", "phi1", "hf", "hf_sharded")}
    assert kinds == {"run": "run", "checkpoint": "checkpoint", "phi1": "phi1", "hf": "hf", "hf_sharded": "hf"}
    for name in kinds:
        _, state = load_state(bases[name])
        assert set(state) == set(expected), name
        for tensor_name, tensor in expected.items():
            assert torch.equal(state[tensor_name], tensor), (name, tensor_name)


def test_eval_and_convert_accept_every_kind_of_path(bases, tmp_path) -> None:
    """`phi1-eval` generates from a training run directory (its checkpoint's tokenizer); convert exports each
    kind of path to the same HF weights."""
    outcome = run_bounded(python("-m", "phi1.eval", "--model", str(bases["run"]), "--limit", "1", "--no-execute",
                                 "--quiet", "--max-new-tokens", "4", "--output-dir", str(tmp_path / "eval"),
                                 "--device", "cpu"), timeout_s=300)
    assert outcome.returncode == 0, outcome.describe()
    samples = (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 1 and json.loads(samples[0])["task_id"] == "HumanEval/0"
    for name in ("checkpoint", "hf_sharded"):
        out = tmp_path / f"converted_{name}"
        outcome = run_bounded(python(str(ROOT / "tools" / "convert_checkpoint.py"), "--input", str(bases[name]),
                                     "--output", str(out), "--output-format", "phi1"), timeout_s=300)
        assert outcome.returncode == 0, outcome.describe()
        _, state = load_state(out)
        assert all(torch.equal(state[k], v) for k, v in bases["state"].items()), name
        assert (out / "tokenizer.json").is_file(), name



class _Payload:
    """Unpickling this runs a shell command: what a hostile ZeRO file would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_zero_files_that_would_run_code_are_refused(tmp_path) -> None:
    """DeepSpeed loads ZeRO files with weights_only=False: a pickle naming any callable beyond the classes
    DeepSpeed writes is refused before DeepSpeed sees it, and nothing runs; DeepSpeed's own classes pass."""
    deepspeed = pytest.importorskip("deepspeed")
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from phi1.training.checkpointing import check_zero_files

    checkpoint = tmp_path / "iter_0000002"
    (checkpoint / "zero").mkdir(parents=True)
    honest = checkpoint / "zero" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.optimizer_states,
                                         "state": {0: torch.zeros(3)}}, "ds_version": deepspeed.__version__}, honest)
    check_zero_files(checkpoint)
    marker = tmp_path / "PAYLOAD_RAN"
    torch.save({"optimizer_state_dict": _Payload(marker)}, checkpoint / "zero" / "mp_rank_00_model_states.pt")
    with pytest.raises(ValueError, match=r"mp_rank_00_model_states\.pt: its pickle names \['posix\.system'\]"):
        check_zero_files(checkpoint)
    os.remove(checkpoint / "zero" / "mp_rank_00_model_states.pt")
    (checkpoint / "zero" / "mp_rank_00_model_states.pt").symlink_to(honest)
    check_zero_files(checkpoint)  # a symlink inside the checkpoint is fine
    (checkpoint / "zero" / "mp_rank_00_model_states.pt").unlink()
    (checkpoint / "zero" / "mp_rank_00_model_states.pt").symlink_to(tmp_path)
    with pytest.raises(ValueError, match="symlink pointing out"):
        check_zero_files(checkpoint)
    assert not marker.exists()


def test_serve_loads_a_training_run_directory(bases) -> None:
    """`phi1-serve --model RUN` builds its service from the run's checkpoint and the tokenizer copied into it."""
    from phi1.serve import build_service, parse_args

    service = build_service(parse_args(["--model", str(bases["run"]), "--device", "cpu"]))
    try:
        assert service.served_model == "run" and service.context == 128
        assert service.tokenizer.encode("w3 w4") == [5, 6]  # the run's word-level tokenizer, from its checkpoint
        model_state = service.model.state_dict()
        assert all(torch.equal(model_state[k], v) for k, v in bases["state"].items())
    finally:
        service.engine.stop()
