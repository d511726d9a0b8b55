"""CodeExercises-shaped fine-tuning data: {"prompt": signature + docstring, "solution": body} per JSONL line.

Each exercise becomes `prompt tokens + solution tokens + <eod>`; exercises are concatenated into one stream
and cut into samples of `seq_len + 1` tokens, as pretraining packs files (the paper describes no other
packing). A parallel mask marks the tokens that carry loss: with `loss_on_solution_only` the prompt tokens are
context only, and the model learns to write solutions, not docstrings. Items are
`{"tokens": int64 (seq_len + 1,), "loss_mask": int64 (seq_len + 1,)}`; the loss of the prediction of
`tokens[t + 1]` counts when `loss_mask[t + 1]` is 1.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
import torch

from phi1.data.gpt_dataset import split_document_ranges
from phi1.data.tokenizers import Tokenizer


def read_exercises(path: str | os.PathLike, prompt_key: str = "prompt", solution_key: str = "solution") -> list[tuple[str, str]]:
    """(prompt, solution) pairs of a JSONL file.

    Raises:
        ValueError: a line that is not JSON or lacks a key, naming the file, line and key.
    """
    pairs = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{number}: not UTF-8 ({e})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as e:
                raise ValueError(f"{path}:{number}: not JSON ({type(e).__name__}: {e})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object with {prompt_key!r} and {solution_key!r}, "
                                 f"got a {type(record).__name__}")
            for key in (prompt_key, solution_key):
                if not isinstance(record.get(key), str):
                    raise ValueError(f"{path}:{number}: no string field {key!r} (finetune.prompt_key / solution_key)")
            pairs.append((record[prompt_key], record[solution_key]))
    if not pairs:
        raise ValueError(f"{path}: no exercises")
    return pairs


def pack_exercises(
    pairs: Sequence[tuple[str, str]], tokenizer: Tokenizer, loss_on_solution_only: bool
) -> tuple[np.ndarray, np.ndarray]:
    """One token stream (int64) and its loss mask (int64, 1 = loss) for the exercises, in order."""
    prompts = tokenizer.encode_batch([p for p, _ in pairs])
    solutions = tokenizer.encode_batch([s for _, s in pairs])
    token_parts, mask_parts = [], []
    for prompt, solution in zip(prompts, solutions):
        token_parts.append(np.asarray(prompt + solution + [tokenizer.eod], dtype=np.int64))
        prompt_mask = np.zeros(len(prompt), dtype=np.int64) if loss_on_solution_only else np.ones(len(prompt), dtype=np.int64)
        mask_parts.append(np.concatenate([prompt_mask, np.ones(len(solution) + 1, dtype=np.int64)]))
    return np.concatenate(token_parts), np.concatenate(mask_parts)


class PackedExerciseDataset(torch.utils.data.Dataset):
    """`num_samples` packed samples of one split, cycling through seeded per-epoch permutations.

    Args:
        tokens, loss_mask: the split's stream (see `pack_exercises`).
        seq_len: model sequence length.
        num_samples: samples served (several epochs when the stream holds fewer).
        seed: shuffle seed.
        name: 'train' / 'valid', for messages.
    Raises:
        ValueError: the stream is shorter than one sample.
    """

    def __init__(self, tokens: np.ndarray, loss_mask: np.ndarray, seq_len: int, num_samples: int, seed: int, name: str) -> None:
        self.tokens, self.loss_mask, self.seq_len = tokens, loss_mask, seq_len
        self.samples_per_epoch = (len(tokens) - 1) // seq_len
        if self.samples_per_epoch < 1:
            raise ValueError(f"finetune.data: the {name} split has {len(tokens)} tokens, fewer than one sample of "
                             f"data.seq_len + 1 = {seq_len + 1}; add exercises or lower data.seq_len")
        self.num_samples, self.seed, self.name = num_samples, seed, name
        self._permutations: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.num_samples

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            self._permutations[epoch] = np.random.RandomState((self.seed + 7919 * epoch) % 2**32).permutation(self.samples_per_epoch)
        return self._permutations[epoch]

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"{self.name}: sample {index} out of range ({self.num_samples})")
        epoch, position = divmod(index, self.samples_per_epoch)
        start = int(self._permutation(epoch)[position]) * self.seq_len
        window = slice(start, start + self.seq_len + 1)
        return {"tokens": self.tokens[window], "loss_mask": self.loss_mask[window]}


def build_exercise_datasets(
    path: str | os.PathLike,
    tokenizer: Tokenizer,
    seq_len: int,
    split: str,
    num_samples: tuple[int, int],
    seed: int,
    loss_on_solution_only: bool,
    prompt_key: str = "prompt",
    solution_key: str = "solution",
) -> tuple[PackedExerciseDataset, PackedExerciseDataset | None]:
    """Train and validation datasets of a JSONL of exercises, split by exercise with `split` ('969,30,1').

    The validation dataset is None when it asks for no samples or the split gives it no exercises.
    """
    pairs = read_exercises(path, prompt_key, solution_key)
    ranges = split_document_ranges(len(pairs), split)
    datasets: list[PackedExerciseDataset | None] = []
    for (start, end), wanted, name in zip(ranges[:2], num_samples, ("train", "valid")):
        if not wanted or end <= start:
            if name == "train":
                raise ValueError(f"finetune.data: {path}: data.split {split!r} leaves no exercises for training")
            datasets.append(None)
            continue
        tokens, mask = pack_exercises(pairs[start:end], tokenizer, loss_on_solution_only)
        datasets.append(PackedExerciseDataset(tokens, mask, seq_len, wanted, seed + (0 if name == "train" else 1), name))
    return datasets[0], datasets[1]
