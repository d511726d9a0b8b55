"""Runs a recipe's steps in order, skipping those whose inputs and settings are unchanged, and records provenance.

Layout of `work_dir`:

    steps/NAME/               a finished step's output; step.json holds its cache key, settings, inputs, counts
    steps/.NAME.partial-KEY/  a step being run: renamed to steps/NAME/ only when it succeeds, so a killed step
                              never looks finished. Run again with the same key, the step resumes in it (annotate,
                              the synthetic generator, dedup and training resume inside their own output); a
                              partial folder of another key is removed.
    recipe_log.jsonl          one line per step per invocation: ran / skipped, key, seconds, counts
    digests.json              content hashes of input files by (path, size, mtime), so unchanged inputs are not reread
    teacher_serve.log         phi1-serve's log, when the recipe started the teacher itself

A step's cache key hashes its settings, the content of every external file it reads and the content hash of
each upstream step's output, so changing `steps.filter.threshold` reruns filter and everything that reads its
output (dedup, decontaminate, preprocess, pretrain, finetune, evaluate), while annotate, classifier and the
synthetic steps, which do not read it, stay cached. `provenance.json` is written into the pretraining and
fine-tuning run directories and the eval report directory: the recipe, the teacher, and for this artefact and
every step upstream of it the key, settings, input hashes and counts (what was pruned and why).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import phi1
from phi1.recipe.cache import DigestCache, open_append_here, step_key, write_text_here
from phi1.recipe.spec import Recipe
from phi1.recipe.steps import STEPS, StepContext, StepFailed

REPO_ROOT = Path(phi1.__file__).resolve().parents[1]
PROVENANCE = "provenance.json"
# Where each artefact that gets a provenance manifest lives inside its step's folder.
ARTEFACTS = {"pretrain": "run", "finetune": "run", "evaluate": "eval"}
# Left out of a step's output hash: what the recipe itself writes after the hash (step.json, provenance), logs, and
# what later steps add beside the data they read (training's index-cache beside the preprocessed prefix).
OUTPUT_SKIP = ("logs", "step.json", PROVENANCE, "tensorboard", "index-cache")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class TeacherServer:
    """`python -m phi1.serve` on a free port of 127.0.0.1, started on first use."""

    def __init__(self, model: str, log: Path) -> None:
        self.model, self.log = model, log
        self.process: subprocess.Popen | None = None
        self.url: str | None = None

    def start(self) -> str:
        if self.url is not None:
            return self.url
        print(f"[recipe] starting the teacher: phi1-serve --model {self.model} (log {self.log})", file=sys.stderr)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        if self.log.is_symlink() or self.log.exists():
            self.log.unlink()  # a fresh log; a link planted here is removed, never written through
        with open_append_here(self.log) as log:
            self.process = subprocess.Popen([sys.executable, "-m", "phi1.serve", "--model", self.model, "--port", "0"],
                                            env=child_env(), stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and self.process.poll() is None:
            found = re.search(r"on http://127\.0\.0\.1:(\d+)/v1", self.log.read_text(errors="replace"))
            if found:
                self.url = f"http://127.0.0.1:{found.group(1)}/v1"
                return self.url
            time.sleep(0.2)
        self.stop()
        tail = self.log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise StepFailed(f"teacher.serve_model {self.model}: phi1-serve did not start ({tail[0]}); see {self.log}",
                         exit_code=2)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def child_env() -> dict[str, str]:
    """The environment of step commands: this checkout first on PYTHONPATH, so tools import this phi1."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT) + (os.pathsep + path if path else "")}


