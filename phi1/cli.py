"""One error style for every phi1 command line: a user error is one line and exit status 2; a bug keeps its traceback.

    from phi1.cli import run_cli

    if __name__ == "__main__":
        run_cli(main, prog="preprocess_data.py")

A *user error* is the ValueError family (ConfigError, CheckpointCorruptError, UnicodeDecodeError, ...), a missing
or unreadable file (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) and `UserError`.
The line reads `PROG: error: WHAT IS WRONG` where the message itself names the file or option and what to do.
Under torchrun / mpirun / SLURM only global rank 0 prints it, once; the other ranks exit 2 silently, so a
misconfigured 64-rank job prints one line, not 64 tracebacks.

Anything else (a TypeError deep in a library, an assertion) is a bug in phi1: it propagates with its traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

EXIT_USER_ERROR = 2

# The exceptions that mean "the input is wrong", never "phi1 is wrong".
USER_ERROR_TYPES: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
    FileExistsError,
)


class UserError(ValueError):
    """A problem with what the user gave (a file, an option); the message names it and says what to do."""


def launched_rank() -> int:
    """Global rank from the launcher's environment (torchrun, mpirun, SLURM); 0 when launched alone."""
    for name in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"):
        value = os.environ.get(name)
        if value is not None and value.strip().isdigit():
            return int(value)
    return 0


def one_line(error: BaseException) -> str:
    """The error's message on one line (a multi-problem ConfigError keeps its own line breaks, indented)."""
    text = str(error).strip() or type(error).__name__
    if isinstance(error, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError,
                          FileExistsError)) and error.filename is not None and str(error.filename) not in text:
        text = f"{error.filename}: {error.strerror or text}"
    return text


def user_error_exit(prog: str, error: BaseException) -> NoReturn:
    """Print `PROG: error: MESSAGE` on rank 0 only and exit with status 2."""
    if launched_rank() == 0:
        sys.stdout.flush()
        print(f"{prog}: error: {one_line(error)}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_USER_ERROR)


def run_cli(main: Callable[..., Any], prog: str | None = None, argv: list[str] | None = None) -> NoReturn:
    """Run `main(argv)` and exit: its int return value (None is 0), or 2 with one line for a user error."""
    prog = prog or os.path.basename(sys.argv[0]) or "phi1"
    try:
        result = main(argv) if argv is not None else main()
    except USER_ERROR_TYPES as error:
        user_error_exit(prog, error)
    except KeyboardInterrupt:
        if launched_rank() == 0:
            print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    raise SystemExit(result if isinstance(result, int) else 0)
