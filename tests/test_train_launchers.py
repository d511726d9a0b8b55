"""The example launchers train the same run whatever starts the processes: `bash` starting torchrun with 2
processes, two torchrun launches of one process each joined by a rendezvous on 127.0.0.1 (two "nodes"),
`torchrun --nproc-per-node 2 FILE` literally as the design card writes it (torchrun runs FILE with Python: each
launcher is a bash + Python polyglot), the same with --no-python, and mpirun with ranks from mpi4py. Every
launcher (pretrain, pretrain-small, fine-tune, multi-node) is run under literal torchrun."""

from __future__ import annotations

import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from phi1.testing.synthetic import write_synthetic_dataset, write_synthetic_exercises
from phi1.training.metrics import read_jsonl

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "model.preset=phi-1-nano", "model.vocab_size=128", "model.attn_dropout=0.1", "model.resid_dropout=0.1",
    "data.seq_len=32", "data.split=90,10,0", "batch.global_batch_size=8", "batch.micro_batch_size=2",
    "schedule.train_steps=4", "schedule.warmup_steps=1", "parallel.zero_stage=0", "precision=fp32",
    "activation_checkpointing=false", "eval.interval=0", "logging.interval=1", "checkpoint.interval=0",
    "logging.tensorboard_dir=",
]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def env_for(data_dir: Path, run_dir: Path, **extra: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               DATA_PATH=str(data_dir / "counting_text_document"), TOKENIZER_MODEL=str(data_dir / "tokenizer.json"),
               CHECKPOINT_DIR=str(run_dir), **extra)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK"):
        if key not in extra:
            env.pop(key, None)
    return env


def losses(run_dir: Path) -> list[float]:
    return [r["step_losses"][-1] for r in read_jsonl(run_dir / "metrics.jsonl") if "step_losses" in r]


def check(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One launch of 2 processes on this machine (`bash examples/pretrain_phi1.sh`, GPUS_PER_NODE=2)."""
    data_dir = tmp_path_factory.mktemp("data")
    write_synthetic_dataset(data_dir)
    run_dir = tmp_path_factory.mktemp("reference")
    result = subprocess.run(["bash", "examples/pretrain_phi1.sh", *TINY], cwd=REPO, capture_output=True, text=True,
                            env=env_for(data_dir, run_dir, GPUS_PER_NODE="2"), timeout=180)
    check(result)
    expected = losses(run_dir)
    assert len(expected) == 4
    return data_dir, expected


@pytest.mark.slow
def test_two_nodes_train_like_one_launch(reference, tmp_path) -> None:
    data_dir, expected = reference
    port = str(free_port())
    nodes = [
        subprocess.Popen(["bash", "examples/multinode_torchrun.sh", *TINY], cwd=REPO, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         env=env_for(data_dir, tmp_path, NNODES="2", NODE_RANK=str(node), GPUS_PER_NODE="1",
                                     MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RUN_ID="test-two-nodes",
                                     CONFIG="configs/pretrain_phi1.yaml"))
        for node in range(2)
    ]
    outputs = []
    for process in nodes:
        try:
            outputs.append(process.communicate(timeout=180)[0])
        finally:
            if process.poll() is None:
                process.kill()
    assert all(p.returncode == 0 for p in nodes), "\n".join(o[-3000:] for o in outputs)
    assert "2 processes: tensor parallel 1 x data parallel 2" in "".join(outputs)
    assert losses(tmp_path) == expected


def torchrun(*arguments: str) -> list[str]:
    """`torchrun --standalone --nproc-per-node 2 ARGUMENTS...`, with this interpreter's torch."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *arguments]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", [
    ["examples/pretrain_phi1.sh"],                    # the design card's command: torchrun runs it with Python
    ["--no-python", "examples/pretrain_phi1.sh"],     # torchrun executes it (bash, from the shebang)
    ["examples/multinode_torchrun.sh"],               # one rank of a multi-node launcher: no NNODES needed
], ids=["python", "no-python", "multinode"])
def test_torchrun_runs_the_launcher_literally(reference, tmp_path, launcher) -> None:
    data_dir, expected = reference
    check(subprocess.run(torchrun(*launcher, *TINY), cwd=REPO, capture_output=True, text=True,
                         env=env_for(data_dir, tmp_path), timeout=180))
    assert losses(tmp_path) == expected


