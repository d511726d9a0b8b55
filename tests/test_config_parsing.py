"""Config values are typed by jsonargparse against the section dataclasses, behind the hardened YAML loader, and
each section validates itself (issue 15: one config section per component, parsed by a library).

Pure Python, milliseconds per case: no data, model or process group.
"""

from __future__ import annotations

import dataclasses
import time

import jsonargparse
import pytest

from phi1.training import config as config_module
from phi1.training.config import (
    BatchSection,
    CheckpointSection,
    ConfigError,
    DataSection,
    EvalSection,
    FaultsSection,
    FinetuneSection,
    GuardSection,
    LoggingSection,
    LossScaleSection,
    ModelSection,
    OptimSection,
    ParallelSection,
    ProfilingSection,
    ScheduleSection,
    TrainConfig,
    config_fields,
    config_from_dict,
    load_config,
    option_types,
    validate_config,
)

BILLION_LAUGHS = "\n".join(
    ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    + [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 10)])


@pytest.fixture
def parsed_by_library(monkeypatch) -> list[dict]:
    """Every mapping that jsonargparse's parse_object is given while the test runs."""
    calls: list[dict] = []
    original = jsonargparse.ArgumentParser.parse_object

    def spy(self, obj, *args, **kwargs):
        calls.append(obj)
        return original(self, obj, *args, **kwargs)

    monkeypatch.setattr(jsonargparse.ArgumentParser, "parse_object", spy)
    return calls


# -- the library is what types the values ---------------------------------------------------------------------------


def test_every_option_has_a_typed_jsonargparse_argument() -> None:
    parser = config_module._parser()
    assert isinstance(parser, jsonargparse.ArgumentParser)
    defaults = parser.get_defaults()
    for dotted in option_types():
        assert dotted in defaults, dotted
    # The section dataclasses are the types: a default of the parser is the dataclass default.
    assert defaults["optim.betas"] == OptimSection().betas and defaults["schedule.decay"] == "linear"
    assert option_types()["optim.betas"] == tuple[float, float]


def test_overrides_are_typed_by_jsonargparse(parsed_by_library) -> None:
    config = load_config(None, ["parallel.sequence_parallel=yes", "optim.betas=[0.9,0.95]", "optim.lr=3e-4",
                                "profiling.steps=[5,7]", "schedule.decay=cosine", "model.n_layer=3"])
    assert parsed_by_library, "jsonargparse was not asked"
    given = parsed_by_library[0]
    assert given["parallel"]["sequence_parallel"] == "yes" and given["optim"]["lr"] == "3e-4"  # the raw words
    assert config.parallel.sequence_parallel is True  # bool
    assert config.optim.betas == (0.9, 0.95) and all(type(b) is float for b in config.optim.betas)  # tuple
    assert config.optim.lr == 3e-4 and type(config.optim.lr) is float
    assert config.profiling.steps == [5, 7] and all(type(s) is int for s in config.profiling.steps)  # list[int]
    assert config.schedule.decay == "cosine"  # Literal
    assert config.model.overrides == {"n_layer": 3} and type(config.model.overrides["n_layer"]) is int


def test_yaml_values_are_typed_by_jsonargparse_too(tmp_path, parsed_by_library) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 1e-3\n  betas: [0.9, 0.95]\nfaults:\n  inject_nan_at: [3, 4]\n"
                    "fused_ops: off\ndata:\n  split: 100\n")
    config = load_config(path, ["faults.inject_nan_at=[5]"])
    assert any(call.get("optim", {}).get("lr") == "1e-3" for call in parsed_by_library)  # YAML 1.1 reads a str
    assert config.optim.lr == 1e-3 and config.optim.betas == (0.9, 0.95)
    assert config.faults.inject_nan_at == [5]  # the override of a nested list field replaces the file's
    assert config.fused_ops == "off"  # YAML 1.1 reads `off` as false; the string field keeps its word
    assert config.data.split == "100"


@pytest.mark.parametrize("word, value", [("true", True), ("yes", True), ("on", True), ("false", False),
                                         ("no", False), ("off", False)])
def test_boolean_words(word: str, value: bool) -> None:
    assert load_config(None, [f"data.document_mask={word}"]).data.document_mask is value


@pytest.mark.parametrize("override, attribute, value", [
    ("profiling.steps=5,7", ("profiling", "steps"), [5, 7]),  # comma-separated list, as before
    ("faults.inject_overflow_at=3", ("faults", "inject_overflow_at"), [3]),
    ("profiling.steps=", ("profiling", "steps"), []),
    ("checkpoint.load=none", ("checkpoint", "load"), None),
    ("checkpoint.exit_at_iteration=null", ("checkpoint", "exit_at_iteration"), None),
    ("logging.wandb_project=", ("logging", "wandb_project"), ""),  # '' is a value (validation names it)
    ("data.path=0.8 a 0.2 b", ("data", "path"), "0.8 a 0.2 b"),
    ("activation_checkpointing=true", ("activation_checkpointing",), "true"),
])
def test_spellings_older_configs_use_keep_their_meaning(override: str, attribute: tuple[str, ...], value) -> None:
    target = load_config(None, [override])
    for name in attribute:
        target = getattr(target, name)
    assert target == value and type(target) is type(value)


