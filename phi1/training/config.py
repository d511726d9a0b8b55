"""The one configuration source of a training run: nested typed dataclasses, YAML files, `key.sub=value`
overrides, validated in one function before any process-group work, and saved as YAML beside every checkpoint.

    python -m phi1.train --config configs/pretrain_phi1.yaml optim.lr=5e-4 batch.micro_batch_size=4
    python -m phi1.train --help-config          # every field: dotted name, type, default, one-line doc

Every value, from a file or an override, is typed by the dataclass field it names (`parallel.tensor_parallel=2`
is an int, `optim.betas=[0.9,0.95]` a pair of floats, `schedule.decay=cosine` one of its Literal choices) by
jsonargparse, a library made for YAML configs of typed dataclasses with dotted overrides; an unknown key is an
error that names it and the closest option. The `model` section is a preset name plus any `ModelConfig` field
(`model.n_layer=2`), so the model's fields are declared once, in `phi1.core.config`.

Why jsonargparse and not tyro (torchtitan's choice): tyro parses a command line of `--optim.lr 3e-4` flags and
exits on the first bad one with a formatted box, while phi1 reads YAML values (already typed by the YAML loader)
and `key.sub=value` words, and must list every problem of a file and its overrides at once, one line each;
jsonargparse types a nested mapping of YAML values or strings (`parse_object`) against the same dataclasses,
raises instead of exiting, and lets its string loader be replaced. What phi1 keeps of its own, and why:
  - reading the file (ConfigLoader, below) and `[...]` override values: the library must never see a tag, an
    alias or unbounded nesting, and the refusal names the file, line and column;
  - naming unknown keys, with the closest option (difflib): jsonargparse stops at the first and suggests none;
  - the words of a refused value ('expected an integer, got ...'), written from the field's type, and a check
    that numbers are finite (jsonargparse's float takes nan and inf, which no config means);
  - three spellings older configs use (see `_compatible`): `fused_ops: off` (a YAML 1.1 boolean given to a
    string field), `checkpoint.load=none`, `profiling.steps=5,7`.
`--help-config` stays generated from the same dataclasses (field docstrings), so the options have one source.

Bad input is reported all at once: `load_config` collects every unknown key and badly typed value of the file
and the overrides, `validate_config` every out-of-range or contradictory setting (and a size whose memory
cannot fit the device, with the planner's estimate), and each raises one ConfigError that lists them, one line
per problem, so scaling a recipe down takes one launch, not one per field.

Config files are read with yaml.SafeLoader (no Python objects are ever constructed), through a subclass that
also refuses anchors and aliases (configs have no use for them, and they are what YAML "billion laughs" bombs
and recursive documents are made of), explicit tags other than the standard ones, duplicate keys, nesting
deeper than 16 levels and files over 1 MiB.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import math
import os
import re
import stat
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import jsonargparse
import yaml

from phi1.core.activation_checkpointing import MODES as CHECKPOINTING_MODES
from phi1.core.activation_checkpointing import activation_checkpointing_mode
from phi1.core.config import PRESETS, ModelConfig, number_problem
from phi1.data.tokenizers import TOKENIZER_TYPES
from phi1.ops.loader import MODES as FUSED_OPS_MODES
from phi1.parallel.pipeline import SCHEDULES as PIPELINE_SCHEDULES
from phi1.training.precision import PRECISIONS, default_device_type, precision_problem, resolve_precision

PRECISION_CHOICES = ("auto", *PRECISIONS)
TOKENIZER_TYPE_CHOICES = ("auto", *TOKENIZER_TYPES)
DECAYS = ("linear", "cosine", "constant")
OPTIMIZER_IMPLS = ("auto", "torch", "torch-fused", "apex")
WANDB_MODES = ("online", "offline", "disabled")
DEVICE_TYPES = ("cpu", "cuda")

MAX_CONFIG_BYTES = 1 << 20
"""Largest config file read (a real one is a few KiB)."""
MAX_CONFIG_DEPTH = 16
"""Deepest nesting of mappings and lists accepted in a config (a real one has 2 or 3 levels)."""
MAX_WORKERS_PER_CORE = 4
"""data.num_workers may be at most this many times the machine's CPU cores."""
MAX_LISTED_PROBLEMS = 50
"""A ConfigError lists at most this many problems, then says how many more there are."""
MAX_WORLD_SIZE = 2**20
"""Processes of a run at most (a sanity bound far beyond any cluster)."""
MAX_TRAIN_SAMPLES = 2**32
"""schedule.train_steps x batch.global_batch_size at most (the sample index of the run is built up front)."""
ZERO_STAGES = (0, 1, 2, 3)
"""Values of `parallel.zero_stage`."""
LOSS_SCALE_RANGE = {"integer": False, "low": 0, "high": 2.0**64, "low_open": True}
"""Range of `loss_scale.initial_scale` and `loss_scale.min_scale` (number_problem's bounds)."""


class ParallelLayout(typing.NamedTuple):
    """The sizes of a parallel layout that the checks of other sections need (ParallelSection.check)."""

    tensor: int
    """parallel.tensor_parallel; 1 when out of range."""
    tensor_ok: bool
    """Whether parallel.tensor_parallel is in range and divides the launched processes."""
    pipeline: int
    """parallel.pipeline_parallel; 1 when out of range or when tensor x pipeline does not divide the processes."""
    data: int
    """Data-parallel ranks: processes / (tensor x pipeline)."""
    virtual: int
    """parallel.virtual_stages; 1 when out of range."""
    zero_ok: bool
    """Whether parallel.zero_stage is one of ZERO_STAGES."""


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


class ConfigError(ValueError):
    """A configuration that cannot run: one or more problems, each naming its option and what to do.

    `problems` holds one line per problem; the message is that line when there is one, else a count followed
    by the lines, indented.
    """

    def __init__(self, problems: str | list[str] | tuple[str, ...]) -> None:
        # One line each, whatever a hostile value or path put in them (newlines, terminal escapes).
        self.problems = [_printable(line) for line in ([problems] if isinstance(problems, str) else problems)]
        if len(self.problems) > MAX_LISTED_PROBLEMS:  # a file of 100,000 unknown keys gets a readable answer
            hidden = len(self.problems) - MAX_LISTED_PROBLEMS
            self.problems = self.problems[:MAX_LISTED_PROBLEMS] + [f"... and {hidden:,} more problems like these"]
        if len(self.problems) == 1:
            message = self.problems[0]
        else:
            message = (f"{len(self.problems)} problems in the configuration (all listed; fix them together):\n  "
                       + "\n  ".join(self.problems))
        super().__init__(message)

    def __reduce__(self):
        return (type(self), (self.problems,))


@dataclass
class ModelSection:
    """A preset plus overrides of any ModelConfig field (given flat: `model.n_layer=2`)."""

    preset: str = "phi-1"
    """Name of a preset in phi1.core.config.PRESETS; ignored for the architecture when finetune.init_from is set."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """ModelConfig fields that differ from the preset (written flat in YAML, beside `preset`)."""

    def values(self) -> dict[str, Any]:
        """The ModelConfig fields: the preset's, then the overrides (unvalidated)."""
        return {**PRESETS.get(self.preset, {}), "name": self.preset, **self.overrides}

    def problems(self, tensor_parallel: int = 1) -> list[str]:
        """Every problem of the model fields, one line each named `model.FIELD`; empty when it builds."""
        if self.preset not in PRESETS:
            return [f"model.preset: unknown preset {self.preset!r}; known presets are {sorted(PRESETS)}"]
        config = ModelConfig.unvalidated(**self.values())
        alone = config.problems()
        lines = [f"model.{name}: {why}" for name, why in alone]
        lines += [f"parallel.tensor_parallel: {tensor_parallel} does not split the model: model.{name} {why}"
                  for name, why in config.problems(tensor_parallel) if (name, why) not in alone]
        return lines

    def build(self) -> ModelConfig:
        """The ModelConfig of the preset with the overrides applied.

        Raises:
            ConfigError: listing every bad model field.
        """
        problems = self.problems()
        if problems:
            raise ConfigError(problems)
        return ModelConfig(**self.values())


