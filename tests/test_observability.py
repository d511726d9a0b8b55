"""What a run leaves for users' tools: TensorBoard event files, a Weights & Biases offline run, and a
torch.profiler trace of the chosen steps, each read back and compared with the run's own metrics.jsonl."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest

from phi1.testing.hostile import REPO, assert_clear_error, python, run_bounded
from phi1.testing.synthetic import write_synthetic_dataset
from phi1.training.config import load_config
from phi1.training.metrics import read_jsonl
from phi1.training.trainer import train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("data"))


def overrides(data, run_dir: Path, **extra) -> list[str]:
    prefix, tokenizer = data
    values = {
        "model.preset": "phi-1-nano", "data.path": prefix, "data.tokenizer_model": tokenizer, "data.seq_len": 32,
        "data.split": "100,0,0", "batch.global_batch_size": 4, "batch.micro_batch_size": 2,
        "schedule.train_steps": 5, "schedule.warmup_steps": 1, "checkpoint.dir": run_dir, "checkpoint.interval": 0,
        "logging.interval": 1, "eval.interval": 0,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def wandb_records(path: Path) -> list:
    """The records of a W&B transaction log (`run-ID.wandb`) as `wandb_internal_pb2.Record` messages.

    wandb >= 0.20 no longer ships a Python reader, so this one is written here: the file is a 7-byte header
    (':W&B', magic 0xBEE1, version 0) followed by LevelDB-log framing in 32 KiB blocks: each chunk has a 7-byte
    header (crc32c, little-endian length, type 1 full / 2 first / 3 middle / 4 last), and a block's tail shorter
    than a header is zero padding. The payloads are wandb's own protobuf records.
    """
    from wandb.proto import wandb_internal_pb2

    raw = path.read_bytes()
    assert raw[:4] == b":W&B" and struct.unpack("<H", raw[4:6])[0] == 0xBEE1, f"{path}: not a W&B transaction log"
    block, offset, pending, records = 32768, 7, b"", []
    while offset + 7 <= len(raw):
        left_in_block = block - offset % block
        if left_in_block < 7:
            offset += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", raw[offset:offset + 7])
        if kind == 0 and length == 0:  # zero padding to the end of a block
            offset += left_in_block
            continue
        payload = raw[offset + 7:offset + 7 + length]
        offset += 7 + length
        pending = payload if kind in (1, 2) else pending + payload
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_history(run_dir: Path) -> dict[int, dict]:
    """{step: {key: value}} of the history rows logged to an offline W&B run."""
    (log,) = run_dir.glob("run-*.wandb")
    rows = {}
    for record in wandb_records(log):
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            rows.setdefault(int(items["_step"]), {}).update(items)
    return rows


@pytest.mark.slow
def test_tensorboard_wandb_offline_and_profiler_trace(data, tmp_path, monkeypatch, capsys) -> None:
    """One run with W&B offline and profiling.steps=[2,3]: the TensorBoard scalars, the W&B history and the trace
    are all read back; the losses are the run's own, step by step, and the trace holds iterations 2 and 3 only."""
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run = tmp_path / "run"
    config = load_config(None, overrides(data, run, **{
        "logging.wandb_project": "phi1-test", "logging.wandb_mode": "offline", "profiling.steps": "[2,3]"}))
    train(config)
    output = capsys.readouterr().out
    losses = {r["iteration"]: r["loss"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r}
    assert sorted(losses) == [1, 2, 3, 4, 5] and all(math.isfinite(v) for v in losses.values())

    # TensorBoard: the default folder under checkpoint.dir holds event files with the same losses
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    accumulator = EventAccumulator(str(run / "tensorboard"))
    accumulator.Reload()
    scalars = {e.step: e.value for e in accumulator.Scalars("loss")}
    assert scalars.keys() == losses.keys()
    assert all(scalars[i] == pytest.approx(losses[i], rel=1e-6) for i in losses)
    assert "lr" in accumulator.Tags()["scalars"] and "tokens_per_second" in accumulator.Tags()["scalars"]

    # W&B offline: the run folder under {checkpoint.dir}/wandb, its history read back from the transaction log
    (wandb_run,) = (run / "wandb").glob("offline-run-*")
    history = wandb_history(wandb_run)
    assert sorted(history) == [1, 2, 3, 4, 5]
    assert all(history[i]["loss"] == pytest.approx(losses[i], rel=1e-12) for i in losses)
    assert all("grad_norm" in row and "lr" in row for row in history.values())

    # torch.profiler: one Chrome-trace JSON with a range per traced iteration, and only those
    trace = run / "profile" / "rank0_iterations2-3.pt.trace.json"
    assert trace.is_file()
    trace_events = json.loads(trace.read_text())["traceEvents"]
    steps = {e["name"] for e in trace_events if str(e.get("name", "")).startswith("phi1 iteration")}
    assert steps == {"phi1 iteration 2", "phi1 iteration 3"}
    assert sum(1 for e in trace_events if e.get("ph") == "X") > 100  # the operators of two real steps

    # every artefact's path is logged at the start
    (line,) = [line for line in output.splitlines() if "] artefacts: " in line]
    for path in (run / "metrics.jsonl", run / "tensorboard", wandb_run, trace):
        assert str(path) in line, line


def test_profiler_range_the_run_stops_inside_is_still_written(data, tmp_path) -> None:
    """checkpoint.exit_at_iteration inside profiling.steps: the trace of what ran is exported at close."""
    run = tmp_path / "run"
    train(load_config(None, overrides(data, run, **{
        "profiling.steps": "[2,9]", "schedule.train_steps": 10, "checkpoint.exit_at_iteration": 3,
        "logging.tensorboard_dir": "", "profiling.dir": tmp_path / "traces"})))
    trace = tmp_path / "traces" / "rank0_iterations2-9.pt.trace.json"
    names = {e.get("name") for e in json.loads(trace.read_text())["traceEvents"]}
    assert {"phi1 iteration 2", "phi1 iteration 3"} <= names and "phi1 iteration 4" not in names


def test_missing_wandb_is_one_clear_line(data, tmp_path) -> None:
    """logging.wandb_project set and wandb not importable: exit 2 naming the option, before any training."""
    fake = tmp_path / "no_wandb" / "wandb"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named wandb')\n")
    run = tmp_path / "run"
    outcome = run_bounded(python("-m", "phi1.train", *overrides(data, run, **{"logging.wandb_project": "p"})),
                          timeout_s=180, memory_mb=None, env={"PYTHONPATH": f"{fake.parent}:{REPO}"})
    assert_clear_error(outcome, names="logging.wandb_project")
    assert "pip install wandb" in outcome.stderr and not (run / "metrics.jsonl").exists()



def test_online_wandb_without_a_login_is_one_clear_line(data, tmp_path, monkeypatch) -> None:
    """logging.wandb_mode=online with no API key: exit 2 naming the option and the offline alternative."""
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    run = tmp_path / "run"
    outcome = run_bounded(python("-m", "phi1.train", *overrides(data, run, **{"logging.wandb_project": "p"})),
                          timeout_s=240, memory_mb=None, env={"HOME": str(tmp_path / "home"), "WANDB_SILENT": "true"})
    assert_clear_error(outcome, names="logging.wandb_project")
    assert "logging.wandb_mode=offline" in outcome.stderr and not (run / "latest").exists()
