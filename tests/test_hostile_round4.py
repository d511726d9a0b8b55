"""Hostile input against what round 4 added, one case per class of bad input: recipe files and their work folder,
DCP checkpoints on every path that reads them, the `selected` pointer of a run, the data pipeline's shards and
the contamination index. Each case runs the real command (`run_bounded`) and expects one line naming the file or
option, exit status 2, and no code run from the file; cases that need no subprocess call the library."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest

from phi1.testing.hostile import assert_clear_error, python, run_bounded

ROOT = Path(__file__).resolve().parents[1]


def _one_line(outcome, names) -> None:
    """The rule for a user error, and exactly one error line (progress and log lines before it may be there)."""
    assert_clear_error(outcome, names=names)
    errors = [line for line in outcome.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and outcome.stderr.strip().endswith(errors[0].strip()), outcome.describe()


# ----------------------------------------------------------------------------------------------------------------
# Recipes: the file, its overrides, and the work folder between runs


@pytest.fixture()
def recipe_inputs(tmp_path) -> dict[str, Path]:
    """Files a recipe points at (existence is all load_recipe checks) and a recipe over them."""
    for name in ("a.jsonl", "b.jsonl", "tok.model"):
        (tmp_path / name).write_text(json.dumps({"text": "def f():\n    return 1\n"}) + "\n")
    (tmp_path / "model").mkdir()
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""name: hostile
work_dir: {tmp_path / 'work'}
teacher:
  base_url: http://127.0.0.1:9/v1
inputs:
  corpus: [{tmp_path / 'a.jsonl'}]
  tokenizer: {tmp_path / 'tok.model'}
  embedding_model: {tmp_path / 'model'}
steps:
  textbooks:
    count: 0
  exercises:
    count: 0
  pretrain:
    config: {ROOT / 'configs' / 'quickstart_pretrain.yaml'}
  finetune:
    config: {ROOT / 'configs' / 'quickstart_finetune.yaml'}
""")
    return {"dir": tmp_path, "recipe": recipe, "work": tmp_path / "work"}


