"""Any model path to a model: the one place that decides what a path is.

    resolve_model_path(path) -> ModelSource     what the path is (and, for training runs, which checkpoint)
    load_state(path)         -> (ModelConfig, whole CPU tensors under phi1 names), every file checked first
    load_pretrained(path)    -> PhiForCausalLM  (sliced for a TP group when given)
    find_tokenizer(path) / load_tokenizer(path)   the tokenizer stored with the model or the checkpoint

Accepted kinds:

    phi1        config.json {"format": "phi1", "model": {...}} + model.safetensors
    hf          config.json (model_type "phi") + model.safetensors | model.safetensors.index.json + shards
                | pytorch_model.bin (read with weights_only=True)
    run         a training run directory: the checkpoint `selected` names when fine-tuning chose one by pass@1
                (finetune.select_by), else `latest` (or the newest complete iter_*); verified by its manifest, and
                the choice and its reason logged
    checkpoint  one iter_* directory: trainer_state.json + model_tpNN-of-NN.safetensors (any TP size, merged),
                or a torch.distributed.checkpoint (DCP) checkpoint of any TP x PP x DP layout

The tokenizer of a run or checkpoint is the copy saved inside the checkpoint. A path that is none of these gets
one line saying what was found there and what is accepted.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import torch

from phi1.core.config import ModelConfig
from phi1.core.hf_interop import config_from_hf, hf_expected_shapes, state_dict_from_hf
from phi1.core.pretrained import FORMAT_VERSION, HF_FORMAT, PHI1_FORMAT, load_state_dict_into
from phi1.data.tokenizers import describe_directory
from phi1.loading.checkpoints import (
    SELECTED,
    compare_tensors,
    expected_tensor_shapes,
    find_checkpoint,
    find_selected,
    is_checkpoint,
    load_checkpoint_state,
    load_shard_config,
)
from phi1.loading.manifest import verify_checkpoint
from phi1.loading.paths import describe_kind, inside, read_json_object, regular_file
from phi1.loading.safetensors_file import SafetensorsHeader, check_weight_dtypes, load_tensors, read_header

logger = logging.getLogger("phi1.loading")

KINDS = (PHI1_FORMAT, HF_FORMAT, "run", "checkpoint")
SELECTION_FILE = "selection.json"
ACCEPTED = ("accepted: a phi1 model directory (config.json with \"format\": \"phi1\" + model.safetensors), a "
            "HuggingFace phi directory (config.json + model.safetensors or model.safetensors.index.json), a training "
            "run directory (latest + iter_*/), or one iter_* checkpoint (trainer_state.json + model_tp*.safetensors or "
            "DCP files)")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json")
HF_INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class ModelSource:
    """What a model path is."""

    path: Path
    """The path as given."""
    kind: str
    """One of KINDS."""
    directory: Path
    """Where the weights and the tokenizer are: the model directory, or the checkpoint directory of a run."""
    reason: str = ""
    """For a run: why this checkpoint (the one `selected` names, or `latest`)."""

    def describe(self) -> str:
        if self.kind == "run":
            return f"{self.path} (training run; checkpoint {self.directory.name}: {self.reason})"
        return f"{self.path} ({self.kind} {'checkpoint' if self.kind == 'checkpoint' else 'model directory'})"


def _config_kind(directory: Path, what: str) -> tuple[str, dict]:
    path = directory / "config.json"
    inside(directory, "config.json", "file")
    raw = read_json_object(path)
    if raw.get("format") == PHI1_FORMAT:
        return PHI1_FORMAT, raw
    if raw.get("model_type") == "phi":
        return HF_FORMAT, raw
    found = f"model_type {raw['model_type']!r}" if "model_type" in raw else "no \"format\" or \"model_type\""
    raise ValueError(f"{what} {directory}: config.json has {found}; {ACCEPTED}")


def resolve_model_path(path: str | os.PathLike, what: str = "--model", verify: bool = True) -> ModelSource:
    """Decide what `path` is; for a run directory, pick its checkpoint (`latest`, else the newest complete one).

    Args:
        path: the path a user gave.
        what: the option or field it came from, for messages ("--model", "finetune.init_from", ...).
        verify: check a checkpoint's files against its manifest (sizes, then SHA-256).

    Raises:
        FileNotFoundError: nothing at `path`.
        ValueError: one line saying what was found and what is accepted; or a checkpoint that fails its
            manifest, or a pointer that leaves its directory.
    """
    path = Path(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path}: no such file or directory; {ACCEPTED}") from None
    except OSError as e:
        raise ValueError(f"{what} {path}: cannot be examined ({e.strerror})") from None
    if not stat.S_ISDIR(info.st_mode):
        raise ValueError(f"{what} {path}: is {describe_kind(info.st_mode)}, not a directory; {ACCEPTED}")
    if os.path.lexists(path / "config.json"):
        kind, _ = _config_kind(path, what)
        return ModelSource(path, kind, path)
    if is_checkpoint(path):
        if verify:
            verify_checkpoint(path)
        return ModelSource(path, "checkpoint", path)
    checkpoint, reason = _run_checkpoint(path)
    if checkpoint is not None:
        if verify:
            verify_checkpoint(checkpoint)
        _announce(path, checkpoint, reason)
        return ModelSource(path, "run", checkpoint, reason)
    if os.path.lexists(path / "latest"):
        raise ValueError(f"{what} {path}: a training run directory with no complete checkpoint (no iter_*/ holding "
                         "trainer_state.json); train until a checkpoint is saved, or pass another path")
    raise ValueError(f"{what} {path}: found {describe_directory(path, shown=6)}, but no config.json, latest, iter_*/ or "
                     f"trainer_state.json; {ACCEPTED}")


def _run_checkpoint(run_dir: Path) -> tuple[Path | None, str]:
    """(the checkpoint a run directory stands for when a model is loaded from it, why that one).

    A run whose fine-tuning chose a checkpoint by pass@1 (`finetune.select_by`, which writes `selected` and
    `selection.json`) stands for that checkpoint: it is the model the run produced. Otherwise `latest` (else the
    newest complete checkpoint). An explicit iter_* path is never redirected.
    """
    latest = find_checkpoint(run_dir)
    selected = find_selected(run_dir)
    if selected is None:
        return latest, "latest (the run has no selected checkpoint)"
    reason = f"the one {run_dir / SELECTED} names (chosen by finetune.select_by, scores in {SELECTION_FILE})"
    if latest is not None and latest != selected:
        reason += f"; latest is {latest.name}: pass {latest} to load it"
    return selected, reason


_ANNOUNCED: set[tuple[str, str]] = set()


def _announce(path: Path, checkpoint: Path, reason: str) -> None:
    """Say once per process which checkpoint of a run is loaded and why (callers resolve a path several times:
    the weights, then the tokenizer). A selected checkpoint other than latest is a warning, so that it shows
    even where no logging is configured."""
    key = (str(path), str(checkpoint))
    if key in _ANNOUNCED:
        return
    _ANNOUNCED.add(key)
    level = logging.WARNING if "; latest is" in reason else logging.INFO
    logger.log(level, "%s: loading checkpoint %s, %s", path, checkpoint.name, reason)


def _as_source(path_or_source: str | os.PathLike | ModelSource, what: str) -> ModelSource:
    if isinstance(path_or_source, ModelSource):
        return path_or_source
    return resolve_model_path(path_or_source, what)


def _phi1_config(directory: Path, raw: dict) -> ModelConfig:
    shown = directory / "config.json"
    if raw.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{shown}: format_version {raw.get('format_version')!r}, this reader knows {FORMAT_VERSION}; "
                         "convert it with the phi1 version that wrote it")
    if not isinstance(raw.get("model"), dict):
        raise ValueError(f"{shown}: \"model\" must be an object of ModelConfig fields")
    try:
        return ModelConfig.from_dict(raw["model"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{shown}: {e}") from None


def _hf_config(directory: Path, raw: dict) -> ModelConfig:
    try:
        return config_from_hf(raw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{directory / 'config.json'}: {str(e).removeprefix('config.json: ')}") from None


def load_config(path_or_source: str | os.PathLike | ModelSource, what: str = "--model") -> ModelConfig:
    """The ModelConfig of any accepted model path, read without touching tensor data."""
    source = _as_source(path_or_source, what)
    if source.kind in ("run", "checkpoint"):
        return load_shard_config(source.directory)
    kind, raw = _config_kind(source.directory, what)
    return _phi1_config(source.directory, raw) if kind == PHI1_FORMAT else _hf_config(source.directory, raw)


def _hf_headers(directory: Path) -> list[SafetensorsHeader] | None:
    """Checked headers of a HF directory's safetensors files (one file, or the shards its index names);
    None when it has neither."""
    if os.path.lexists(directory / "model.safetensors"):
        return [read_header(inside(directory, "model.safetensors", "file"), directory / "model.safetensors")]
    if not os.path.lexists(directory / HF_INDEX):
        return None
    index_path = directory / HF_INDEX
    inside(directory, HF_INDEX, "file")
    weight_map = read_json_object(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index_path}: no \"weight_map\" object of tensor name -> shard file")
    if not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index_path}: weight_map values must be shard file names")
    headers = []
    for shard in sorted(set(weight_map.values())):
        resolved = inside(directory, shard, f"{HF_INDEX} shard")
        header = read_header(resolved, directory / shard)
        claimed = sorted(name for name, file in weight_map.items() if file == shard and name not in header.tensors)
        if claimed:
            raise ValueError(f"{directory / shard}: lacks tensors {claimed[:5]} that {HF_INDEX} places in it")
        headers.append(header)
    return headers


def _check_hf_tensors(directory: Path, headers: list[SafetensorsHeader], config: ModelConfig) -> None:
    total = sum(len(h.tensors) for h in headers)
    expected = expected_tensor_shapes(config, total, headers[0].path if len(headers) == 1 else directory / HF_INDEX,
                                      str(directory / "config.json"), hf_expected_shapes)
    seen: dict[str, Path] = {}
    for header in headers:
        check_weight_dtypes(header)
        duplicate = sorted(set(header.tensors) & set(seen))
        if duplicate:
            raise ValueError(f"{header.path}: tensor {duplicate[0]!r} is also in {seen[duplicate[0]].name}")
        seen.update(dict.fromkeys(header.tensors, header.path))
        own = {name: shape for name, shape in expected.items() if name in header.tensors}
        # missing tensors are reported once, over all files, below
        compare_tensors(header, own, f"{directory / 'config.json'}", ignore=lambda name: "rotary_emb" in name)
    missing = sorted(set(expected) - set(seen))
    if missing:
        where = headers[0].path if len(headers) == 1 else directory / HF_INDEX
        raise ValueError(f"{where}: tensors missing: {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''} (config.json says n_layer={config.n_layer})")


def _load_hf(directory: Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    headers = _hf_headers(directory)
    if headers is not None:
        _check_hf_tensors(directory, headers, config)
        tensors: dict[str, torch.Tensor] = {}
        for header in headers:
            tensors.update(load_tensors(header, [n for n in header.tensors if "rotary_emb" not in n]))
        return state_dict_from_hf(tensors, config)
    legacy = directory / "pytorch_model.bin"
    if os.path.lexists(legacy):
        regular_file(inside(directory, legacy.name, "file"), legacy)
        try:
            tensors = torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle and zip errors: weights_only refuses code, a damaged file fails to parse
            raise ValueError(f"{legacy}: not a weights-only torch file ({type(e).__name__})") from None
        if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise ValueError(f"{legacy}: not a dict of tensors")
        expected = hf_expected_shapes(config)
        for name, tensor in tensors.items():
            if name in expected and tuple(tensor.shape) != expected[name]:
                raise ValueError(f"{legacy}: tensor {name!r} has shape {list(tensor.shape)}, config.json needs "
                                 f"{list(expected[name])}")
            if not tensor.is_floating_point():
                raise ValueError(f"{legacy}: tensor {name!r} has dtype {tensor.dtype}; model weights are floating point")
        try:
            return state_dict_from_hf(tensors, config)
        except KeyError as e:
            raise ValueError(f"{legacy}: {e.args[0]}") from None
    raise FileNotFoundError(f"{directory}: no model.safetensors, {HF_INDEX} or pytorch_model.bin beside config.json")


def _load_phi1(directory: Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    weights = directory / "model.safetensors"
    if not os.path.lexists(weights):
        raise FileNotFoundError(f"{weights}: missing (a phi1 model directory holds config.json and model.safetensors)")
    header = read_header(inside(directory, weights.name, "file"), weights)
    check_weight_dtypes(header, weights)
    expected = expected_tensor_shapes(config, len(header.tensors), weights, str(directory / "config.json"))
    compare_tensors(header, expected, str(directory / "config.json"))
    return load_tensors(header)


def load_state(path_or_source: str | os.PathLike | ModelSource,
               what: str = "--model") -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(ModelConfig, whole CPU tensors under phi1 names) of any accepted model path.

    Every file is checked before a tensor is read: headers against the files, tensor names, dtypes and shapes
    against the config.

    Raises:
        FileNotFoundError, ValueError: one message naming the file (and tensor) that is wrong.
    """
    source = _as_source(path_or_source, what)
    if source.kind in ("run", "checkpoint"):
        return load_checkpoint_state(source.directory)
    config = load_config(source, what)
    load = _load_phi1 if source.kind == PHI1_FORMAT else _load_hf
    return config, load(source.directory, config)


