"""Loading a model and its tokenizer for evaluation and serving, from any model path.

`--model` may be a phi1 model directory, a HuggingFace phi directory, a training run directory (its `latest`
checkpoint, verified by its manifest; the tokenizer copied into that checkpoint) or one `iter_*` checkpoint.
`phi1.loading` decides which and checks every file before a tensor is read; this module adds the eval and serve
concerns: dtype names, eval mode, fused kernels, the vocabulary check.
"""

from __future__ import annotations

import os

import torch

from phi1.core.model import PhiForCausalLM
from phi1.loading import find_tokenizer as _find_tokenizer
from phi1.loading import load_pretrained
from phi1.loading import load_tokenizer as _load_tokenizer
from phi1.ops import prepare as prepare_fused_ops

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def find_tokenizer(model_dir: str | os.PathLike) -> tuple[str, str] | None:
    """(tokenizer_type, tokenizer_model) of the tokenizer stored with the model at `model_dir`, or None.

    Looks for tokenizer.model (SentencePiece), tokenizer.json (HuggingFace), vocab.json + merges.txt (GPT-2 BPE),
    in that order, in the model directory or, for a training run, in its checkpoint.
    """
    return _find_tokenizer(model_dir)


def load_tokenizer(model_dir: str | os.PathLike, tokenizer_type: str | None = None, tokenizer_model: str | None = None):
    """The tokenizer named by --tokenizer-type/--tokenizer-model, else the one stored with `model_dir`.

    Raises:
        ValueError: neither is there (says which options to pass), or `model_dir` is not a model path.
    """
    return _load_tokenizer(model_dir, tokenizer_type, tokenizer_model)


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