@dataclass
class DataSection:
    """Pretraining data: indexed datasets written by tools/preprocess_data.py."""

    path: str | None = None
    """Dataset prefix, or weighted prefixes to blend: '0.8 data/code_text_document 0.2 data/book_text_document'."""
    split: str = "969,30,1"
    """Train, validation and test proportions of the documents."""
    seq_len: int = 2048
    """Tokens per training sample (the model's context during training)."""
    tokenizer_type: Literal[TOKENIZER_TYPE_CHOICES] = "auto"
    """'auto' (inferred from data.tokenizer_model: a SentencePiece .model, a tokenizer.json, or a GPT-2
    vocab.json + merges.txt directory), or SentencePieceTokenizer, HuggingFaceTokenizer or GPT2BPETokenizer,
    which must match the file."""
    tokenizer_model: str | None = None
    """The tokenizer file or directory; copied into every checkpoint, sets the vocabulary when model.vocab_size is not given."""
    cache_dir: str | None = None
    """Where the sample-index arrays are cached; default beside each dataset prefix."""
    num_workers: int = 0
    """DataLoader worker processes per rank (0 reads in the training process); at most 4 x the CPU cores."""
    document_mask: bool = False
    """Attention stays inside each document of a packed sample (documents end at the tokenizer's eod token),
    rotary positions restart at each document, and the loss across a boundary is masked (off: the paper's way)."""

    def problems(self) -> list[str]:
        """Problems of the data fields alone, one line each named `data.FIELD`; the tokenizer file, the data
        files and the model's context are checked with the rest of the run, by validate_config."""
        from phi1.data.gpt_dataset import parse_split

        problems: list[str] = []
        _check(problems, "data.seq_len", self.seq_len, integer=True, low=1, high=2**20)
        cores = os.cpu_count() or 1
        _check(problems, "data.num_workers", self.num_workers, integer=True, low=0, high=MAX_WORKERS_PER_CORE * cores)
        try:
            parse_split(self.split)
        except (ValueError, TypeError) as error:
            message = str(error).removeprefix("data.split").removeprefix(":").strip()
            problems.append(f"data.split: {message}")
        return problems


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
    pipeline_parallel: int = 1
    """Pipeline stages the blocks are split into (ranks laid out TP adjacent, then PP, then DP)."""
    pipeline_schedule: Literal[PIPELINE_SCHEDULES] = "1f1b"
    """Pipeline schedule: '1f1b', 'interleaved' (Megatron's, needs virtual_stages >= 2) or 'gpipe' (reference)."""
    virtual_stages: int = 1
    """Model chunks per pipeline rank under the interleaved schedule (bubble (P-1)/(V m + P-1))."""
    pipeline_split: list[int] = field(default_factory=list)
    """Blocks per pipeline stage, e.g. [5, 6, 6, 7] (pipeline_parallel x virtual_stages entries summing to
    model.n_layer); empty: balanced (the remainder goes to the middle stages)."""
    fsdp: bool = False
    """Shard parameters, gradients and optimizer state over the data-parallel ranks with PyTorch FSDP2 (fully_shard
    per block, then the root); composes with tensor_parallel. Not with zero_stage > 0 or pipeline_parallel > 1."""
    fsdp_cpu_offload: bool = False
    """Under parallel.fsdp: keep the sharded parameters, gradients and optimizer state in CPU memory (copied to the
    device for compute; the optimizer steps on the CPU)."""

    def problems(self, world_size: int) -> list[str]:
        """Problems of this layout for `world_size` processes, one line each named `parallel.FIELD`."""
        return self.check(world_size)[0]

    def check(self, world_size: int) -> tuple[list[str], ParallelLayout]:
        """(the problems of this layout for `world_size` processes, the sizes the other checks use).

        A size out of range counts as 1 in the layout, so that the checks which need one still run.
        """
        problems: list[str] = []
        tp_ok = _check_size(problems, "parallel.tensor_parallel", self.tensor_parallel, world_size)
        tp = self.tensor_parallel if tp_ok else 1
        if tp_ok and world_size % tp != 0:
            problems.append(f"parallel.tensor_parallel: {tp} does not divide the {world_size} launched processes")
            tp_ok = False
        pp_ok = _check_size(problems, "parallel.pipeline_parallel", self.pipeline_parallel, world_size)
        pp = self.pipeline_parallel if pp_ok else 1
        if tp_ok and pp_ok and world_size % (tp * pp) != 0:
            problems.append(f"parallel.pipeline_parallel: tensor_parallel x pipeline_parallel = {tp} x {pp} does not "
                            f"divide the {world_size} launched processes")
            pp = 1
        dp = world_size // (tp * pp)
        zero_ok = _check_choice(problems, "parallel.zero_stage", self.zero_stage, ZERO_STAGES)
        if zero_ok and self.zero_stage > 0 and dp < 2:
            problems.append(f"parallel.zero_stage: DeepSpeed ZeRO partitions over the data-parallel ranks, and this "
                            f"run has 1 ({world_size} processes / tensor_parallel {tp}"
                            + (f" / pipeline_parallel {pp}" if pp > 1 else "") + "); use parallel.zero_stage=0 or "
                            "launch more processes")
        if self.sequence_parallel and tp == 1:
            problems.append("parallel.sequence_parallel: needs parallel.tensor_parallel > 1")
        if self.sequence_parallel and self.zero_stage in (2, 3):
            problems.append("parallel.sequence_parallel: is not supported with ZeRO stage 2 or 3; use zero_stage 0 "
                            "or 1")
        _check(problems, "parallel.ddp_bucket_mb", self.ddp_bucket_mb, integer=False, low=0, high=65536,
               low_open=True)
        schedule_ok = _check_choice(problems, "parallel.pipeline_schedule", self.pipeline_schedule,
                                    PIPELINE_SCHEDULES)
        virtual_ok = _check(problems, "parallel.virtual_stages", self.virtual_stages, integer=True, low=1, high=1024)
        virtual = self.virtual_stages if virtual_ok else 1
        if schedule_ok and virtual_ok and self.pipeline_schedule == "interleaved" and virtual < 2:
            problems.append(f"parallel.virtual_stages: the interleaved schedule needs >= 2 model chunks per pipeline "
                            f"rank, got {virtual}; set parallel.virtual_stages=2 or parallel.pipeline_schedule=1f1b")
        if schedule_ok and virtual_ok and self.pipeline_schedule != "interleaved" and virtual != 1:
            problems.append(f"parallel.virtual_stages: {virtual} chunks per rank need parallel.pipeline_schedule="
                            f"interleaved (got {self.pipeline_schedule!r})")
        problems.extend(_fsdp_problems(self, pp, dp, world_size))
        if pp > 1 and zero_ok and self.zero_stage in (2, 3):
            problems.append(f"parallel.zero_stage: ZeRO-{self.zero_stage} cannot be combined with pipeline "
                            "parallelism (DeepSpeed refuses it too: 'ZeRO-2 and ZeRO-3 are incompatible with "
                            "pipeline parallelism'): they partition gradients (ZeRO-3 also weights), so every "
                            "micro-batch's backward would reduce-scatter (and gather) again, once per micro-batch; "
                            "use zero_stage 0 or 1")
        return problems, ParallelLayout(tp, tp_ok, pp, dp, virtual, zero_ok)


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
    impl: Literal[OPTIMIZER_IMPLS] = "auto"
    """'auto' (torch fused on CUDA, torch foreach elsewhere), 'torch', 'torch-fused' or 'apex' (FusedAdam)."""

    def problems(self) -> list[str]:
        """Problems of the optimizer fields, one line each named `optim.FIELD`."""
        problems: list[str] = []
        lr_ok = _check(problems, "optim.lr", self.lr, integer=False, low=0, high=1, low_open=True)
        if _check(problems, "optim.min_lr", self.min_lr, integer=False, low=0, high=1) and lr_ok \
                and self.min_lr > self.lr:
            problems.append(f"optim.min_lr: {self.min_lr:g} is above optim.lr={self.lr:g}; the decay ends at "
                            "min_lr <= lr")
        betas_ok = isinstance(self.betas, tuple) and len(self.betas) == 2
        if not betas_ok or any(number_problem(b, integer=False, low=0, high=1, high_open=True) for b in self.betas):
            problems.append(f"optim.betas: must be two numbers, each in [0, 1), got {self.betas!r}")
        _check(problems, "optim.eps", self.eps, integer=False, low=0, high=1, low_open=True, high_open=True)
        _check(problems, "optim.weight_decay", self.weight_decay, integer=False, low=0, high=1)
        _check(problems, "optim.grad_clip", self.grad_clip, integer=False, low=0, high=1e6)
        _check_choice(problems, "optim.impl", self.impl, OPTIMIZER_IMPLS)
        return problems


@dataclass
class ScheduleSection:
    """Learning-rate schedule, in optimizer steps."""

    train_steps: int = 36000
    """Optimizer steps of the run (the schedule ends here)."""
    warmup_steps: int = 750
    """Linear warmup from 0 to optim.lr over these steps."""
    decay: Literal[DECAYS] = "linear"
    """Decay after warmup, down to optim.min_lr at train_steps: 'linear', 'cosine' or 'constant'."""

    def problems(self) -> list[str]:
        """Problems of the schedule fields, one line each named `schedule.FIELD`."""
        problems: list[str] = []
        steps_ok = _check(problems, "schedule.train_steps", self.train_steps, integer=True, low=1, high=10**9)
        if _check(problems, "schedule.warmup_steps", self.warmup_steps, integer=True, low=0, high=10**9) \
                and steps_ok and self.warmup_steps > self.train_steps:
            problems.append(f"schedule.warmup_steps: {self.warmup_steps} is more than schedule.train_steps="
                            f"{self.train_steps}; lower it (a few percent of the run is usual)")
        _check_choice(problems, "schedule.decay", self.decay, DECAYS)
        return problems


@dataclass
class BatchSection:
    """Batch sizes, in sequences; gradient accumulation = global / (micro x data-parallel size)."""

    global_batch_size: int = 1024
    """Sequences per optimizer step, summed over all data-parallel ranks."""
    micro_batch_size: int = 8
    """Sequences per forward/backward on one rank."""

    def problems(self) -> list[str]:
        """Problems of the batch sizes alone, one line each named `batch.FIELD`; whether they divide into
        micro-batches of the data-parallel ranks is checked with the layout, by validate_config."""
        problems: list[str] = []
        _check(problems, "batch.micro_batch_size", self.micro_batch_size, integer=True, low=1, high=2**20)
        _check(problems, "batch.global_batch_size", self.global_batch_size, integer=True, low=1, high=2**24)
        return problems