@pytest.mark.slow
def test_small_and_finetune_launchers_under_torchrun(reference, tmp_path) -> None:
    """pretrain_phi1_small.sh trains; finetune_phi1.sh then fine-tunes from that run, both under plain torchrun."""
    data_dir, _ = reference
    pretrain_dir, finetune_dir = tmp_path / "small", tmp_path / "finetune"
    check(subprocess.run(torchrun("examples/pretrain_phi1_small.sh", *TINY), cwd=REPO, capture_output=True,
                         text=True, env=env_for(data_dir, pretrain_dir), timeout=180))
    assert len(losses(pretrain_dir)) == 4
    exercises = write_synthetic_exercises(tmp_path / "exercises.jsonl")
    finetune_tiny = [o for o in TINY if not o.startswith(("model.preset", "model.vocab_size"))]
    check(subprocess.run(torchrun("examples/finetune_phi1.sh", *finetune_tiny), cwd=REPO, capture_output=True,
                         text=True, timeout=180,
                         env=env_for(data_dir, finetune_dir, INIT_FROM=str(pretrain_dir), EXERCISES=str(exercises))))
    finetuned = losses(finetune_dir)
    assert len(finetuned) == 4 and all(math.isfinite(loss) for loss in finetuned)
    assert (finetune_dir / "latest").is_file()


def test_launcher_is_valid_bash_and_python() -> None:
    """Each polyglot parses as bash (`bash -n`) and compiles as Python with warnings as errors."""
    for name in ("pretrain_phi1.sh", "pretrain_phi1_small.sh", "finetune_phi1.sh", "multinode_torchrun.sh"):
        path = REPO / "examples" / name
        assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0, name
        assert subprocess.run([sys.executable, "-W", "error", "-c", "import sys; compile(open(sys.argv[1]).read(), "
                               "sys.argv[1], 'exec')", str(path)], capture_output=True).returncode == 0, name


@pytest.mark.slow
def test_mpirun_trains_with_ranks_from_mpi(reference, tmp_path) -> None:
    if shutil.which("mpirun") is None:
        pytest.skip("mpirun not found: install Open MPI (apt-get install openmpi-bin libopenmpi-dev); CI does")
    pytest.importorskip("mpi4py", reason="mpi4py not installed (pip install mpi4py); CI installs it")
    data_dir, expected = reference
    env = env_for(data_dir, tmp_path, NP="2", MPIRUN_ARGS="--oversubscribe", CONFIG="configs/pretrain_phi1.yaml",
                  OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", MASTER_ADDR="127.0.0.1")
    check(subprocess.run(["bash", "examples/mpirun_pretrain.sh", *TINY], cwd=REPO, capture_output=True, text=True,
                         env=env, timeout=180))
    assert losses(tmp_path) == expected


FAKE_SRUN = """#!/usr/bin/env bash
# srun for one node: drop srun's own options, run the task once (SLURM_PROCID 0), as srun does on each node.
while [[ "$1" == --* ]]; do shift; done
SLURM_PROCID=0 exec "$@"
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
# `scontrol show hostnames LIST`: this machine.
echo 127.0.0.1
"""


@pytest.mark.slow
def test_slurm_batch_script_trains_like_one_launch(reference, tmp_path) -> None:
    """examples/slurm_pretrain_phi1.sbatch on one 'node', with srun and scontrol stand-ins on PATH: the script's
    own logic (node count, rendezvous host, srun of the multi-node launcher) runs unchanged."""
    data_dir, expected = reference
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    run_dir = tmp_path / "run"
    env = env_for(data_dir, run_dir, SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="node0", SLURM_JOB_ID="4242",
                  SLURM_SUBMIT_DIR=str(REPO), GPUS_PER_NODE="2", MASTER_PORT=str(free_port()),
                  PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    check(subprocess.run(["bash", "examples/slurm_pretrain_phi1.sbatch", *TINY], cwd=REPO, capture_output=True,
                         text=True, env=env, timeout=180))
    assert losses(run_dir) == expected
