"""A randomly initialised model directory with a small trained tokenizer, for smoke tests and benchmarks of
evaluation and serving (nothing here learns to code: pass@1 of such a model is about zero)."""

from __future__ import annotations

import os
from pathlib import Path

from phi1.core.config import get_preset
from phi1.core.model import PhiForCausalLM
from phi1.core.pretrained import save_pretrained


def train_bytelevel_tokenizer(texts: list[str], vocab_size: int, path: str | os.PathLike) -> Path:
    """Train a GPT-2 style byte-level BPE on `texts` with `<|endoftext|>` and save it as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer)
    path = Path(path)
    tokenizer.save(str(path))
    return path


def build_toy_model_dir(
    directory: str | os.PathLike, preset: str = "phi-1-nano", texts: list[str] | None = None, seed: int = 0,
    **config_overrides,
) -> Path:
    """Write a random `preset` model and a tokenizer.json trained on `texts` (default: the HumanEval prompts)
    to `directory`; the tokenizer fills the preset's vocabulary. Returns the directory."""
    config = get_preset(preset, **config_overrides)
    if texts is None:
        from phi1.eval.tasks import load_humaneval

        texts = [p.prompt + p.test for p in load_humaneval()]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    train_bytelevel_tokenizer(texts, config.vocab_size, directory / "tokenizer.json")
    model = PhiForCausalLM(config, init_seed=seed)
    save_pretrained(model.state_dict(), config, directory)
    return directory