@pytest.mark.parametrize("override, line", [
    ("batch.micro_batch_size=x", "batch.micro_batch_size: expected an integer, got 'x'"),
    ("schedule.train_steps=2.5", "schedule.train_steps: expected an integer, got '2.5'"),
    ("optim.betas=[0.9,0.9,0.9]", "optim.betas: expected 2 numbers, got [0.9, 0.9, 0.9]"),
    ("optim.lr=nan", "optim.lr: must be a finite number, got 'nan'"),
    ("optim.lr=1e999", "optim.lr: must be a finite number, got inf"),
    ("parallel.sequence_parallel=maybe", "parallel.sequence_parallel: expected true or false, got 'maybe'"),
    ("profiling.steps=[1,x]", "profiling.steps: expected a list of integers, got [1, 'x']"),
    ("schedule.decay=exponential", "schedule.decay: must be one of ('linear', 'cosine', 'constant'), got "
                                   "'exponential'"),
    ("checkpoint.exit_at_iteration=soon", "checkpoint.exit_at_iteration: expected an integer, got 'soon'"),
    ("optim=3", "optim: is a section; set one of its fields (optim.FIELD=VALUE)"),
    ("optim.lr.peak=3", "optim.lr: is not a section; cannot set optim.lr.peak"),
])
def test_a_refused_value_is_one_line_naming_the_option(override: str, line: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert error.value.problems == [line]


@pytest.mark.parametrize("override, suggestion", [
    ("optim.lrr=1", "optim.lr"),
    ("optim.weight_decy=0.1", "optim.weight_decay"),
    ("schedule.warmup=10", "schedule.warmup_steps"),
    ("model.n_layers=2", "model.n_layer"),
    ("precison=fp32", "precision"),
])
def test_an_unknown_key_names_the_closest_option(override: str, suggestion: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    (line,) = error.value.problems
    key = override.split("=")[0]
    assert line.startswith(f"{key}: unknown ") and f"(did you mean {suggestion}?)" in line, line


def test_an_unknown_key_far_from_every_option_gets_no_guess() -> None:
    with pytest.raises(ConfigError) as error:
        load_config(None, ["optim.zzzzzz=1"])
    assert "did you mean" not in str(error.value) and "optim has ['betas'" in str(error.value)


def test_file_and_override_problems_are_listed_together(tmp_path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: fast\n  lrate: 1\n")
    found: list[str] = []
    config = load_config(path, ["batch.micro_batch_size=x", "optim.eps=1e-8"], problems=found)
    assert found[0] == f"{path}: optim.lr: expected a number, got 'fast'"
    assert found[1].startswith(f"{path}: optim.lrate: unknown option (did you mean optim.lr?)")
    assert found[2] == "batch.micro_batch_size: expected an integer, got 'x'"
    assert len(found) == 3
    # What was refused keeps its default; what was accepted is applied.
    assert config.optim.lr == OptimSection().lr and config.optim.eps == 1e-8


# -- hostile text never reaches the library ----------------------------------------------------------------------


@pytest.mark.parametrize("option", ["optim.lr", "parallel.sequence_parallel", "profiling.steps", "model.d_mlp"])
def test_an_alias_bomb_in_an_override_is_refused_before_the_library(option: str, parsed_by_library) -> None:
    start = time.perf_counter()
    with pytest.raises(ConfigError) as error:
        load_config(None, [f"{option}={BILLION_LAUGHS}"])
    assert time.perf_counter() - start < 5
    (line,) = error.value.problems
    assert line.startswith(f"{option}:") and "anchor &l0 is not accepted" in line, line
    assert all(BILLION_LAUGHS not in str(call) for call in parsed_by_library)


def test_an_alias_bomb_in_a_file_string_is_refused_before_the_library(tmp_path, parsed_by_library) -> None:
    path = tmp_path / "run.yaml"
    quoted = BILLION_LAUGHS.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    path.write_text(f'optim:\n  lr: "{quoted}"\n')
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert error.value.problems[0].startswith(f"{path}: optim.lr:") and "anchor" in error.value.problems[0]
    assert all(BILLION_LAUGHS not in str(call) for call in parsed_by_library)


def test_a_python_tag_in_an_override_is_refused_by_the_config_loader() -> None:
    with pytest.raises(ConfigError) as error:
        load_config(None, ["optim.lr=!!python/object/apply:os.system ['touch PAYLOAD_RAN']"])
    assert error.value.problems[0].startswith("optim.lr:") and "is not accepted" in error.value.problems[0]


# -- round trip and reference --------------------------------------------------------------------------------------


def test_the_saved_yaml_is_the_same_config(tmp_path) -> None:
    config = load_config("configs/pretrain_phi1.yaml", ["optim.betas=[0.9,0.95]", "profiling.steps=[2,3]",
                                                        "schedule.decay=cosine", "model.n_layer=4"])
    import yaml

    assert config_from_dict(yaml.safe_load(config.to_yaml())) == config
    # The dataclass form of the model section (overrides as a mapping) reads the same.
    assert config_from_dict(dataclasses.asdict(config)) == config


def test_help_config_shows_the_choices_of_a_literal_field() -> None:
    types_ = {name: type_name for name, type_name, _, _ in config_fields()}
    assert types_["schedule.decay"] == "Literal['linear', 'cosine', 'constant']"
    assert types_["precision"] == "Literal['auto', 'fp32', 'bf16', 'fp16']"


# -- each section validates itself -----------------------------------------------------------------------------------

SECTIONS_ALONE = [DataSection, OptimSection, ScheduleSection, BatchSection, LossScaleSection, CheckpointSection,
                  LoggingSection, ProfilingSection, EvalSection, FinetuneSection, FaultsSection, GuardSection]


@pytest.mark.parametrize("section", SECTIONS_ALONE, ids=lambda cls: cls.__name__)
def test_the_default_of_every_section_has_no_problems(section) -> None:
    assert section().problems() == []


def test_the_default_parallel_and_model_sections_have_no_problems() -> None:
    assert ParallelSection().problems(world_size=1) == []
    assert ModelSection().problems() == []


@pytest.mark.parametrize("section, option", [
    (DataSection(seq_len=0), "data.seq_len"),
    (DataSection(split="1,x"), "data.split"),
    (DataSection(num_workers=-1), "data.num_workers"),
    (OptimSection(lr=0.0), "optim.lr"),
    (OptimSection(lr=1e-4, min_lr=1e-3), "optim.min_lr"),
    (OptimSection(betas=(0.9, 1.0)), "optim.betas"),
    (OptimSection(impl="sgd"), "optim.impl"),
    (ScheduleSection(train_steps=10, warmup_steps=11), "schedule.warmup_steps"),
    (ScheduleSection(decay="step"), "schedule.decay"),
    (BatchSection(micro_batch_size=0), "batch.micro_batch_size"),
    (BatchSection(global_batch_size=-4), "batch.global_batch_size"),
    (LossScaleSection(initial_scale=0.5, min_scale=1.0), "loss_scale.initial_scale"),
    (LossScaleSection(growth_interval=0), "loss_scale.growth_interval"),
    (CheckpointSection(dir=" "), "checkpoint.dir"),
    (CheckpointSection(format="zip"), "checkpoint.format"),
    (CheckpointSection(exit_at_iteration=0), "checkpoint.exit_at_iteration"),
    (LoggingSection(wandb_mode="loud"), "logging.wandb_mode"),
    (LoggingSection(wandb_project=""), "logging.wandb_project"),
    (ProfilingSection(steps=[7, 5]), "profiling.steps"),
    (EvalSection(iters=-1), "eval.iters"),
    (FinetuneSection(prompt_key=""), "finetune.prompt_key"),
    (FaultsSection(inject_nan_at=[0]), "faults.inject_nan_at"),
    (GuardSection(max_consecutive_nonfinite=-1), "guard.max_consecutive_nonfinite"),
], ids=lambda value: value if isinstance(value, str) else type(value).__name__)
def test_a_section_alone_names_its_bad_field(section, option: str) -> None:
    lines = section.problems()
    assert len(lines) == 1 and lines[0].startswith(f"{option}:"), lines


@pytest.mark.parametrize("changes, world_size, option", [
    ({"tensor_parallel": 3}, 4, "parallel.tensor_parallel"),
    ({"zero_stage": 1}, 1, "parallel.zero_stage"),
    ({"zero_stage": 4}, 8, "parallel.zero_stage"),
    ({"sequence_parallel": True}, 1, "parallel.sequence_parallel"),
    ({"pipeline_schedule": "interleaved"}, 2, "parallel.virtual_stages"),
    ({"pipeline_parallel": 2, "zero_stage": 2}, 4, "parallel.zero_stage"),
])
def test_the_parallel_section_alone_names_its_bad_field(changes: dict, world_size: int, option: str) -> None:
    lines = ParallelSection(**changes).problems(world_size)
    assert lines and all(line.startswith(f"{option}:") for line in lines), lines


def test_the_parallel_layout_that_other_checks_use() -> None:
    problems, layout = ParallelSection(tensor_parallel=2, pipeline_parallel=2).check(8)
    assert problems == [] and (layout.tensor, layout.pipeline, layout.data, layout.virtual) == (2, 2, 2, 1)
    problems, layout = ParallelSection(tensor_parallel=0).check(4)
    assert problems and not layout.tensor_ok and layout.tensor == 1 and layout.data == 4


def test_validate_config_lists_what_each_section_says() -> None:
    config = TrainConfig()
    config.optim.lr = -1.0
    config.logging.wandb_mode = "loud"
    config.faults.inject_nan_at = [0]
    with pytest.raises(ConfigError) as error:
        validate_config(config, 1, check_files=False, check_memory=False, device="cpu")
    for section in (config.optim, config.logging, config.faults):
        for line in section.problems():
            assert line in error.value.problems
