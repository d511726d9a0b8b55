"""A tiny synthetic corpus with a word-level tokenizer: for tests and smoke runs of the trainer in seconds.

Documents are counting sequences in words ("w12 w13 w14 ...") of random start and length, so a model can
learn them quickly and a falling loss means the loop works. Nothing here is used by real training.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

EOD_TOKEN = "<|endoftext|>"


def write_word_tokenizer(path: str | os.PathLike, num_words: int = 100) -> Path:
    """A HuggingFace tokenizer.json: `<|endoftext|>` (id 0), then 'w0' .. 'w{num_words-1}', split on spaces."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {EOD_TOKEN: 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(num_words)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return path


def counting_documents(num_documents: int, num_words: int = 100, seed: int = 0) -> list[list[int]]:
    """Token ids (word ids + 2) of counting documents, each ending with the eod id 0."""
    rng = np.random.RandomState(seed)
    documents = []
    for _ in range(num_documents):
        start, length = rng.randint(0, num_words), rng.randint(8, 40)
        documents.append([(start + i) % num_words + 2 for i in range(length)] + [0])
    return documents


def write_synthetic_dataset(directory: str | os.PathLike, num_documents: int = 400, num_words: int = 100) -> tuple[str, str]:
    """Write `directory/tokenizer.json` and the indexed dataset `directory/counting_text_document`.

    Returns:
        (dataset prefix, tokenizer path).
    """
    from phi1.data.indexed_dataset import IndexedDatasetWriter

    directory = Path(directory)
    tokenizer = write_word_tokenizer(directory / "tokenizer.json", num_words)
    prefix = directory / "counting_text_document"
    with IndexedDatasetWriter(prefix, dtype=np.uint16) as writer:
        for document in counting_documents(num_documents, num_words):
            writer.add_document(document)
    return str(prefix), str(tokenizer)


def write_synthetic_exercises(path: str | os.PathLike, num_exercises: int = 200, num_words: int = 100) -> Path:
    """A JSONL of exercise-shaped records in the same words: prompt = the first words, solution = the rest."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for document in counting_documents(num_exercises, num_words, seed=1):
            words = [f"w{t - 2}" for t in document[:-1]]
            cut = max(1, len(words) // 3)
            handle.write(json.dumps({"prompt": " ".join(words[:cut]) + " ", "solution": " ".join(words[cut:])}) + "\n")
    return path
