"""The phi-1 model configuration: one typed dataclass, named presets, validated in one place.

The numbers of the presets are those of `microsoft/phi-1` and the paper (Gunasekar et al. 2023, section 2.3);
the tiny presets exist so that tests and the CPU quickstart run in seconds.
"""

from __future__ import annotations

import dataclasses
import math
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
        if self.d_mlp is None:
            self.d_mlp = 4 * self.d_model
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def validate(self, tensor_parallel_size: int = 1) -> None:
        """Raise ValueError naming the field when the shape is impossible."""

        def fail(field_name: str, why: str) -> None:
            raise ValueError(f"ModelConfig.{field_name}: {why}")

        for name in ("n_layer", "d_model", "n_head", "d_mlp", "vocab_size", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                fail(name, f"must be a positive integer, got {value!r}")
        if self.d_model % self.n_head != 0:
            fail("n_head", f"{self.n_head} heads do not divide d_model={self.d_model}")
        if self.rotary_dim < 0 or self.rotary_dim % 2 != 0:
            fail("rotary_dim", f"must be even and >= 0 (rotary rotates pairs), got {self.rotary_dim}")
        if self.rotary_dim > self.head_dim:
            fail("rotary_dim", f"{self.rotary_dim} exceeds the head dim {self.head_dim}")
        if self.vocab_size % VOCAB_MULTIPLE != 0:
            fail(
                "vocab_size",
                f"{self.vocab_size} is not a multiple of {VOCAB_MULTIPLE}; pad it "
                f"(e.g. {pad_vocab_size(self.vocab_size)})",
            )
        for name in ("embd_dropout", "attn_dropout", "resid_dropout"):
            p = getattr(self, name)
            if not 0.0 <= p < 1.0:
                fail(name, f"must be in [0, 1), got {p}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            fail("attention_backend", f"unknown backend {self.attention_backend!r}; choose one of {ATTENTION_BACKENDS}")
        if self.layer_norm_eps <= 0:
            fail("layer_norm_eps", f"must be > 0, got {self.layer_norm_eps}")
        if self.tie_word_embeddings:
            fail("tie_word_embeddings", "phi-1 has an untied lm_head with bias; tying is not supported")
        if tensor_parallel_size > 1:
            if self.n_head % tensor_parallel_size != 0:
                fail("n_head", f"{self.n_head} heads are not divisible by tensor parallel size {tensor_parallel_size}")
            if self.d_mlp % tensor_parallel_size != 0:
                fail("d_mlp", f"{self.d_mlp} is not divisible by tensor parallel size {tensor_parallel_size}")
            if self.vocab_size % tensor_parallel_size != 0:
                fail(
                    "vocab_size",
                    f"{self.vocab_size} is not divisible by tensor parallel size {tensor_parallel_size}",
                )

    def replace(self, **changes) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"ModelConfig: unknown field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**values)

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
    "pad_vocab_size",
]
