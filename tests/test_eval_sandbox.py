"""Hostile programs in the sandbox: each is contained, scored as a failure, and leaves the machine unharmed;
the isolation layers (private /tmp quota and socket directories, the seccomp filter) each hold on their own."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from phi1.eval.harness import score_samples
from phi1.eval.sandbox import SandboxConfig, namespaces_available, processes_of_uid, run_program
from phi1.eval.tasks import HUMANEVAL_STOP_STRINGS, Problem

PROMPT = 'def add(a: int, b: int) -> int:\n    """Return a + b."""\n'
TEST = "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n"
PROBLEM = Problem("Toy/0", PROMPT, "add", TEST, HUMANEVAL_STOP_STRINGS, "humaneval")
CONFIG = SandboxConfig(timeout_s=4.0, cpu_time_s=4, memory_mb=512, max_processes=8)
NAMESPACES = pytest.mark.skipif(
    os.geteuid() != 0 or not namespaces_available(),
    reason="needs root and a working `unshare --net --mount --ipc` (mount namespaces)",
)


def run_completion(completion: str, config: SandboxConfig = CONFIG):
    """Run the toy problem's program with `completion`; returns the result after checking the clean-up."""
    start = time.monotonic()
    result = run_program(PROBLEM.program(completion), config)
    assert time.monotonic() - start < config.timeout_s + 3, "the evaluator itself waited too long"
    uid = result.isolation.get("uid")
    if uid and uid != os.getuid():
        assert processes_of_uid(uid) == [], "processes of the sandbox's uid survived"
    return result


def test_correct_solution_passes_and_isolation_is_active():
    result = run_completion("    return a + b\n")
    assert result.passed, result.stderr
    if os.geteuid() == 0:
        assert result.isolation["uid"] != 0
        assert result.isolation["namespaces"] == namespaces_available()
        assert result.isolation["setup_failures"] == []
        assert result.isolation["seccomp"] is True
        if namespaces_available():
            assert result.isolation["disk_kb"] == CONFIG.disk_mb * 1024


def test_wrong_solution_fails():
    result = run_completion("    return a - b\n")
    assert result.status == "failed" and "AssertionError" in result.stderr


def test_infinite_loop_is_killed():
    start = time.monotonic()
    result = run_completion("    while True:\n        pass\n")
    assert result.status == "timed out"
    assert time.monotonic() - start < CONFIG.timeout_s + 2


OUTER_LAYERS = pytest.mark.skipif(
    os.geteuid() != 0 or not namespaces_available(),
    reason="guard bypasses are stopped by the private uid and namespaces, which need root and unshare",
)


@pytest.mark.parametrize("fork", ["os.fork()", pytest.param("__import__('ctypes').CDLL(None).fork()", marks=OUTER_LAYERS)])
def test_fork_bomb_is_contained(fork):
    # The ctypes variant bypasses the in-process guard: RLIMIT_NPROC of the private uid and the final kill of
    # everything that uid owns must hold it.
    processes_before = len(os.listdir("/proc"))
    result = run_completion(f"    while True:\n        {fork}\n    return a + b\n")
    assert not result.passed
    assert len(os.listdir("/proc")) < processes_before + 20


def test_memory_bomb_hits_the_limit():
    result = run_completion("    hog = []\n    while True:\n        hog.append(bytearray(50 * 2**20))\n")
    assert result.status == "failed"
    assert "MemoryError" in result.stderr


def test_writing_or_deleting_outside_the_workdir_fails(tmp_path):
    # A world-writable directory: file permissions alone would not protect it from another uid.
    victim_dir = tmp_path / "shared"
    victim_dir.mkdir()
    os.chmod(tmp_path, 0o755)
    os.chmod(victim_dir, 0o777)
    victim = victim_dir / "precious.txt"
    victim.write_text("keep me")
    os.chmod(victim, 0o666)
    created = victim_dir / "planted.txt"
    attempts = [
        f"os.remove({str(victim)!r})",
        f"__import__('shutil').rmtree({str(victim_dir)!r})",
        f"open({str(victim)!r}, 'w').write('gone')",
        f"open({str(created)!r}, 'w').write('x')",
    ]
    if os.geteuid() == 0 and namespaces_available():
        # Bypass the guard: raw libc calls and the C-level open meet the read-only mounts instead.
        attempts += [
            f"__import__('ctypes').CDLL(None).unlink({str(victim).encode()!r})",
            f"__import__('_io').open({str(created)!r}, 'w').write('x')",
            f"__import__('_io').open({str(victim)!r}, 'a').write('x')",
            "__import__('_io').open('/tmp/phi1-sandbox-planted', 'w').write('x')",
        ]
    body = "    import os\n" + "".join(f"    try:\n        {a}\n    except Exception:\n        pass\n" for a in attempts)
    result = run_completion(body + "    return a - b\n")
    assert not result.passed
    assert victim.read_text() == "keep me"
    assert not created.exists()
    assert not os.path.exists("/tmp/phi1-sandbox-planted")


