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

# One exercise is a function and its docstring; a line beyond this is not an exercise, and is refused before it
# is read into memory whole.
MAX_LINE_BYTES = 16 << 20


def _json_type(value: object) -> str:
    names = {type(None): "null", bool: "boolean", int: "number", float: "number", str: "string", list: "array",
             dict: "object"}
    return names.get(type(value), type(value).__name__)


def _open_exercises(path: str):
    """Opens `path` for reading, refusing what is not a regular file (a FIFO would block, /dev/zero never end)."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file (finetune.data)") from None
    if not stat.S_ISREG(mode):
        kind = ("a directory" if stat.S_ISDIR(mode) else "a named pipe (FIFO)" if stat.S_ISFIFO(mode)
                else "a device file" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
        raise ValueError(f"{path}: {kind}; finetune.data must be a JSONL file of exercises")
    return open(path, "rb")


def read_exercises(path: str | os.PathLike, prompt_key: str = "prompt", solution_key: str = "solution") -> list[tuple[str, str]]:
    """(prompt, solution) pairs of a JSONL file: one JSON object per line, blank lines allowed.

    Raises:
        ValueError: naming the file and line: not UTF-8, not JSON, not an object, a key missing or not a string,
            text that cannot be encoded (a lone surrogate), a line over MAX_LINE_BYTES, or no exercise at all.
        FileNotFoundError: no such file.
    """
    path = os.fspath(path)
    pairs = []
    keys_hint = "(finetune.prompt_key / finetune.solution_key choose the fields)"
    with _open_exercises(path) as handle:
        number = 0
        while True:
            raw = handle.readline(MAX_LINE_BYTES + 1)
            if not raw:
                break
            number += 1
            if len(raw) > MAX_LINE_BYTES:
                raise ValueError(f"{path}:{number}: a line longer than {MAX_LINE_BYTES} bytes, not one exercise; "
                                 "one JSON object per line")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{number}: not UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1}); "
                                 "re-encode the file as UTF-8") from None
            if number == 1:
                line = line.removeprefix("\ufeff")  # a byte-order mark, as some editors write, is not JSON
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as e:
                raise ValueError(f"{path}:{number}: not JSON ({type(e).__name__}: {e})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object with {prompt_key!r} and {solution_key!r}, "
                                 f"got a JSON {_json_type(record)}")
            for key in (prompt_key, solution_key):
                if key not in record:
                    raise ValueError(f"{path}:{number}: no field {key!r} {keys_hint}")
                if not isinstance(record[key], str):
                    raise ValueError(f"{path}:{number}: field {key!r} is a JSON {_json_type(record[key])}, not a "
                                     f"string {keys_hint}")
                try:
                    record[key].encode("utf-8")
                except UnicodeEncodeError as e:
                    raise ValueError(f"{path}:{number}: field {key!r} holds an unencodable character "
                                     f"U+{ord(record[key][e.start]):04X} (a lone surrogate)") from None
            pairs.append((record[prompt_key], record[solution_key]))
    if not pairs:
        what = "an empty file" if number == 0 else f"{number} blank lines"
        raise ValueError(f"{path}: no exercises ({what}); finetune.data needs one JSON object per line with "
                         f"{prompt_key!r} and {solution_key!r}")
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
            # Only the current epoch's order is kept: many epochs over a small file would otherwise grow memory.
            self._permutations.clear()
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
