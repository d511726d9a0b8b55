"""Training configs that cannot run are refused before anything starts: every problem at once, one line each,
naming the option (and the file), exit status 2 and no traceback (issues 13 and 14).

The field-by-value matrix runs in this process (validation is pure Python, milliseconds per case); each class
of bad input also runs the real command, `python -m phi1.train ... --dry-run` or a real launch, bounded in time
and memory by phi1.testing.hostile.run_bounded.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import sys
import time
from pathlib import Path

import pytest

from phi1.core.config import ModelConfig, get_preset
from phi1.testing.hostile import assert_clear_error, python, run_bounded
from phi1.testing.synthetic import write_synthetic_dataset
from phi1.training import precision as precision_module
from phi1.training.config import (
    MAX_CONFIG_BYTES,
    ConfigError,
    config_fields,
    config_reference,
    load_config,
    read_config_file,
    validate_config,
)

NAN, INF = "nan", "inf"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    prefix, tokenizer = write_synthetic_dataset(tmp_path_factory.mktemp("data"))
    return {"prefix": prefix, "tokenizer": tokenizer}


def nano(data: dict[str, str], **extra) -> list[str]:
    """Overrides of a valid run of the nano model on the synthetic data (what each case then breaks)."""
    values = {"model.preset": "phi-1-nano", "data.path": data["prefix"], "data.tokenizer_model": data["tokenizer"],
              "data.seq_len": 32, "data.split": "90,10,0", "batch.global_batch_size": 4, "batch.micro_batch_size": 2,
              "schedule.train_steps": 3, "schedule.warmup_steps": 1, "checkpoint.interval": 0, "eval.interval": 0,
              "logging.tensorboard_dir": ""}
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def problems_of(overrides: list[str], world_size: int = 1, device: str = "cpu", **kwargs) -> list[str]:
    """The problem lines of load + validate, as `phi1-train` reports them (empty when the config is valid)."""
    loaded: list[str] = []
    config = load_config(None, overrides, problems=loaded)
    try:
        validate_config(config, world_size, device=device, prior=loaded, **kwargs)
    except ConfigError as error:
        return error.problems
    return []


# -- every numeric field: nan, inf, negative, zero, absurdly large -----------------------------------------------

# option -> the values it must refuse (zero only where zero is meaningless).
NUMERIC_FIELDS: dict[str, list[str]] = {
    "optim.lr": [NAN, INF, "-1e-3", "0", "1e30"],
    "optim.min_lr": [NAN, INF, "-1e-4", "1e30"],
    "optim.weight_decay": [NAN, INF, "-0.1", "1e30"],
    "optim.eps": [NAN, INF, "-1e-8", "0", "1e30"],
    "optim.grad_clip": [NAN, INF, "-1", "1e30"],
    "optim.betas": ["[nan,0.95]", "[0.9,inf]", "[-0.1,0.95]", "[0.9,1.0]", "[0.9,1e30]"],
    "model.init_std": [NAN, INF, "-0.02", "0", "1e30"],
    "model.rotary_base": [NAN, INF, "-10000", "0", "1e30"],
    "model.layer_norm_eps": [NAN, INF, "-1e-5", "0", "1e30"],
    "model.attn_dropout": [NAN, INF, "-0.1", "1.0", "1e30"],
    "model.resid_dropout": [NAN, INF, "-0.1", "1.0", "1e30"],
    "model.embd_dropout": [NAN, INF, "-0.1", "1.0", "1e30"],
    "model.n_layer": [NAN, INF, "-2", "0", "10**9"],
    "model.d_model": [NAN, INF, "-64", "0", "10**9"],
    "model.n_head": [NAN, INF, "-4", "0", "10**9"],
    "model.d_mlp": [NAN, INF, "-256", "0", "10**9"],
    "model.vocab_size": [NAN, INF, "-512", "0", "10**12"],
    "model.max_seq_len": [NAN, INF, "-128", "0", "10**12"],
    "model.rotary_dim": [NAN, INF, "-8", "10**9"],
    "data.seq_len": [NAN, INF, "-32", "0", "10**12"],
    "data.num_workers": [NAN, INF, "-1", "10**6"],
    "batch.micro_batch_size": [NAN, INF, "-2", "0", "10**12"],
    "batch.global_batch_size": [NAN, INF, "-4", "0", "10**12"],
    "schedule.train_steps": [NAN, INF, "-3", "0", "10**12"],
    "schedule.warmup_steps": [NAN, INF, "-1", "10**12"],
    "parallel.tensor_parallel": [NAN, INF, "-1", "0", "10**6"],
    "parallel.ddp_bucket_mb": [NAN, INF, "-25", "0", "1e30"],
    "loss_scale.initial_scale": [NAN, INF, "-1", "0", "1e300"],
    "loss_scale.min_scale": [NAN, INF, "-1", "0", "1e300"],
    "loss_scale.growth_interval": [NAN, INF, "-1", "0", "10**12"],
    "checkpoint.interval": [NAN, INF, "-1", "10**12"],
    "checkpoint.keep_last": [NAN, INF, "-1", "10**12"],
    "logging.interval": [NAN, INF, "-1", "0", "10**12"],
    "logging.peak_tflops": [NAN, INF, "-1", "0", "1e30"],
    "eval.interval": [NAN, INF, "-1", "10**12"],
    "eval.iters": [NAN, INF, "-1", "10**12"],
    "guard.max_consecutive_nonfinite": [NAN, INF, "-1", "10**12"],
    "loss_chunk_size": [NAN, INF, "-1", "10**12"],
    "seed": [NAN, INF, "-1", "10**30"],
}


def _spell(value: str) -> str:
    """'10**9' written as the digits a user would type."""
    return str(eval(value, {})) if "**" in value else value  # noqa: S307 (literal powers of this table only)


@pytest.mark.parametrize("option, value", [(option, value) for option, values in NUMERIC_FIELDS.items()
                                           for value in values])
def test_bad_number_is_named(data, option: str, value: str) -> None:
    lines = problems_of(nano(data, **{option: _spell(value)}))
    assert lines, f"{option}={value} was accepted"
    assert any(line.startswith(f"{option}:") or f": {option}:" in line for line in lines), lines
    assert all("\n" not in line for line in lines)


def test_the_valid_base_config_passes(data) -> None:
    assert problems_of(nano(data)) == []


@pytest.mark.parametrize("overrides, option", [
    (["optim.lr=1e-4", "optim.min_lr=1e-3"], "optim.min_lr"),
    (["schedule.train_steps=10", "schedule.warmup_steps=11"], "schedule.warmup_steps"),
    (["data.seq_len=4096"], "data.seq_len"),  # beyond the nano model's 128-token context
    (["model.n_head=5"], "model.n_head"),
    (["model.vocab_size=1000"], "model.vocab_size"),
    (["profiling.steps=[0,3]"], "profiling.steps"),
    (["profiling.steps=[5,3]"], "profiling.steps"),
    (["profiling.steps=[1,2,3]"], "profiling.steps"),
    (["profiling.steps=[9,10]"], "profiling.steps"),  # after the last step
    (["logging.wandb_mode=sometimes"], "logging.wandb_mode"),
    (["logging.wandb_project="], "logging.wandb_project"),
    (["data.split=1,x,0"], "data.split"),
    (["data.tokenizer_type=WordPiece"], "data.tokenizer_type"),
    (["precision=fp8"], "precision"),
    (["parallel.zero_stage=1"], "parallel.zero_stage"),  # one data-parallel rank: nothing to partition
    (["checkpoint.exit_at_iteration=99"], "checkpoint.exit_at_iteration"),
    (["schedule.train_steps=1000000000", "batch.global_batch_size=1000000"], "schedule.train_steps"),
    (["finetune.prompt_key="], "finetune.prompt_key"),
    (["activation_checkpointing=maybe"], "activation_checkpointing"),
])
def test_contradictions_are_named(data, overrides: list[str], option: str) -> None:
    lines = problems_of(nano(data) + overrides)
    assert any(line.startswith(f"{option}:") for line in lines), lines


@pytest.mark.parametrize("overrides, world_size, option", [
    (["parallel.tensor_parallel=3"], 4, "parallel.tensor_parallel"),  # does not divide the world
    (["parallel.tensor_parallel=8", "batch.global_batch_size=2", "batch.micro_batch_size=2"], 8,
     "parallel.tensor_parallel"),  # 4 heads cannot split 8 ways
    (["parallel.sequence_parallel=true"], 1, "parallel.sequence_parallel"),
    (["parallel.tensor_parallel=2", "parallel.sequence_parallel=true", "parallel.zero_stage=2"], 4,
     "parallel.sequence_parallel"),
    (["parallel.zero_stage=4"], 1, "parallel.zero_stage"),
    (["optim.betas=[0.9,0.9,0.9]"], 1, "optim.betas"),
    (["schedule.decay=exponential"], 1, "schedule.decay"),
    (["optimiser.lr=1e-3"], 1, "optimiser.lr"),
    (["schedule.train_steps=many"], 1, "schedule.train_steps"),
    (["model.preset=phi-9"], 1, "model.preset"),
    (["model.n_layers=2"], 1, "model.n_layers"),
    (["model.rotary_dim=7"], 1, "model.rotary_dim"),
    (["model.tie_word_embeddings=true"], 1, "model.tie_word_embeddings"),
    (["model.attention_backend=triton"], 1, "model.attention_backend"),
    (["fused_ops=sometimes"], 1, "fused_ops"),
    (["optim.impl=sgd"], 1, "optim.impl"),
    (["loss_chunk_size=64", "parallel.zero_stage=3"], 2, "loss_chunk_size"),
    (["faults.kill_at_iteration=2", "faults.kill_rank=5"], 1, "faults.kill_rank"),
    (["data.path=/nonexistent/corpus"], 1, "data.path"),
    (["data.tokenizer_model=/nonexistent/tokenizer.json"], 1, "data.tokenizer_model"),
    (["checkpoint.load=/nonexistent/run"], 1, "checkpoint.load"),
    (["finetune.data=/nonexistent/ex.jsonl"], 1, "finetune.data"),
])
def test_layout_and_file_problems_are_named(data, overrides: list[str], world_size: int, option: str) -> None:
    lines = problems_of(nano(data) + overrides, world_size=world_size)
    assert any(line.startswith(f"{option}:") for line in lines), lines


@pytest.mark.parametrize("option", ["parallel.tensor_parallel", "parallel.pipeline_parallel"])
def test_a_size_above_the_launched_processes_says_how_many_are_needed(data, option: str) -> None:
    assert problems_of(nano(data) + [f"{option}=4"], world_size=2) == [
        f"{option}: 4 needs at least 4 processes, and 2 are launched; launch more (torchrun --nproc-per-node, "
        f"or --world-size with --dry-run) or lower {option}"]


@pytest.mark.parametrize("size", ["0", "-3"])
def test_a_pipeline_size_out_of_range_is_one_line(data, size: str) -> None:
    # Not also a checkpoint.format line about pipeline stages that the run does not have.
    assert problems_of(nano(data) + [f"parallel.pipeline_parallel={size}"]) == [
        f"parallel.pipeline_parallel: must be in [1, 1], got {size}"]


def test_workers_are_bounded_by_the_cores(data) -> None:
    cores = os.cpu_count() or 1
    assert problems_of(nano(data, **{"data.num_workers": 4 * cores})) == []
    assert problems_of(nano(data, **{"data.num_workers": 4 * cores + 1}))[0].startswith("data.num_workers:")


def test_all_problems_are_listed_at_once(data) -> None:
    bad = {"optim.lr": "nan", "model.n_layer": "0", "data.seq_len": "4096", "schedule.warmup_steps": "99",
           "optim.nope": "1", "logging.wandb_mode": "loud", "batch.micro_batch_size": "x"}
    lines = problems_of(nano(data, **bad))
    for option in bad:
        assert sum(line.startswith(f"{option}:") for line in lines) == 1, (option, lines)
    assert len(lines) == len(bad)
    with pytest.raises(ConfigError) as error:
        validate_config(load_config(None, nano(data, **{"optim.lr": "-1", "optim.eps": "0"})), 1, device="cpu")
    message = str(error.value)
    assert message.startswith("2 problems") and "\n  optim.lr:" in message and "\n  optim.eps:" in message


def test_a_valid_config_file_names_itself_in_every_problem(tmp_path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: .nan\n  eps: .inf\n  lrate: 1\nbatch:\n  micro_batch_size: many\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert len(error.value.problems) == 4
    assert all(line.startswith(f"{path}: ") for line in error.value.problems), error.value.problems
    for option in ("optim.lr", "optim.eps", "optim.lrate", "batch.micro_batch_size"):
        assert any(f"{path}: {option}:" in line for line in error.value.problems)


# -- memory that cannot fit, refused before anything is allocated ------------------------------------------------


@pytest.mark.parametrize("overrides, names", [
    (["model.preset=phi-1", "model.n_layer=1000000"], ["model.n_layer=1000000"]),
    (["model.preset=phi-1", "model.d_model=10000000"], ["model.d_model=10000000"]),
    (["model.preset=phi-1", "model.d_model=131072", "model.n_head=1024"], ["model.d_model=131072"]),
])
def test_absurd_sizes_are_refused_in_milliseconds_with_the_estimate(data, overrides, names) -> None:
    for device in ("cpu", "cuda"):
        start = time.perf_counter()
        lines = problems_of(nano(data) + overrides, device=device)
        elapsed = time.perf_counter() - start
        assert elapsed < 0.5, f"validation took {elapsed:.2f} s"
        memory = [line for line in lines if line.startswith("memory:")]
        assert len(memory) == 1, lines
        assert all(name in memory[0] for name in names) and re.search(r"[\d,]+ GiB", memory[0]), memory[0]
        assert ("RAM" if device == "cpu" else "GPU") in memory[0]


def test_planner_estimate_refuses_a_batch_that_cannot_fit(data) -> None:
    overrides = ["model.preset=phi-1", "model.vocab_size=51200", "data.seq_len=2048", "batch.micro_batch_size=256",
                 "batch.global_batch_size=256"]
    lines = problems_of(nano(data) + overrides, device="cuda")
    assert len(lines) == 1 and lines[0].startswith("memory: the planner estimates"), lines
    estimate = float(re.search(r"estimates ([\d,.]+) GiB", lines[0]).group(1).replace(",", ""))
    assert estimate > 192  # more than the largest GPU in phi1.planning.hardware
    assert "batch.micro_batch_size=256" in lines[0] and "data.seq_len=2048" in lines[0]
    # the paper's layout fits a GPU
    assert problems_of(["model.preset=phi-1", "model.vocab_size=51200", f"data.path={data['prefix']}",
                        f"data.tokenizer_model={data['tokenizer']}", "parallel.zero_stage=2",
                        "activation_checkpointing=true"], world_size=8, device="cuda") == []


# -- precision and tokenizer type ----------------------------------------------------------------------------------


def test_precision_auto_and_what_each_device_runs(data) -> None:
    assert precision_module.resolve_precision("auto", "cpu") == "fp32"
    assert precision_module.resolve_precision("fp16", "cpu") == "fp16"
    assert precision_module.precision_problem("fp16", "cpu") is not None
    assert precision_module.precision_problem("bf16", "cpu") is None  # torch's CPU autocast runs it
    assert precision_module.precision_problem("fp32", "cuda") is None
    config = load_config(None, nano(data))
    validate_config(config, 1, device="cpu")
    assert config.precision == "fp32"
    lines = problems_of(nano(data, precision="fp16"))
    assert len(lines) == 1 and lines[0].startswith("precision: fp16 cannot train on a CPU"), lines
    if not precision_module.torch.cuda.is_available():  # planning for a GPU from this machine: a current one
        config = load_config(None, nano(data))
        validate_config(config, 1, device="cuda")
        assert config.precision == "bf16"


def test_tokenizer_type_is_inferred_and_a_mismatch_named(data, tmp_path) -> None:
    config = load_config(None, nano(data))
    assert config.data.tokenizer_type == "auto"
    validate_config(config, 1, device="cpu")
    assert config.data.tokenizer_type == "HuggingFaceTokenizer"
    lines = problems_of(nano(data, **{"data.tokenizer_type": "SentencePieceTokenizer"}))
    assert len(lines) == 1 and lines[0].startswith("data.tokenizer_type: SentencePieceTokenizer does not match")
    assert data["tokenizer"] in lines[0] and "HuggingFaceTokenizer" in lines[0]
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00" * 64)
    lines = problems_of(nano(data, **{"data.tokenizer_model": junk}))
    assert any(line.startswith("data.tokenizer_model:") and str(junk) in line for line in lines), lines


# -- the YAML loader ---------------------------------------------------------------------------------------------

BILLION_LAUGHS = "".join(
    ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n']
    + [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 10)]
)

HOSTILE_YAML: dict[str, bytes] = {
    "billion_laughs": BILLION_LAUGHS.encode(),
    "recursive_anchor": b"optim: &loop\n  lr: *loop\n",
    "merge_key": b"base: &b {lr: 1.0e-3}\noptim:\n  <<: *b\n",
    "python_object": b"optim: !!python/object/apply:os.system ['touch PAYLOAD_RAN']\n",
    "python_name": b"optim:\n  lr: !!python/name:os.system\n",
    "binary_tag": b"data:\n  path: !!binary aGVsbG8=\n",
    "custom_tag": b"data:\n  path: !env HOME\n",
    "not_utf8": "optim:\n  lr: 1.0e-3  # caf\xe9\n".encode("latin-1"),
    "nul_bytes": b"optim:\n  lr: 1\x00\n",
    "huge_file": b"# " + b"x" * (MAX_CONFIG_BYTES + 16) + b"\n",
    "deep_flow_nesting": b"optim: " + b"[" * 200_000 + b"\n",
    "deep_block_nesting": b"a:\n" + b"".join(b"  " * i + b"k%d:\n" % i for i in range(1, 60)),
    "top_level_list": b"- optim\n- lr\n",
    "top_level_scalar": b"42\n",
    "section_is_scalar": b"optim: 3\n",
    "duplicate_key": b"optim:\n  lr: 1.0e-3\n  lr: 2.0e-3\n",
    "nan_value": b"optim:\n  lr: .nan\n",
    "inf_value": b"optim:\n  grad_clip: .inf\n",
    "unknown_key": b"optim:\n  lrate: 1\n",
    "wrong_type": b"batch:\n  micro_batch_size: [1, 2]\n",
    "syntax_error": b"optim: {lr: 1e-3\n",
    "tabs": b"optim:\n\tlr: 1.0\n",
    "list_key": b"? [a, b]\n: 1\n",
    "binary": b"\x00\x01\x02 binary",
}


@pytest.mark.parametrize("name", sorted(HOSTILE_YAML))
def test_hostile_yaml_is_refused_naming_the_file(tmp_path, name: str) -> None:
    path = tmp_path / f"{name}.yaml"
    path.write_bytes(HOSTILE_YAML[name])
    start = time.perf_counter()
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert time.perf_counter() - start < 5
    assert all(line.startswith(str(path)) for line in error.value.problems), error.value.problems
    assert not (tmp_path / "PAYLOAD_RAN").exists() and not Path("PAYLOAD_RAN").exists()


def test_a_file_of_many_bad_keys_gets_a_short_answer(tmp_path) -> None:
    path = tmp_path / "many.yaml"
    path.write_text("".join(f"key{i}: 1\n" for i in range(20000)))
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert len(error.value.problems) == 51 and error.value.problems[-1] == "... and 19,950 more problems like these"


def test_world_size_is_bounded(data) -> None:
    for world_size in (0, -1, 2**40):
        with pytest.raises(ConfigError, match=r"world size \(--world-size"):
            validate_config(load_config(None, nano(data)), world_size, device="cpu")


def test_special_files_are_refused(tmp_path) -> None:
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    for path, words in ((fifo, "not a regular file"), (Path("/dev/zero"), "not a regular file"),
                        (tmp_path, "is a directory"), (tmp_path / "absent.yaml", "no such config file")):
        with pytest.raises(ConfigError, match=re.escape(f"{path}: {words}")):
            read_config_file(path)


def test_every_shipped_config_loads(tmp_path) -> None:
    for path in sorted(Path("configs").glob("*.yaml")):
        config = load_config(path)
        assert config.precision == "auto" and config.data.tokenizer_type == "auto", path
        world_size = 1 if path.name.startswith("quickstart") else 8  # the paper's recipes are for 8 GPUs
        validate_config(config, world_size, check_files=False, device="cuda")
        if path.name.startswith("quickstart"):
            validate_config(load_config(path), 1, check_files=False, device="cpu")


@pytest.mark.parametrize("override, option", [
    ("optim.betas=[*a, 1]", "optim.betas"),
    ("optim.betas=[0.9, !!python/object/apply:os.system [true]]", "optim.betas"),
    ("optim.lr", "optim.lr"),
    ("=3", "override"),
    ("optim.lr=1e-3=2", "optim.lr"),
    ("model.n_layer=1e999", "model.n_layer"),
    ("optim.lr=-inf", "optim.lr"),
    ("model.overrides.n_layer=2", "model.overrides"),
])
def test_bad_overrides_are_named(override: str, option: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert option in str(error.value)


# -- ModelConfig read from a file --------------------------------------------------------------------------------


def test_model_config_json_names_the_file_and_every_field(tmp_path) -> None:
    source = tmp_path / "model" / "config.json"
    values = {**get_preset("phi-1-nano").to_dict(), "n_layer": -1, "rotary_base": math.inf, "attn_dropout": "high"}
    with pytest.raises(ValueError) as error:
        ModelConfig.from_dict(values, source=source)
    lines = str(error.value).splitlines()
    assert lines[0].startswith("3 problems")
    for name in ("n_layer", "rotary_base", "attn_dropout"):
        assert any(line.strip().startswith(f"{source}: {name}:") for line in lines), lines
    with pytest.raises(ValueError, match=re.escape(f"{source}: expected a JSON object")):
        ModelConfig.from_dict([1, 2], source=source)


# -- --help-config ---------------------------------------------------------------------------------------------------


def test_help_config_lists_every_field_with_type_default_and_doc() -> None:
    fields = config_fields()
    text = config_reference()
    names = [name for name, _, _, _ in fields]
    assert len(names) == len(set(names)) > 80
    for name, type_name, default, doc in fields:
        assert doc, f"{name} has no docstring"
        assert f"  {name}  ({type_name}, default {default})" in text
    for expected in ("optim.lr", "data.tokenizer_type", "profiling.steps", "logging.wandb_mode", "model.n_layer",
                     "precision"):
        assert expected in names
    load_config(None, [f"{name}={value}" for name, value in (("optim.lr", "2e-3"), ("model.n_layer", "3"))])


# -- the real command ---------------------------------------------------------------------------------------------


def _train(*args: str) -> list[str]:
    return python("-m", "phi1.train", *args)


@pytest.mark.parametrize("case", ["nan", "inf", "negative", "zero", "huge"])
def test_dry_run_refuses_bad_numbers(data, case: str) -> None:
    override = {"nan": "optim.lr=nan", "inf": "optim.grad_clip=inf", "negative": "optim.weight_decay=-1",
                "zero": "batch.micro_batch_size=0", "huge": "data.seq_len=1000000000000"}[case]
    outcome = run_bounded(_train(*nano(data), override, "--dry-run"), timeout_s=120)
    assert_clear_error(outcome, names=override.split("=")[0])
    assert outcome.stderr.count("phi1-train: error:") == 1


@pytest.mark.parametrize("name", ["billion_laughs", "recursive_anchor", "python_object", "not_utf8", "huge_file"])
def test_dry_run_refuses_hostile_yaml(data, tmp_path, name: str) -> None:
    path = tmp_path / f"{name}.yaml"
    path.write_bytes(HOSTILE_YAML[name])
    outcome = run_bounded(_train("--config", str(path), *nano(data), "--dry-run"), timeout_s=120, memory_mb=4096,
                          cwd=tmp_path)
    assert_clear_error(outcome, names=str(path))
    assert not (tmp_path / "PAYLOAD_RAN").exists()


def test_dry_run_lists_every_problem_of_a_scaled_down_recipe(data) -> None:
    # Scaling the paper recipe down wrongly: five problems, all reported by one launch.
    outcome = run_bounded(_train("--config", "configs/pretrain_phi1.yaml", f"data.path={data['prefix']}",
                                 "model.preset=phi-1-nano", "data.seq_len=2048", "schedule.train_steps=100",
                                 "schedule.warmup_steps=750", "precision=fp16", "optim.lr=inf",
                                 "data.tokenizer_type=SentencePieceTokenizer",
                                 f"data.tokenizer_model={data['tokenizer']}", "--dry-run", "--device", "cpu",
                                 "--world-size", "1"), timeout_s=120)
    assert_clear_error(outcome, names="data.seq_len")
    for option in ("data.seq_len", "schedule.warmup_steps", "precision", "optim.lr", "data.tokenizer_type"):
        assert f"\n  {option}:" in outcome.stderr, outcome.stderr


def test_memory_impossible_size_is_refused_fast(data) -> None:
    start = time.monotonic()
    outcome = run_bounded(_train(*nano(data), "model.preset=phi-1", "model.n_layer=1000000", "--dry-run"), timeout_s=120,
                          memory_mb=4096)
    assert_clear_error(outcome, names="model.n_layer")
    assert re.search(r"memory: .*model\.n_layer=1000000.* [\d,]+ GiB", outcome.stderr), outcome.stderr
    assert time.monotonic() - start < 100


def test_fp16_on_cpu_is_refused_by_dry_run_and_by_a_launch(data, tmp_path) -> None:
    for extra in (["--dry-run", "--device", "cpu"], [f"checkpoint.dir={tmp_path / 'run'}"]):
        outcome = run_bounded(_train(*nano(data), "precision=fp16", *extra), timeout_s=180,
                              env={"DS_ACCELERATOR": "cpu", "DS_BUILD_OPS": "0", "CUDA_VISIBLE_DEVICES": ""})
        assert_clear_error(outcome, names="precision")
        assert "cannot train on a CPU" in outcome.stderr
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_tokenizer_mismatch_is_refused_by_dry_run(data) -> None:
    outcome = run_bounded(_train(*nano(data), "data.tokenizer_type=GPT2BPETokenizer", "--dry-run"), timeout_s=120)
    assert_clear_error(outcome, names="data.tokenizer_type")
    assert data["tokenizer"] in outcome.stderr


@pytest.mark.parametrize("args, names", [
    (["--world-size", "abc", "--dry-run"], "--world-size"),
    (["--no-such-flag"], "--no-such-flag"),
    (["--device", "tpu", "--dry-run"], "--device"),
    (["--world-size", "4"], "--world-size"),
    (["--config", "/nonexistent/run.yaml"], "/nonexistent/run.yaml"),
])
def test_command_line_errors_are_one_line(args: list[str], names: str) -> None:
    outcome = run_bounded(_train(*args), timeout_s=120)
    assert_clear_error(outcome, names=names)
    assert len(outcome.stderr.strip().splitlines()) == 1, outcome.stderr
    assert "usage:" not in outcome.stderr


def test_help_config_command_lists_the_fields() -> None:
    outcome = run_bounded(_train("--help-config"), timeout_s=120)
    assert outcome.returncode == 0, outcome.describe()
    for name, _, _, _ in config_fields():
        assert f"  {name}  (" in outcome.stdout


@pytest.mark.slow
def test_torchrun_prints_one_error_line(data, tmp_path) -> None:
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    outcome = run_bounded([torchrun, "--nproc-per-node", "2", "-m", "phi1.train", *nano(data), "optim.lr=nan",
                           "data.seq_len=0", f"checkpoint.dir={tmp_path / 'run'}"], timeout_s=300, memory_mb=None,
                          env={"OMP_NUM_THREADS": "1"})
    assert not outcome.timed_out, outcome.describe()
    assert outcome.returncode != 0
    lines = [line for line in (outcome.stdout + outcome.stderr).splitlines() if "phi1-train: error:" in line]
    assert len(lines) == 1, outcome.describe()
    # torchrun itself reports a failed worker with its own ChildFailedError traceback; no phi1 frame may appear.
    assert not re.search(r'File "[^"]*/phi1/', outcome.stderr), outcome.describe()
    assert "exitcode  : 2" in outcome.stderr  # rank 0 exited with the user-error status
    assert "optim.lr:" in outcome.stderr and "data.seq_len:" in outcome.stderr


@pytest.mark.parametrize("run_dir", ["/dev/null", "/etc/passwd/run"])
def test_checkpoint_dir_that_cannot_be_a_directory_is_named(tmp_path, run_dir):
    """A run directory that is a file (or lies under one) fails in validation, naming checkpoint.dir, before any
    process group, model or dataset is built."""
    from phi1.testing.hostile import assert_clear_error, python, run_bounded

    outcome = run_bounded(python("-m", "phi1.train", "model.preset=phi-1-nano", f"checkpoint.dir={run_dir}",
                                 "data.path=missing", "schedule.train_steps=2", "schedule.warmup_steps=1"),
                          timeout_s=120)
    assert_clear_error(outcome, names="checkpoint.dir")
    assert "is not a directory" in outcome.stderr
