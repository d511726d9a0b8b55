"""A model ready for inference (evaluation, serving, embedding, checkpoint selection), from any model path.

`phi1.loading.model_path` decides what a path is and checks every file before a tensor is read; this module adds
what every inference caller needs on top: dtype names, eval mode, the fused kernels, the vocabulary check.
"""

from __future__ import annotations

import os

import torch

from phi1.core.model import PhiForCausalLM
from phi1.loading.model_path import load_pretrained
from phi1.ops import prepare as prepare_fused_ops

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(model_dir: str | os.PathLike, device: str = "cpu", dtype: str = "float32") -> PhiForCausalLM:
    """The model at any accepted model path, in eval mode on `device`.

    Raises:
        ValueError, FileNotFoundError: one line naming the file (and tensor) that is wrong, or saying what was
            found at `model_dir` and what is accepted.
    """
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    model = load_pretrained(model_dir, device=device, dtype=DTYPES[dtype])
    model.eval()
    # On a GPU, generation runs the fused bias + gelu and rotary kernels when they build (a warning if not).
    model.fused_ops = prepare_fused_ops(device, "auto")
    return model


def check_vocab(model: PhiForCausalLM, tokenizer, model_dir: str | os.PathLike) -> None:
    """Raise ValueError when the tokenizer makes ids the model's embedding does not have."""
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"{model_dir}: the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary has "
            f"{model.config.vocab_size}; pass the tokenizer the model was trained with"
        )