def test_network_connection_fails():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    attempts = [f"socket.create_connection(('127.0.0.1', {port}), timeout=1)"]
    if namespaces_available():
        attempts.append(f"_socket.socket().connect(('127.0.0.1', {port}))")  # the C module, past the guard
    body = "    import socket, _socket\n    reached = 0\n" + "".join(
        f"    try:\n        {a}\n        reached += 1\n    except Exception:\n        pass\n" for a in attempts
    )
    result = run_completion(body + "    return a + b if reached else -1\n")
    listener.setblocking(False)
    with pytest.raises(BlockingIOError):
        listener.accept()
    listener.close()
    assert not result.passed


def test_killing_the_parent_fails():
    sentinel = subprocess.Popen(["sleep", "60"])
    try:
        body = (
            "    import os, signal\n"
            "    for attempt in (lambda: os.kill(os.getppid(), signal.SIGKILL),\n"
            "                    lambda: os.killpg(os.getpgid(os.getppid()), signal.SIGKILL),\n"
            "                    lambda: __import__('ctypes').CDLL(None).kill(os.getppid(), 9),\n"
            f"                    lambda: __import__('ctypes').CDLL(None).kill({sentinel.pid}, 9),\n"
            "                    lambda: __import__('ctypes').CDLL(None).kill(-1, 9)):\n"
            "        try:\n            attempt()\n        except Exception:\n            pass\n"
            "    return a - b\n"
        )
        result = run_completion(body)
        assert not result.passed
        assert sentinel.poll() is None, "the sandbox killed a process outside it"
        os.kill(os.getpid(), 0)  # the evaluator (this process) is alive
    finally:
        sentinel.send_signal(signal.SIGKILL)
        sentinel.wait()


def test_exit_before_the_asserts_fails():
    result = run_completion("    return a - b\nimport os\nos._exit(0)\n")
    assert result.exit_code == 0  # the process exited "successfully"...
    assert result.status == "failed"  # ...but never reached the end of check()


def test_printing_passed_fails():
    completion = "    return a - b\nprint('passed')\nprint('All tests passed', flush=True)\nimport sys\nsys.exit(0)\n"
    result = run_completion(completion)
    assert "passed" in result.stdout
    assert result.status == "failed"


def test_scores_through_the_harness():
    samples = [{"task_id": "Toy/0", "completion": c} for c in (
        "    return a + b\n", "    return a - b\nimport os\nos._exit(0)\n", "    while True:\n        pass\n")]
    report, scored = score_samples([PROBLEM], samples, ks=(1, 2, 3), sandbox=CONFIG, workers=2, progress=False)
    assert [s["passed"] for s in scored] == [True, False, False]
    assert scored[2]["result"] == "timed out"
    assert report.pass_at_k["pass@1"] == pytest.approx(1 / 3)
    assert report.pass_at_k["pass@3"] == 1.0


def test_cpu_limit_before_wall_clock_scores_as_timed_out():
    # Under load the CPU limit can strike before the wall-clock timeout: that is a time-out, not a failure.
    result = run_program("while True:\n    pass\n", SandboxConfig(timeout_s=60, cpu_time_s=1))
    assert result.status == "timed out"
    assert result.exit_code == -signal.SIGXCPU
    assert result.wall_time_s < 30


