"""Paths read from files stay inside their directory, and only regular files of bounded size are read.

Every name that comes from a file phi1 did not just write (a checkpoint's `latest` pointer or manifest, an
`iter_*` entry, a HuggingFace `model.safetensors.index.json`) goes through `inside`: it is joined to its base
directory, resolved (symlinks followed, `..` collapsed) and refused when the result leaves the base. The message
then says only that the name leaves the directory: nothing about what lies outside (its size, its existence) is
looked at or printed. `regular_file` refuses FIFOs, devices, sockets and directories before anything is
opened, so `/dev/zero` or a named pipe is an error, never a hang or an endless read.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

# Small text files (config.json, latest, manifest.json, index.json, trainer_state.json) are read whole; these
# caps are far above any real file (a 1,000-shard index is ~100 KB) and keep a hostile one from using memory.
MAX_POINTER_BYTES = 64
MAX_JSON_BYTES = 16 << 20


def inside(base: str | os.PathLike, name: str | os.PathLike, what: str) -> Path:
    """`base / name`, resolved, when it stays inside `base` (resolved too).

    Args:
        base: the directory the name belongs to.
        name: a relative name read from a file (or from a directory listing).
        what: where the name came from, for the message (e.g. "manifest.json entry").

    Raises:
        ValueError: `name` is absolute, empty, not a string, holds a NUL, climbs out with `..`, or resolves
            outside `base` through a symlink. The message names `base`, and the name only when the name itself
            stays inside (a symlink's name); never the target or any fact about it.
    """
    base_resolved = Path(base).resolve()
    if not isinstance(name, (str, os.PathLike)) or not os.fspath(name) or "\x00" in os.fspath(name):
        raise ValueError(f"{base}: a {what} is not a file name inside the directory; refused")
    text = os.fspath(name)
    if os.path.isabs(text):
        # The name itself points elsewhere: it is not echoed, so no message names a file outside the directory.
        raise ValueError(f"{base}: a {what} is an absolute path; only names inside {base} are accepted, refused")
    if ".." in Path(text).parts:
        raise ValueError(f"{base}: a {what} climbs out with '..'; only names inside {base} are accepted, refused")
    try:
        resolved = (base_resolved / text).resolve()
    except (OSError, RuntimeError):  # a symlink loop
        raise ValueError(f"{base}: {what} {text!r} cannot be resolved (a symlink loop?); refused") from None
    if resolved != base_resolved and base_resolved not in resolved.parents:
        raise ValueError(f"{base}: {what} {text!r} is a symlink pointing out of the directory; refused")
    return resolved


def describe_kind(mode: int) -> str:
    """'a directory', 'a FIFO', ... for a stat mode."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISREG, "a regular file")):
        if test(mode):
            return name
    return "not a regular file"


def regular_file(path: str | os.PathLike, shown: str | os.PathLike | None = None, max_bytes: int | None = None) -> int:
    """The size of `path` after checking that it is a regular file (at most `max_bytes` when given).

    Args:
        path: the (already contained) path to check; symlinks are followed.
        shown: how to name it in messages (default: `path`).
        max_bytes: refuse larger files.

    Raises:
        FileNotFoundError: it does not exist.
        ValueError: a directory, FIFO, device or socket, or over `max_bytes`.
    """
    shown = shown if shown is not None else path
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{shown}: missing") from None
    except OSError as e:
        raise ValueError(f"{shown}: cannot be examined ({e.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{shown}: is {describe_kind(info.st_mode)} where a file was expected")
    if max_bytes is not None and info.st_size > max_bytes:
        raise ValueError(f"{shown}: {info.st_size} bytes, over the {max_bytes}-byte limit for this kind of file")
    return info.st_size


def read_bounded_text(path: str | os.PathLike, shown: str | os.PathLike | None = None,
                      max_bytes: int = MAX_JSON_BYTES) -> str:
    """UTF-8 text of a regular file of at most `max_bytes` (checked before it is opened).

    Raises:
        FileNotFoundError, ValueError: as `regular_file`, or the bytes are not UTF-8.
    """
    shown = shown if shown is not None else path
    regular_file(path, shown, max_bytes)
    with open(path, "rb") as handle:
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:  # grew between the check and the read
        raise ValueError(f"{shown}: over the {max_bytes}-byte limit for this kind of file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{shown}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_json_object(path: str | os.PathLike, shown: str | os.PathLike | None = None,
                     max_bytes: int = MAX_JSON_BYTES) -> dict:
    """A JSON object from a bounded regular file.

    Raises:
        FileNotFoundError, ValueError: not a bounded regular file, not JSON, nested too deep, or not an object.
    """
    import json

    shown = shown if shown is not None else path
    text = read_bounded_text(path, shown, max_bytes)
    try:
        value = json.loads(text)
    except RecursionError:
        raise ValueError(f"{shown}: JSON nested too deeply") from None
    except ValueError as e:
        raise ValueError(f"{shown}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{shown}: expected a JSON object, got {type(value).__name__}")
    return value


def check_output_directory(out: str | os.PathLike, inputs: list[str | os.PathLike], option: str) -> None:
    """Refuse a model output directory that would write into what is being read, or into a training run.

    Writing `config.json` + `model.safetensors` into a checkpoint, beside or above it in its run directory, or
    into any training run makes that directory read as another kind of model path afterwards (a `config.json`
    wins over `latest`), and can overwrite the files being converted.

    Args:
        out: the directory about to be written.
        inputs: the directories being read (the path given and the checkpoint it resolved to).
        option: the option that named `out`, for the message.

    Raises:
        ValueError: `out` is one of `inputs`, inside one, holds one, or is a training run or checkpoint.
    """
    target = Path(out).resolve()
    for source in inputs:
        source = Path(source).resolve()
        if target == source or source in target.parents or target in source.parents:
            raise ValueError(f"{option} {out}: is, holds or lies inside {source}, which is being read; write the "
                             "model to a new directory")
    if target.is_dir() and (os.path.lexists(target / "latest") or os.path.lexists(target / "trainer_state.json")
                            or any(p.name.startswith("iter_") for p in target.iterdir())):
        raise ValueError(f"{option} {out}: is a training run or checkpoint directory; write the model to a new "
                         "directory")
