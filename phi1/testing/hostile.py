"""Run a command on hostile input the way a user would, bounded in time and memory, and judge how it ended.

    result = run_bounded([sys.executable, "tools/preprocess_data.py", "--input", str(bad)], timeout_s=60)
    assert_clear_error(result, names=str(bad))

`run_bounded` starts the command in its own session with an address-space cap (RLIMIT_AS) and a wall-clock limit,
and kills the whole process group when the limit passes, so a hang or runaway memory is a recorded outcome of
its case instead of a stuck test run. `assert_clear_error` states the project's rule for user errors: exit
status 2, a message that names the file or option, and no Python traceback.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Outcome:
    """How a bounded command ended."""

    argv: list[str]
    returncode: int | None
    """Exit status; None when the command was killed for running past its time limit."""
    stdout: str
    stderr: str
    timed_out: bool

    def describe(self) -> str:
        tail = self.stderr[-2000:]
        return f"argv={self.argv}\nreturncode={self.returncode} timed_out={self.timed_out}\nstderr tail:\n{tail}"


def _limit_memory(memory_mb: int | None):
    def apply() -> None:
        os.setsid()
        if memory_mb is not None:
            limit = memory_mb * 1024 * 1024
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return apply


def run_bounded(argv: Sequence[str], *, timeout_s: float = 60, memory_mb: int | None = 4096,
                cwd: str | os.PathLike | None = None, env: dict[str, str] | None = None,
                stdin: str | None = None) -> Outcome:
    """Run `argv` with a wall-clock limit and an address-space cap; never raises for the command's failures.

    Args:
        argv: the command; `sys.executable` for Python programs.
        timeout_s: seconds before the process group is killed (the outcome then has timed_out=True).
        memory_mb: RLIMIT_AS of the command in MiB (torch maps ~1.5 GiB at import; keep it at least 3072).
        cwd: working directory; default the repository root.
        env: extra environment variables, added to a copy of this process's environment.
        stdin: text fed to standard input (default: none, stdin is /dev/null).
    """
    full_env = dict(os.environ)
    full_env.setdefault("PYTHONPATH", str(REPO))
    full_env.update({"PYTHONFAULTHANDLER": "", "OMP_NUM_THREADS": "1"})
    full_env.update(env or {})
    process = subprocess.Popen(
        list(argv), cwd=str(cwd or REPO), env=full_env, text=True, errors="replace",
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_limit_memory(memory_mb),
    )
    try:
        stdout, stderr = process.communicate(stdin, timeout=timeout_s)
        return Outcome(list(argv), process.returncode, stdout, stderr, timed_out=False)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        stdout, stderr = process.communicate()
        return Outcome(list(argv), None, stdout, stderr, timed_out=True)


def assert_clear_error(outcome: Outcome, names: str | Sequence[str], *, status: int = 2) -> None:
    """Assert the project's rule for a user error: exit `status`, no traceback, and a message naming `names`.

    `names` is the file or option the message must mention (any one of several when a sequence is given).
    """
    assert not outcome.timed_out, f"hung (killed after its time limit)\n{outcome.describe()}"
    assert "Traceback (most recent call last)" not in outcome.stderr, f"traceback instead of a clear error\n{outcome.describe()}"
    assert outcome.returncode == status, f"exit status {outcome.returncode}, expected {status}\n{outcome.describe()}"
    candidates = [names] if isinstance(names, str) else list(names)
    message = outcome.stderr + outcome.stdout
    assert any(name in message for name in candidates), (
        f"the message names none of {candidates}\n{outcome.describe()}")


def python(*args: str) -> list[str]:
    """argv for running a Python program of this repository with the interpreter running the tests."""
    return [sys.executable, *args]
