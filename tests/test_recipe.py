"""`phi1-recipe`: recipes/tiny_cpu.yaml runs the whole loop end to end (annotate -> evaluate) with phi1-serve on a
tiny model as the teacher; a second run skips every step; a changed filter threshold reruns filter and what reads
its output, and a run killed in the middle of pretraining resumes; bad recipe files are one line, exit 2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from phi1.testing.hostile import assert_clear_error, python, run_bounded

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "tiny_cpu.yaml"
STEPS = ["annotate", "classifier", "filter", "dedup", "textbooks", "exercises", "decontaminate", "preprocess",
         "pretrain", "finetune", "evaluate"]
READS_FILTER = {"filter", "dedup", "decontaminate", "preprocess", "pretrain", "finetune", "evaluate"}


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """A corpus of stdlib functions with near-duplicates, a tokenizer, a random tiny model (teacher and
    embedder) and held-out exercises: everything tiny_cpu.yaml points at, made here (no hub at run time)."""
    from phi1.core.config import get_preset
    from phi1.core.model import PhiForCausalLM
    from phi1.core.pretrained import save_pretrained
    from phi1.data.tokenizer_training import main as train_tokenizer
    from phi1.quality.stdlib_functions import stdlib_functions

    directory = tmp_path_factory.mktemp("recipe-inputs")
    texts = [f.source for f in stdlib_functions(90, seed=3)]
    texts += [text + "\n# a copy\n" for text in texts[:6]]  # near duplicates for dedup to find
    corpus = directory / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    train_tokenizer(["--input", str(corpus), "--output-dir", str(directory / "tok"), "--vocab-size", "512",
                     "--threads", "1"])
    config = get_preset("phi-1-tiny", vocab_size=512, n_layer=2, d_model=128, n_head=2, d_mlp=512, max_seq_len=512)
    model = directory / "model"
    save_pretrained(PhiForCausalLM(config, init_seed=0).state_dict(), config, model)
    (model / "tokenizer.model").write_bytes((directory / "tok" / "tokenizer.model").read_bytes())
    exercises = directory / "exercises.jsonl"
    done = run_bounded(python(str(ROOT / "tools" / "build_exercises.py"), "--output", str(exercises),
                              "--max-exercises", "60"), timeout_s=300, env={"PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.describe()
    return {"dir": directory, "corpus": corpus, "tokenizer": directory / "tok" / "tokenizer.model", "model": model,
            "exercises": exercises}


def _overrides(inputs: dict[str, Path], work: Path) -> list[str]:
    """tiny_cpu.yaml pointed at the fixture's files, at even smaller sizes (the suite runs on 2 shared cores)."""
    return [f"work_dir={work}", f"teacher.serve_model={inputs['model']}", f"inputs.corpus=[{inputs['corpus']}]",
            f"inputs.tokenizer={inputs['tokenizer']}", f"inputs.embedding_model={inputs['model']}",
            f"inputs.exercises=[{inputs['exercises']}]", "steps.annotate.sample=12", "steps.annotate.max_attempts=1",
            "steps.classifier.proxy_count=40", "steps.classifier.trees=10", "steps.textbooks.count=3",
            "steps.exercises.count=3", "steps.textbooks.max_tokens=48", "steps.exercises.max_tokens=48",
            "steps.pretrain.overrides.schedule.train_steps=6", "steps.pretrain.overrides.checkpoint.interval=6",
            "steps.pretrain.overrides.eval.interval=6", "steps.pretrain.overrides.batch.global_batch_size=8",
            "steps.pretrain.overrides.data.seq_len=128", "steps.finetune.overrides.schedule.train_steps=4",
            "steps.finetune.overrides.checkpoint.interval=4", "steps.finetune.overrides.eval.interval=4",
            "steps.finetune.overrides.batch.global_batch_size=8", "steps.finetune.overrides.data.seq_len=128",
            "steps.evaluate.limit=2", "steps.evaluate.max_new_tokens=16"]


def _recipe(*extra: str, timeout_s: float = 1200):
    return run_bounded(python("-m", "phi1.recipe", "run", str(RECIPE), *extra), timeout_s=timeout_s, memory_mb=None,
                       env=_env())


def _log(work: Path) -> list[dict]:
    return [json.loads(line) for line in (work / "recipe_log.jsonl").read_text().splitlines()]


def _actions(work: Path, invocation: str | None = None) -> dict[str, str]:
    """{step: ran | skipped} of the last invocation (or of `invocation`)."""
    entries = _log(work)
    invocation = invocation or entries[-1]["invocation"]
    return {e["step"]: e["action"] for e in entries if e["invocation"] == invocation}


