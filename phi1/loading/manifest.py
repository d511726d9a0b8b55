"""A checkpoint's `manifest.json`: every file's size and SHA-256, written at save and verified before a load.

Verification treats the manifest as untrusted input: each entry must name a regular file inside the
checkpoint directory (`phi1.loading.paths.inside`; absolute names, `..` and symlinks pointing out are refused
without looking at the target), and sizes are compared before anything is hashed, so an entry naming a huge
file costs a `stat`, not a read. Messages name the entry and the checkpoint, never facts about other files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from phi1.loading.paths import inside, read_json_object, regular_file

logger = logging.getLogger("phi1.loading")

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "phi1-checkpoint-manifest"
_HASH_BLOCK = 1 << 24


class CheckpointCorruptError(ValueError):
    """A checkpoint whose files do not match its manifest; `damaged` lists them."""

    def __init__(self, directory: Path, damaged: list[str]) -> None:
        super().__init__(f"{directory}: damaged checkpoint: {'; '.join(damaged)} (set checkpoint.fallback=true to "
                         "resume from the previous complete checkpoint instead, or load an older iter_* directory)")
        self.directory = directory
        self.damaged = damaged


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _checkpoint_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(directory: str | os.PathLike) -> Path:
    """Write `manifest.json` listing every other file of `directory` (recursively) with its bytes and SHA-256."""
    directory = Path(directory)
    files = {str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
             for p in _checkpoint_files(directory)}
    path = directory / MANIFEST
    tmp = path.with_name(MANIFEST + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump({"format": MANIFEST_FORMAT, "version": 1, "files": files}, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return path


# Verified results, keyed by the manifest's identity, so that loading the model and then its tokenizer from the
# same checkpoint hashes its files once.
_verified: set[tuple] = set()


def verify_checkpoint(directory: str | os.PathLike) -> bool:
    """Check every file of a checkpoint against its `manifest.json`.

    Returns:
        True when verified; False (with a warning) when the checkpoint has no manifest (written before phi1
        wrote them).

    Raises:
        CheckpointCorruptError: naming each entry that leaves the directory, is missing, is not a regular file,
            has another size or another SHA-256, and an unreadable manifest.
    """
    directory = Path(directory)
    path = directory / MANIFEST
    if not os.path.lexists(path):
        logger.warning("%s: no %s; the files cannot be verified", directory, MANIFEST)
        return False
    try:
        inside(directory, MANIFEST, "manifest")
        manifest = read_json_object(path)
        files = manifest.get("files")
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
            raise ValueError("not a phi1 checkpoint manifest")
        manifest_stat = os.stat(path)
    except (ValueError, OSError) as e:
        raise CheckpointCorruptError(directory, [f"{MANIFEST} unreadable ({e})"]) from None
    damaged, to_hash = [], []
    for name, entry in sorted(files.items()):
        try:
            file = inside(directory, name, f"{MANIFEST} entry")
            if not isinstance(entry, dict) or not isinstance(entry.get("bytes"), int) or not isinstance(entry.get("sha256"), str):
                raise ValueError(f"{MANIFEST} entry {name!r} lacks an integer 'bytes' and a string 'sha256'")
            size = regular_file(file, name)
        except (ValueError, FileNotFoundError) as e:
            damaged.append(str(e).removeprefix(f"{directory}: "))
            continue
        if size != entry["bytes"]:
            damaged.append(f"{name} has {size} bytes, the manifest says {entry['bytes']}")
        else:
            to_hash.append((name, file, entry["sha256"]))
    key = (str(path.resolve()), manifest_stat.st_mtime_ns,
           tuple((str(file), os.stat(file).st_mtime_ns) for _, file, _ in to_hash))
    if not damaged and key in _verified:
        return True
    if not damaged:  # sizes first: nothing is hashed while any entry is already known bad
        damaged = [f"{name} has another SHA-256 than the manifest's"
                   for name, file, sha in to_hash if file_sha256(file) != sha]
    if damaged:
        raise CheckpointCorruptError(directory, damaged)
    _verified.add(key)
    return True
