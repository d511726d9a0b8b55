"""Workers die with their launcher: a rank whose torchrun / mpirun is killed stops at once, instead of training on.

torchrun starts each worker in its own session (`subprocess.Popen(..., start_new_session=True)`), so when the
launcher itself is killed with SIGKILL (out-of-memory killer, `kill -9`, a scheduler's hard stop) nobody sends
the workers a signal: they train on, alone, and keep writing checkpoints over a run that a restarted job is
also writing. `die_with_launcher()`, the first call in `phi1.train` and `phi1.eval`, makes that impossible:

- Under torchrun, the kernel's parent-death signal (`prctl(PR_SET_PDEATHSIG, SIGKILL)`): the worker gets SIGKILL
  the moment its parent goes. The signal follows the *thread* that forked the worker, and torchrun's agent
  forks its workers from its main thread, so it fires exactly when the launcher process dies. Right after
  setting it the parent pid is checked again, which closes the race with a launcher that died just before.
- Under every launcher (torchrun, mpirun / PMI ranks): a daemon thread that compares `os.getppid()` with the
  launcher's pid once a second and kills this process when they differ (the launcher died and the worker was
  handed to init or a subreaper). This also covers launchers that fork from a helper thread (Open MPI's
  daemons), where a parent-death signal would fire when that thread ends rather than when the launcher does,
  and systems without `prctl` (macOS).

The worker kills itself with SIGKILL rather than raising: its peers are dying too, so any collective (a
checkpoint save included) could only hang, and nothing half-written is renamed into place (checkpoints are
written to a temporary directory first). A process started without a launcher (`python -m phi1.train` from a
shell, `nohup`) is left alone: its parent is a shell whose exit must not end a run. PHI1_DIE_WITH_LAUNCHER=0
turns it off. Written here rather than taken from a library because it is two system calls and a thread;
torch's own `DataLoader` workers watch their parent the same way.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# Environment variables that mean "a launcher started this process as one rank", and whether that launcher is
# known to fork its workers from its main thread (then the parent-death signal is safe to use).
TORCHRUN_VARIABLES = ("TORCHELASTIC_RUN_ID",)
MPI_VARIABLES = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")
# What an orphan's new parent is called when the launcher died before we could record it.
INIT_PROCESS_NAMES = frozenset({"systemd", "init", "tini", "docker-init", "dumb-init", "catatonit"})

_installed_for: int | None = None


def launcher_kind(environ: dict[str, str] | None = None) -> str | None:
    """"torchrun", "mpi", or None when no launcher's environment is present."""
    environ = os.environ if environ is None else environ
    if any(environ.get(name) for name in TORCHRUN_VARIABLES):
        return "torchrun"
    if any(environ.get(name) for name in MPI_VARIABLES):
        return "mpi"
    return None


def _set_parent_death_signal(signal_number: int) -> bool:
    """prctl(PR_SET_PDEATHSIG, signal_number) on Linux; False where it is not available."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return libc.prctl(PR_SET_PDEATHSIG, signal_number, 0, 0, 0) == 0


def _process_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as handle:
            return handle.read().strip()
    except OSError:
        return ""


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _watch(launcher_pid: int, poll_interval_s: float) -> None:
    while True:
        time.sleep(poll_interval_s)
        if os.getppid() != launcher_pid:
            _die()


def die_with_launcher(poll_interval_s: float = 1.0) -> int | None:
    """Make this process die when the launcher that started it dies; call it first thing in a rank's main.

    Args:
        poll_interval_s: how often the watchdog thread compares the parent pid with the launcher's.

    Returns:
        The launcher's pid being watched, or None when this process was not started by a launcher, or
        PHI1_DIE_WITH_LAUNCHER=0. Calling it again returns the same pid without a second watchdog.

    Never returns when the launcher is already gone: the process kills itself with SIGKILL.
    """
    global _installed_for
    if _installed_for is not None:
        return _installed_for
    kind = launcher_kind()
    if kind is None or os.environ.get("PHI1_DIE_WITH_LAUNCHER", "1") == "0":
        return None
    launcher_pid = os.getppid()
    if launcher_pid == 1 and _process_name(1) in INIT_PROCESS_NAMES:
        _die()  # the launcher died while this interpreter was starting: we were handed to init
    if kind == "torchrun":
        _set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != launcher_pid:
        _die()  # it died between the first look and the prctl: the signal was never armed for it
    threading.Thread(target=_watch, args=(launcher_pid, poll_interval_s), name="phi1-launcher-watchdog",
                     daemon=True).start()
    _installed_for = launcher_pid
    return launcher_pid