@dataclass
class LossScaleSection:
    """Dynamic loss scaling for precision fp16."""

    initial_scale: float = 2.0**16
    """Loss scale of the first step."""
    growth_interval: int = 1000
    """Steps without overflow after which the scale doubles."""
    min_scale: float = 1.0
    """The scale never drops below this."""

    def problems(self) -> list[str]:
        """Problems of the loss-scale fields, one line each named `loss_scale.FIELD`."""
        problems: list[str] = []
        _check(problems, "loss_scale.min_scale", self.min_scale, **LOSS_SCALE_RANGE)
        if _check(problems, "loss_scale.initial_scale", self.initial_scale, **LOSS_SCALE_RANGE) \
                and isinstance(self.min_scale, float) and math.isfinite(self.min_scale) \
                and self.initial_scale < self.min_scale:
            problems.append(f"loss_scale.initial_scale: {self.initial_scale:g} is below loss_scale.min_scale "
                            f"{self.min_scale:g}")
        _check(problems, "loss_scale.growth_interval", self.growth_interval, integer=True, low=1, high=10**9)
        return problems


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
    format: str = "auto"
    """'phi1' (TP shards), 'dcp' (torch.distributed.checkpoint: loads at any TP x PP x DP layout) or 'auto' (dcp
    under parallel.pipeline_parallel > 1 or parallel.fsdp, phi1 otherwise); resume reads either format."""
    async_save: bool = False
    """With the dcp format: write checkpoints in the background while the next steps run."""

    def problems(self) -> list[str]:
        """Problems of the checkpoint fields alone, one line each named `checkpoint.FIELD`; the format against
        the layout, the run directory and checkpoint.load on disk are checked by validate_config."""
        problems: list[str] = []
        _check(problems, "checkpoint.interval", self.interval, integer=True, low=0, high=10**9)
        _check(problems, "checkpoint.keep_last", self.keep_last, integer=True, low=0, high=10**6)
        _check_choice(problems, "checkpoint.format", self.format, CHECKPOINT_FORMATS)
        if self.exit_at_iteration is not None:
            _check(problems, "checkpoint.exit_at_iteration", self.exit_at_iteration, integer=True, low=1, high=10**9)
        if not str(self.dir).strip():
            problems.append("checkpoint.dir: is empty; name the run directory")
        return problems


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
    wandb_mode: Literal[WANDB_MODES] = "online"
    """W&B mode: 'online', 'offline' (no network; sync later with `wandb sync`) or 'disabled'."""
    wandb_run_name: str | None = None
    """W&B run name; default the name of checkpoint.dir."""

    def problems(self) -> list[str]:
        """Problems of the logging fields, one line each named `logging.FIELD`."""
        problems: list[str] = []
        _check(problems, "logging.interval", self.interval, integer=True, low=1, high=10**9)
        if self.peak_tflops is not None:
            _check(problems, "logging.peak_tflops", self.peak_tflops, integer=False, low=0, high=1e6, low_open=True)
        _check_choice(problems, "logging.wandb_mode", self.wandb_mode, WANDB_MODES)
        if self.wandb_project is not None and not self.wandb_project.strip():
            problems.append("logging.wandb_project: is empty; name a W&B project, or leave it unset to disable W&B")
        return problems


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

    def problems(self) -> list[str]:
        """Problems of the traced range alone, named `profiling.steps`; whether it falls inside the run is
        checked by validate_config."""
        if self.steps and (len(self.steps) != 2 or not all(number_problem(s, integer=True, low=1) is None
                                                           for s in self.steps) or self.steps[0] > self.steps[1]):
            return [f"profiling.steps: must be [first, last] iterations with 0 < first <= last, e.g. [5, 7], or [] "
                    f"to disable; got {self.steps!r}"]
        return []


@dataclass
class EvalSection:
    """Validation loss on the validation split."""

    interval: int = 1000
    """Evaluate every this many steps (and at the end); 0 disables."""
    iters: int = 10
    """Micro-batches per data-parallel rank per evaluation (the same samples every time)."""

    def problems(self) -> list[str]:
        """Problems of the evaluation fields, one line each named `eval.FIELD`."""
        problems: list[str] = []
        _check(problems, "eval.interval", self.interval, integer=True, low=0, high=10**9)
        _check(problems, "eval.iters", self.iters, integer=True, low=0, high=10**6)
        return problems


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
    select_by: str = "none"
    """'none' or 'pass@1': at the end, score each kept checkpoint on select_problems in the sandbox and write `selected` and selection.json (phi1.training.checkpoint_selection)."""
    select_problems: str | None = None
    """Held-out exercises JSONL for select_by, one {"prompt", "tests"} object a line (not in the fine-tuning data)."""

    def problems(self) -> list[str]:
        """Problems of the fine-tuning fields alone, one line each named `finetune.FIELD`; the files and
        checkpoint selection (which needs the checkpoint section) are checked by validate_config."""
        return [f"finetune.{option}: is empty; name the JSON key" for option in ("prompt_key", "solution_key")
                if not getattr(self, option)]


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

    def problems(self) -> list[str]:
        """Problems of the injection points alone, named `faults.FIELD`; kill_rank against the launched ranks is
        checked by validate_config."""
        problems: list[str] = []
        for name in ("inject_overflow_at", "inject_nan_at", "inject_nan_weights_at"):
            for step in getattr(self, name, []):
                _check(problems, f"faults.{name}", step, integer=True, low=1, high=10**9)
        return problems


@dataclass
class GuardSection:
    """What the loop does about non-finite losses and gradients (see phi1.training.fault)."""

    max_consecutive_nonfinite: int = 5
    """Stop the run after this many consecutive skipped non-finite steps, with a diagnosis; 0 never stops."""

    def problems(self) -> list[str]:
        """Problems of the guard fields, named `guard.FIELD`."""
        problems: list[str] = []
        _check(problems, "guard.max_consecutive_nonfinite", self.max_consecutive_nonfinite, integer=True, low=0,
               high=10**9)
        return problems


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
    precision: Literal[PRECISION_CHOICES] = "auto"
    """'auto' (bf16 on GPUs that have it, fp16 with loss scaling on older GPUs, fp32 on CPU), 'fp32', 'bf16'
    (autocast, no scaler) or 'fp16' (autocast with dynamic loss scaling; GPUs only)."""
    activation_checkpointing: str = "none"
    """'none'; 'full' (each block keeps only its input and runs again in the backward; true means full);
    'selective' (keeps matmul and attention outputs, recomputes the cheap ops between them)."""
    activation_checkpointing_every: int = 1
    """Under activation_checkpointing=full, checkpoint every k-th block only (1: every block)."""
    compile: bool = False
    """torch.compile each block (regional: compile time does not grow with depth); the first step's time is
    logged as compile time, apart from the step time."""
    loss_chunk_size: int = 0
    """Tokens per chunk of the fused lm_head + loss, which never holds the micro-batch's whole logits (0: off;
    used at tensor_parallel 1, where the vocab-parallel loss does not already split them; not with ZeRO-3)."""
    fused_ops: Literal[FUSED_OPS_MODES] = "auto"
    """csrc/fused_ops (bias + gelu, rotary on q/k/v): 'auto' builds and uses them on CUDA, falling back to the
    PyTorch references with a warning; 'on' fails at start-up if they cannot be built; 'off' never uses them."""
    seed: int = 1234
    """Seed of weight init, dropout and data order (0 <= seed < 2^63)."""

    # -- derived -------------------------------------------------------------------------------------------------

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // (self.parallel.tensor_parallel * self.parallel.pipeline_parallel)

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
# Reading YAML safely

# Explicit tags that name plain values; any other (!!python/object, !!binary, !!set, custom !tags) is refused.
_PLAIN_TAGS = {f"tag:yaml.org,2002:{name}" for name in ("str", "int", "float", "bool", "null", "seq", "map")}


class _ConfigYAMLError(yaml.MarkedYAMLError):
    """A YAML construct configs do not accept, with the place it was found."""


class ConfigLoader(yaml.SafeLoader):
    """yaml.SafeLoader that accepts plain configuration only: mappings, lists and scalars.

    On top of SafeLoader (which never constructs Python objects) it refuses anchors and aliases (configs need
    neither; an alias is how a "billion laughs" document multiplies itself and how a recursive one refers to
    itself), explicit non-standard tags, duplicate keys in one mapping, and nesting deeper than
    MAX_CONFIG_DEPTH.
    """

    def __init__(self, stream) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise _ConfigYAMLError(None, None, f"alias *{event.anchor} is not accepted: configs have no need for "
                                   "anchors or aliases; write the values out", event.start_mark)
        anchor = getattr(event, "anchor", None)
        if anchor is not None:
            raise _ConfigYAMLError(None, None, f"anchor &{anchor} is not accepted: configs have no need for "
                                   "anchors or aliases; write the values out", event.start_mark)
        tag = getattr(event, "tag", None)
        if tag is not None and tag not in ("!", *_PLAIN_TAGS):
            raise _ConfigYAMLError(None, None, f"tag {tag} is not accepted: configs hold plain values (numbers, "
                                   "strings, lists, mappings)", event.start_mark)
        self._depth += 1
        try:
            if self._depth > MAX_CONFIG_DEPTH:
                raise _ConfigYAMLError(None, None, f"nested deeper than {MAX_CONFIG_DEPTH} levels; a config has "
                                       "sections of fields, 2 or 3 levels", event.start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:
                raise _ConfigYAMLError(None, None, "a mapping key must be a plain value, not a list or mapping",
                                       key_node.start_mark) from None
            if duplicate:
                raise _ConfigYAMLError(None, None, f"duplicate key {key!r} in one mapping; keep one",
                                       key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _yaml_error_line(where: str, error: yaml.YAMLError) -> str:
    """One line for a YAML error: `WHERE:LINE:COLUMN: what is wrong`."""
    if isinstance(error, yaml.reader.ReaderError):
        return (f"{where}: not a YAML text: unacceptable character #x{error.character:04x} at byte offset "
                f"{error.position}; a config is UTF-8 text")
    if isinstance(error, yaml.MarkedYAMLError):
        mark = error.problem_mark or error.context_mark
        place = f"{where}:{mark.line + 1}:{mark.column + 1}" if mark is not None else where
        words = " ".join(part for part in (error.context, error.problem) if part)
        if isinstance(error, _ConfigYAMLError):
            return f"{place}: {words}"
        if isinstance(error, yaml.constructor.ConstructorError):
            return f"{place}: {words}; configs hold plain values (numbers, strings, lists, mappings)"
        return f"{place}: not valid YAML: {words}"
    return f"{where}: not valid YAML: {' '.join(str(error).split())}"


def parse_yaml(text: str, where: str) -> Any:
    """`text` parsed with ConfigLoader; ConfigError naming `where` (a file or an override) when refused."""
    try:
        return yaml.load(text, Loader=ConfigLoader)  # noqa: S506 (ConfigLoader is a SafeLoader)
    except yaml.YAMLError as error:
        raise ConfigError(_yaml_error_line(where, error)) from None
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply to read; a config has sections of fields") from None
    except (ValueError, OverflowError) as error:  # e.g. an integer of more digits than Python converts
        raise ConfigError(f"{where}: a value cannot be read: {shown(str(error))}") from None


def read_config_file(path: str | os.PathLike) -> dict:
    """The mapping of sections in the YAML file `path`.

    Raises:
        ConfigError: naming the file: missing, a directory, over MAX_CONFIG_BYTES, not UTF-8, not YAML,
            refused by ConfigLoader, or not a mapping at the top level.
    """
    try:
        # A FIFO would block the open and a device never ends: only regular files are configs.
        if Path(path).exists() and not Path(path).is_dir() and not stat.S_ISREG(os.stat(path).st_mode):
            raise ConfigError(f"{path}: not a regular file (a pipe or a device); --config takes a YAML file")
        with open(path, "rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file (see configs/ for examples)") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory; --config takes a YAML file") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read it: {error.strerror or error}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES >> 20} MiB, which no config is; "
                          "--config takes a YAML file of a few KiB")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{raw[error.start]:02x} at offset {error.start}); "
                          "save the config as UTF-8") from None
    values = parse_yaml(text, str(path))
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, data:, optim:, ...), "
                          f"got {type(values).__name__}")
    return values


