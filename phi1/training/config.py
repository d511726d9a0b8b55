"""The one configuration source of a training run: nested typed dataclasses, YAML files, `key.sub=value`
overrides, validated in one function before any process-group work, and saved as YAML beside every checkpoint.

    python -m phi1.train --config configs/pretrain_phi1.yaml optim.lr=5e-4 batch.micro_batch_size=4

Every override is typed by the dataclass field it names (`parallel.tensor_parallel=2` is an int,
`optim.betas=[0.9,0.95]` a pair of floats); an unknown key is an error that names it. The `model` section is a
preset name plus any `ModelConfig` field (`model.n_layer=2`), so the model's fields are declared once, in
`phi1.core.config`.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from phi1.core.config import PRESETS, ModelConfig, get_preset
from phi1.ops.loader import MODES as FUSED_OPS_MODES

PRECISIONS = ("fp32", "bf16", "fp16")
DECAYS = ("linear", "cosine", "constant")
OPTIMIZER_IMPLS = ("auto", "torch", "torch-fused", "apex")


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the option."""


@dataclass
class ModelSection:
    """A preset plus overrides of any ModelConfig field (given flat: `model.n_layer=2`)."""

    preset: str = "phi-1"
    """Name of a preset in phi1.core.config.PRESETS; ignored for the architecture when finetune.init_from is set."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """ModelConfig fields that differ from the preset (written flat in YAML, beside `preset`)."""

    def build(self) -> ModelConfig:
        """The ModelConfig of the preset with the overrides applied (validated by ModelConfig)."""
        try:
            return get_preset(self.preset, **self.overrides)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model: {e}") from None


@dataclass
class DataSection:
    """Pretraining data: indexed datasets written by tools/preprocess_data.py."""

    path: str | None = None
    """Dataset prefix, or weighted prefixes to blend: '0.8 data/code_text_document 0.2 data/book_text_document'."""
    split: str = "969,30,1"
    """Train, validation and test proportions of the documents."""
    seq_len: int = 2048
    """Tokens per training sample (the model's context during training)."""
    tokenizer_type: str = "HuggingFaceTokenizer"
    """Tokenizer class name: SentencePieceTokenizer, HuggingFaceTokenizer or GPT2BPETokenizer."""
    tokenizer_model: str | None = None
    """The tokenizer file or directory; copied into every checkpoint, sets the vocabulary when model.vocab_size is not given."""
    cache_dir: str | None = None
    """Where the sample-index arrays are cached; default beside each dataset prefix."""
    num_workers: int = 0
    """DataLoader worker processes per rank (0 reads in the training process)."""


@dataclass
class ParallelSection:
    """How the processes split the work."""

    tensor_parallel: int = 1
    """Ranks that split every layer (adjacent ranks, ideally one NVLink island)."""
    sequence_parallel: bool = False
    """Keep LayerNorm / dropout activations split along the sequence across the TP group (needs tensor_parallel > 1)."""
    zero_stage: int = 0
    """0: torch DDP with replicated optimizer; 1, 2, 3: DeepSpeed ZeRO stage over the data-parallel group."""
    ddp_bucket_mb: float = 25.0
    """Gradient all-reduce bucket size of DDP, MB."""


@dataclass
class OptimSection:
    """AdamW and gradient clipping."""

    lr: float = 1e-3
    """Peak learning rate (reached at the end of warmup)."""
    min_lr: float = 1e-4
    """Floor that the decay ends at."""
    betas: tuple[float, float] = (0.9, 0.98)
    """Adam betas (phi-1.5's; the phi-1 paper does not state them)."""
    eps: float = 1e-7
    """Adam epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay of matrices and embeddings (none on biases and LayerNorms)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping (the norm is still logged)."""
    impl: str = "auto"
    """'auto' (torch fused on CUDA, torch foreach elsewhere), 'torch', 'torch-fused' or 'apex' (FusedAdam)."""


@dataclass
class ScheduleSection:
    """Learning-rate schedule, in optimizer steps."""

    train_steps: int = 36000
    """Optimizer steps of the run (the schedule ends here)."""
    warmup_steps: int = 750
    """Linear warmup from 0 to optim.lr over these steps."""
    decay: str = "linear"
    """Decay after warmup, down to optim.min_lr at train_steps: 'linear', 'cosine' or 'constant'."""


@dataclass
class BatchSection:
    """Batch sizes, in sequences; gradient accumulation = global / (micro x data-parallel size)."""

    global_batch_size: int = 1024
    """Sequences per optimizer step, summed over all data-parallel ranks."""
    micro_batch_size: int = 8
    """Sequences per forward/backward on one rank."""


@dataclass
class LossScaleSection:
    """Dynamic loss scaling for precision fp16."""

    initial_scale: float = 2.0**16
    """Loss scale of the first step."""
    growth_interval: int = 1000
    """Steps without overflow after which the scale doubles."""
    min_scale: float = 1.0
    """The scale never drops below this."""


@dataclass
class CheckpointSection:
    """Where and when checkpoints are written, and what is kept."""

    dir: str = "checkpoints/phi1"
    """Run directory: iter_NNNNNNN/ checkpoints, the `latest` and `best` pointers."""
    interval: int = 1000
    """Save every this many steps (and at the end); 0 saves only at the end."""
    keep_last: int = 2
    """Keep this many most recent checkpoints (0 keeps all)."""
    keep_best: bool = True
    """Also keep the checkpoint with the lowest validation loss."""
    resume: bool = True
    """Continue from the `latest` checkpoint of `dir` when there is one."""
    load: str | None = None
    """Resume from this checkpoint (iter_ directory or run directory) instead; new checkpoints still go to `dir`."""
    exit_at_iteration: int | None = None
    """Save a checkpoint and stop once this iteration is done (time-limited jobs); the schedule is unchanged."""
    fallback: bool = False
    """When the checkpoint to resume from fails its manifest check, resume from the previous complete one (else stop)."""


@dataclass
class LoggingSection:
    """Metrics every `interval` steps to the console, TensorBoard and a JSONL file (rank 0)."""

    interval: int = 10
    """Log every this many steps."""
    tensorboard_dir: str | None = None
    """TensorBoard event directory; default {checkpoint.dir}/tensorboard; '' disables."""
    jsonl: str | None = None
    """Metrics file, one JSON object per line; default {checkpoint.dir}/metrics.jsonl; '' disables."""
    peak_tflops: float | None = None
    """Peak dense TFLOP/s of one device, for MFU where the device is not in phi1.training.metrics.PEAK_TFLOPS."""
    wandb_project: str | None = None
    """Also log to this Weights & Biases project (needs `pip install wandb`); None disables."""
    wandb_mode: str = "online"
    """W&B mode: 'online', 'offline' (no network; sync later with `wandb sync`) or 'disabled'."""
    wandb_run_name: str | None = None
    """W&B run name; default the name of checkpoint.dir."""


@dataclass
class ProfilingSection:
    """torch.profiler traces of a chosen range of steps (rank 0), viewable in TensorBoard or Perfetto."""

    steps: list[int] = field(default_factory=list)
    """[first, last] iterations to trace (inclusive), e.g. [5, 7]; empty disables profiling."""
    dir: str | None = None
    """Where the traces go; default {checkpoint.dir}/profile."""
    record_shapes: bool = False
    """Record operator input shapes (larger traces)."""
    profile_memory: bool = False
    """Record tensor allocations (larger traces)."""


@dataclass
class EvalSection:
    """Validation loss on the validation split."""

    interval: int = 1000
    """Evaluate every this many steps (and at the end); 0 disables."""
    iters: int = 10
    """Micro-batches per data-parallel rank per evaluation (the same samples every time)."""


@dataclass
class FinetuneSection:
    """Fine-tuning on CodeExercises-shaped data: {"prompt": signature + docstring, "solution": body}."""

    init_from: str | None = None
    """Pretrained weights: a phi1 / HuggingFace model directory or a phi1 training checkpoint (fresh optimizer and schedule)."""
    data: str | None = None
    """JSONL file of exercises; replaces data.path."""
    loss_on_solution_only: bool = True
    """Take the loss on solution tokens only (the prompt is context)."""
    prompt_key: str = "prompt"
    """JSON key of the prompt."""
    solution_key: str = "solution"
    """JSON key of the solution."""


@dataclass
class FaultsSection:
    """Fault injection, for tests of the recovery paths; leave empty in real runs."""

    inject_overflow_at: list[int] = field(default_factory=list)
    """Iterations whose gradients are overwritten with inf (exercises fp16 overflow skipping)."""
    kill_during_save_at: int | None = None
    """SIGKILL this process half-way through writing the checkpoint of this iteration."""
    kill_at_iteration: int | None = None
    """SIGKILL rank `kill_rank` right after this iteration's step, in the first launch only (torchrun restarts)."""
    kill_rank: int = 0
    """The rank that kill_at_iteration kills."""
    inject_nan_at: list[int] = field(default_factory=list)
    """Iterations whose gradient of `inject_nan_param` is overwritten with NaN (exercises the non-finite guard)."""
    inject_nan_param: str = "layers.0.mlp.fc1.weight"
    """The parameter whose gradient inject_nan_at poisons (and whose weights inject_nan_weights_at poison)."""
    inject_nan_weights_at: list[int] = field(default_factory=list)
    """Iterations after whose update one element of `inject_nan_param` is set to NaN (exercises the weight check before saves)."""


@dataclass
class GuardSection:
    """What the loop does about non-finite losses and gradients (see phi1.training.fault)."""

    max_consecutive_nonfinite: int = 5
    """Stop the run after this many consecutive skipped non-finite steps, with a diagnosis; 0 never stops."""


@dataclass
class TrainConfig:
    """Everything a training run reads."""

    model: ModelSection = field(default_factory=ModelSection)
    """Model architecture."""
    data: DataSection = field(default_factory=DataSection)
    """Pretraining data and tokenizer."""
    parallel: ParallelSection = field(default_factory=ParallelSection)
    """Parallel layout."""
    optim: OptimSection = field(default_factory=OptimSection)
    """Optimizer."""
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    """Learning-rate schedule and run length."""
    batch: BatchSection = field(default_factory=BatchSection)
    """Batch sizes."""
    loss_scale: LossScaleSection = field(default_factory=LossScaleSection)
    """fp16 loss scaling."""
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    """Checkpoints."""
    logging: LoggingSection = field(default_factory=LoggingSection)
    """Metrics."""
    eval: EvalSection = field(default_factory=EvalSection)
    """Validation."""
    finetune: FinetuneSection = field(default_factory=FinetuneSection)
    """Fine-tuning."""
    faults: FaultsSection = field(default_factory=FaultsSection)
    """Fault injection (tests)."""
    guard: GuardSection = field(default_factory=GuardSection)
    """Non-finite loss / gradient handling."""
    profiling: ProfilingSection = field(default_factory=ProfilingSection)
    """torch.profiler traces."""
    precision: str = "fp32"
    """'fp32', 'bf16' (autocast, no scaler) or 'fp16' (autocast with dynamic loss scaling)."""
    activation_checkpointing: bool = False
    """Recompute each block in the backward instead of keeping its activations."""
    loss_chunk_size: int = 0
    """Tokens per chunk of the fused lm_head + loss, which never holds the micro-batch's whole logits (0: off;
    used at tensor_parallel 1, where the vocab-parallel loss does not already split them; not with ZeRO-3)."""
    fused_ops: str = "auto"
    """csrc/fused_ops (bias + gelu, rotary on q/k/v): 'auto' builds and uses them on CUDA, falling back to the
    PyTorch references with a warning; 'on' fails at start-up if they cannot be built; 'off' never uses them."""
    seed: int = 1234
    """Seed of weight init, dropout and data order."""

    # -- derived -------------------------------------------------------------------------------------------------

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // self.parallel.tensor_parallel

    def grad_accum_steps(self, world_size: int) -> int:
        """Micro-batches per rank per optimizer step."""
        return self.batch.global_batch_size // (self.batch.micro_batch_size * self.data_parallel_size(world_size))

    def to_dict(self) -> dict:
        """Plain dict (YAML-ready) with the model overrides written flat beside the preset."""
        values = dataclasses.asdict(self)
        model = values.pop("model")
        values = {"model": {"preset": model["preset"], **model["overrides"]}, **values}
        values["optim"]["betas"] = list(values["optim"]["betas"])
        return values

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(self.to_yaml())


# ----------------------------------------------------------------------------------------------------------------
# Building from YAML and overrides


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """`value` converted to the type `hint`, or ConfigError naming `key`."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if hint is Any:
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and len(args) == 2 and args[1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {list(value)!r}")
            return tuple(_coerce(v, a, key) for v, a in zip(value, args))
        item = args[0] if args else Any
        converted = [_coerce(v, item, key) for v in value]
        return tuple(converted) if origin is tuple else converted
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value).replace("_", ""))
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if hint is str:
        if isinstance(value, bool):
            # YAML 1.1 reads on/off/yes/no/true/false as booleans; the string options spell them on / off.
            return "on" if value else "off"
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported field type {hint}")


_MODEL_FIELDS = {f.name: f for f in dataclasses.fields(ModelConfig)}


def _set_model_field(section: ModelSection, name: str, value: Any, key: str) -> None:
    if name == "preset":
        section.preset = _coerce(value, str, key)
        return
    if name not in _MODEL_FIELDS or name == "name":
        known = sorted(n for n in _MODEL_FIELDS if n != "name")
        raise ConfigError(f"{key}: unknown model field; use model.preset or one of the ModelConfig fields {known}")
    hint = typing.get_type_hints(ModelConfig)[name]
    section.overrides[name] = _coerce(value, hint, key)


def _set(config: TrainConfig, dotted: str, value: Any) -> None:
    """Set the field at `dotted` (e.g. 'optim.lr') from a YAML value or a command-line string."""
    parts = dotted.split(".")
    if parts[0] == "model" and len(parts) == 2:
        _set_model_field(config.model, parts[1], value, dotted)
        return
    target: Any = config
    for depth, name in enumerate(parts):
        hints = _hints(type(target))
        if name not in hints or (isinstance(target, ModelSection)):
            where = ".".join(parts[:depth]) or "the top level"
            raise ConfigError(f"{dotted}: unknown option; {where} has {sorted(hints)}")
        if depth == len(parts) - 1:
            if dataclasses.is_dataclass(hints[name]) or isinstance(getattr(target, name), (ModelSection,)):
                raise ConfigError(f"{dotted}: is a section; set one of its fields ({dotted}.FIELD=VALUE)")
            setattr(target, name, _coerce(value, hints[name], dotted))
            return
        target = getattr(target, name)
        if not dataclasses.is_dataclass(target):
            raise ConfigError(f"{'.'.join(parts[: depth + 1])}: is not a section; cannot set {dotted}")


def _flatten(values: dict, prefix: str = "") -> list[tuple[str, Any]]:
    items = []
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and dotted != "model.overrides":
            items.extend(_flatten(value, dotted + "."))
        else:
            items.append((dotted, value))
    return items


def config_from_dict(values: dict, source: str = "config") -> TrainConfig:
    """A TrainConfig from nested plain values (as read from YAML); unknown keys raise ConfigError."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level")
    config = TrainConfig()
    for dotted, value in _flatten(values):
        if dotted.startswith("model.overrides"):
            for name, item in (value or {}).items():
                _set_model_field(config.model, name, item, f"model.{name}")
            continue
        try:
            _set(config, dotted, value)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
    return config


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Defaults, then the YAML file at `path`, then `key.sub=value` overrides in order.

    Raises:
        ConfigError: an unknown key, a value of the wrong type, an override without '='.
        FileNotFoundError: `path` does not exist.
    """
    if path is not None:
        try:
            values = yaml.safe_load(Path(path).read_bytes().decode("utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        config = config_from_dict(values or {}, source=str(path))
    else:
        config = TrainConfig()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. optim.lr=3e-4")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw  # not a YAML value: the field's type decides (and names the key if it cannot)
        if isinstance(value, str) or value is None:
            value = raw  # keep strings as typed ('1e-3' and 'None' are coerced by the field's type)
        _set(config, key.strip(), value)
    return config


# ----------------------------------------------------------------------------------------------------------------
# Validation: the one place that decides whether a run can start


def validate_config(config: TrainConfig, world_size: int, *, check_files: bool = True) -> ModelConfig:
    """Check the whole configuration for `world_size` processes; return the ModelConfig it trains.

    Runs before any process group is created, so an impossible layout fails every rank at once with the same
    message. `check_files=False` skips the existence of data and tokenizer files (dry runs planned elsewhere).

    Raises:
        ConfigError: naming the option that is wrong and what would fix it.
    """

    def fail(option: str, why: str) -> None:
        raise ConfigError(f"{option}: {why}")

    if config.model.preset not in PRESETS and config.finetune.init_from is None:
        fail("model.preset", f"unknown preset {config.model.preset!r}; known presets are {sorted(PRESETS)}")
    model_config = config.model.build()
    par = config.parallel
    tp = par.tensor_parallel
    if tp < 1:
        fail("parallel.tensor_parallel", f"must be >= 1, got {tp}")
    if world_size % tp != 0:
        fail("parallel.tensor_parallel", f"{tp} does not divide the {world_size} launched processes")
    try:
        model_config.validate(tensor_parallel_size=tp)
    except ValueError as e:
        fail("parallel.tensor_parallel", f"{tp} does not fit the model: {e}")
    if par.sequence_parallel and tp == 1:
        fail("parallel.sequence_parallel", "needs parallel.tensor_parallel > 1")
    if par.zero_stage not in (0, 1, 2, 3):
        fail("parallel.zero_stage", f"must be 0 (DDP), 1, 2 or 3, got {par.zero_stage}")
    if config.fused_ops not in FUSED_OPS_MODES:
        fail("fused_ops", f"must be one of {FUSED_OPS_MODES}, got {config.fused_ops!r}")
    if config.loss_chunk_size < 0:
        fail("loss_chunk_size", f"must be >= 0 (0: off), got {config.loss_chunk_size}")
    if config.loss_chunk_size > 0 and par.zero_stage == 3:
        fail("loss_chunk_size", "cannot be used with ZeRO-3, which gathers the lm_head only inside its own forward")
    if par.sequence_parallel and par.zero_stage >= 2:
        fail("parallel.sequence_parallel", "is not supported with ZeRO stage 2 or 3; use zero_stage 0 or 1")
    if par.ddp_bucket_mb <= 0:
        fail("parallel.ddp_bucket_mb", f"must be > 0, got {par.ddp_bucket_mb}")

    if config.precision not in PRECISIONS:
        fail("precision", f"must be one of {PRECISIONS}, got {config.precision!r}")
    ls = config.loss_scale
    if ls.initial_scale <= 0 or ls.min_scale <= 0 or ls.growth_interval < 1:
        fail("loss_scale", "initial_scale and min_scale must be > 0 and growth_interval >= 1")

    dp = world_size // tp
    batch = config.batch
    if batch.micro_batch_size < 1:
        fail("batch.micro_batch_size", f"must be >= 1, got {batch.micro_batch_size}")
    if batch.global_batch_size < 1 or batch.global_batch_size % (batch.micro_batch_size * dp) != 0:
        fail(
            "batch.global_batch_size",
            f"{batch.global_batch_size} is not a multiple of micro_batch_size x data-parallel size = "
            f"{batch.micro_batch_size} x {dp}; gradient accumulation must be a whole number of micro-batches",
        )

    data = config.data
    if data.seq_len < 1:
        fail("data.seq_len", f"must be >= 1, got {data.seq_len}")
    if data.seq_len > model_config.max_seq_len:
        fail("data.seq_len", f"{data.seq_len} exceeds model max_seq_len {model_config.max_seq_len}; set model.max_seq_len")
    if data.num_workers < 0:
        fail("data.num_workers", f"must be >= 0, got {data.num_workers}")

    opt = config.optim
    if opt.lr <= 0:
        fail("optim.lr", f"must be > 0, got {opt.lr}")
    if not 0 <= opt.min_lr <= opt.lr:
        fail("optim.min_lr", f"must be in [0, optim.lr={opt.lr}], got {opt.min_lr}")
    if not all(0 <= b < 1 for b in opt.betas):
        fail("optim.betas", f"each must be in [0, 1), got {opt.betas}")
    if opt.eps <= 0:
        fail("optim.eps", f"must be > 0, got {opt.eps}")
    if opt.weight_decay < 0:
        fail("optim.weight_decay", f"must be >= 0, got {opt.weight_decay}")
    if opt.grad_clip < 0:
        fail("optim.grad_clip", f"must be >= 0 (0 disables), got {opt.grad_clip}")
    if opt.impl not in OPTIMIZER_IMPLS:
        fail("optim.impl", f"must be one of {OPTIMIZER_IMPLS}, got {opt.impl!r}")

    sched = config.schedule
    if sched.train_steps < 1:
        fail("schedule.train_steps", f"must be >= 1, got {sched.train_steps}")
    if not 0 <= sched.warmup_steps <= sched.train_steps:
        fail("schedule.warmup_steps", f"must be in [0, train_steps={sched.train_steps}], got {sched.warmup_steps}")
    if sched.decay not in DECAYS:
        fail("schedule.decay", f"must be one of {DECAYS}, got {sched.decay!r}")

    ckpt = config.checkpoint
    for name in ("interval", "keep_last"):
        if getattr(ckpt, name) < 0:
            fail(f"checkpoint.{name}", f"must be >= 0, got {getattr(ckpt, name)}")
    if ckpt.exit_at_iteration is not None and not 1 <= ckpt.exit_at_iteration <= sched.train_steps:
        fail("checkpoint.exit_at_iteration", f"must be in [1, schedule.train_steps={sched.train_steps}]")
    if config.logging.interval < 1:
        fail("logging.interval", f"must be >= 1, got {config.logging.interval}")
    if config.logging.peak_tflops is not None and config.logging.peak_tflops <= 0:
        fail("logging.peak_tflops", f"must be > 0, got {config.logging.peak_tflops}")
    if config.eval.interval < 0 or config.eval.iters < 0:
        fail("eval", "interval and iters must be >= 0")
    if config.guard.max_consecutive_nonfinite < 0:
        fail("guard.max_consecutive_nonfinite", f"must be >= 0 (0 never stops), got {config.guard.max_consecutive_nonfinite}")
    faults = config.faults
    if faults.kill_at_iteration is not None and not 0 <= faults.kill_rank < world_size:
        fail("faults.kill_rank", f"{faults.kill_rank} is not a rank of the {world_size} launched processes")

    ft = config.finetune
    if ft.data is None and data.path is None:
        fail("data.path", "no training data: set data.path (indexed dataset prefixes) or finetune.data (JSONL)")
    if check_files:
        if ft.data is not None and not Path(ft.data).is_file():
            fail("finetune.data", f"{ft.data}: no such file; build one with tools/build_exercises.py")
        if ft.data is None:
            from phi1.data.gpt_dataset import parse_data_path
            from phi1.data.indexed_dataset import dataset_exists

            try:
                prefixes, _ = parse_data_path(data.path)
            except ValueError as e:
                fail("data.path", str(e))
            for prefix in prefixes:
                if not dataset_exists(prefix):
                    fail("data.path", f"{prefix}.bin/.idx not found; write them with tools/preprocess_data.py")
        if data.tokenizer_model is None:
            fail("data.tokenizer_model", "needed to read the data and to make the checkpoints usable for generation")
        if not Path(data.tokenizer_model).exists():
            fail("data.tokenizer_model", f"{data.tokenizer_model}: no such file or directory")
        if ft.init_from is not None and not Path(ft.init_from).exists():
            fail("finetune.init_from", f"{ft.init_from}: no such directory")
        if ckpt.load is not None and not Path(ckpt.load).exists():
            fail("checkpoint.load", f"{ckpt.load}: no such directory")
    return model_config


def default_paths(config: TrainConfig) -> tuple[str | None, str | None]:
    """(TensorBoard dir, JSONL path) after applying the defaults under checkpoint.dir; None where disabled."""
    tb = config.logging.tensorboard_dir
    jsonl = config.logging.jsonl
    tb = os.path.join(config.checkpoint.dir, "tensorboard") if tb is None else (tb or None)
    jsonl = os.path.join(config.checkpoint.dir, "metrics.jsonl") if jsonl is None else (jsonl or None)
    return tb, jsonl


__all__ = [
    "BatchSection",
    "CheckpointSection",
    "ConfigError",
    "DataSection",
    "EvalSection",
    "FaultsSection",
    "FinetuneSection",
    "GuardSection",
    "LoggingSection",
    "LossScaleSection",
    "ModelSection",
    "OptimSection",
    "ParallelSection",
    "ScheduleSection",
    "TrainConfig",
    "config_from_dict",
    "default_paths",
    "load_config",
    "validate_config",
]
