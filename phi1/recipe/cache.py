"""Content hashes of files and folders, remembered by (path, size, mtime) so a 35B-token corpus is read once.

A step's cache key is the SHA-256 of its name, its settings and the content hashes of everything it reads; a
step whose key is unchanged and whose finished output is in place is skipped. Folders hash as the sorted list of
(relative path, file hash) pairs; symlinks are followed only inside the folder (a link leaving it is an error,
as the loading code treats checkpoints).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

BLOCK = 1 << 20


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(BLOCK):
            digest.update(block)
    return digest.hexdigest()


class DigestCache:
    """sha256 of files by (absolute path, size, mtime_ns), persisted in a JSON file (the recipe's state folder)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.entries: dict[str, list] = {}
        try:
            if not self.path.is_symlink():
                loaded = json.loads(self.path.read_text(encoding="utf-8"))
                # Only well-formed entries are kept: a damaged or edited file costs a rehash, never a wrong answer
                # of the wrong type.
                if isinstance(loaded, dict):
                    self.entries = {k: v for k, v in loaded.items() if isinstance(k, str) and isinstance(v, list)
                                    and len(v) == 3 and all(isinstance(n, int) for n in v[:2])
                                    and isinstance(v[2], str) and len(v[2]) == 64}
        except (OSError, ValueError):
            self.entries = {}

    def file(self, path: str | os.PathLike) -> str:
        absolute = os.path.abspath(path)
        info = os.stat(absolute)
        if not stat.S_ISREG(info.st_mode):  # a FIFO or a device would block the read, or never end
            raise ValueError(f"{path}: not a regular file (a pipe, device or socket); a recipe reads files and "
                             "folders only")
        stamp = [info.st_size, info.st_mtime_ns]
        known = self.entries.get(absolute)
        if known is not None and known[:2] == stamp:
            return known[2]
        digest = _file_sha256(absolute)
        self.entries[absolute] = [*stamp, digest]
        return digest

    def tree(self, path: str | os.PathLike, skip: tuple[str, ...] = ()) -> str:
        """A file's hash, or a folder's: its files' relative paths and hashes, sorted (names in `skip` left out)."""
        root = Path(path)
        if not root.is_dir():
            return self.file(root)
        digest = hashlib.sha256()
        resolved_root = root.resolve()
        for file in sorted(p for p in root.rglob("*") if p.is_file()):
            relative = file.relative_to(root)
            if any(part in skip for part in relative.parts):
                continue
            if not file.resolve().is_relative_to(resolved_root):
                raise ValueError(f"{file}: a link that leaves {root}; copy the file in instead")
            digest.update(f"{relative.as_posix()}\0{self.file(file)}\n".encode())
        return digest.hexdigest()

    def forget(self, folder: str | os.PathLike) -> None:
        """Drop the entries of files under `folder` (a step's temporary folder, once renamed)."""
        prefix = os.path.abspath(folder) + os.sep
        self.entries = {k: v for k, v in self.entries.items() if not k.startswith(prefix)}

    def moved(self, old: str | os.PathLike, new: str | os.PathLike) -> None:
        """Entries of files under `old` now under `new` (a rename keeps sizes and mtimes, so the hashes hold)."""
        old_prefix, new_prefix = os.path.abspath(old) + os.sep, os.path.abspath(new) + os.sep
        self.entries = {(new_prefix + k[len(old_prefix):] if k.startswith(old_prefix) else k): v
                        for k, v in self.entries.items() if not k.startswith(new_prefix)}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text_here(self.path, json.dumps(self.entries))


def write_text_here(path: str | os.PathLike, text: str) -> None:
    """Write `path` atomically, never through a link: the text goes to a new file created beside it (O_EXCL, so
    a link planted under the temporary name is never followed) and is renamed over `path` (a rename replaces a
    link at `path` itself, not what it points to)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, path)


def open_append_here(path: str | os.PathLike):
    """`path` opened for appending text, refusing to follow a link there (a log planted as a link to a file
    elsewhere would otherwise be written through)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError:
        if Path(path).is_symlink():
            raise ValueError(f"{path}: is a symbolic link; the recipe writes its logs only into its own work "
                             "folder: remove the link") from None
        raise
    return os.fdopen(fd, "a", encoding="utf-8")


# Part of every key: raise it when what a step does changes, so results of the old code are not reused.
STEPS_VERSION = 3


def step_key(name: str, settings: dict, inputs: dict[str, str]) -> str:
    """The cache key of a step: its name, settings, the content hashes of its inputs and STEPS_VERSION."""
    payload = json.dumps({"step": name, "settings": settings, "inputs": inputs, "version": STEPS_VERSION},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()
