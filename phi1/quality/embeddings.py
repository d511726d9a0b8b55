"""Code embeddings from a phi1 checkpoint: the mean of the final hidden states over a text's real tokens."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import torch


def checkpoint_fingerprint(model_dir: str | os.PathLike) -> str:
    """sha256 over the directory's config and weight files: a classifier records which embedder it needs."""
    digest = hashlib.sha256()
    names = sorted(n for n in os.listdir(model_dir) if n.endswith((".json", ".safetensors", ".model", ".txt")))
    for name in names:
        digest.update(name.encode())
        with open(os.path.join(model_dir, name), "rb") as handle:
            while block := handle.read(8 << 20):
                digest.update(block)
    return digest.hexdigest()


class CodeEmbedder:
    """Batched mean-pooled final-LayerNorm states of a phi1 (or HF phi) model directory.

    Args:
        model_dir: any model path `phi1.loading` accepts (phi1 / HF directory, training run, iter_* checkpoint).
        tokenizer_type, tokenizer_model: the tokenizer, when the directory does not hold one.
        batch_size: texts per forward pass.
        max_tokens: texts are cut to this many tokens (default: the model's max_seq_len).
        threads: torch intra-op threads (1 in worker processes so workers do not fight over cores).
    """

    def __init__(self, model_dir: str | os.PathLike, tokenizer_type: str | None = None,
                 tokenizer_model: str | None = None, batch_size: int = 16, max_tokens: int | None = None,
                 device: str = "cpu", threads: int | None = None) -> None:
        from phi1.eval.loading import check_vocab, load_model, load_tokenizer

        if threads is not None:
            torch.set_num_threads(threads)
        self.model_dir = os.fspath(model_dir)
        self.model = load_model(model_dir, device=device)
        self.tokenizer = load_tokenizer(model_dir, tokenizer_type, tokenizer_model)
        check_vocab(self.model, self.tokenizer, model_dir)
        self.batch_size = batch_size
        self.max_tokens = min(max_tokens or self.model.config.max_seq_len, self.model.config.max_seq_len)
        self.device = device

    @property
    def dim(self) -> int:
        return self.model.config.d_model

    @torch.no_grad()
    def embed(self, texts: list[str], normalise: bool = False) -> np.ndarray:
        """(len(texts), d) float32 mean hidden states; rows of unit length when `normalise`.

        An empty text (no tokens) is embedded from the end-of-document token alone.
        """
        token_lists = []
        for text in texts:
            ids = self.tokenizer.encode(text)[: self.max_tokens]
            token_lists.append(ids or [self.tokenizer.eod])
        result = np.zeros((len(texts), self.dim), dtype=np.float32)
        # Similar lengths share a batch: little padding, so little wasted compute.
        order = sorted(range(len(texts)), key=lambda i: len(token_lists[i]))
        for begin in range(0, len(order), self.batch_size):
            rows = order[begin: begin + self.batch_size]
            longest = max(len(token_lists[i]) for i in rows)
            input_ids = torch.zeros((len(rows), longest), dtype=torch.long)
            mask = torch.zeros((len(rows), longest), dtype=torch.long)
            for slot, i in enumerate(rows):
                ids = token_lists[i]
                input_ids[slot, : len(ids)] = torch.tensor(ids)
                mask[slot, : len(ids)] = 1
            # Right padding: causal attention means real tokens never see the pads after them.
            hidden = self.model.hidden_states(input_ids.to(self.device), attention_mask=mask.to(self.device))
            weights = mask.to(hidden.device, hidden.dtype).unsqueeze(-1)  # (B, T, 1)
            mean = (hidden * weights).sum(dim=1) / weights.sum(dim=1)  # (B, d)
            result[rows] = mean.float().cpu().numpy()
        if normalise:
            result /= np.maximum(np.linalg.norm(result, axis=1, keepdims=True), 1e-12)
        return result