# ----------------------------------------------------------------------------------------------------------------
# Building from YAML and overrides: jsonargparse types every value


def shown(value: Any, limit: int = 80) -> str:
    """`value` for a message: its repr, cut to `limit` characters (a hostile value can be megabytes long)."""
    try:
        text = value if isinstance(value, str) and value.startswith("Exceeds") else repr(value)
    except ValueError:  # an integer of more digits than Python prints
        text = "an integer of thousands of digits"
    return text if len(text) <= limit else f"{text[: limit - 15]}...({len(text):,} chars)"


_VALUE_LOADER_MODE = "phi1_config"
"""jsonargparse parser mode whose loader is ConfigLoader (registered below)."""


def _load_value_text(text: str) -> Any:
    """How jsonargparse reads a string given for a non-string field (`optim.lr=3e-4`): with ConfigLoader, so that
    no text the library reads can name a Python object, expand an alias or nest without bound."""
    return yaml.load(text, Loader=ConfigLoader)  # noqa: S506 (ConfigLoader is a SafeLoader)


# What ConfigLoader raises for a text it refuses; jsonargparse then keeps the text as a string, which the field's
# type refuses by name.
jsonargparse.set_loader(_VALUE_LOADER_MODE, _load_value_text,
                        (yaml.YAMLError, RecursionError, ValueError, OverflowError))


@functools.cache
def option_types() -> dict[str, Any]:
    """{dotted option: type hint} of every option a config file or override can set: `model.preset` and the
    ModelConfig fields flat under `model.`, every field of the other sections, and the top-level fields."""
    model_hints = typing.get_type_hints(ModelConfig)
    types_ = {"model.preset": str}
    types_.update({f"model.{item.name}": model_hints[item.name] for item in dataclasses.fields(ModelConfig)
                   if item.name != "name"})
    hints = typing.get_type_hints(TrainConfig)
    for item in dataclasses.fields(TrainConfig):
        hint = hints[item.name]
        if hint is ModelSection:
            continue
        if dataclasses.is_dataclass(hint):
            section_hints = typing.get_type_hints(hint)
            types_.update({f"{item.name}.{inner.name}": section_hints[inner.name]
                           for inner in dataclasses.fields(hint)})
        else:
            types_[item.name] = hint
    return types_


@functools.cache
def _sections() -> dict[str, type]:
    """{name: dataclass} of the sections of TrainConfig."""
    hints = typing.get_type_hints(TrainConfig)
    return {item.name: hints[item.name] for item in dataclasses.fields(TrainConfig)
            if dataclasses.is_dataclass(hints[item.name])}


@functools.cache
def _parser() -> jsonargparse.ArgumentParser:
    """The jsonargparse parser of TrainConfig: each section through `add_class_arguments` (every field an
    argument typed by the dataclass's annotation, with its default), the model's preset and ModelConfig fields
    one by one (they are given flat, and only the given ones become ModelSection.overrides), and the top-level
    fields. It types values only; `_build` sets the typed values on a default TrainConfig."""
    parser = jsonargparse.ArgumentParser(prog="phi1 training config", exit_on_error=False,
                                         parser_mode=_VALUE_LOADER_MODE, default_env=False)
    for dotted, hint in option_types().items():
        if dotted.startswith("model."):
            # No default: a model field that is not given takes the preset's value (ModelSection.values).
            parser.add_argument(f"--{dotted}", type=hint, default=None)
    hints = typing.get_type_hints(TrainConfig)
    for item in dataclasses.fields(TrainConfig):
        hint = hints[item.name]
        if hint is ModelSection:
            continue
        if dataclasses.is_dataclass(hint):
            parser.add_class_arguments(hint, item.name)
        else:
            parser.add_argument(f"--{item.name}", type=hint, default=item.default)
    return parser


def _nested(pairs: typing.Iterable[tuple[str, Any]]) -> dict:
    """{'optim': {'lr': 1e-3}} from [('optim.lr', 1e-3)]; a later pair replaces an earlier one."""
    nested: dict = {}
    for dotted, value in pairs:
        *sections, name = dotted.split(".")
        level = nested
        for section in sections:
            level = level.setdefault(section, {})
        level[name] = value
    return nested


def _close_option(dotted: str, candidates: typing.Iterable[str]) -> str:
    """' (did you mean X?)' for the closest of `candidates`, or ''."""
    match = difflib.get_close_matches(dotted, list(candidates), n=1, cutoff=0.75)
    return f" (did you mean {match[0]}?)" if match else ""


def _key_problem(dotted: str, suggest: bool = True) -> str | None:
    """Why `dotted` names no option (unknown, a section, or under a field), with the closest option; None when it
    names one. jsonargparse would refuse these too, but it stops at the first and names no neighbour."""
    types_ = option_types()
    if dotted in types_:
        return None
    options = list(types_)
    parts = dotted.split(".")
    sections = _sections()
    if parts[0] == "model" and len(parts) > 1:
        known = sorted(name.removeprefix("model.") for name in options if name.startswith("model.")
                       and name != "model.preset")
        near = _close_option(dotted, [name for name in options if name.startswith("model.")]) if suggest else ""
        return (f"{dotted}: unknown model field{near}; use model.preset or one of the ModelConfig fields {known}")
    if dotted in sections:
        return f"{dotted}: is a section; set one of its fields ({dotted}.FIELD=VALUE)"
    for depth in range(1, len(parts)):
        prefix = ".".join(parts[:depth])
        if prefix in types_:
            return f"{prefix}: is not a section; cannot set {dotted}"
    if parts[0] in sections:
        where, fields = parts[0], sorted(item.name for item in dataclasses.fields(sections[parts[0]]))
    else:
        where, fields = "the top level", sorted(item.name for item in dataclasses.fields(TrainConfig))
    near = _close_option(dotted, options) if suggest else ""
    return (f"{dotted}: unknown option{near}; {where} has {fields} (phi1-train --help-config lists every "
            "option)")


def _accepts(hint: Any, kind: type) -> bool:
    """Whether `hint` (or a member of its union or Literal) takes values of `kind`."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(member, kind) for member in typing.get_args(hint))
    if origin is typing.Literal:
        return any(type(choice) is kind for choice in typing.get_args(hint))
    return hint is kind


def _sequence_hint(hint: Any) -> bool:
    """Whether `hint` (or a member of its union) is a list or tuple."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_sequence_hint(member) for member in typing.get_args(hint))
    return origin in (list, tuple)


def _compatible(value: Any, hint: Any) -> Any:
    """`value` in the spellings the library reads, for the spellings phi1 configs have always accepted.

    jsonargparse reads standard YAML values; three older habits of phi1 configs are translated first, so that
    every existing config and command line keeps its meaning: a YAML 1.1 boolean or a number given to a string
    field is its text (`fused_ops: off` is 'off', `data.split: 100` is '100'); 'none', 'null' or '~' unset an
    optional field; a comma-separated text is a list (`profiling.steps=5,7`, `faults.inject_nan_at=3`).
    """
    if isinstance(value, str):
        text = value.strip()
        if _accepts(hint, type(None)) and text.lower() in ("none", "null", "~"):
            return None
        if _sequence_hint(hint) and not text.startswith(("[", "{")):
            return [item.strip() for item in text.split(",") if item.strip()]
        return value
    if _accepts(hint, str) and not _accepts(hint, bool) and isinstance(value, bool):
        return "on" if value else "off"
    if _accepts(hint, str) and isinstance(value, (int, float)) and not isinstance(value, bool) \
            and not (_accepts(hint, int) or _accepts(hint, float)):
        return str(value)
    return value


def _unsafe_text(value: Any, dotted: str) -> str | None:
    """The ConfigLoader refusal of a text in `value` that jsonargparse would read as YAML, or None.

    jsonargparse reads a string given for a number, a boolean or a list with its own YAML loader, which expands
    aliases (and then prints what it read in its refusal); so every such string (a list's items too) is read by
    ConfigLoader first: no alias bomb, tag or deep nesting reaches the library, from a file or the command line.
    A field that takes strings keeps the text as it is, unread.
    """
    if isinstance(value, str):
        try:
            parse_yaml(value, dotted)
        except ConfigError as error:
            return error.problems[0]
    elif isinstance(value, (list, tuple)):
        return next((why for why in (_unsafe_text(item, dotted) for item in value) if why is not None), None)
    elif isinstance(value, dict):
        return _unsafe_text(list(value.values()), dotted)
    return None


