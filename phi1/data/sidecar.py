"""The tokenizer sidecar `PREFIX.json` beside `PREFIX.bin` / `PREFIX.idx`: which tokenizer made the token ids.

`tools/preprocess_data.py` writes it; training reads it and refuses to train a model on ids from another
tokenizer (a SentencePiece corpus fed to a codegen-vocabulary model trains without any error, on nonsense).
The `.bin` / `.idx` format is unchanged, so Megatron-LM still reads our data and we still read Megatron's; a
dataset without a sidecar (made by Megatron) is accepted as before.

    {"format": "phi1-dataset-tokenizer", "format_version": 1,
     "tokenizer": {"type": "SentencePieceTokenizer", "files": {"tokenizer.model": "<sha256>"},
                   "paths": ["/abs/path/tokenizer.model"],
                   "vocab_size": 32000, "eod": 3, "probe_ids_sha256": "<sha256>"},
     "append_eod": true, "json_key": "text", "documents": 1234, "tokens": 567890,
     "command": ["tools/preprocess_data.py", "--input", ...]}

Two tokenizers are the same for the data when their files hash alike, or, when they do not (codegen's
`tokenizer.json` versus its `vocab.json` + `merges.txt`, or a copy re-saved), when the vocabulary size, the
end-of-document id and the ids of a fixed probe text all agree.
"""

from __future__ import annotations

import hashlib
import json
import os

from phi1.data.tokenizers import _PROBE_TEXT, Tokenizer

SIDECAR_FORMAT = "phi1-dataset-tokenizer"
SIDECAR_VERSION = 1
# A sidecar is a few hundred bytes; a larger file under that name is not ours and is not read whole.
_MAX_SIDECAR_BYTES = 1 << 20


def sidecar_path(prefix: str | os.PathLike) -> str:
    """`PREFIX.json`."""
    return f"{os.fspath(prefix)}.json"


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer: Tokenizer) -> dict:
    """What the sidecar records about a tokenizer: type, file hashes, vocab size, eod id, probe-ids hash."""
    try:
        eod: int | None = tokenizer.eod
    except ValueError:
        eod = None
    probe_ids = tokenizer.encode(_PROBE_TEXT)
    return {
        "type": type(tokenizer).__name__,
        "files": {os.path.basename(path): _file_sha256(path) for path in tokenizer.source_files},
        "paths": [os.path.abspath(path) for path in tokenizer.source_files],
        "vocab_size": int(tokenizer.vocab_size),
        "eod": eod,
        "probe_ids_sha256": hashlib.sha256(json.dumps(probe_ids).encode()).hexdigest(),
    }


def write_sidecar(prefix: str | os.PathLike, tokenizer: Tokenizer, *, command: list[str], append_eod: bool,
                  json_key: str | None = None, documents: int | None = None, tokens: int | None = None) -> str:
    """Writes `PREFIX.json` (atomically) and returns its path."""
    path = sidecar_path(prefix)
    record = {
        "format": SIDECAR_FORMAT,
        "format_version": SIDECAR_VERSION,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "append_eod": bool(append_eod),
        "json_key": json_key,
        "documents": documents,
        "tokens": tokens,
        "command": list(command),
    }
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=1)
        handle.write("\n")
    os.replace(temporary, path)
    return path


def read_sidecar(prefix: str | os.PathLike) -> dict | None:
    """The sidecar of `prefix`, or None when there is none (a dataset made by Megatron-LM).

    Raises:
        ValueError: the file is not a sidecar this version reads; the message names it.
    """
    path = sidecar_path(prefix)
    if not os.path.lexists(path):
        return None
    if not os.path.isfile(path):
        raise ValueError(f"{path}: not a regular file; the tokenizer sidecar of {prefix} must be the JSON file "
                         "tools/preprocess_data.py writes (remove it to train without the tokenizer check)")
    size = os.path.getsize(path)
    if size > _MAX_SIDECAR_BYTES:
        raise ValueError(f"{path}: {size} bytes, not a tokenizer sidecar (those are under 1 KB); re-run "
                         "tools/preprocess_data.py")
    try:
        with open(path, encoding="utf-8") as handle:
            record = json.load(handle)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{path}: not a readable tokenizer sidecar ({type(e).__name__}: {e}); re-run "
                         "tools/preprocess_data.py") from None
    if not isinstance(record, dict) or record.get("format") != SIDECAR_FORMAT:
        raise ValueError(f"{path}: not a phi1 tokenizer sidecar (no \"format\": \"{SIDECAR_FORMAT}\"); a dataset "
                         f"prefix's .json is reserved for it: rename that file or re-run tools/preprocess_data.py")
    version = record.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= SIDECAR_VERSION:
        raise ValueError(f"{path}: sidecar format_version {version!r}, this phi1 reads 1 to {SIDECAR_VERSION}; "
                         "update phi1 or re-run tools/preprocess_data.py")
    tokenizer = record.get("tokenizer")
    fields_ok = (
        isinstance(tokenizer, dict)
        and isinstance(tokenizer.get("type"), str)
        and isinstance(tokenizer.get("files"), dict)
        and isinstance(tokenizer.get("vocab_size"), int)
        and (tokenizer.get("eod") is None or isinstance(tokenizer.get("eod"), int))
        and isinstance(tokenizer.get("probe_ids_sha256"), str)
    )
    if not fields_ok:
        raise ValueError(f"{path}: the \"tokenizer\" entry lacks type, files, vocab_size, eod or probe_ids_sha256; "
                         "re-run tools/preprocess_data.py")
    return record


def check_dataset_tokenizer(prefix: str | os.PathLike, tokenizer: Tokenizer,
                            tokenizer_path: str | os.PathLike | None = None) -> dict | None:
    """Refuses to train on `prefix` when its sidecar records another tokenizer than `tokenizer`.

    Args:
        prefix: the dataset prefix (`PREFIX.bin`, `PREFIX.idx`, `PREFIX.json`).
        tokenizer: the tokenizer training uses.
        tokenizer_path: the file or directory it was read from, for the message.
    Returns:
        the sidecar record, or None when the dataset has none (accepted: Megatron-made data).
    Raises:
        ValueError: a different tokenizer, or an unreadable sidecar; the message names both files.
    """
    record = read_sidecar(prefix)
    if record is None:
        return None
    recorded = record["tokenizer"]
    ours = tokenizer_fingerprint(tokenizer)
    if sorted(recorded["files"].values()) == sorted(ours["files"].values()):
        return record
    differences = [
        f"{what} {recorded[key]} vs {ours[key]}"
        for key, what in (("vocab_size", "vocabulary size"), ("eod", "end-of-document id"))
        if recorded[key] != ours[key]
    ]
    if recorded["probe_ids_sha256"] != ours["probe_ids_sha256"]:
        differences.append("different ids for the same text")
    if not differences:
        return record  # other files, same ids (codegen's tokenizer.json versus its vocab.json + merges.txt)
    ours_name = os.fspath(tokenizer_path) if tokenizer_path is not None else ", ".join(tokenizer.source_files)
    paths = recorded.get("paths")
    made_with = ", ".join(map(str, paths)) if isinstance(paths, list) and paths else ", ".join(recorded["files"])
    raise ValueError(
        f"{sidecar_path(prefix)}: the dataset {prefix} was made with another tokenizer ({recorded['type']}, "
        f"{made_with}) than training uses ({ours['type']}, {ours_name}): {'; '.join(differences)}. Re-run "
        f"tools/preprocess_data.py with --tokenizer-model {ours_name}, or set data.tokenizer_model to the "
        "tokenizer that made the data"
    )