def load_pretrained(path: str | os.PathLike | ModelSource, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None, tp_group=None, what: str = "--model", **config_overrides):
    """A PhiForCausalLM with the weights of any accepted model path (sliced for `tp_group` when given)."""
    from phi1.core.model import PhiForCausalLM

    source = _as_source(path, what)
    config, state = load_state(source, what)
    if config_overrides:
        config = config.replace(**config_overrides)
    with torch.device("meta"):
        model = PhiForCausalLM(config, tp_group=tp_group)
    model = model.to_empty(device=device)
    load_state_dict_into(model, state, source=str(source.directory))
    if dtype is not None:
        model = model.to(dtype)
    return model


def _contained_file(directory: Path, name: str) -> Path | None:
    if not os.path.lexists(directory / name):
        return None
    resolved = inside(directory, name, "tokenizer file")
    regular_file(resolved, directory / name)
    return directory / name


def tokenizer_files(directory: str | os.PathLike) -> dict[str, Path]:
    """{name: path} of the tokenizer files in a model or checkpoint directory (each a regular file inside it).

    Raises:
        ValueError: a tokenizer file that leaves the directory or is not a regular file.
    """
    directory = Path(directory)
    found = {name: _contained_file(directory, name) for name in TOKENIZER_FILES}
    return {name: path for name, path in found.items() if path is not None}


