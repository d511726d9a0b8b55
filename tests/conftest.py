"""Suite-wide pytest settings.

After the session has been reported, the process leaves with pytest's own exit status through `os._exit`,
skipping the interpreter's teardown of native extensions. About one full-suite run in three on a 2-core machine
died there (after "N passed" was printed) with "terminate called without an active exception" (SIGABRT).

What is known about that abort:
- The message is what CPython (before 3.14) produces when a daemon thread is inside a torch op, or any pybind11
  call that releases the GIL, as the interpreter finalizes: the thread is ended with `pthread_exit` from the
  op's GIL-release guard's destructor, and unwinding through a destructor calls std::terminate. This is
  pytorch/pytorch#38228 (open upstream); tests/test_exit_teardown.py keeps the three-line reproduction.
- phi1's one daemon thread that runs torch, the serving engine's worker, was left running by a test and is now
  stopped at exit by the engine itself (tests/test_exit_teardown.py checks it mid-generation). C++ static
  destructors were checked too: kineto's config thread, alive at exit, is joined by its destructor.
- With PHI1_TEST_THREAD_REPORT=1 the other Python threads alive at the suite's end are named: wandb's asyncio
  manager and finalizer and two OpenTelemetry exporters (test_observability's offline W&B run), fsspec's IO
  loop, two tqdm monitors. Each waits in C (a lock or select), which `pthread_exit` unwinds safely; a script
  leaving all of them alive exits cleanly 12 times in 12. One run of the in-process tests (`-m "not slow"`,
  1,435 tests) with PHI1_TEST_NATIVE_TEARDOWN=1 ended without the abort; one run of a one-in-three event
  proves little, so `os._exit` stays until a full run is seen to abort with a named thread, or many do not.
Results are unaffected: every test has run and been reported, and a failing session still exits non-zero.
Set PHI1_TEST_NATIVE_TEARDOWN=1 to keep the normal teardown, and PHI1_TEST_THREAD_REPORT=1 to name each test
that leaves a Python thread running (with its stack, as the test ends) and to print, at exit, every thread
still alive: its Python stack, and its native frames through gdb when installed.
"""

from __future__ import annotations

import os
import sys

import pytest

_exit_status: int | None = None


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    global _exit_status
    _exit_status = int(exitstatus)


def _threads_alive() -> dict[str, int]:
    """Threads of this process by the name the kernel knows them by (a native library's threads carry its name)."""
    counts: dict[str, int] = {}
    for task in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else []:
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                name = f.read().strip()
        except OSError:
            continue
        counts[name] = counts.get(name, 0) + 1
    return counts


def _python_thread_stack(ident: int) -> str:
    import traceback

    frame = sys._current_frames().get(ident)
    return "".join(traceback.format_stack(frame, limit=6)) if frame is not None else "    (no Python frame)\n"


@pytest.fixture(autouse=True)
def _report_leaked_threads(request: pytest.FixtureRequest):
    """With PHI1_TEST_THREAD_REPORT=1: name the test that leaves a new Python thread alive, with its stack."""
    if os.environ.get("PHI1_TEST_THREAD_REPORT") != "1":
        yield
        return
    import threading

    before = {thread.ident for thread in threading.enumerate()}
    yield
    left = [thread for thread in threading.enumerate() if thread.ident not in before and thread.is_alive()]
    if left:
        capture = request.config.pluginmanager.getplugin("capturemanager")
        with capture.global_and_fixture_disabled():  # past pytest's capture, so the report is seen as it happens
            for thread in left:
                print(f"\nthread left by {request.node.nodeid}: {thread.name!r} daemon={thread.daemon}\n"
                      f"{_python_thread_stack(thread.ident)}", file=sys.stderr)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    if os.environ.get("PHI1_TEST_THREAD_REPORT") == "1":
        print(f"\nthreads alive at exit: {_threads_alive()}", file=sys.stderr)
        import threading

        for thread in threading.enumerate():
            print(f"python thread {thread.name!r} daemon={thread.daemon}\n{_python_thread_stack(thread.ident)}",
                  file=sys.stderr)
        import shutil
        import subprocess

        if shutil.which("gdb"):  # which library started each thread: the frames nearest its start routine
            trace = subprocess.run(["gdb", "-p", str(os.getpid()), "-batch", "-ex", "thread apply all bt 10"],
                                   capture_output=True, text=True, timeout=120).stdout
            print("\n".join(line for line in trace.splitlines() if line.startswith(("Thread", "#"))), file=sys.stderr)
    if _exit_status is None or os.environ.get("PHI1_TEST_NATIVE_TEARDOWN") == "1":
        return
    if getattr(config, "workerinput", None) is not None:
        return  # an xdist worker: let it report back to the controller normally
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_exit_status)