def _alias_bomb() -> str:
    lines = ['      a0: &a0 ["x","x","x","x","x","x","x","x","x","x"]']
    lines += [f"      a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    return "\n".join(lines)


# case: (how the recipe text changes or which overrides are given, what the message must name)
RECIPE_CASES = {
    "duplicate-key": (lambda text: text.replace("name: hostile\n", "name: hostile\nname: other\n"), [],
                      "duplicate key 'name'"),
    "alias-bomb": (lambda text: text.replace("    config: " + str(ROOT / "configs" / "quickstart_pretrain.yaml"),
                                             "    config: " + str(ROOT / "configs" / "quickstart_pretrain.yaml")
                                             + "\n    overrides:\n" + _alias_bomb()), [], "anchor &a0"),
    "python-tag": (None, ['name=!!python/object/apply:os.system ["touch ran-code"]'], "python/object/apply"),
    "binary-tag": (None, ["steps.pretrain.overrides={a: !!binary aGVsbG8=}"], "binary"),
    "date-override": (None, ["steps.pretrain.overrides.schedule.train_steps=2001-12-14"],
                      "steps.pretrain.overrides.schedule.train_steps"),
    "override-sets-output": (None, ["steps.finetune.overrides.checkpoint.dir=/tmp/elsewhere"],
                             "steps.finetune.overrides.checkpoint.dir"),
    "override-bad-key": (None, ['steps.pretrain.overrides={"a=b": 1}'], "steps.pretrain.overrides"),
    "zero-workers": (None, ["steps.dedup.workers=0"], "steps.dedup.workers"),
    "negative-concurrency": (None, ["teacher.concurrency=-3"], "teacher.concurrency"),
    "zero-eval-samples": (None, ["steps.evaluate.n_samples=0"], "steps.evaluate.n_samples"),
    "nan-threshold": (None, ["steps.filter.threshold=.nan"], "steps.filter.threshold"),
    "repeated-shard": ("repeat", [], "inputs.corpus[1]"),
    "work-dir-is-a-file": ("work-file", [], "work_dir"),
    "huge-file": ("huge", [], "1 MiB"),
    "empty-file": ("empty", [], "work_dir"),
    "fifo": ("fifo", [], "not a regular file"),
    "input-is-a-fifo": ("input-fifo", [], "inputs.tokenizer"),
}


@pytest.mark.parametrize("case", list(RECIPE_CASES))
def test_hostile_recipe_file_is_one_line_before_any_step(recipe_inputs, case) -> None:
    change, overrides, names = RECIPE_CASES[case]
    recipe: Path = recipe_inputs["recipe"]
    text = recipe.read_text()
    if callable(change):
        recipe.write_text(change(text))
    elif change == "repeat":
        overrides = [f"inputs.corpus=[{recipe_inputs['dir'] / 'a.jsonl'},{recipe_inputs['dir'] / 'a.jsonl'}]"]
    elif change == "work-file":
        overrides = [f"work_dir={recipe_inputs['dir'] / 'b.jsonl'}"]
    elif change == "huge":
        recipe.write_text(text + "#" * (2 << 20) + "\n")
    elif change == "empty":
        recipe.write_text("")
    elif change == "fifo":
        recipe.unlink()
        os.mkfifo(recipe)
    elif change == "input-fifo":  # hashing it for the cache key would block forever
        os.mkfifo(recipe_inputs["dir"] / "tokenizer.fifo")
        overrides = [f"inputs.tokenizer={recipe_inputs['dir'] / 'tokenizer.fifo'}"]
    outcome = run_bounded(python("-m", "phi1.recipe", "run", str(recipe), *overrides), timeout_s=120)
    _one_line(outcome, names)
    assert not (ROOT / "ran-code").exists()
    assert not (recipe_inputs["work"] / "steps").exists()  # refused before any step ran


def _finish_steps(recipe_inputs, monkeypatch, until: str) -> None:
    """Run the recipe in this process up to `until` with stand-in step functions (each writes one small file),
    so the work folder holds finished steps exactly as the runner records them."""
    from phi1.recipe import steps as recipe_steps
    from phi1.recipe.runner import Runner
    from phi1.recipe.spec import load_recipe

    def stand_in(name):
        def run(ctx):
            (ctx.out / f"{name}.jsonl").write_text(json.dumps({"text": name}) + "\n")
            return {"kept": 1}
        return run

    for name, (_, deps, teacher) in list(recipe_steps.STEPS.items()):
        monkeypatch.setitem(recipe_steps.STEPS, name, (stand_in(name), deps, teacher))
    actions = Runner(load_recipe(str(recipe_inputs["recipe"])), until=until).run()
    assert set(actions.values()) == {"ran"}


def _status(recipe_inputs) -> dict[str, tuple[str, str]]:
    outcome = run_bounded(python("-m", "phi1.recipe", "status", str(recipe_inputs["recipe"])), timeout_s=120)
    assert outcome.returncode == 0, outcome.describe()
    rows = [line.split(None, 2) for line in outcome.stdout.splitlines() if line.strip()]
    return {row[0]: (row[1], row[2] if len(row) > 2 else "") for row in rows}


def test_finished_steps_are_cached_when_untouched(recipe_inputs, monkeypatch) -> None:
    _finish_steps(recipe_inputs, monkeypatch, until="classifier")
    status = _status(recipe_inputs)
    assert status["annotate"][0] == status["classifier"][0] == "cached"
    assert status["filter"] == ("runs", "not run yet")


def _delete_output(work: Path) -> None:
    (work / "steps" / "annotate" / "annotate.jsonl").unlink()


def _edit_output(work: Path) -> None:
    (work / "steps" / "annotate" / "annotate.jsonl").write_text("edited\n")


def _step_json_list(work: Path) -> None:
    (work / "steps" / "annotate" / "step.json").write_text("[1, 2]")


def _step_json_half(work: Path) -> None:
    meta = work / "steps" / "annotate" / "step.json"
    meta.write_text(meta.read_text()[:40])


def _step_json_no_hash(work: Path) -> None:
    meta = work / "steps" / "annotate" / "step.json"
    record = json.loads(meta.read_text())
    del record["output_sha256"]
    meta.write_text(json.dumps(record))


def _digests_list(work: Path) -> None:
    (work / "digests.json").write_text("[1]")


def _digests_wrong_types(work: Path) -> None:
    entries = json.loads((work / "digests.json").read_text())
    (work / "digests.json").write_text(json.dumps({key: 5 for key in entries}))


# case: (tamper, what status says of annotate afterwards)
TAMPERED = {
    "output-deleted": (_delete_output, ("runs", "its output was changed or deleted since it finished")),
    "output-edited": (_edit_output, ("runs", "its output was changed or deleted since it finished")),
    "step-json-not-an-object": (_step_json_list, ("runs", "not run yet")),
    "step-json-truncated": (_step_json_half, ("runs", "not run yet")),
    "step-json-without-hash": (_step_json_no_hash, ("runs", "not run yet")),
    "digests-not-an-object": (_digests_list, ("cached", None)),
    "digests-wrong-types": (_digests_wrong_types, ("cached", None)),
}


@pytest.mark.parametrize("case", list(TAMPERED))
def test_tampered_cache_reruns_what_it_cannot_trust(recipe_inputs, monkeypatch, case) -> None:
    """A work folder changed between runs: what no longer matches runs again (and what reads it); a damaged
    digest cache only costs rehashing. Never a traceback."""
    _finish_steps(recipe_inputs, monkeypatch, until="classifier")
    tamper, (state, why) = TAMPERED[case]
    tamper(recipe_inputs["work"])
    status = _status(recipe_inputs)
    assert status["annotate"][0] == state, status
    if why is not None:
        assert status["annotate"][1] == why
    if state == "runs":
        assert status["classifier"] == ("runs", "annotate reruns, and it reads its output")
    else:
        assert status["classifier"][0] == "cached"


def test_a_deleted_output_is_made_again(recipe_inputs, monkeypatch) -> None:
    _finish_steps(recipe_inputs, monkeypatch, until="classifier")
    _delete_output(recipe_inputs["work"])
    _finish_steps(recipe_inputs, monkeypatch, until="annotate")  # asserts the step ran again
    assert (recipe_inputs["work"] / "steps" / "annotate" / "annotate.jsonl").read_text() == '{"text": "annotate"}\n'


def _link_step_dir(work: Path, outside: Path) -> None:
    shutil.move(work / "steps" / "annotate", outside / "annotate")
    os.symlink(outside / "annotate", work / "steps" / "annotate")


def _link_log(work: Path, outside: Path) -> None:
    os.symlink(outside / "victim.txt", work / "recipe_log.jsonl.new")
    (work / "recipe_log.jsonl").unlink()
    os.replace(work / "recipe_log.jsonl.new", work / "recipe_log.jsonl")


def _link_partial(work: Path, outside: Path) -> None:
    (outside / "partial").mkdir()
    os.symlink(outside / "partial", work / "steps" / ".annotate.partial-0123456789abcdef")


@pytest.mark.parametrize("case", ["step-dir-link", "log-link", "partial-link"])
def test_links_in_the_work_folder_never_lead_writes_outside(recipe_inputs, monkeypatch, tmp_path_factory,
                                                            case) -> None:
    _finish_steps(recipe_inputs, monkeypatch, until="annotate")
    outside = tmp_path_factory.mktemp("outside")
    (outside / "victim.txt").write_text("keep me\n")
    work = recipe_inputs["work"]
    if case == "step-dir-link":
        _link_step_dir(work, outside)
        outcome = run_bounded(python("-m", "phi1.recipe", "status", str(recipe_inputs["recipe"])), timeout_s=120)
        _one_line(outcome, [str(work / "steps" / "annotate"), "symbolic link"])
        assert (outside / "annotate" / "step.json").exists()
        return
    if case == "log-link":
        _link_log(work, outside)
        with pytest.raises(ValueError, match="symbolic link"):
            _finish_steps(recipe_inputs, monkeypatch, until="annotate")
    else:
        _link_partial(work, outside)
        (work / "steps" / "annotate" / "annotate.jsonl").unlink()
        _finish_steps(recipe_inputs, monkeypatch, until="annotate")
        assert (outside / "partial").is_dir() and not list((outside / "partial").iterdir())
        assert not (work / "steps" / ".annotate.partial-0123456789abcdef").exists()
    assert (outside / "victim.txt").read_text() == "keep me\n"


# ----------------------------------------------------------------------------------------------------------------
# DCP checkpoints: every command that reads one goes through the checked reader


def _train_overrides(prefix: str, tokenizer: str, run: Path, **extra) -> list[str]:
    values = {
        "model.preset": "phi-1-nano", "data.path": prefix, "data.tokenizer_model": tokenizer, "data.seq_len": 32,
        "data.split": "100,0,0", "batch.global_batch_size": 4, "batch.micro_batch_size": 2,
        "schedule.train_steps": 4, "schedule.warmup_steps": 1, "checkpoint.dir": run, "checkpoint.interval": 2,
        "checkpoint.keep_last": 0, "checkpoint.format": "dcp", "logging.interval": 1, "eval.interval": 0,
        "logging.tensorboard_dir": "",
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture(scope="module")
def dcp_run(tmp_path_factory) -> dict:
    """A training run of phi-1-nano with DCP checkpoints at iterations 2 and 4 (tokenizer inside each)."""
    from phi1.testing.synthetic import write_synthetic_dataset
    from phi1.training.config import load_config
    from phi1.training.trainer import train

    root = tmp_path_factory.mktemp("dcp-run")
    prefix, tokenizer = write_synthetic_dataset(root / "data")
    run = root / "run"
    train(load_config(None, _train_overrides(prefix, tokenizer, run)))
    assert (run / "iter_0000004" / ".metadata").is_file() and (run / "iter_0000002" / ".metadata").is_file()
    return {"root": root, "run": run, "prefix": prefix, "tokenizer": tokenizer}


class _RunsCode:
    """A pickle that runs a command when loaded: it must never be loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _metadata_code(checkpoint: Path, marker: Path) -> None:
    (checkpoint / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))


def _distcp_code(checkpoint: Path, marker: Path) -> None:
    for payload in checkpoint.glob("*.distcp"):
        size = payload.stat().st_size
        code = pickle.dumps(_RunsCode(marker))
        payload.write_bytes(code + b"\0" * (size - len(code)))  # same size: every .metadata offset stays valid


def _metadata_truncated(checkpoint: Path, marker: Path) -> None:
    data = (checkpoint / ".metadata").read_bytes()
    (checkpoint / ".metadata").write_bytes(data[: len(data) // 2])


def _metadata_oversize(checkpoint: Path, marker: Path) -> None:
    with open(checkpoint / ".metadata", "r+b") as handle:
        handle.truncate(8 << 30)  # sparse: 8 GiB on paper, nothing on disk


def _json_nested(checkpoint: Path, marker: Path) -> None:
    (checkpoint / "format.json").write_text("[" * 100000 + "]" * 100000)


def _rank_file_missing(checkpoint: Path, marker: Path) -> None:
    for payload in checkpoint.glob("*.distcp"):
        payload.unlink()


def _other_preset(checkpoint: Path, marker: Path) -> None:
    from phi1.core.config import get_preset

    (checkpoint / "model_config.json").write_text(json.dumps(get_preset("phi-1-tiny").to_dict()))


def _latest_escapes(checkpoint: Path, marker: Path) -> None:
    (checkpoint.parent / "latest").write_text("../../etc\n")


def _payload_link_out(checkpoint: Path, marker: Path) -> None:
    payload = next(checkpoint.glob("*.distcp"))
    outside = checkpoint.parent.parent / "elsewhere.distcp"
    shutil.move(payload, outside)
    os.symlink(outside, payload)


def _rank_state_garbage(checkpoint: Path, marker: Path) -> None:
    (checkpoint / "rank_state" / "rank00000.safetensors").write_bytes(b"\xff" * 64)


def _command(which: str, run: Path, scratch: Path, dcp_run: dict, **train_extra) -> list[str]:
    if which == "export":
        return python(str(ROOT / "tools" / "export_dcp.py"), "export", str(run / "iter_0000004"), str(scratch / "hf"))
    if which == "convert":
        return python(str(ROOT / "tools" / "convert_checkpoint.py"), "--input", str(run), "--output",
                      str(scratch / "hf"), "--output-format", "hf")
    if which == "eval":
        return python("-m", "phi1.eval", "--model", str(run), "--output-dir", str(scratch / "eval"), "--limit", "1")
    if which == "serve":
        return python("-m", "phi1.serve", "--model", str(run), "--port", "0")
    assert which == "resume"
    return python("-m", "phi1.train", *_train_overrides(dcp_run["prefix"], dcp_run["tokenizer"], run,
                                                         **{"schedule.train_steps": 6, **train_extra}))


READERS = ["export", "convert", "eval", "serve", "resume"]
# (damage, the commands it is tried with, what the message must name, training overrides for the resume)
DCP_CASES = {
    "metadata-pickle-code": (_metadata_code, READERS, "is not part of DCP metadata", {}),
    "distcp-pickle-code": (_distcp_code, READERS, "not a tensor", {}),
    "metadata-truncated": (_metadata_truncated, ["resume"], "unreadable DCP metadata", {}),
    "metadata-oversize": (_metadata_oversize, ["eval"], "over the", {}),
    "json-nested": (_json_nested, ["convert"], "nested too deeply", {}),
    "rank-file-missing": (_rank_file_missing, ["resume"], "missing or not a regular file", {}),
    "other-preset-config": (_other_preset, ["eval"], "do not fit", {}),
    "other-preset-resume": (None, ["resume"], "does not fit this model", {"model.preset": "phi-1-tiny"}),
    "latest-escapes": (_latest_escapes, ["eval", "resume"], "latest", {}),
    "payload-link-out": (_payload_link_out, ["serve"], "symlink", {}),
    "rank-state-garbage": (_rank_state_garbage, ["resume"], "rank00000.safetensors", {}),
}


@pytest.mark.parametrize(("case", "which"), [(case, which) for case, (_, readers, _, _) in DCP_CASES.items()
                                             for which in readers])
def test_hostile_dcp_checkpoint_is_refused_by_every_reader(dcp_run, tmp_path, case, which) -> None:
    """Damage or forgery of the newest checkpoint (its manifest rewritten to match, as a forger would): export,
    convert, eval, serve and resume each say one line naming it, exit 2, and run nothing from it."""
    from phi1.loading import write_manifest

    damage, _, names, train_extra = DCP_CASES[case]
    run = tmp_path / "run"
    shutil.copytree(dcp_run["run"], run, symlinks=True)
    checkpoint = run / "iter_0000004"
    marker = tmp_path / "code-ran"
    if damage is not None:
        damage(checkpoint, marker)
    if case == "metadata-oversize":
        (checkpoint / "manifest.json").unlink()  # a forger drops it rather than hash 8 GiB
    elif case not in ("latest-escapes", "payload-link-out"):
        write_manifest(checkpoint)
    outcome = run_bounded(_command(which, run, tmp_path, dcp_run, **train_extra), timeout_s=240)
    _one_line(outcome, names)
    assert not marker.exists(), "code from the checkpoint ran"
    assert not (run / "iter_0000006").exists()


# ----------------------------------------------------------------------------------------------------------------
# The `selected` pointer: a run directory stands for the checkpoint finetune.select_by chose


def _copy_run_with_selected(dcp_run, tmp_path, text: str | None) -> Path:
    run = tmp_path / "run"
    shutil.copytree(dcp_run["run"], run, symlinks=True)
    if text is not None:
        (run / "selected").write_text(text)
    return run


def test_a_run_directory_loads_its_selected_checkpoint(dcp_run, tmp_path) -> None:
    """`selected` (written by finetune.select_by) wins over `latest` for loading a model; an explicit iter_* path
    is never redirected; the command says which checkpoint it loads and why; resuming still takes `latest`."""
    from safetensors.torch import load_file

    from phi1.loading import load_state, resolve_model_path
    from phi1.training.checkpointing import find_checkpoint

    run = _copy_run_with_selected(dcp_run, tmp_path, "2\n")
    source = resolve_model_path(run)
    assert source.directory == run / "iter_0000002" and "selected" in source.reason
    assert resolve_model_path(run / "iter_0000004").directory == run / "iter_0000004"
    assert find_checkpoint(run) == run / "iter_0000004"  # training resumes from latest

    outcome = run_bounded(_command("convert", run, tmp_path, dcp_run), timeout_s=240)
    assert outcome.returncode == 0, outcome.describe()
    assert f"loading checkpoint iter_0000002, the one {run / 'selected'} names" in outcome.stderr
    assert "latest is iter_0000004" in outcome.stderr
    exported = load_file(str(tmp_path / "hf" / "model.safetensors"))
    _, selected = load_state(run / "iter_0000002")
    _, latest = load_state(run / "iter_0000004")
    name = "model.embed_tokens.weight"
    assert name in exported and exported[name].shape == selected["embed_tokens.weight"].shape
    assert exported[name].equal(selected["embed_tokens.weight"])
    assert not exported[name].equal(latest["embed_tokens.weight"])

    (run / "selected").unlink()
    plain = resolve_model_path(run)
    assert plain.directory == run / "iter_0000004" and "latest" in plain.reason


@pytest.mark.parametrize("case", ["escapes", "not-a-number", "stale", "fifo", "link-out"])
def test_hostile_or_stale_selected_is_one_line(dcp_run, tmp_path, case) -> None:
    """A `selected` that leaves the run, is no iteration number, is not a file, or names a checkpoint that is
    gone: one line naming it and what to do, never another checkpoint loaded in its place."""
    run = _copy_run_with_selected(dcp_run, tmp_path, {"escapes": "../../etc\n", "not-a-number": "best\n",
                                                      "stale": "8\n", "fifo": None, "link-out": None}[case])
    if case == "fifo":
        os.mkfifo(run / "selected")
    elif case == "link-out":
        (tmp_path / "outside").write_text("2\n")
        os.symlink(tmp_path / "outside", run / "selected")
    outcome = run_bounded(_command("eval", run, tmp_path, dcp_run), timeout_s=240)
    _one_line(outcome, [str(run / "selected"), f"{run}: a pointer", f"{run}: pointer"])
    if case == "stale":
        assert "python -m phi1.training.checkpoint_selection" in outcome.stderr


# ----------------------------------------------------------------------------------------------------------------
# The data pipeline (tools/data_pipeline.py over phi1.quality.engine): shards, options and the output folder


def _shards(directory: Path, count: int = 2) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for n in range(count):
        (directory / f"part-{n}.jsonl").write_text(
            "".join(json.dumps({"text": f"def f{n}_{i}():\n    return {i}\n"}) + "\n" for i in range(5)))
    return directory


def _truncated_gzip(tmp_path: Path) -> tuple[list[str], str]:
    import gzip

    shards = _shards(tmp_path / "in")
    data = gzip.compress(b"".join(json.dumps({"text": f"x = {i}"}).encode() + b"\n" for i in range(400)))
    (shards / "part-9.jsonl.gz").write_bytes(data[: len(data) // 2])  # its first lines read fine
    return ["--input-dir", str(shards), "--glob", "*.jsonl*"], str(shards / "part-9.jsonl.gz")


def _too_many_tasks(tmp_path: Path) -> tuple[list[str], str]:
    return ["--input-dir", str(_shards(tmp_path / "in")), "--tasks", "100000000"], "--tasks"


def _damaged_record(tmp_path: Path) -> tuple[list[str], str]:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "engine.json").write_text("[1]")
    return ["--input-dir", str(_shards(tmp_path / "in"))], str(tmp_path / "out" / "engine.json")


def _half_written_record(tmp_path: Path) -> tuple[list[str], str]:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "engine.json").write_text('{"format": "phi1-data-eng')
    return ["--input-dir", str(_shards(tmp_path / "in"))], str(tmp_path / "out" / "engine.json")


def _input_is_the_result(tmp_path: Path) -> tuple[list[str], str]:
    return ["--input-dir", str(_shards(tmp_path / "out" / "result"))], "--input-dir"


def _output_is_the_input_through_a_link(tmp_path: Path) -> tuple[list[str], str]:
    shards = _shards(tmp_path / "in")
    os.symlink(shards, tmp_path / "out")
    return ["--input-dir", str(shards)], "--output-dir"


ENGINE_CASES = {
    "gzip-truncated": _truncated_gzip,
    "tasks-beyond-shards": _too_many_tasks,
    "record-not-an-object": _damaged_record,
    "record-half-written": _half_written_record,
    "input-is-the-result": _input_is_the_result,
    "output-is-input-via-link": _output_is_the_input_through_a_link,
}


@pytest.mark.parametrize("case", list(ENGINE_CASES))
def test_data_pipeline_bad_input_is_one_line_before_any_task(tmp_path, case) -> None:
    args, names = ENGINE_CASES[case](tmp_path)
    outcome = run_bounded(python(str(ROOT / "tools" / "data_pipeline.py"), "--steps", "decontaminate",
                                 "--output-dir", str(tmp_path / "out"), *args), timeout_s=120)
    _one_line(outcome, names)
    assert not (tmp_path / "out" / "steps").exists() or case == "output-is-input-via-link"


# ----------------------------------------------------------------------------------------------------------------
# Contamination index and checkpoint selection


def _index_of_other_benchmark(path: Path) -> Path:
    path.write_text(json.dumps({
        "format": "phi1-contamination-index", "version": 1,
        "thresholds": {"ngram_n": 13, "ngram_min_shared": 1, "ast_taus": [0.95, 0.9, 0.85, 0.8], "ast_min_tokens": 16,
                       "constant_values": False, "embedding_model": None, "embedding_threshold": 0.05},
        "references": ["Mbpp/11", "Mbpp/12"], "training_data": ["t.jsonl"], "documents": 3, "near": {}}))
    return path


def test_index_of_another_benchmark_is_refused_before_generation(dcp_run, tmp_path) -> None:
    """An index that checked none of the problems used to be refused when the report was written, after every
    completion had been generated and run; now before the model is loaded."""
    index = _index_of_other_benchmark(tmp_path / "index.json")
    outcome = run_bounded(python("-m", "phi1.eval", "--model", str(dcp_run["run"]), "--limit", "2",
                                 "--output-dir", str(tmp_path / "eval"), "--contamination-index", str(index)),
                          timeout_s=240)
    _one_line(outcome, ["--contamination-index", "checked none of the evaluated problems"])
    assert "loading checkpoint" not in outcome.stderr and not (tmp_path / "eval").exists()


def _problems_file(tmp_path: Path, case: str) -> Path:
    path = tmp_path / f"{case}.jsonl"
    if case == "binary":
        path.write_bytes(b"\xff\xfe\x00\x89PNG")
    elif case == "nested":
        path.write_text("[" * 100000 + "]" * 100000 + "\n")
    elif case == "fifo":
        os.mkfifo(path)
    elif case == "directory":
        path.mkdir()
    elif case == "null-byte-tests":
        path.write_text(json.dumps({"prompt": "def f():\n", "tests": "assert 1\0"}) + "\n")
    return path


@pytest.mark.parametrize("case", ["binary", "nested", "fifo", "directory", "null-byte-tests",
                                  "saved-config-not-yaml", "saved-config-wrong-shape"])
def test_selection_command_hostile_files_are_one_line(dcp_run, tmp_path, case) -> None:
    run = tmp_path / "run"
    shutil.copytree(dcp_run["run"], run, symlinks=True)
    args = [str(run)]
    if case.startswith("saved-config"):
        saved = run / "iter_0000004" / "config.yaml"
        saved.write_text("finetune: [unclosed\n" if case == "saved-config-not-yaml" else "finetune: [1, 2]\n")
        names = str(saved)
    else:
        problems = _problems_file(tmp_path, case)
        args += ["--problems", str(problems)]
        names = str(problems)
    outcome = run_bounded(python("-m", "phi1.training.checkpoint_selection", *args), timeout_s=120)
    _one_line(outcome, names)
    assert not (run / "selected").exists() and not (run / "selection.json").exists()


@pytest.mark.parametrize("where", ["the-checkpoint", "inside-it", "its-run", "another-run"])
def test_export_never_writes_into_what_it_reads_or_a_run(dcp_run, tmp_path, where) -> None:
    """A model written into the checkpoint, its run directory or another run would overwrite what is read, or
    turn a run into a directory that loads as something else (config.json wins over latest)."""
    run = tmp_path / "run"
    shutil.copytree(dcp_run["run"], run, symlinks=True)
    checkpoint = run / "iter_0000004"
    other = tmp_path / "other-run"
    other.mkdir()
    (other / "latest").write_text("2\n")
    out = {"the-checkpoint": checkpoint, "inside-it": checkpoint / "hf", "its-run": run, "another-run": other}[where]
    before = sorted(p.name for p in out.iterdir()) if out.is_dir() else None
    outcome = run_bounded(python(str(ROOT / "tools" / "export_dcp.py"), "export", str(checkpoint), str(out)),
                          timeout_s=240)
    _one_line(outcome, f"OUT {out}")
    assert (sorted(p.name for p in out.iterdir()) if out.is_dir() else None) == before
    if where == "its-run":
        converted = run_bounded(python(str(ROOT / "tools" / "convert_checkpoint.py"), "--input", str(checkpoint),
                                       "--output", str(run), "--output-format", "hf"), timeout_s=240)
        _one_line(converted, f"--output {run}")
    assert not (run / "config.json").exists()


@pytest.mark.parametrize("field, value, names", [
    ("iteration", [1], "iteration"),
    ("iteration", 99999999999, "says iteration 99999999999"),
    ("consumed_samples", "many", "consumed_samples"),
    ("schedule", 7, "'schedule'"),
    ("loss_scaler", {"scale": "nan", "skipped_steps": 0}, "loss_scaler.scale"),
    ("schedule", None, "no schedule section"),  # None: the section deleted
    ("loss_scaler", None, "no loss_scaler section"),
])
def test_edited_trainer_state_is_one_line_on_resume(dcp_run, tmp_path, field, value, names) -> None:
    """trainer_state.json of the checkpoint a run resumes from, edited (manifest rewritten to match): each field the
    trainer restores is checked when read (phi1.loading.checkpoints.read_trainer_state), so a wrong type is named
    instead of a TypeError deep in the restore, and an iteration other than the directory's is refused."""
    from phi1.loading import write_manifest

    run = tmp_path / "run"
    shutil.copytree(dcp_run["run"], run, symlinks=True)
    path = run / "iter_0000004" / "trainer_state.json"
    state = json.loads(path.read_text())
    if value is None:
        del state[field]
    else:
        state[field] = value
    path.write_text(json.dumps(state))
    write_manifest(run / "iter_0000004")
    outcome = run_bounded(_command("resume", run, tmp_path, dcp_run), timeout_s=240)
    _one_line(outcome, [names])
    assert str(path) in outcome.stderr and not (run / "iter_0000006").exists()


def test_every_dcp_read_in_phi1_goes_through_the_checked_reader() -> None:
    """DCP's own FileSystemReader unpickles `.metadata` with no allowlist: no code of phi1 or its tools may read a
    checkpoint through it or through dcp.load without SafeFileSystemReader."""
    import re

    offenders = []
    for path in [*(ROOT / "phi1").rglob("*.py"), *(ROOT / "tools").glob("*.py"), *(ROOT / "examples").rglob("*.py")]:
        text = path.read_text(encoding="utf-8")
        for match in re.finditer(r"(?<!Safe)FileSystemReader\(|dcp\.load\((?![^)]*SafeFileSystemReader)", text):
            offenders.append(f"{path.relative_to(ROOT)}:{text[: match.start()].count(chr(10)) + 1}")
        if re.search(r"torch\.distributed\.checkpoint\.(format_utils|state_dict_loader)|dcp_to_torch_save", text):
            offenders.append(f"{path.relative_to(ROOT)}: DCP's other loaders")
    assert not offenders, offenders
    text = (ROOT / "phi1" / "parallel" / "distributed_checkpoint.py").read_text()
    assert "dcp.load(state, storage_reader=SafeFileSystemReader(" in text  # the one place tensors are read
