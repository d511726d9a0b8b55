"""A small phi1 model trained briefly on CPU, as an honest embedder for demos and tests.

A randomly initialised model's hidden states barely reflect what a text says; a few hundred next-token steps
on real code give mean embeddings that separate, e.g., documented from undocumented functions. This is not the
paper's pretrained code model; it is the cheapest real one that can be built offline.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import torch


def train_tiny_model(texts: list[str], tokenizer, output_dir: str | os.PathLike, preset: str = "phi-1-nano",
                     steps: int = 300, batch_size: int = 16, learning_rate: float = 3e-3, seed: int = 0,
                     tokenizer_file: str | None = None) -> list[float]:
    """Train a `preset` model on random windows of `texts` and save it (phi1 format) to `output_dir`.

    Args:
        tokenizer: a phi1 tokenizer whose vocabulary fits the preset's.
        tokenizer_file: copied into `output_dir` (as tokenizer.model / tokenizer.json) so loaders find it.
    Returns the training loss of every step.
    """
    from phi1.core.config import get_preset
    from phi1.core.model import PhiForCausalLM
    from phi1.core.pretrained import save_pretrained

    config = get_preset(preset)
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens, preset {preset} only {config.vocab_size}")
    stream = []
    for text in texts:
        stream.extend(tokenizer.encode(text))
        stream.append(tokenizer.eod)
    tokens = torch.tensor(stream, dtype=torch.long)
    window = config.max_seq_len + 1
    if len(tokens) <= window:
        raise ValueError(f"{len(tokens)} tokens of text: need more than {window} to train")
    torch.manual_seed(seed)
    model = PhiForCausalLM(config, init_seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
    rng = np.random.default_rng(seed)
    losses = []
    model.train()
    for step in range(steps):
        starts = rng.integers(0, len(tokens) - window, size=batch_size)
        batch = torch.stack([tokens[s: s + window] for s in starts])  # (B, T + 1)
        # Linear warm-up over the first tenth, then constant: enough for a short run.
        for group in optimizer.param_groups:
            group["lr"] = learning_rate * min(1.0, (step + 1) / max(1, steps // 10))
        loss = model(batch[:, :-1], labels=batch[:, 1:]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.detach().item())
    save_pretrained(model.state_dict(), config, output_dir)
    if tokenizer_file is not None:
        name = "tokenizer.model" if tokenizer_file.endswith(".model") else "tokenizer.json"
        shutil.copyfile(tokenizer_file, os.path.join(output_dir, name))
    return losses