@pytest.mark.slow
def test_tiny_recipe_end_to_end_then_cached_then_rerun_from_filter(inputs, tmp_path) -> None:
    work = tmp_path / "work"
    overrides = _overrides(inputs, work)

    # 1. The whole loop, every step run once, the teacher started by the recipe.
    first = _recipe(*overrides)
    assert first.returncode == 0, first.describe()
    assert _actions(work) == {step: "ran" for step in STEPS}
    assert "starting the teacher" in first.stderr
    records = {step: json.loads((work / "steps" / step / "step.json").read_text()) for step in STEPS}
    assert records["annotate"]["counts"]["sampled"] == 12
    assert records["annotate"]["counts"]["scored"] + records["annotate"]["counts"]["unparsed"] == 12
    assert records["filter"]["counts"]["documents"] == 96
    assert records["dedup"]["counts"]["documents"] - records["dedup"]["counts"]["kept"] >= 1  # the copies
    assert records["textbooks"]["counts"]["requested"] == 3 and records["exercises"]["counts"]["requested"] == 3
    assert records["preprocess"]["counts"]["tokens"] > 0
    assert records["pretrain"]["counts"]["latest_iteration"] == "6"
    assert records["finetune"]["counts"]["latest_iteration"] == "4"
    assert records["evaluate"]["counts"]["num_problems"] == 2
    assert not list((work / "steps").glob(".*"))  # no partial or old folder left

    # Provenance beside both checkpoints and the eval report: data hashes, classifier, thresholds, teacher, counts.
    for step, folder in (("pretrain", "run"), ("finetune", "run"), ("evaluate", "eval")):
        manifest = json.loads((work / "steps" / step / folder / "provenance.json").read_text())
        assert manifest["artefact"] == step and manifest["recipe"]["file"] == str(RECIPE)
        assert manifest["teacher"]["serve_model"] == str(inputs["model"])
        assert manifest["classifier"]["labels"] and manifest["classifier"]["embedder"]["model_dir"] == str(inputs["model"])
        assert manifest["thresholds"]["filter"] == 0.5 and manifest["thresholds"]["dedup"] == 0.8
        corpus = manifest["steps"]["filter"]["inputs"]["corpus[0]"]
        assert corpus["path"] == str(inputs["corpus"]) and len(corpus["sha256"]) == 64
        assert manifest["steps"]["dedup"]["counts"]["pruned"]
        assert "pretrain" in manifest["steps"] and ("evaluate" in manifest["steps"]) == (step == "evaluate")
    evaluation = json.loads((work / "steps" / "evaluate" / "eval" / "provenance.json").read_text())
    assert evaluation["steps"]["evaluate"]["counts"]["num_problems"] == 2
    # The eval report splits pass@1 by the contamination index the decontaminate step built from the kept data.
    summary = json.loads((work / "steps" / "evaluate" / "eval" / "summary.json").read_text())
    split = summary["contamination"]
    assert split["checked_problems"] == 2 and split["index"].endswith("decontamination_index.json")
    assert split["training_data"] == [str(work / "steps" / "decontaminate" / name)
                                      for name in ("code.jsonl", "textbooks.jsonl", "exercises.jsonl")]
    assert split["split"]["any"]["clean"]["problems"] + split["split"]["any"]["contaminated"]["problems"] == 2
    assert evaluation["steps"]["evaluate"]["counts"]["contamination"]["split"] == split["split"]

    # 2. Nothing changed: every step skipped, the teacher never started.
    second = _recipe(*overrides, timeout_s=300)
    assert second.returncode == 0, second.describe()
    assert _actions(work) == {step: "skipped" for step in STEPS}
    assert "starting the teacher" not in second.stderr

    # 3. A threshold between the kept scores: filter and everything reading its output rerun. The run is killed
    # during pretraining, and the next run resumes it: what finished is skipped, pretraining resumes in place.
    scores = sorted(json.loads(line)["quality_score"]
                    for line in (work / "steps" / "filter" / "filtered" / "corpus.jsonl").read_text().splitlines())
    distinct = sorted(set(scores))  # a forest's scores tie (multiples of 1/trees): cut between two distinct ones
    threshold = round((distinct[len(distinct) // 2 - 1] + distinct[len(distinct) // 2]) / 2, 6)
    assert scores[0] < threshold < scores[-1]
    changed = [*overrides, f"steps.filter.threshold={threshold}"]
    status = run_bounded(python("-m", "phi1.recipe", "status", str(RECIPE), *changed), timeout_s=300, env=_env())
    assert status.returncode == 0, status.describe()
    plan = {line.split()[0]: line.split(None, 2)[1:] for line in status.stdout.splitlines()}
    assert {step for step, (state, _) in plan.items() if state == "runs"} == READS_FILTER
    assert plan["filter"][1] == "settings changed: threshold"
    assert plan["dedup"][1] == "filter reruns, and it reads its output"
    runner = subprocess.Popen(python("-m", "phi1.recipe", "run", str(RECIPE), *changed), env=_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 900
        # Killed as soon as pretraining's folder exists: the trainer needs several seconds just to start.
        while not list((work / "steps").glob(".pretrain.partial-*/logs")) and time.monotonic() < deadline:
            assert runner.poll() is None, "the recipe ended before pretraining started"
            time.sleep(0.1)
        time.sleep(0.5)
    finally:
        os.killpg(runner.pid, signal.SIGKILL)
        runner.wait()
    killed = _actions(work)
    assert {s for s, a in killed.items() if a == "ran"} == {"filter", "dedup", "decontaminate", "preprocess"}
    assert list((work / "steps").glob(".pretrain.partial-*"))

    resumed = _recipe(*changed)
    assert resumed.returncode == 0, resumed.describe()
    last = _actions(work)
    assert {s for s, a in last.items() if a == "ran"} == {"pretrain", "finetune", "evaluate"}
    ran = {s for s, a in {**killed, **{k: v for k, v in last.items() if v == "ran"}}.items() if a == "ran"}
    assert ran == READS_FILTER  # annotate, classifier and the synthetic steps do not read the filter's output
    assert [e["resumed"] for e in _log(work) if e["step"] == "pretrain" and e["action"] == "ran"][-1] is True
    assert "starting the teacher" not in resumed.stderr
    assert not list((work / "steps").glob(".*"))
    manifest = json.loads((work / "steps" / "finetune" / "run" / "provenance.json").read_text())
    assert manifest["thresholds"]["filter"] == threshold
    kept = manifest["steps"]["filter"]["counts"]["kept"]
    assert kept == sum(score >= threshold for score in scores) < records["filter"]["counts"]["kept"]


BAD = {
    "not_yaml": ("name: [unclosed\n", "not valid YAML"),
    "unknown_key": ("steps:\n  filtr:\n    threshold: 0.5\n", "steps.filtr"),
    "wrong_type": ("steps:\n  filter:\n    threshold: high\n", "steps.filter.threshold"),
    "missing_input": ("work_dir: w\ninputs:\n  corpus: [nope.jsonl]\n", "inputs.corpus[0]"),
    "not_a_mapping": ("- just\n- a list\n", "expected a mapping"),
}


@pytest.mark.parametrize("case", [*BAD, "no_file", "bad_override", "override_out_of_range"])
def test_bad_recipe_is_one_line_exit_2(tmp_path, case) -> None:
    recipe = tmp_path / "recipe.yaml"
    extra: list[str] = []
    if case in BAD:
        recipe.write_text(BAD[case][0])
        names = BAD[case][1]
    elif case == "no_file":
        recipe, names = tmp_path / "missing.yaml", "missing.yaml"
    else:
        recipe.write_text(RECIPE.read_text())
        extra, names = (["steps.filter"], "key.sub=value") if case == "bad_override" else \
            (["steps.filter.threshold=2"], "steps.filter.threshold")
    outcome = run_bounded(python("-m", "phi1.recipe", "run", str(recipe), *extra), timeout_s=120,
                          env={"PYTHONPATH": str(ROOT)})
    assert_clear_error(outcome, names=names)
    lines = [line for line in outcome.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("phi1-recipe: error: "), outcome.describe()


@pytest.mark.parametrize("name", ["tiny_cpu.yaml", "phi1.yaml"])
def test_shipped_recipes_are_valid_once_their_inputs_exist(tmp_path, name) -> None:
    """Both shipped recipes pass the recipe check when their input files exist (the paths are the user's)."""
    from phi1.recipe.spec import load_recipe

    for file in ("a.jsonl", "b.jsonl", "tok.model", "ex.jsonl"):
        (tmp_path / file).write_text("")
    (tmp_path / "model").mkdir()
    (tmp_path / "teacher").mkdir()
    overrides = [f"inputs.corpus=[{tmp_path}/*.jsonl]", f"inputs.tokenizer={tmp_path / 'tok.model'}",
                 f"inputs.embedding_model={tmp_path / 'model'}", f"inputs.exercises=[{tmp_path / 'ex.jsonl'}]"]
    if name == "tiny_cpu.yaml":
        overrides.append(f"teacher.serve_model={tmp_path / 'teacher'}")
    recipe = load_recipe(str(ROOT / "recipes" / name), overrides)
    assert recipe.inputs.corpus == [str(tmp_path / f) for f in ("a.jsonl", "b.jsonl", "ex.jsonl")]
    assert recipe.steps.pretrain.config and os.path.isfile(recipe.steps.pretrain.config)
    assert (recipe.teacher.base_url is None) != (recipe.teacher.serve_model is None)
