"""Workers die with their launcher (phi1/parallel/launcher.py): SIGKILL of `torchrun` ends its training ranks
within seconds and no checkpoint is written after; a rank under an MPI-style launcher is ended by its watchdog;
a process started from a shell, with no launcher, is left alone when its parent goes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from phi1.parallel.launcher import die_with_launcher, launcher_kind
from phi1.testing.synthetic import write_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]
LAUNCHER_VARIABLES = ("TORCHELASTIC_RUN_ID", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "RANK", "WORLD_SIZE",
                      "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# A run that would go on for many minutes, saving every 2 steps.
LONG_RUN = [
    "model.preset=phi-1-nano", "model.vocab_size=128", "data.seq_len=32", "data.split=90,10,0",
    "batch.global_batch_size=4", "batch.micro_batch_size=2", "schedule.train_steps=100000",
    "schedule.warmup_steps=1", "parallel.zero_stage=0", "precision=fp32", "activation_checkpointing=false",
    "eval.interval=0", "logging.interval=1", "checkpoint.interval=2", "checkpoint.keep_last=1000",
    "logging.tensorboard_dir=",
]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", **extra)
    return env


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (a dead process whose new parent has not reaped it yet)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except FileNotFoundError:
            continue
    return found


def wait_until(condition, timeout_s: float, interval_s: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval_s)
    return condition()


def checkpoints(run_dir: Path) -> set[str]:
    return {p.name for p in run_dir.glob("iter_*")}


def test_no_launcher_means_no_watchdog(monkeypatch) -> None:
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert launcher_kind() is None
    assert die_with_launcher() is None
    assert launcher_kind({"TORCHELASTIC_RUN_ID": "x"}) == "torchrun"
    assert launcher_kind({"OMPI_COMM_WORLD_RANK": "0"}) == "mpi"


# A "launcher" that starts one rank and then sleeps; the rank reports its pid and what die_with_launcher returned.
PARENT = textwrap.dedent("""
    import subprocess, sys, time
    rank = subprocess.Popen([sys.executable, "-c", sys.argv[1]], start_new_session=True)
    time.sleep(600)
""")
RANK = textwrap.dedent("""
    import os, time
    from phi1.parallel.launcher import die_with_launcher
    watched = die_with_launcher(poll_interval_s=0.2)
    print(os.getpid(), watched, os.getppid(), flush=True)
    time.sleep(600)
""")


@pytest.mark.parametrize("launcher_env, dies", [
    ({"OMPI_COMM_WORLD_RANK": "0"}, True),        # mpirun: the watchdog thread
    ({"TORCHELASTIC_RUN_ID": "test"}, True),      # torchrun: the parent-death signal (and the watchdog)
    ({}, False),                                  # started from a shell: a parent's exit must not end it
])
def test_rank_dies_with_its_launcher(tmp_path, launcher_env, dies) -> None:
    report = tmp_path / "rank.txt"
    with open(report, "w") as out:
        parent = subprocess.Popen([sys.executable, "-c", PARENT, RANK], env=clean_env(**launcher_env), stdout=out,
                                  start_new_session=True)
    rank_pid = None
    try:
        assert wait_until(lambda: report.read_text().strip() != "", 60), "the rank never started"
        rank_pid, watched, parent_pid = report.read_text().split()
        rank_pid = int(rank_pid)
        assert int(parent_pid) == parent.pid
        assert watched == (str(parent.pid) if dies else "None")
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        if dies:
            assert wait_until(lambda: not alive(rank_pid), 5), "the rank outlived its launcher by 5 s"
        else:
            time.sleep(1.5)
            assert alive(rank_pid), "a process started without a launcher was killed when its parent exited"
    finally:
        if parent.poll() is None:
            parent.kill()
        if rank_pid is not None and alive(rank_pid):
            os.kill(rank_pid, signal.SIGKILL)


@pytest.mark.slow
def test_sigkill_of_torchrun_ends_training_and_checkpoints(tmp_path) -> None:
    data_prefix, tokenizer = write_synthetic_dataset(tmp_path / "data")
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "phi1.train", "--config", str(REPO / "configs/pretrain_phi1.yaml"), *LONG_RUN,
               f"data.path={data_prefix}", f"data.tokenizer_model={tokenizer}", f"checkpoint.dir={run_dir}"]
    log = (tmp_path / "torchrun.log").open("w")
    launcher = subprocess.Popen(command, cwd=tmp_path, env=clean_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    workers: list[int] = []
    try:
        started = wait_until(lambda: len(checkpoints(run_dir)) >= 2 or launcher.poll() is not None, 240, 0.5)
        assert started and launcher.poll() is None, (tmp_path / "torchrun.log").read_text()[-3000:]
        workers = [pid for pid in children(launcher.pid) if alive(pid)]
        assert len(workers) == 2, f"expected 2 workers under torchrun, found {workers}"
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait(10)
        assert wait_until(lambda: not any(alive(pid) for pid in workers), 5), (
            f"workers {[pid for pid in workers if alive(pid)]} still run 5 s after torchrun was killed")
        saved = checkpoints(run_dir)
        time.sleep(3)
        assert checkpoints(run_dir) == saved, "a checkpoint was written after the launcher died"
    finally:
        log.close()
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


MPI_RANK = textwrap.dedent("""
    import os, sys, time
    from phi1.parallel.launcher import die_with_launcher
    watched = die_with_launcher(poll_interval_s=0.2)
    with open(os.path.join(sys.argv[1], f"rank{os.environ['OMPI_COMM_WORLD_RANK']}"), "w") as report:
        report.write(f"{os.getpid()} {watched}")
    time.sleep(600)
""")


@pytest.mark.slow
def test_sigkill_of_mpirun_ends_its_ranks(tmp_path) -> None:
    import shutil

    if shutil.which("mpirun") is None:
        pytest.skip("mpirun not found: install Open MPI (apt-get install openmpi-bin libopenmpi-dev); CI does")
    env = clean_env(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    launcher = subprocess.Popen(["mpirun", "-np", "2", "--oversubscribe", "-x", "PYTHONPATH", sys.executable, "-c",
                                 MPI_RANK, str(tmp_path)], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    ranks: list[int] = []
    try:
        reports = [tmp_path / "rank0", tmp_path / "rank1"]
        assert wait_until(lambda: all(r.exists() and r.read_text() for r in reports), 120), "the ranks never started"
        watched = []
        for report in reports:
            pid, launcher_pid = report.read_text().split()
            ranks.append(int(pid))
            watched.append(launcher_pid)
        assert "None" not in watched, "die_with_launcher did not recognise mpirun"
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait(10)
        assert wait_until(lambda: not any(alive(pid) for pid in ranks), 5), (
            f"ranks {[pid for pid in ranks if alive(pid)]} still run 5 s after mpirun was killed")
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
        for pid in ranks:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


class Installed(Exception):
    """Raised by the stand-in for die_with_launcher: it was the first thing main did."""


@pytest.mark.parametrize("module", ["phi1.train", "phi1.eval.__main__"])
def test_entry_points_install_it_first(monkeypatch, module) -> None:
    """phi1.train's and phi1.eval's main call die_with_launcher before anything else (even --help)."""
    import importlib

    entry = importlib.import_module(module)

    def installed() -> None:
        raise Installed

    monkeypatch.setattr(entry, "die_with_launcher", installed)
    with pytest.raises(Installed):
        entry.main(["--help"])
