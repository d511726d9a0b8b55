"""Reading jsonl where bad lines are counted and reported (file and line), never silently dropped."""

from __future__ import annotations

import gzip
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

# How many bad lines are quoted by number in a report; the rest are only counted.
MAX_EXAMPLES = 20


@dataclass
class LineStats:
    """Counts of what was read, and where the bad lines are."""

    lines: int = 0
    """Lines seen (blank ones included)."""
    good: int = 0
    """Records with every required key of the required type."""
    blank: int = 0
    not_json: int = 0
    not_object: int = 0
    """Valid JSON that is not an object (a list, a number, ...)."""
    missing_key: int = 0
    wrong_type: int = 0
    """A required key whose value has the wrong type (e.g. "text": null)."""
    unparsable_code: int = 0
    """Records whose code does not parse as Python (counted by the stage that parses it)."""
    examples: list[str] = field(default_factory=list)
    """`path:line: reason` of the first MAX_EXAMPLES bad lines."""

    @property
    def bad(self) -> int:
        """Lines that were not usable records (blank lines excluded)."""
        return self.not_json + self.not_object + self.missing_key + self.wrong_type

    def note(self, kind: str, path: str, line_number: int, reason: str) -> None:
        """Count one bad line of `kind` (a counter's name) and keep its description while few are kept."""
        setattr(self, kind, getattr(self, kind) + 1)
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(f"{path}:{line_number}: {reason}")

    def merge(self, other: LineStats) -> None:
        """Add another reader's counts (a worker's) into this one."""
        for name in ("lines", "good", "blank", "not_json", "not_object", "missing_key", "wrong_type",
                     "unparsable_code"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        room = MAX_EXAMPLES - len(self.examples)
        self.examples.extend(other.examples[: max(room, 0)])

    def to_dict(self) -> dict:
        return {
            "lines": self.lines, "good": self.good, "blank": self.blank, "not_json": self.not_json,
            "not_object": self.not_object, "missing_key": self.missing_key, "wrong_type": self.wrong_type,
            "unparsable_code": self.unparsable_code, "examples": list(self.examples),
        }

    def summary(self) -> str:
        """One paragraph for the console: counts, then the first bad lines by file and line."""
        text = (f"{self.lines} lines: {self.good} records, {self.blank} blank, {self.not_json} not JSON, "
                f"{self.not_object} not an object, {self.missing_key} missing a key, {self.wrong_type} with a "
                f"wrong type, {self.unparsable_code} with code that does not parse")
        if self.examples:
            shown = "\n  ".join(self.examples)
            more = self.bad + self.unparsable_code - len(self.examples)
            text += f"\n  {shown}" + (f"\n  ... and {more} more" if more > 0 else "")
        return text


def check_record(raw: bytes | str, required: dict[str, type | tuple[type, ...]], path: str, line_number: int,
                 stats: LineStats) -> dict | None:
    """The record of one jsonl line, or None after counting why it is unusable.

    Args:
        raw: the line, with or without its newline.
        required: key -> accepted type(s); a missing key or another type makes the line bad.
    """
    stats.lines += 1
    if not raw.strip():
        stats.blank += 1
        return None
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        stats.note("not_json", path, line_number, f"not JSON ({error})")
        return None
    if not isinstance(record, dict):
        stats.note("not_object", path, line_number, f"a JSON {type(record).__name__}, not an object")
        return None
    for key, kind in required.items():
        if key not in record:
            stats.note("missing_key", path, line_number, f"no {key!r} key (keys: {sorted(record)[:8]})")
            return None
        # bool is an int in Python; a label of `true` is still accepted where ints are, as 1.
        if not isinstance(record[key], kind):
            stats.note("wrong_type", path, line_number,
                       f"{key!r} is {type(record[key]).__name__}, expected {_type_names(kind)}")
            return None
    stats.good += 1
    return record


def _type_names(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def iter_records(path: str | os.PathLike, required: dict[str, type | tuple[type, ...]] | None = None,
                 stats: LineStats | None = None) -> Iterator[tuple[int, dict]]:
    """(line number, record) of every usable line of a .jsonl or .jsonl.gz file; bad lines go to `stats`.

    Raises FileNotFoundError naming the file when it is missing.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    required = {"text": str} if required is None else required
    stats = LineStats() if stats is None else stats
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as handle:
        for line_number, raw in enumerate(handle, 1):
            record = check_record(raw, required, path, line_number, stats)
            if record is not None:
                yield line_number, record


def append_line(handle, record: dict, sync: bool = False) -> None:
    """Write one record as a line; with `sync`, flush and fsync so a killed process loses no finished line."""
    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    if sync:
        handle.flush()
        os.fsync(handle.fileno())


def report_stats(stats: LineStats, what: str, stream=sys.stderr) -> None:
    """Print the stats' summary when anything was bad (always when `stream` is given explicitly)."""
    print(f"{what}: {stats.summary()}", file=stream)