def _type_words(hint: Any) -> str:
    """What values of `hint` are, for a message: 'an integer', 'a list of integers', '2 numbers'."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_words(member) for member in args if member is not type(None))
    if origin is typing.Literal:
        return f"one of {args}"
    if origin is list:
        return f"a list of {_type_words(args[0]).removeprefix('an ').removeprefix('a ')}s" if args else "a list"
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_words(args[0]).removeprefix('an ').removeprefix('a ')}s"
        words = _type_words(args[0]).removeprefix("an ").removeprefix("a ")
        return f"{len(args)} {words}s" if len(set(args)) == 1 else f"{len(args)} values"
    if origin is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(hint, str(hint))


def _refusal(dotted: str, hint: Any, value: Any) -> str:
    """The line for a value that jsonargparse refused for the field `dotted` of type `hint`."""
    if typing.get_origin(hint) is typing.Literal:
        return f"{dotted}: must be one of {typing.get_args(hint)}, got {shown(value)}"
    if _accepts(hint, float) and isinstance(value, str):
        try:
            number = float(value.strip().replace("_", ""))
        except (ValueError, OverflowError):
            number = 0.0
        if not math.isfinite(number):  # 'nan', 'inf': a number, but not one a config can mean
            return f"{dotted}: must be a finite number, got {shown(value)}"
    return f"{dotted}: expected {_type_words(hint)}, got {shown(value)}"


def _non_finite(value: Any) -> bool:
    """Whether `value` is, or holds, a float that is nan or infinite (jsonargparse's float accepts them)."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return any(_non_finite(item) for item in value)
    return False


def _parsed(parser: jsonargparse.ArgumentParser, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """{dotted option: typed value} of `pairs`, parsed by jsonargparse without its defaults.

    Raises:
        jsonargparse.ArgumentError: a value its field's type refuses (the first one).
    """
    namespace = parser.parse_object(_nested(pairs), defaults=False)
    return dict(namespace.items())


def typed_values(pairs: typing.Iterable[tuple[str, Any]]) -> tuple[list[tuple[str, Any]], list[str]]:
    """`(dotted option, value)` pairs, from a file or the command line, typed by their fields.

    Returns:
        (the accepted options with their typed values, in order; one line per refused key or value): an
        unknown key, a value its field's type refuses (typed by jsonargparse), a non-finite number.
    """
    parser = _parser()
    types_ = option_types()
    problems: dict[int, str] = {}
    candidates: list[tuple[int, str, Any]] = []
    for index, (dotted, value) in enumerate(pairs):
        why = _key_problem(dotted, suggest=len(problems) < MAX_LISTED_PROBLEMS)
        if why is None:
            value = _compatible(value, types_[dotted])
            why = None if _accepts(types_[dotted], str) else _unsafe_text(value, dotted)
        if why is not None:
            problems[index] = why
        else:
            candidates.append((index, dotted, value))
    typed: dict[int, Any] = {}
    try:  # one call for the whole source; only when it refuses something, one call per value to find them all
        values = _parsed(parser, [(dotted, value) for _, dotted, value in candidates])
        if len({dotted for _, dotted, _ in candidates}) == len(candidates):
            typed = {index: values[dotted] for index, dotted, _ in candidates}
        else:  # an option given twice: each occurrence on its own (the last one wins when applied)
            typed = {index: _parsed(parser, [(dotted, value)])[dotted] for index, dotted, value in candidates}
    except (jsonargparse.ArgumentError, TypeError, ValueError):
        for index, dotted, value in candidates:
            try:
                typed[index] = _parsed(parser, [(dotted, value)])[dotted]
            except (jsonargparse.ArgumentError, TypeError, ValueError):
                problems[index] = _refusal(dotted, types_[dotted], value)
    for index, dotted, _ in candidates:
        if index in typed and _non_finite(typed[index]):
            problems[index] = f"{dotted}: must be a finite number, got {shown(typed.pop(index))}"
    accepted = [(dotted, typed[index]) for index, dotted, _ in candidates if index in typed]
    return accepted, [problems[index] for index in sorted(problems)]


def _build(pairs: list[tuple[str, Any]]) -> TrainConfig:
    """The TrainConfig of the defaults with the typed `pairs` (from `typed_values`) applied in order; the given
    model fields become ModelSection.overrides."""
    config = TrainConfig()
    for dotted, value in pairs:
        section, _, name = dotted.rpartition(".")
        if dotted == "model.preset":
            config.model.preset = value
        elif section == "model":
            config.model.overrides[name] = value
        else:
            setattr(getattr(config, section) if section else config, name, value)
    return config


def _flatten(values: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of every leaf of nested `values`; a `model.overrides` mapping is read as model fields
    (the flat YAML form and the dataclass form of the model section mean the same)."""
    items: list[tuple[str, Any]] = []
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if dotted == "model.overrides" and isinstance(value, dict):
            items.extend((f"model.{name}", item) for name, item in value.items())
        elif dotted == "model.overrides":
            items.append((dotted, value))
        elif isinstance(value, dict):
            items.extend(_flatten(value, dotted + "."))
        else:
            items.append((dotted, value))
    return items


def config_from_dict(values: dict, source: str = "config") -> TrainConfig:
    """A TrainConfig from nested plain values (as read from YAML).

    Raises:
        ConfigError: listing every unknown key and badly typed value, each prefixed by `source`.
    """
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level, got {type(values).__name__}")
    accepted, problems = typed_values(_flatten(values))
    if problems:
        raise ConfigError([f"{source}: {line}" for line in problems])
    return _build(accepted)


def parse_override(item: str) -> tuple[str, Any]:
    """(dotted key, value) of a `key.sub=value` command-line override; ConfigError when it is not one.

    A value that starts with '[' or '{' is read here with ConfigLoader (refusing tags, anchors and deep nesting
    with the loader's own message); any other stays the text, which jsonargparse types by the field.
    """
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. optim.lr=3e-4")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r}: the key before '=' is empty; expected KEY=VALUE, e.g. optim.lr=3e-4")
    value: Any = raw
    text = raw.strip()
    if text.startswith(("[", "{")):
        value = parse_yaml(text, f"override {key}")  # a list (or a mistaken mapping) the field's type judges
    return key, value


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = (),
                problems: list[str] | None = None) -> TrainConfig:
    """Defaults, then the YAML file at `path`, then `key.sub=value` overrides in order.

    Args:
        problems: when given, the refused keys and values are appended to it (one line each) and the config
            is returned with defaults in their place, so that `validate_config(..., prior=problems)` can list
            them together with the rest; otherwise they are raised.

    Raises:
        ConfigError: the file cannot be read as a config (see `read_config_file`), or listing every unknown
            key, badly typed or non-finite value and malformed override of the file and the overrides together.
    """
    collect = problems is not None
    problems = problems if problems is not None else []
    accepted: list[tuple[str, Any]] = []
    if path is not None:
        from_file, refused = typed_values(_flatten(read_config_file(path)))
        accepted += from_file
        problems.extend(f"{path}: {line}" for line in refused)
    pairs = []
    for item in overrides:
        try:
            pairs.append(parse_override(item))
        except ConfigError as error:
            problems.extend(error.problems)
    from_overrides, refused = typed_values(pairs)
    accepted += from_overrides
    problems.extend(refused)
    if problems and not collect:
        raise ConfigError(problems)
    return _build(accepted)


# ----------------------------------------------------------------------------------------------------------------
# Validation: the one place that decides whether a run can start


def tokenizer_type_of(data: DataSection) -> str | None:
    """The tokenizer type the run reads data.tokenizer_model with: data.tokenizer_type, or for 'auto' the type
    of the file; None when that cannot be told yet (no file, an unknown kind of file, a type that does not
    match the file), which validate_config reports with what to do."""
    from phi1.data.tokenizers import detect_tokenizer_type

    if data.tokenizer_model is None or not Path(data.tokenizer_model).exists():
        return None
    try:
        detected = detect_tokenizer_type(data.tokenizer_model)
    except ValueError:
        return None
    return detected if data.tokenizer_type in ("auto", detected) else None


def _tokenizer_problems(data: DataSection, check_files: bool) -> list[str]:
    """Resolve data.tokenizer_type 'auto' from the file, in place; the problems of the pair."""
    from phi1.data.tokenizers import detect_tokenizer_type

    problems = []
    if data.tokenizer_type not in TOKENIZER_TYPE_CHOICES:
        problems.append(f"data.tokenizer_type: must be one of {TOKENIZER_TYPE_CHOICES}, got {data.tokenizer_type!r}")
    if data.tokenizer_model is None:
        if check_files:
            problems.append("data.tokenizer_model: not set; it is needed to read the data and to make the "
                            "checkpoints usable for generation (a tokenizer.json, a SentencePiece .model, or a "
                            "GPT-2 vocab.json + merges.txt directory)")
        return problems
    if not Path(data.tokenizer_model).exists():
        if check_files:
            problems.append(f"data.tokenizer_model: {data.tokenizer_model}: no such file or directory")
        return problems
    try:
        detected = detect_tokenizer_type(data.tokenizer_model)
    except ValueError as error:
        problems.append(f"data.tokenizer_model: {error}")
        return problems
    if data.tokenizer_type == "auto":
        data.tokenizer_type = detected
    elif data.tokenizer_type in TOKENIZER_TYPES and data.tokenizer_type != detected:
        problems.append(f"data.tokenizer_type: {data.tokenizer_type} does not match data.tokenizer_model "
                        f"{data.tokenizer_model}, which is a {detected}; set data.tokenizer_type=auto (or "
                        f"{detected}), or point data.tokenizer_model at a {data.tokenizer_type} file")
    return problems


def _memory_capacity(device_type: str, ranks_here: int) -> tuple[float, str]:
    """(bytes one rank may use, what that is) on `device_type`: a GPU's memory, or this machine's RAM shared
    by its `ranks_here` processes. Without a GPU here, 'cuda' means the largest GPU the planner knows."""
    if device_type == "cuda":
        import torch

        if torch.cuda.is_available():
            properties = torch.cuda.get_device_properties(torch.cuda.current_device())
            return float(properties.total_memory), f"the {properties.total_memory / 2**30:.1f} GiB of this {properties.name}"
        from phi1.planning.hardware import GPU_KINDS

        largest = max(GPU_KINDS.values(), key=lambda kind: kind.memory_gib)
        return largest.memory_gib * 2**30, f"the {largest.memory_gib:g} GiB of the largest GPU phi1 knows ({largest.name})"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:  # a container's memory limit, when lower
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            ram = min(ram, int(limit))
    except OSError:
        pass
    if ranks_here == 1:
        return float(ram), f"this machine's {ram / 2**30:.1f} GiB of RAM"
    return ram / ranks_here, f"1/{ranks_here} of this machine's {ram / 2**30:.1f} GiB of RAM ({ranks_here} ranks on it)"


def _memory_problem(config: TrainConfig, model_config: ModelConfig, world_size: int, device_type: str) -> str | None:
    """A line naming the sizes when one rank's memory cannot fit the device, with the planner's estimate."""
    ranks_here = world_size if device_type == "cpu" else 1
    local = os.environ.get("LOCAL_WORLD_SIZE", "")
    if device_type == "cpu" and local.isdigit() and int(local) > 0:
        ranks_here = int(local)
    capacity, what = _memory_capacity(device_type, ranks_here)
    tp = config.parallel.tensor_parallel
    sizes = (f"model.n_layer={model_config.n_layer}, model.d_model={model_config.d_model}, "
             f"model.vocab_size={model_config.vocab_size}")
    # The weights alone, in 16 bits, split by tensor parallelism (and by ZeRO-3 over data parallelism): less
    # than any layout holds, counted in closed form, so an absurd size is refused in microseconds, before the
    # planner builds the model on the meta device.
    shards = tp * (world_size // tp if config.parallel.zero_stage == 3 else 1)
    floor = 2.0 * model_config.num_parameters() / shards
    if floor > capacity:
        return (f"memory: {sizes} has {model_config.num_parameters():,} parameters, at least {floor / 2**30:,.0f} GiB "
                f"per rank for the 16-bit weights alone, more than {what}; make the model smaller or split it "
                "(parallel.tensor_parallel, parallel.zero_stage=3)")
    from phi1.training.plan import memory_estimate

    estimate = memory_estimate(config, model_config, world_size, gpu=device_type == "cuda")["total"]
    if estimate > capacity:
        return (f"memory: the planner estimates {estimate / 2**30:,.1f} GiB per rank for {sizes}, "
                f"batch.micro_batch_size={config.batch.micro_batch_size}, data.seq_len={config.data.seq_len} "
                f"(precision {config.precision}, ZeRO stage {config.parallel.zero_stage}, tensor parallel {tp}), "
                f"more than {what}; lower batch.micro_batch_size or data.seq_len, set activation_checkpointing=full, "
                "or split the model (parallel.tensor_parallel, parallel.zero_stage)"
                + ("; planning a GPU run from this machine? add --device cuda" if device_type == "cpu" else ""))
    return None


def _run_directory_problems(option: str, path: str) -> list[str]:
    """A directory the run will create or write into: it, or the nearest part of it that exists, must be a
    directory this process can write (a file, /dev/null or a read-only place fails here, not at the first save)."""
    existing = os.path.abspath(path)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return [f"{option}: {path}: {existing} is not a directory; name a run directory"]
    if not os.access(existing, os.W_OK | os.X_OK):
        return [f"{option}: {path}: {existing} is not writable by this user; name a run directory you can write"]
    return []


def _check(problems: list[str], option: str, value: Any, **bounds: Any) -> bool:
    """Append `option: why` when `value` is not a number in range (see number_problem); True when it is."""
    why = number_problem(value, **bounds)
    if why is not None:
        problems.append(f"{option}: {why}")
    return why is None


def _check_size(problems: list[str], option: str, value: Any, world_size: int) -> bool:
    """`_check` for a parallel size, which cannot exceed the launched processes: that case says how many are
    needed and how to launch them, rather than a bare range."""
    if number_problem(value, integer=True, low=1) is None and value > world_size:
        problems.append(f"{option}: {value} needs at least {value} processes, and {world_size} "
                        f"{'is' if world_size == 1 else 'are'} launched; launch more (torchrun --nproc-per-node, "
                        f"or --world-size with --dry-run) or lower {option}")
        return False
    return _check(problems, option, value, integer=True, low=1, high=world_size)


CHECKPOINT_FORMATS = ("auto", "phi1", "dcp")
"""Values of `checkpoint.format`."""


def checkpoint_format(config: TrainConfig) -> str:
    """The checkpoint format a run writes: `checkpoint.format`, with 'auto' resolved (dcp under pipeline
    parallelism or FSDP, whose layouts the TP-shard format cannot describe; phi1 otherwise)."""
    fmt = config.checkpoint.format
    if fmt != "auto":
        return fmt
    par = config.parallel
    return "dcp" if par.pipeline_parallel > 1 or getattr(par, "fsdp", False) else "phi1"


def _checkpoint_format_problems(config: TrainConfig) -> list[str]:
    """What stops the chosen checkpoint format (and async_save) from holding this run's state."""
    problems = []
    fmt = checkpoint_format(config)
    if fmt == "dcp" and isinstance(config.parallel.zero_stage, int) and config.parallel.zero_stage > 0 \
            and config.parallel.pipeline_parallel == 1:
        problems.append("checkpoint.format: dcp holds the model and a torch AdamW; DeepSpeed ZeRO keeps its "
                        "optimizer in its own format: use checkpoint.format=phi1 (or auto) with parallel.zero_stage > 0")
    pp = config.parallel.pipeline_parallel
    if fmt == "phi1" and isinstance(pp, int) and pp > 1:  # a size out of range is reported by the layout check
        problems.append("checkpoint.format: phi1 (TP shards) cannot hold pipeline stages; use checkpoint.format=dcp "
                        "(or auto) with parallel.pipeline_parallel > 1")
    if fmt == "phi1" and getattr(config.parallel, "fsdp", False):
        problems.append("checkpoint.format: phi1 (TP shards) cannot hold FSDP-sharded parameters; use "
                        "checkpoint.format=dcp (or auto) with parallel.fsdp")
    if config.checkpoint.async_save is not False and config.checkpoint.async_save is not True:
        problems.append(f"checkpoint.async_save: must be true or false, got {config.checkpoint.async_save!r}")
    elif config.checkpoint.async_save and fmt != "dcp":
        problems.append("checkpoint.async_save: only the dcp format saves in the background; set "
                        "checkpoint.format=dcp or leave checkpoint.async_save=false")
    return problems


def _pipeline_problems(par: ParallelSection, pp: int, virtual: int, dp: int, model_config: ModelConfig | None,
                       batch: BatchSection | None, precision: str | None = None) -> list[str]:
    """What stops `pp` pipeline stages of `virtual` chunks each from running this model, batch and precision.

    (ZeRO-2/3 with a pipeline is refused with the rest of the parallel layout, in validate_config.)"""
    problems = []
    interleaved = par.pipeline_schedule == "interleaved"
    chunks = pp * virtual
    split = list(par.pipeline_split or [])
    if split:
        if len(split) != chunks:
            problems.append(f"parallel.pipeline_split: {split} has {len(split)} entries; the pipeline has "
                            f"pipeline_parallel x virtual_stages = {chunks} stages")
        elif any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in split):
            problems.append(f"parallel.pipeline_split: {split}: every stage needs a whole number >= 1 of blocks")
        elif model_config is not None and sum(split) != model_config.n_layer:
            problems.append(f"parallel.pipeline_split: {split} sums to {sum(split)} blocks; the model has "
                            f"n_layer={model_config.n_layer}")
        return problems + _pipeline_batch_problems(par, pp, dp, batch, precision)
    if model_config is not None and model_config.n_layer < chunks:
        problems.append(f"parallel.pipeline_parallel: {pp} ranks x {virtual} chunks = {chunks} stages, but the model "
                        f"has {model_config.n_layer} blocks (n_layer); every stage needs at least one")
    elif model_config is not None and interleaved and model_config.n_layer % chunks != 0:
        problems.append(f"parallel.virtual_stages: the interleaved schedule needs equal chunks: n_layer="
                        f"{model_config.n_layer} is not divisible by pipeline_parallel x virtual_stages = {chunks}")
    return problems + _pipeline_batch_problems(par, pp, dp, batch, precision)


def _pipeline_batch_problems(par: ParallelSection, pp: int, dp: int, batch: BatchSection | None,
                             precision: str | None) -> list[str]:
    """What stops the batch (micro-batches per step) and the precision from running `pp` pipeline stages."""
    problems = []
    interleaved = par.pipeline_schedule == "interleaved"
    if batch is not None and batch.global_batch_size % (batch.micro_batch_size * dp) == 0:
        micro_batches = batch.global_batch_size // (batch.micro_batch_size * dp)
        if par.pipeline_schedule in ("1f1b", "interleaved") and micro_batches < pp:
            problems.append(f"batch.global_batch_size: {micro_batches} micro-batches per step are fewer than the "
                            f"{pp} pipeline stages that {par.pipeline_schedule} keeps busy; raise "
                            "batch.global_batch_size or lower batch.micro_batch_size")
        elif interleaved and micro_batches % pp != 0:
            problems.append(f"batch.global_batch_size: the interleaved schedule needs the micro-batches per step "
                            f"({micro_batches}) to be a multiple of parallel.pipeline_parallel={pp}")
    if precision == "fp16":
        problems.append("precision: fp16 with pipeline parallelism is not supported (its dynamic loss scale would "
                        "have to be agreed between stages before every step); use precision=bf16 or fp32")
    return problems


def _fsdp_problems(par: ParallelSection, pp: int, dp: int, world_size: int) -> list[str]:
    """What stops parallel.fsdp (FSDP2) and parallel.fsdp_cpu_offload from running this layout."""
    problems = []
    fsdp_ok = _check_bool(problems, "parallel.fsdp", par.fsdp)
    offload_ok = _check_bool(problems, "parallel.fsdp_cpu_offload", par.fsdp_cpu_offload)
    if offload_ok and par.fsdp_cpu_offload and fsdp_ok and not par.fsdp:
        problems.append("parallel.fsdp_cpu_offload: offloads FSDP2's shards and needs parallel.fsdp=true; set "
                        "parallel.fsdp=true or parallel.fsdp_cpu_offload=false")
    if not (fsdp_ok and par.fsdp):
        return problems
    if isinstance(par.zero_stage, int) and par.zero_stage > 0:
        problems.append(f"parallel.fsdp: FSDP2 and DeepSpeed ZeRO-{par.zero_stage} both shard the training state "
                        "over the data-parallel ranks, and neither can take the other's shards (DeepSpeed would "
                        "partition FSDP2's DTensor shards again); use parallel.fsdp=true with parallel.zero_stage=0, "
                        "or parallel.fsdp=false")
    if pp > 1:
        problems.append("parallel.fsdp: phi1's pipeline strategy runs DDP or ZeRO-1 beside its stages and does not "
                        "shard stage chunks with fully_shard; use parallel.pipeline_parallel=1 with parallel.fsdp, "
                        "or parallel.fsdp=false")
    elif dp < 2:
        problems.append(f"parallel.fsdp: FSDP2 shards over the data-parallel ranks, and this run has {dp} "
                        f"({world_size} processes / (tensor_parallel x pipeline_parallel)); launch more processes "
                        "or set parallel.fsdp=false")
    return problems


def _fsdp_optimizer_problems(config: TrainConfig) -> list[str]:
    """optim.impl choices that cannot step FSDP2's shards."""
    par, impl = config.parallel, config.optim.impl
    if par.fsdp is not True:
        return []
    if impl == "apex":
        return ["optim.impl: apex's FusedAdam does not take FSDP2's sharded (DTensor) parameters; use optim.impl=auto "
                "(torch's fused AdamW on CUDA) with parallel.fsdp"]
    if impl == "torch-fused" and par.fsdp_cpu_offload is True:
        return ["optim.impl: torch-fused steps on CUDA, and parallel.fsdp_cpu_offload keeps the optimizer state in CPU "
                "memory; use optim.impl=auto or torch with parallel.fsdp_cpu_offload"]
    return []


def _check_bool(problems: list[str], option: str, value: object) -> bool:
    """True when `value` is a bool; else one problem naming `option`."""
    if isinstance(value, bool):
        return True
    problems.append(f"{option}: must be true or false, got {value!r}")
    return False


def _speed_problems(config: TrainConfig) -> list[str]:
    """activation_checkpointing (normalised in place: true / false mean full / none), its every-k, and compile."""
    problems = []
    try:
        config.activation_checkpointing = activation_checkpointing_mode(config.activation_checkpointing)
    except ValueError:
        problems.append(f"activation_checkpointing: must be one of {CHECKPOINTING_MODES} (true means full, false "
                        f"none), got {config.activation_checkpointing!r}")
    mode = config.activation_checkpointing
    if _check(problems, "activation_checkpointing_every", config.activation_checkpointing_every, integer=True,
              low=1, high=2**20):
        if config.activation_checkpointing_every > 1 and mode != "full":
            problems.append(f"activation_checkpointing_every: {config.activation_checkpointing_every} applies to "
                            f"activation_checkpointing=full, got {mode!r}; set activation_checkpointing=full or "
                            "activation_checkpointing_every=1")
    if config.compile and mode == "selective":
        problems.append("compile: selective activation checkpointing around compiled blocks is not supported (its "
                        "op-level policy needs the eager ops); use activation_checkpointing=full or none with compile")
    if config.compile and config.parallel.zero_stage == 3:
        problems.append("compile: not supported with ZeRO-3, whose parameter-gathering hooks run inside each block; "
                        "use parallel.zero_stage 0, 1 or 2 with compile")
    return problems


def _selection_problems(ft: FinetuneSection, ckpt: CheckpointSection, train_steps: int | None,
                        check_files: bool) -> list[str]:
    """finetune.select_by needs held-out problems that parse and more than one checkpoint to choose from."""
    from phi1.training.checkpoint_selection import SELECT_BY, load_selection_problems

    found: list[str] = []
    if ft.select_by not in SELECT_BY:
        return [f"finetune.select_by: {str(ft.select_by)[:40]!r} is not one of {', '.join(SELECT_BY)}"]
    if ft.select_by == "none":
        if ft.select_problems is not None:
            found.append("finetune.select_problems: is set but finetune.select_by is none; set finetune.select_by: "
                         "pass@1, or leave select_problems unset")
        return found
    if ft.select_problems is None:
        found.append(f"finetune.select_problems: finetune.select_by={ft.select_by} needs held-out problems: a JSONL "
                     'of {"prompt", "tests"} exercises not in the fine-tuning data')
    elif check_files:
        try:
            load_selection_problems(ft.select_problems)
        except (ValueError, OSError) as error:
            found.append(f"finetune.select_problems: {error}")
    if isinstance(ckpt.keep_last, int) and ckpt.keep_last == 1:
        found.append("checkpoint.keep_last: 1 keeps one checkpoint, leaving finetune.select_by nothing to choose "
                     "from; set 0 (keep all) or more than 1")
    if isinstance(ckpt.interval, int) and (ckpt.interval == 0 or train_steps is not None
                                           and ckpt.interval >= train_steps):
        found.append(f"checkpoint.interval: {ckpt.interval} saves only the final checkpoint, leaving "
                     "finetune.select_by nothing to choose from; save more often than schedule.train_steps")
    return found


def _names_no(problems: list[str], option: str) -> bool:
    """Whether none of a section's `problems` is about `option` (the checks of other sections that need its
    value run only then)."""
    return not any(line.startswith(f"{option}:") for line in problems)


def _check_choice(problems: list[str], option: str, value: Any, choices: tuple[str, ...]) -> bool:
    if value not in choices:
        problems.append(f"{option}: must be one of {choices}, got {value!r}")
        return False
    return True


def validate_config(config: TrainConfig, world_size: int, *, check_files: bool = True, device: str | None = None,
                    check_memory: bool = True, prior: typing.Sequence[str] = ()) -> ModelConfig:
    """Check the whole configuration for `world_size` processes on `device`; return the ModelConfig it trains.

    Every problem is collected before anything is raised, so one run lists them all. Each section checks its
    own fields (`DataSection.problems()`, `ParallelSection.problems(world_size)`, ...); this function composes
    them with the checks that need more than one section (batch arithmetic over the data-parallel ranks, the
    model against the layout and the sequence length, tokenizer and vocabulary, pipeline stages, checkpoint
    format, files, memory). Runs before any process group is created or any tensor allocated, so an impossible
    layout fails every rank at once with the same message. The 'auto' choices are resolved in place, so the YAML saved beside checkpoints names what ran:
    `precision` for the device, `data.tokenizer_type` from the tokenizer file (when it exists).

    Args:
        config: the loaded configuration (see load_config).
        world_size: processes of the run.
        check_files: also check that data, tokenizer and checkpoint paths exist (False for dry runs planned
            on another machine; an existing tokenizer file is still checked against data.tokenizer_type).
        device: 'cpu' or 'cuda', the device the ranks train on; None is what this machine has.
        check_memory: refuse sizes whose estimated memory per rank exceeds the device's.
        prior: problems already found (by `load_config(..., problems=...)`), listed first; the checks of the
            options they name are not reported again (those options hold their defaults).

    Raises:
        ConfigError: listing every problem, one line each, naming the option and what would fix it.
    """
    problems: list[str] = []
    device = device or default_device_type()
    if device not in DEVICE_TYPES:
        raise ConfigError(f"device: must be one of {DEVICE_TYPES}, got {device!r}")
    if not isinstance(world_size, int) or not 1 <= world_size <= MAX_WORLD_SIZE:
        raise ConfigError(f"world size (--world-size, or the launcher's): must be a number of processes in "
                          f"[1, {MAX_WORLD_SIZE}], got {world_size!r}")

    # -- each section alone, then what one section means for another -------------------------------------------
    par = config.parallel
    parallel_problems, layout = par.check(world_size)
    problems.extend(parallel_problems)
    tp, tp_ok, pp, dp, virtual, zero_ok = layout

    # -- model -----------------------------------------------------------------------------------------------------
    if config.model.preset not in PRESETS and config.finetune.init_from is None:
        problems.append(f"model.preset: unknown preset {config.model.preset!r}; known presets are {sorted(PRESETS)}")
        model_config = None
    else:
        model_problems = config.model.problems(tp if tp_ok else 1)
        problems.extend(model_problems)
        model_config = None if model_problems else ModelConfig(**config.model.values())

    # -- precision and kernels (top-level fields) ------------------------------------------------------------------
    if _check_choice(problems, "precision", config.precision, PRECISION_CHOICES):
        config.precision = resolve_precision(config.precision, device)
        why = precision_problem(config.precision, device)
        if why is not None:
            problems.append(f"precision: {why}")
    _check_choice(problems, "fused_ops", config.fused_ops, tuple(FUSED_OPS_MODES))
    problems.extend(_speed_problems(config))
    _check(problems, "loss_chunk_size", config.loss_chunk_size, integer=True, low=0, high=2**31 - 1)
    if isinstance(config.loss_chunk_size, int) and config.loss_chunk_size > 0 and par.zero_stage == 3:
        problems.append("loss_chunk_size: cannot be used with ZeRO-3, which gathers the lm_head only inside its own "
                        "forward; set loss_chunk_size=0")
    ls = config.loss_scale
    problems.extend(ls.problems())
    if number_problem(ls.initial_scale, **LOSS_SCALE_RANGE) is None and config.precision == "fp16" \
            and par.zero_stage > 0 and not math.log2(ls.initial_scale).is_integer():
        problems.append(f"loss_scale.initial_scale: DeepSpeed takes a power of two, got {ls.initial_scale:g}")

    # -- batch and data --------------------------------------------------------------------------------------------
    batch = config.batch
    batch_problems = batch.problems()
    problems.extend(batch_problems)
    micro_ok = _names_no(batch_problems, "batch.micro_batch_size")
    global_ok = _names_no(batch_problems, "batch.global_batch_size")
    if micro_ok and global_ok and batch.global_batch_size % (batch.micro_batch_size * dp) != 0:
        problems.append(
            f"batch.global_batch_size: {batch.global_batch_size} is not a multiple of batch.micro_batch_size x "
            f"data-parallel size = {batch.micro_batch_size} x {dp}; gradient accumulation must be a whole number of "
            "micro-batches")
    data = config.data
    pipeline_problems = (_pipeline_problems(par, pp, virtual, dp, model_config,
                                            batch if micro_ok and global_ok else None, config.precision)
                         if pp > 1 else [])
    if pp == 1 and par.pipeline_split:
        pipeline_problems.append(f"parallel.pipeline_split: {par.pipeline_split} splits pipeline stages, but "
                                 "parallel.pipeline_parallel is 1; set parallel.pipeline_parallel or leave the split empty")
    problems.extend(pipeline_problems)
    if pp > 1:
        if data.document_mask:
            problems.append("data.document_mask: not with pipeline parallelism: the stages after the first never "
                            "see the token ids the document boundaries come from; set data.document_mask=false")
    data_problems = data.problems()
    problems.extend(data_problems)
    seq_ok = _names_no(data_problems, "data.seq_len")
    # The model's context, even when other model fields are wrong (so that this problem is listed with theirs).
    context = (ModelConfig.unvalidated(**config.model.values()).max_seq_len
               if config.model.preset in PRESETS else None)
    if seq_ok and number_problem(context, integer=True, low=1) is None and data.seq_len > context:
        problems.append(f"data.seq_len: {data.seq_len} exceeds the model's context model.max_seq_len="
                        f"{context}; lower data.seq_len or raise model.max_seq_len")
    problems.extend(_tokenizer_problems(data, check_files))

    # -- optimizer and schedule ------------------------------------------------------------------------------------
    problems.extend(config.optim.problems())
    problems.extend(_fsdp_optimizer_problems(config))
    sched = config.schedule
    schedule_problems = sched.problems()
    problems.extend(schedule_problems)
    steps_ok = _names_no(schedule_problems, "schedule.train_steps")
    if steps_ok and global_ok and sched.train_steps * batch.global_batch_size > MAX_TRAIN_SAMPLES:
        problems.append(f"schedule.train_steps: {sched.train_steps} steps x batch.global_batch_size "
                        f"{batch.global_batch_size} = {sched.train_steps * batch.global_batch_size:,} sequences, "
                        f"more than the {MAX_TRAIN_SAMPLES:,} a run's sample index is built for")

    # -- checkpoints, logging, evaluation --------------------------------------------------------------------------
    ckpt = config.checkpoint
    checkpoint_problems = ckpt.problems()
    problems.extend(checkpoint_problems)
    if ckpt.format in CHECKPOINT_FORMATS:
        problems.extend(_checkpoint_format_problems(config))
    if ckpt.exit_at_iteration is not None and _names_no(checkpoint_problems, "checkpoint.exit_at_iteration") \
            and steps_ok and ckpt.exit_at_iteration > sched.train_steps:
        problems.append(f"checkpoint.exit_at_iteration: {ckpt.exit_at_iteration} is beyond schedule.train_steps="
                        f"{sched.train_steps}")
    if str(ckpt.dir).strip() and check_files:
        problems.extend(_run_directory_problems("checkpoint.dir", str(ckpt.dir)))
    problems.extend(config.logging.problems())
    prof = config.profiling
    profiling_problems = prof.problems()
    problems.extend(profiling_problems)
    if prof.steps and not profiling_problems and steps_ok and prof.steps[0] > sched.train_steps:
        problems.append(f"profiling.steps: starts at {prof.steps[0]}, after the last step "
                        f"schedule.train_steps={sched.train_steps}; nothing would be traced")
    problems.extend(config.eval.problems())
    problems.extend(config.guard.problems())
    _check(problems, "seed", config.seed, integer=True, low=0, high=2**63 - 1)
    faults = config.faults
    problems.extend(faults.problems())
    if faults.kill_at_iteration is not None and not 0 <= faults.kill_rank < world_size:
        problems.append(f"faults.kill_rank: {faults.kill_rank} is not a rank of the {world_size} launched processes")

    # -- files -----------------------------------------------------------------------------------------------------
    ft = config.finetune
    if ft.data is None and data.path is None:
        problems.append("data.path: no training data: set data.path (indexed dataset prefixes written by "
                        "tools/preprocess_data.py) or finetune.data (JSONL)")
    problems.extend(ft.problems())
    problems.extend(_selection_problems(ft, ckpt, sched.train_steps if steps_ok else None, check_files))
    if check_files:
        if ft.data is not None and not Path(ft.data).is_file():
            problems.append(f"finetune.data: {ft.data}: no such file; build one with tools/build_exercises.py")
        if ft.data is None and data.path is not None:
            from phi1.data.gpt_dataset import parse_data_path
            from phi1.data.indexed_dataset import dataset_exists

            try:
                prefixes, _ = parse_data_path(data.path)
            except ValueError as error:
                problems.append(f"data.path: {error}")
                prefixes = []
            for prefix in prefixes:
                if not dataset_exists(prefix):
                    problems.append(f"data.path: {prefix}.bin/.idx not found; write them with tools/preprocess_data.py")
        if ft.init_from is not None and not Path(ft.init_from).exists():
            problems.append(f"finetune.init_from: {ft.init_from}: no such directory")
        if ckpt.load is not None and not Path(ckpt.load).exists():
            problems.append(f"checkpoint.load: {ckpt.load}: no such directory")

    # -- memory: needs a valid model, layout and batch -------------------------------------------------------------
    layout_ok = (tp_ok and zero_ok and micro_ok and global_ok and seq_ok and config.precision in PRECISIONS
                 and config.activation_checkpointing in CHECKPOINTING_MODES and not pipeline_problems
                 and pp == config.parallel.pipeline_parallel)
    if check_memory and model_config is not None and layout_ok:
        why = _memory_problem(config, model_config, world_size, device)
        if why is not None:
            problems.append(why)
    elif check_memory and model_config is None and config.model.preset in PRESETS:
        # An absurd size is still worth naming next to the range errors: the closed-form weights alone.
        problems.extend(_absurd_size_problem(config, tp, world_size, device))
    if prior:
        # The options refused while loading hold their defaults here: drop what validation says that involves them.
        refused = {match.group(1) for line in prior for match in re.finditer(r"([a-z_]+(?:\.[a-z_]+)*): ", line)}
        refused.discard("override")
        problems = list(prior) + [line for line in problems if not any(
            re.search(rf"(?<![\w.]){re.escape(option)}(?![\w])", line) for option in refused)]
    if problems:
        raise ConfigError(problems)
    return model_config


def _magnitude(number: int) -> str:
    """`number` with thousands separators, or as a power of ten when it has more digits than anyone reads."""
    return f"{number:,}" if number < 10**30 else f"about 10^{int(math.log10(number))}"


def _absurd_size_problem(config: TrainConfig, tp: int, world_size: int, device_type: str) -> list[str]:
    """For a model whose fields are out of range but numeric: a line when its 16-bit weights alone cannot fit."""
    shape = ModelConfig.unvalidated(**config.model.values())
    if any(number_problem(getattr(shape, name), integer=True, low=1) for name in ("n_layer", "d_model", "vocab_size",
                                                                                  "d_mlp")):
        return []
    ranks_here = world_size if device_type == "cpu" else 1
    capacity, what = _memory_capacity(device_type, ranks_here)
    parameters = shape.num_parameters()
    floor = 2 * parameters // tp
    if floor <= capacity:
        return []
    count, gib = _magnitude(parameters), _magnitude(floor // 2**30)
    return [f"memory: model.n_layer={shown(shape.n_layer, 24)}, model.d_model={shown(shape.d_model, 24)}, "
            f"model.vocab_size={shown(shape.vocab_size, 24)} has {count} parameters, at least {gib} GiB per rank "
            f"for the 16-bit weights alone, more than {what}"]


# ----------------------------------------------------------------------------------------------------------------
# The reference of every field, generated from the dataclasses (phi1-train --help-config)


def field_docs(cls: type) -> dict[str, str]:
    """{field name: its docstring, on one line} of a dataclass whose fields each have a string literal under
    them (the attribute-docstring convention of this codebase), read from the class's source with `ast`."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def _type_name(hint: Any) -> str:
    if isinstance(hint, type) and not typing.get_args(hint):
        return hint.__name__
    return str(hint).replace("typing.", "")


def _default_text(item: dataclasses.Field) -> str:
    if item.default is not dataclasses.MISSING:
        value = item.default
    elif item.default_factory is not dataclasses.MISSING:
        value = item.default_factory()
    else:
        return "(required)"
    return _value_text(value)


def _value_text(value: Any) -> str:
    """`value` as it is written in YAML, on one line."""
    if isinstance(value, tuple):
        value = list(value)
    return "null" if value is None else yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def config_fields() -> list[tuple[str, str, str, str]]:
    """(dotted name, type, default, one-line doc) of every option a config file or override can set."""
    rows: list[tuple[str, str, str, str]] = []
    model_docs = field_docs(ModelSection)
    rows.append(("model.preset", "str", _default_text(next(f for f in dataclasses.fields(ModelSection)
                                                           if f.name == "preset")), model_docs["preset"]))
    hints = typing.get_type_hints(ModelConfig)
    docs = field_docs(ModelConfig)
    preset = ModelSection().preset
    preset_values = ModelConfig(**ModelSection(preset=preset).values()).to_dict()
    for item in dataclasses.fields(ModelConfig):
        if item.name == "name":
            continue
        default = f"the preset's; {preset}: {_value_text(preset_values[item.name])}"
        rows.append((f"model.{item.name}", _type_name(hints[item.name]), default, docs.get(item.name, "")))

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        docs = field_docs(cls)
        for item in dataclasses.fields(cls):
            hint = hints[item.name]
            if dataclasses.is_dataclass(hint):
                if hint is not ModelSection:
                    walk(hint, f"{prefix}{item.name}.")
                continue
            rows.append((f"{prefix}{item.name}", _type_name(hint), _default_text(item), docs.get(item.name, "")))

    walk(TrainConfig, "")
    return rows


def config_reference() -> str:
    """The text of `phi1-train --help-config`: every field by section, with its type, default and doc."""
    section_docs = field_docs(TrainConfig)
    lines = ["Every option of a phi1 training config, as a YAML section field or a `section.field=value` override",
             "(python -m phi1.train --config FILE.yaml optim.lr=3e-4 ...). Generated from phi1/training/config.py.",
             ""]
    current = None
    for dotted, type_name, default, doc in config_fields():
        section = dotted.split(".")[0] if "." in dotted else ""
        if section != current:
            current = section
            title = section or "top level"
            lines.append(f"{title}: {section_docs.get(section, 'settings of the whole run')}"
                         if section else "top level:")
        lines.append(f"  {dotted}  ({type_name}, default {default})")
        lines.append(f"      {doc}")
    return "\n".join(lines) + "\n"


def default_paths(config: TrainConfig) -> tuple[str | None, str | None]:
    """(TensorBoard dir, JSONL path) after applying the defaults under checkpoint.dir; None where disabled."""
    tb = config.logging.tensorboard_dir
    jsonl = config.logging.jsonl
    tb = os.path.join(config.checkpoint.dir, "tensorboard") if tb is None else (tb or None)
    jsonl = os.path.join(config.checkpoint.dir, "metrics.jsonl") if jsonl is None else (jsonl or None)
    return tb, jsonl


__all__ = [
    "BatchSection",
    "ConfigLoader",
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
    "ParallelLayout",
    "ParallelSection",
    "ScheduleSection",
    "TrainConfig",
    "config_fields",
    "config_from_dict",
    "config_reference",
    "default_paths",
    "field_docs",
    "tokenizer_type_of",
    "typed_values",
    "load_config",
    "option_types",
    "parse_override",
    "parse_yaml",
    "read_config_file",
    "validate_config",
]