@NAMESPACES
def test_total_disk_use_is_bounded_by_the_private_tmpfs():
    # 64 files of 15 MiB (960 MiB) would fit under RLIMIT_FSIZE (16 MiB per file): only the tmpfs quota stops them.
    program = (
        "import os, errno\n"
        "written = 0\n"
        "full = False\n"
        "chunk = b'x' * 2**20\n"
        "for index in range(64):\n"
        "    try:\n"
        "        with open(f'big{index}', 'wb') as handle:\n"
        "            for _ in range(15):\n"
        "                handle.write(chunk)\n"
        "                handle.flush()\n"
        "                written += len(chunk)\n"
        "    except OSError as error:\n"
        "        full = error.errno == errno.ENOSPC\n"
        "        break\n"
        "print('written', written, 'full', full, 'cwd', os.getcwd())\n"
    )
    config = SandboxConfig(timeout_s=30, cpu_time_s=20, memory_mb=512, disk_mb=32)
    result = run_program(program, config)
    assert result.passed, result.stderr
    words = result.stdout.split()
    written = int(words[words.index("written") + 1])
    assert words[words.index("full") + 1] == "True"
    assert 16 * 2**20 <= written <= 32 * 2**20, written
    assert words[words.index("cwd") + 1] == "/tmp"


@contextlib.contextmanager
def _listening_unix_socket(path: str) -> Iterator[socket.socket]:
    """A non-blocking AF_UNIX listener bound at `path`, world-writable, so a connection from the sandbox would
    succeed unless something refuses it (`accept` then raises BlockingIOError when none came); closed and its
    file removed on exit."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(path)
        os.chmod(path, 0o777)
        listener.listen(1)
        listener.setblocking(False)
        yield listener
    finally:
        listener.close()
        Path(path).unlink(missing_ok=True)


@NAMESPACES
def test_private_tmp_and_run_hide_the_hosts_files_and_sockets(tmp_path):
    planted = f"/tmp/phi1-h1-visible-{os.getpid()}"
    with open(planted, "w") as handle:
        handle.write("host")
    socket_path = f"/tmp/phi1-h1-{os.getpid()}.sock"
    try:
        with _listening_unix_socket(socket_path) as listener:
            program = (
                "import os\n"
                f"print('planted', os.path.exists({planted!r}), 'socket', os.path.exists({socket_path!r}))\n"
                "print('run', sorted(os.listdir('/run')), 'shm', sorted(os.listdir('/dev/shm')))\n"
            )
            result = run_program(program, CONFIG)
            assert result.passed, result.stderr
            assert "planted False socket False" in result.stdout
            assert "run [] shm []" in result.stdout
            with pytest.raises(BlockingIOError):
                listener.accept()
    finally:
        os.unlink(planted)


def test_unix_sockets_are_refused_even_where_the_file_is_visible(tmp_path_factory):
    # A world-writable socket outside /tmp and /run (so the private mounts do not hide it): the seccomp filter
    # refuses socket(AF_UNIX) itself, bypassing the in-process guard through the C module.
    directory = tempfile.mkdtemp(prefix=".phi1-h1-sock-", dir=os.getcwd())
    os.chmod(directory, 0o755)
    socket_path = os.path.join(directory, "s.sock")
    try:
        with _listening_unix_socket(socket_path) as listener:
            program = (
                "import _socket, os\n"
                f"print('visible', os.path.exists({socket_path!r}))\n"
                "try:\n"
                "    client = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)\n"
                f"    client.connect({socket_path!r})\n"
                "    client.send(b'hello')\n"
                "    print('connected')\n"
                "except OSError as error:\n"
                "    print('refused', error.errno)\n"
            )
            result = run_program(program, CONFIG)
            assert result.passed, result.stderr
            assert "refused 13" in result.stdout, result.stdout  # EACCES from the filter
            with pytest.raises(BlockingIOError):
                listener.accept()
            if os.geteuid() == 0:
                assert "visible True" in result.stdout  # the filter, not the mounts, stopped it
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.parametrize("call", [
    "libc.syscall(425, 8, ctypes.create_string_buffer(120))",  # io_uring_setup
    "libc.ptrace(16, 1, 0, 0)",  # PTRACE_ATTACH to pid 1
    "libc.syscall(311 if os.uname().machine == 'x86_64' else 271, 1, 0, 0, 0, 0, 0)",  # process_vm_writev
    "libc.syscall(438, 0, 0, 0)",  # pidfd_getfd
])
def test_syscalls_that_reach_other_processes_are_refused(call):
    program = (
        "import ctypes, os\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        f"result = {call}\n"
        "print('result', result, ctypes.get_errno())\n"
    )
    result = run_program(program, CONFIG)
    assert result.passed, result.stderr
    assert "result -1 1" in result.stdout, result.stdout  # EPERM from the filter
