"""Loading a model directory and its tokenizer for evaluation and serving."""

from __future__ import annotations

import os

import torch

from phi1.core.model import PhiForCausalLM
from phi1.ops import prepare as prepare_fused_ops

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def find_tokenizer(model_dir: str | os.PathLike) -> tuple[str, str] | None:
    """(tokenizer_type, tokenizer_model) of a tokenizer stored in the model directory, or None.

    Looks for tokenizer.model (SentencePiece), tokenizer.json (HuggingFace), vocab.json + merges.txt (GPT-2 BPE),
    in that order.
    """
    model_dir = os.fspath(model_dir)
    if os.path.isfile(os.path.join(model_dir, "tokenizer.model")):
        return "SentencePieceTokenizer", os.path.join(model_dir, "tokenizer.model")
    if os.path.isfile(os.path.join(model_dir, "tokenizer.json")):
        return "HuggingFaceTokenizer", os.path.join(model_dir, "tokenizer.json")
    if os.path.isfile(os.path.join(model_dir, "vocab.json")) and os.path.isfile(os.path.join(model_dir, "merges.txt")):
        return "GPT2BPETokenizer", model_dir
    return None


def load_tokenizer(model_dir: str | os.PathLike, tokenizer_type: str | None = None, tokenizer_model: str | None = None):
    """The tokenizer named by --tokenizer-type/--tokenizer-model, else the one inside `model_dir`.

    Raises ValueError saying which options to pass when neither is there.
    """
    from phi1.data.tokenizers import build_tokenizer

    if tokenizer_type is None:
        found = find_tokenizer(model_dir)
        if found is None:
            raise ValueError(
                f"{model_dir}: no tokenizer.model, tokenizer.json or vocab.json+merges.txt inside; "
                "pass --tokenizer-type and --tokenizer-model"
            )
        tokenizer_type, found_model = found
        tokenizer_model = tokenizer_model or found_model
    return build_tokenizer(tokenizer_type, tokenizer_model)


def load_model(model_dir: str | os.PathLike, device: str = "cpu", dtype: str = "float32") -> PhiForCausalLM:
    """The model of a phi1 or HuggingFace phi directory, in eval mode on `device`."""
    from phi1.core.pretrained import load_pretrained

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