def find_tokenizer(path_or_source: str | os.PathLike | ModelSource, what: str = "--model") -> tuple[str, str] | None:
    """(tokenizer_type, tokenizer_model) of the tokenizer stored with a model (in the checkpoint, for a training
    run), or None. Looks for tokenizer.model (SentencePiece), tokenizer.json (HuggingFace), vocab.json +
    merges.txt (GPT-2 BPE), in that order."""
    source = _as_source(path_or_source, what)
    files = tokenizer_files(source.directory)
    if "tokenizer.model" in files:
        return "SentencePieceTokenizer", str(files["tokenizer.model"])
    if "tokenizer.json" in files:
        return "HuggingFaceTokenizer", str(files["tokenizer.json"])
    if "vocab.json" in files and "merges.txt" in files:
        return "GPT2BPETokenizer", str(source.directory)
    return None


def load_tokenizer(path_or_source: str | os.PathLike | ModelSource, tokenizer_type: str | None = None,
                   tokenizer_model: str | None = None, what: str = "--model"):
    """The tokenizer named by `tokenizer_type`/`tokenizer_model`, else the one stored with the model.

    Raises:
        ValueError: neither is there (says which options to pass).
    """
    from phi1.data.tokenizers import build_tokenizer

    if tokenizer_type is None:
        source = _as_source(path_or_source, what)
        found = find_tokenizer(source)
        if found is None:
            raise ValueError(f"{source.directory}: no tokenizer.model, tokenizer.json or vocab.json+merges.txt inside; "
                             "pass --tokenizer-type and --tokenizer-model")
        tokenizer_type, found_model = found
        tokenizer_model = tokenizer_model or found_model
    return build_tokenizer(tokenizer_type, tokenizer_model)
