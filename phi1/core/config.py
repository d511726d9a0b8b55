"""The phi-1 model configuration: one typed dataclass, named presets, validated in one place.

The numbers of the presets are those of `microsoft/phi-1` and the paper (Gunasekar et al. 2023, section 2.3);
the tiny presets exist so that tests and the CPU quickstart run in seconds.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

import torch

ATTENTION_BACKENDS = ("auto", "flash", "sdpa", "math")

# Rows of the embedding must be a multiple of this: the lm_head GEMM tiles well and tensor parallelism splits
# the vocabulary evenly. (microsoft/phi-1 padded its 50,295 codegen tokens further, to 51,200 = 50 x 1024; the
# phi-1 preset keeps that so its weights import unchanged.)
VOCAB_MULTIPLE = 64


@dataclass
class ModelConfig:
    """Shape and regularisation of a phi-1 style decoder."""

    n_layer: int = 24
    """Number of transformer blocks."""
    d_model: int = 2048
    """Width of the residual stream."""
    n_head: int = 32
    """Attention heads; head dim is d_model / n_head."""
    d_mlp: int | None = None
    """Inner width of the MLP; None means 4 * d_model."""
    vocab_size: int = 51200
    """Rows of the embedding and columns of the lm_head (the tokenizer's size padded to a multiple of 64)."""
    rotary_dim: int = 32
    """Dimensions of each head that get rotary embeddings (the first ones, NeoX style); the rest pass through."""
    rotary_base: float = 10000.0
    """Rotary theta."""
    max_seq_len: int = 2048
    """Longest sequence (prompt plus generation) the rotary cache and KV cache are sized for."""
    layer_norm_eps: float = 1e-5
    """LayerNorm epsilon of every block and of the final norm."""
    embd_dropout: float = 0.0
    """Dropout on the token embeddings."""
    attn_dropout: float = 0.0
    """Dropout on the attention probabilities (the paper trains with 0.1)."""
    resid_dropout: float = 0.0
    """Dropout on each block's output before it joins the residual stream (the paper trains with 0.1)."""
    init_std: float = 0.02
    """Standard deviation of the normal init; output projections get init_std / sqrt(2 * n_layer)."""
    attention_backend: str = "auto"
    """'auto' picks flash-attn, then SDPA, then math; 'flash', 'sdpa' or 'math' forces one."""
    tie_word_embeddings: bool = False
    """phi-1 keeps the lm_head separate from the embedding; kept as a field so imports can say so."""
    name: str = "custom"
    """Preset this config came from, for logs and checkpoints."""

    def __post_init__(self) -> None:
        if self.d_mlp is None and _is_integer(self.d_model):
            self.d_mlp = 4 * self.d_model
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def problems(self, tensor_parallel_size: int = 1) -> list[tuple[str, str]]:
        """Every problem of the fields, as (field, what is wrong and what to do) pairs; empty when valid.

        All fields are checked, not just the first bad one, so one run of a validator lists them all; a field
        of the wrong type is reported once and the checks that need it are skipped.
        """
        found: list[tuple[str, str]] = []
        for name, (integer, low, high, low_open, high_open) in _FIELD_RANGES.items():
            if name == "d_mlp" and self.d_mlp is None:
                continue  # left to follow d_model, which is itself reported
            why = number_problem(getattr(self, name), integer=integer, low=low, high=high, low_open=low_open,
                                 high_open=high_open)
            if why is not None:
                found.append((name, why))
        for name in ("attention_backend", "name"):
            if not isinstance(getattr(self, name), str):
                found.append((name, f"must be a string, got {getattr(self, name)!r}"))
        if not isinstance(self.tie_word_embeddings, bool):
            found.append(("tie_word_embeddings", f"must be true or false, got {self.tie_word_embeddings!r}"))
        bad = {name for name, _ in found}

        def ok(*names: str) -> bool:
            return not bad.intersection(names)

        if ok("d_model", "n_head") and self.d_model % self.n_head != 0:
            found.append(("n_head", f"{self.n_head} heads do not divide d_model={self.d_model}; choose a divisor "
                                    f"(head dim 64 means n_head={max(1, self.d_model // 64)})"))
        if ok("rotary_dim") and self.rotary_dim % 2 != 0:
            found.append(("rotary_dim", f"must be even (rotary rotates pairs), got {self.rotary_dim}"))
        if ok("rotary_dim", "d_model", "n_head") and self.d_model % self.n_head == 0 and self.rotary_dim > self.head_dim:
            found.append(("rotary_dim", f"{self.rotary_dim} exceeds the head dim {self.head_dim} (d_model / n_head)"))
        if ok("vocab_size") and self.vocab_size % VOCAB_MULTIPLE != 0:
            found.append(("vocab_size", f"{self.vocab_size} is not a multiple of {VOCAB_MULTIPLE}; pad it "
                                        f"(e.g. {pad_vocab_size(self.vocab_size)})"))
        if ok("attention_backend") and self.attention_backend not in ATTENTION_BACKENDS:
            found.append(("attention_backend",
                          f"unknown backend {self.attention_backend!r}; choose one of {ATTENTION_BACKENDS}"))
        if ok("tie_word_embeddings") and self.tie_word_embeddings:
            found.append(("tie_word_embeddings", "phi-1 has an untied lm_head with bias; tying is not supported; "
                                                 "set it to false"))
        if tensor_parallel_size > 1:
            for name, what in (("n_head", "heads"), ("d_mlp", "MLP width"), ("vocab_size", "vocabulary rows")):
                value = getattr(self, name)
                if ok(name) and value % tensor_parallel_size != 0:
                    found.append((name, f"{value} ({what}) is not divisible by tensor parallel size "
                                        f"{tensor_parallel_size}"))
        return found

    def validate(self, tensor_parallel_size: int = 1, source: str | None = None) -> None:
        """Raise ValueError naming every bad field (`ModelConfig.FIELD: ...`, or `SOURCE: FIELD: ...` when the
        values were read from the file `source`), one line each, when the shape is impossible."""
        found = self.problems(tensor_parallel_size)
        if not found:
            return
        prefix = f"{source}: " if source is not None else "ModelConfig."
        lines = [f"{prefix}{name}: {why}" for name, why in found]
        if len(lines) == 1:
            raise ValueError(lines[0])
        raise ValueError(f"{len(lines)} problems in the model configuration:\n  " + "\n  ".join(lines))

    @classmethod
    def unvalidated(cls, **values) -> ModelConfig:
        """An instance holding `values` (defaults for the rest) without validating them: for validators that
        collect `problems()` instead of stopping at the first one. Unknown names raise TypeError."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise TypeError(f"ModelConfig: unknown field(s) {unknown}")
        config = cls.__new__(cls)
        for name, item in fields.items():
            setattr(config, name, values.get(name, item.default))
        if config.d_mlp is None and _is_integer(config.d_model):
            config.d_mlp = 4 * config.d_model
        return config

    def replace(self, **changes) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict, source: str | os.PathLike | None = None) -> ModelConfig:
        """A validated ModelConfig from plain values (a model's config.json).

        Args:
            values: field name -> value.
            source: the file the values came from; every message then names it.

        Raises:
            ValueError: unknown fields, or every bad field, one line each, naming `source` when given.
        """
        where = f"{source}: " if source is not None else "ModelConfig: "
        if not isinstance(values, dict):
            raise ValueError(f"{where}expected a JSON object of model fields, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{where}unknown field(s) {unknown}; known fields are {sorted(known)}")
        config = cls.unvalidated(**values)
        config.validate(source=str(source) if source is not None else None)
        return config

    def num_parameters(self, exclude_embedding: bool = False) -> int:
        """Parameter count in closed form (biases included, lm_head untied).

        `exclude_embedding` drops the input embedding, as MFU accounting does (the lm_head still counts).
        """
        d, f, v = self.d_model, self.d_mlp, self.vocab_size
        per_layer = (
            2 * d  # LayerNorm weight and bias
            + 3 * (d * d + d)  # q, k, v with biases
            + (d * d + d)  # attention output projection
            + (d * f + f)  # fc1
            + (f * d + d)  # fc2
        )
        total = self.n_layer * per_layer + 2 * d + (d * v + v)  # blocks, final LayerNorm, lm_head
        if not exclude_embedding:
            total += v * d
        return total

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Model FLOPs per token of a training step, as PaLM and nanoGPT count them: 6N + 12 L d T."""
        seq_len = self.max_seq_len if seq_len is None else seq_len
        return 6 * self.num_parameters(exclude_embedding=True) + 12 * self.n_layer * self.d_model * seq_len


def _is_integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _bound_text(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() and abs(bound) < 2**64 else f"{bound:g}"


def number_problem(value: object, *, integer: bool, low: float | None = None, high: float | None = None,
                   low_open: bool = False, high_open: bool = False) -> str | None:
    """What is wrong with `value` as a number in the range [low, high] (open ends where asked), or None.

    The phrase reads after an option's name: `optim.lr: must be a finite number in (0, 1], got inf`.
    Booleans are not numbers here (YAML's `yes` is not 1); an integer is accepted where a float is asked.
    """
    try:
        text = repr(value)
    except ValueError:  # an integer of more digits than Python prints
        text = "an integer of thousands of digits"
    shown = text if len(text) <= 80 else f"{text[:60]}...({len(text):,} chars)"
    if integer and not _is_integer(value):
        return f"must be an integer, got {shown}"
    if not integer and (isinstance(value, bool) or not isinstance(value, (int, float))):
        return f"must be a number, got {shown}"
    if not integer and not math.isfinite(value):
        return f"must be a finite number, got {shown}"
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        low_text = "-inf" if low is None else _bound_text(low)
        high_text = "inf" if high is None else _bound_text(high)
        return f"must be in {left}{low_text}, {high_text}{right}, got {shown}"
    return None


# (integer, low, high, low_open, high_open) of every numeric field. The upper bounds are sanity limits far
# beyond any published model (the deepest have ~128 layers, the widest d_model ~25k); whether a size fits in
# memory is the planner's question, asked by phi1.training.config.validate_config.
_FIELD_RANGES: dict[str, tuple[bool, float | None, float | None, bool, bool]] = {
    "n_layer": (True, 1, 1024, False, False),
    "d_model": (True, 1, 131072, False, False),
    "n_head": (True, 1, 4096, False, False),
    "d_mlp": (True, 1, 1048576, False, False),
    "vocab_size": (True, 1, 2**24, False, False),
    "rotary_dim": (True, 0, 4096, False, False),
    "rotary_base": (False, 1.0, 1e12, True, False),
    "max_seq_len": (True, 1, 2**20, False, False),
    "layer_norm_eps": (False, 0.0, 1.0, True, True),
    "embd_dropout": (False, 0.0, 1.0, False, True),
    "attn_dropout": (False, 0.0, 1.0, False, True),
    "resid_dropout": (False, 0.0, 1.0, False, True),
    "init_std": (False, 0.0, 1.0, True, False),
}


def pad_vocab_size(vocab_size: int, multiple: int = VOCAB_MULTIPLE, tensor_parallel_size: int = 1) -> int:
    """Round a tokenizer's size up so the embedding splits evenly across `tensor_parallel_size` ranks."""
    step = multiple * tensor_parallel_size
    return int(math.ceil(vocab_size / step) * step)


PRESETS: dict[str, dict] = {
    # microsoft/phi-1: 1,418,270,720 parameters.
    "phi-1": dict(n_layer=24, d_model=2048, n_head=32, d_mlp=8192, rotary_dim=32, max_seq_len=2048),
    # The paper's 350M model (section 2.3 / table): ~357M parameters.
    "phi-1-small": dict(n_layer=20, d_model=1024, n_head=16, d_mlp=4096, rotary_dim=32, max_seq_len=2048),
    # Small sizes for laptops, CPU quickstarts and tests; same architecture, same head dim 64 where it fits.
    "phi-1-tiny": dict(
        n_layer=4, d_model=256, n_head=4, d_mlp=1024, rotary_dim=32, vocab_size=8192, max_seq_len=512
    ),
    "phi-1-nano": dict(
        n_layer=2, d_model=64, n_head=4, d_mlp=256, rotary_dim=8, vocab_size=512, max_seq_len=128
    ),
}


def get_preset(name: str, **overrides) -> ModelConfig:
    """The named preset as a ModelConfig, with optional field overrides."""
    if name not in PRESETS:
        raise ValueError(f"ModelConfig preset {name!r} is unknown; known presets are {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], "name": name, **overrides})


def count_parameters_on_meta(config: ModelConfig) -> int:
    """Build the model on the meta device (no memory) and count its parameters."""
    from phi1.core.model import PhiForCausalLM

    with torch.device("meta"):
        model = PhiForCausalLM(config)
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "ATTENTION_BACKENDS",
    "ModelConfig",
    "PRESETS",
    "VOCAB_MULTIPLE",
    "count_parameters_on_meta",
    "get_preset",
    "number_problem",
    "pad_vocab_size",
]