class Runner:
    """Runs `recipe`'s steps (all, or up to `until`) with caching, resumption and provenance."""

    def __init__(self, recipe: Recipe, until: str | None = None, force: tuple[str, ...] = ()) -> None:
        self.recipe = recipe
        self.work = Path(recipe.work_dir)
        self.steps_dir = self.work / "steps"
        self.digests = DigestCache(self.work / "digests.json")
        self.invocation = uuid.uuid4().hex[:12]
        self.until = until
        self.force = set(force)
        self.teacher_server = (TeacherServer(recipe.teacher.serve_model, self.work / "teacher_serve.log")
                               if recipe.teacher.serve_model else None)
        self.records: dict[str, dict] = {}
        if not (REPO_ROOT / "tools").is_dir():
            raise ValueError(f"{REPO_ROOT}/tools: not found; phi1-recipe runs the tools of a phi1 source checkout "
                             "(pip install -e .)")

    # -- what a step reads --------------------------------------------------------------------------------------
    def _teacher_identity(self) -> dict:
        teacher = self.recipe.teacher
        if teacher.serve_model:
            return {"serve_model": self.digests.tree(teacher.serve_model), "model": teacher.model, "api": teacher.api}
        return {"base_url": teacher.base_url, "model": teacher.model, "api": teacher.api}

    def _externals(self, name: str) -> dict[str, str]:
        inputs = self.recipe.inputs
        steps = self.recipe.steps
        paths: dict[str, str | None] = {}
        if name in ("annotate", "filter"):
            paths.update({f"corpus[{i}]": p for i, p in enumerate(inputs.corpus)})
        if name == "annotate":
            paths["annotation_prompt"] = inputs.annotation_prompt
        if name == "classifier" or (name == "decontaminate" and steps.decontaminate.embedding):
            paths["embedding_model"] = inputs.embedding_model
        if name in ("textbooks", "exercises"):
            paths["synthetic_lists"] = inputs.synthetic_lists
        if name == "decontaminate":
            paths.update({f"exercises[{i}]": p for i, p in enumerate(inputs.exercises)})
            paths.update(humaneval=inputs.humaneval, mbpp=inputs.mbpp)
        if name in ("preprocess", "pretrain", "finetune"):
            paths["tokenizer"] = inputs.tokenizer
        if name in ("pretrain", "finetune"):
            paths["config"] = getattr(steps, name).config
        if name == "evaluate":
            paths.update(data=steps.evaluate.data, humaneval=inputs.humaneval)
        return {key: {"path": os.path.abspath(path), "sha256": self.digests.tree(path)}
                for key, path in paths.items() if path}

    def _settings(self, name: str) -> dict:
        steps = self.recipe.steps
        settings = dataclasses.asdict(getattr(steps, name))
        if STEPS[name][2]:
            settings["teacher"] = self._teacher_identity() | {
                "concurrency": self.recipe.teacher.concurrency, "requests_per_minute": self.recipe.teacher.requests_per_minute}
        if name == "filter" and steps.filter.threshold is None:
            settings["threshold"] = steps.classifier.threshold
        return settings

    # -- running --------------------------------------------------------------------------------------------------
    def _teacher(self) -> tuple[str, str | None]:
        teacher = self.recipe.teacher
        url = self.teacher_server.start() if self.teacher_server else teacher.base_url
        return url, teacher.model

    def _command(self, out: Path, argv: list[str], name: str) -> None:
        logs = out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log_path = logs / f"{name}.log"
        env = child_env()
        api_key = os.environ.get(self.recipe.teacher.api_key_env)
        if api_key:
            env["OPENAI_API_KEY"] = api_key
        with open_append_here(log_path) as log:
            log.write(f"$ {' '.join(argv)}\n")
            log.flush()
            done = subprocess.run(argv, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
            first = next((i for i in range(len(lines) - 1, -1, -1) if "error:" in lines[i]), max(0, len(lines) - 1))
            message = "; ".join(line.strip() for line in lines[first:first + 8]) or "no output"
            raise StepFailed(f"{name} failed (exit {done.returncode}): {message}; "
                             f"log: {log_path}", exit_code=2 if done.returncode == 2 else 1)

    def _log(self, entry: dict) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        with open_append_here(self.work / "recipe_log.jsonl") as handle:
            handle.write(json.dumps({"invocation": self.invocation, "time": _now(), **entry}) + "\n")

    def _check_work_folder(self) -> None:
        """Refuse a work folder whose step folders were replaced by links: the recipe reads, replaces and deletes
        its step outputs, which must never happen to whatever a link points at."""
        for path in (self.work, self.steps_dir, *(self.steps_dir / name for name in STEPS)):
            if path.is_symlink():
                raise ValueError(f"{path}: is a symbolic link; a recipe's work folder holds its step outputs itself "
                                 "(it replaces and deletes them): remove the link, or choose another work_dir")
            if path.exists() and not path.is_dir():
                raise ValueError(f"{path}: is not a directory; remove it, or choose another work_dir")

    def _finished(self, name: str) -> dict | None:
        """The record of a finished step, or None when there is none or its step.json is not one the recipe
        wrote (damaged or edited: the step runs again)."""
        meta = self.steps_dir / name / "step.json"
        if meta.is_symlink() or not meta.is_file():
            return None
        try:
            record = json.loads(meta.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            return None
        if not (isinstance(record, dict) and isinstance(record.get("key"), str)
                and isinstance(record.get("output_sha256"), str) and isinstance(record.get("settings"), dict)
                and isinstance(record.get("inputs"), dict) and isinstance(record.get("counts"), dict)):
            return None
        return record

    def _output_intact(self, name: str, record: dict) -> bool:
        """Whether step `name`'s output still has the content it finished with (a file deleted or edited since
        makes the step run again). Hashes are remembered by (size, mtime), so an unchanged output costs a stat
        per file."""
        return self.digests.tree(self.steps_dir / name, skip=OUTPUT_SKIP) == record["output_sha256"]

    def _upstream_closure(self, name: str) -> list[str]:
        seen: list[str] = []

        def visit(step: str) -> None:
            for dep in STEPS[step][1]:
                visit(dep)
            if step not in seen:
                seen.append(step)

        visit(name)
        return seen

    def provenance(self, name: str) -> dict:
        """The manifest of step `name`'s artefact: the recipe, the teacher, and every step it depends on."""
        chain = {step: self.records[step] for step in self._upstream_closure(name)}
        teacher = self.recipe.teacher
        return {
            "format": "phi1-recipe-provenance", "version": 1, "written": _now(), "artefact": name,
            "recipe": {"name": self.recipe.name, "file": os.path.abspath(self.recipe.source),
                       "sha256": self.digests.file(self.recipe.source)},
            "teacher": {"base_url": teacher.base_url, "serve_model": teacher.serve_model and os.path.abspath(teacher.serve_model),
                        "model": teacher.model, "api": teacher.api,
                        "models_seen": sorted({m for s in ("annotate", "textbooks", "exercises") if s in chain
                                               for m in chain[s]["counts"].get("teacher_models", [])})},
            "classifier": chain.get("classifier", {}).get("counts"),
            "thresholds": {"filter": chain["filter"]["settings"]["threshold"] if "filter" in chain else None,
                           "dedup": self.recipe.steps.dedup.threshold, "decontaminate_tau": self.recipe.steps.decontaminate.tau,
                           "decontaminate_ngram_n": self.recipe.steps.decontaminate.ngram_n,
                           "annotate_label": self.recipe.steps.annotate.label_threshold},
            "steps": chain,
        }

    def plan(self) -> list[tuple[str, str, str]]:
        """(step, "cached" | "runs", why) for every step, as `run` would decide, without running anything."""
        self._check_work_folder()
        rows: list[tuple[str, str, str]] = []
        reruns: set[str] = set()
        for name, (_, deps, _) in STEPS.items():
            finished = self._finished(name)
            changed_deps = [dep for dep in deps if dep in reruns]
            if finished is None:
                why = "not run yet"
            elif changed_deps:
                why = (f"{' and '.join(changed_deps)} rerun{'' if len(changed_deps) > 1 else 's'}, and it reads "
                       f"{'their' if len(changed_deps) > 1 else 'its'} output")
            else:
                inputs = self._externals(name)
                for dep in deps:
                    inputs[f"step:{dep}"] = {"sha256": self._finished(dep)["output_sha256"]}
                settings = self._settings(name)
                if finished.get("key") == step_key(name, settings, inputs):
                    if self._output_intact(name, finished):
                        rows.append((name, "cached", finished["key"][:12]))
                        continue
                    reruns.add(name)
                    rows.append((name, "runs", "its output was changed or deleted since it finished"))
                    continue
                moved = [k for k in sorted(set(settings) | set(finished.get("settings", {})))
                         if settings.get(k) != finished.get("settings", {}).get(k)]
                edited = [k for k in sorted(set(inputs) | set(finished.get("inputs", {})))
                          if inputs.get(k, {}).get("sha256") != finished.get("inputs", {}).get(k, {}).get("sha256")]
                why = "; ".join(part for part in (moved and f"settings changed: {', '.join(moved)}",
                                                  edited and f"inputs changed: {', '.join(edited)}") if part) \
                    or "phi1's step code changed (STEPS_VERSION)"
            reruns.add(name)
            rows.append((name, "runs", why))
        self.digests.save()
        return rows

    def run(self) -> dict[str, str]:
        """Run every step (up to `until`); returns {step: "ran" | "skipped"}."""
        self._check_work_folder()
        self.steps_dir.mkdir(parents=True, exist_ok=True)
        actions: dict[str, str] = {}
        try:
            for name, (function, deps, _) in STEPS.items():
                inputs = self._externals(name)
                for dep in deps:
                    inputs[f"step:{dep}"] = {"sha256": self.records[dep]["output_sha256"]}
                settings = self._settings(name)
                key = step_key(name, settings, inputs)
                finished = self._finished(name)
                intact = finished is not None and finished.get("key") == key and self._output_intact(name, finished)
                if finished is not None and finished.get("key") == key and not intact:
                    print(f"[recipe] {name}: its output was changed or deleted since it finished: running it again",
                          file=sys.stderr)
                if intact and name not in self.force:
                    self.records[name] = finished
                    actions[name] = "skipped"
                    print(f"[recipe] {name}: unchanged, skipped ({key[:12]})", file=sys.stderr)
                    self._log({"step": name, "action": "skipped", "key": key})
                else:
                    self.records[name] = self._run_step(name, function, key, settings, inputs)
                    actions[name] = "ran"
                self.digests.save()
                if name == self.until:
                    break
        finally:
            if self.teacher_server is not None:
                self.teacher_server.stop()
        return actions

    def _run_step(self, name: str, function, key: str, settings: dict, inputs: dict) -> dict:
        partial = self.steps_dir / f".{name}.partial-{key[:16]}"
        for stale in self.steps_dir.glob(f".{name}.partial-*"):
            if stale.is_symlink() or not stale.is_dir():
                stale.unlink()  # not a folder the recipe made: the entry itself goes, never what a link points at
            elif stale != partial:
                shutil.rmtree(stale)
        resumed = partial.exists()
        partial.mkdir(exist_ok=True)
        print(f"[recipe] {name}: {'resuming' if resumed else 'running'} ({key[:12]}, logs {partial / 'logs'})",
              file=sys.stderr)
        start = time.perf_counter()
        context = StepContext(recipe=self.recipe, out=partial, upstream=lambda step: self.steps_dir / step,
                              run=lambda argv, log: self._command(partial, argv, log), teacher=self._teacher,
                              tool=lambda tool: str(REPO_ROOT / "tools" / tool))
        counts = function(context)
        seconds = round(time.perf_counter() - start, 1)
        record = {"step": name, "key": key, "settings": settings, "inputs": inputs, "counts": counts,
                  "finished": _now(), "seconds": seconds, "resumed": resumed,
                  "output_sha256": self.digests.tree(partial, skip=OUTPUT_SKIP)}
        self.records[name] = record
        if name in ARTEFACTS:
            write_text_here(partial / ARTEFACTS[name] / PROVENANCE, json.dumps(self.provenance(name), indent=1))
        write_text_here(partial / "step.json", json.dumps(record, indent=1))
        final = self.steps_dir / name
        if final.exists():
            old = self.steps_dir / f".{name}.old-{self.invocation}"
            final.rename(old)
            partial.rename(final)
            shutil.rmtree(old)
        else:
            partial.rename(final)
        self.digests.moved(partial, final)
        self._log({"step": name, "action": "ran", "key": key, "seconds": seconds, "resumed": resumed, "counts": counts})
        print(f"[recipe] {name}: done in {seconds:.0f}s: {json.dumps(counts)[:300]}", file=sys.stderr)
        return record
