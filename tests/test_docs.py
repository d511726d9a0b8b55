"""Documentation that is executed: every shell command of README.md (and of any user guide in docs/) runs, in the
order written, each on what the ones before it made, in a scratch copy of the repository. One test per command,
so a README that drifts from the code fails CI with the command, its line and the end of its output.

What the harness changes, and nothing else (the table is printed with every failure):

- SUBSTITUTIONS: sizes only. `--nproc-per-node 8` becomes 2 and `--workers 8` becomes 2 (a 2-core CPU);
  `tools/build_corpus.py` reads 80 files; a training command (`-m phi1.train` without --dry-run, the
  `examples/*.sh` launchers, the quickstart) gets TINY size overrides appended (model size, sequence length,
  batch, steps, intervals: never the tokenizer, precision or parallel layout); `phi1-eval` scores 2 problems
  (`--limit 2`, replacing any --limit).
- ENVIRONMENT: GPUS_PER_NODE=2 (what `bash examples/pretrain_phi1.sh` reads), QUICKSTART_FILES=80 and
  QUICKSTART_EXERCISES=300 (examples/quickstart.sh), PHI1_SKIP_INSTALL=1 (scripts/quickstart.sh: the suite runs
  after scripts/test.sh installed the same packages), HOME in the scratch directory.
- PREREQUISITES a user brings: `~/models/phi-1` (microsoft/phi-1 downloaded) is staged as a tiny random
  HuggingFace phi model with the tokenizer the README's steps trained; the benchmark files a user downloads
  (`mbpp.jsonl`, `HumanEvalPlus.jsonl.gz`, `MbppPlus.jsonl.gz`) are staged as two problems each, written here in
  the published formats (phi1 ships no benchmark data).
- SERVERS: `phi1-serve` starts in the background on a free port; the harness waits for /health, sends one
  /v1/completions request, expects 200, then stops it.
- NOT RUN: `bash scripts/test.sh` is this test suite (.ci/run runs it); downloads (`curl ...`) need the network,
  which tests do not have (their files are PREREQUISITES). Each is reported as skipped, with why.

The quickstart's closing "Next:" commands (printed by examples/quickstart.sh) run too, after the quickstart.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# PHI1_DOCS_GUIDES=a.md:b.md tries other guides (a README being rewritten) with the same harness.
GUIDES = ([Path(p).resolve() for p in os.environ["PHI1_DOCS_GUIDES"].split(os.pathsep) if p]
          if os.environ.get("PHI1_DOCS_GUIDES") else [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))])
SHELL_LANGUAGES = ("bash", "sh", "shell", "console")
DEFAULT_TIMEOUT_S = 300
QUICKSTART_TIMEOUT_S = 420

# Appended to every training command: the same run, shrunk. Sizes only: the recipe's tokenizer, precision and
# parallel layout are what the README promises to work.
TINY_MODEL = ["model.preset=phi-1-nano", "model.max_seq_len=512"]  # room for HumanEval prompts
TINY_RUN = [
    "data.seq_len=64", "batch.global_batch_size=4", "batch.micro_batch_size=2", "schedule.train_steps=4",
    "schedule.warmup_steps=1", "checkpoint.interval=2", "eval.interval=2", "eval.iters=1", "logging.interval=1",
]
TINY_QUICKSTART = ["schedule.train_steps=6", "schedule.warmup_steps=1", "checkpoint.interval=3", "eval.interval=3"]
ENVIRONMENT = {"GPUS_PER_NODE": "2", "QUICKSTART_FILES": "80", "QUICKSTART_EXERCISES": "300",
               "PHI1_SKIP_INSTALL": "1", "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "DS_BUILD_OPS": "0",
               "PYTHONFAULTHANDLER": "1"}
NOT_RUN = {
    "bash scripts/test.sh": "this is the test suite itself: .ci/run runs it, and this test runs inside it",
}
DOWNLOAD = re.compile(r"^(curl|wget)\b")
# What a scratch copy shares with the repository (read-only use); everything a command writes lands beside them.
SHARED = ("phi1", "tools", "configs", "recipes", "examples", "scripts", "csrc", "benchmarks", "setup.py", "pyproject.toml",
          "README.md", "docs")


@dataclass
class Command:
    """One documented command: where it is written and how the harness runs it."""

    guide: Path
    line: int
    text: str
    """As written (continuation lines joined)."""
    harnessed: str = ""
    """What runs: `text` after the SUBSTITUTIONS."""
    mode: str = "run"
    """run | server | not-run"""
    reason: str = ""

    @property
    def name(self) -> str:
        words = re.sub(r"\s+", " ", self.text.split(" #")[0]).strip()
        return f"{self.guide.name}:{self.line} {words[:70]}"


def shell_commands(guide: Path) -> list[Command]:
    """Every command in the guide's fenced shell blocks: continuation lines joined, comment lines dropped."""
    commands: list[Command] = []
    in_block = False
    pending: list[str] = []
    start = 0
    for number, line in enumerate(guide.read_text(encoding="utf-8").splitlines(), start=1):
        stripped = line.strip()
        if stripped.startswith("```"):
            in_block = not in_block and stripped[3:].strip().lower() in SHELL_LANGUAGES
            continue
        if not in_block:
            continue
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if not pending:
            start = number
        pending.append(stripped.removeprefix("$ ") if not pending else stripped)
        if stripped.endswith("\\"):
            pending[-1] = pending[-1][:-1].rstrip()
            continue
        commands.append(Command(guide, start, " ".join(pending)))
        pending = []
    return commands


def is_training(text: str) -> bool:
    if re.search(r"-m phi1\.train\b|\bphi1-train\b", text):
        return not re.search(r"--dry-run|--print-config|--help", text)
    return bool(re.search(r"examples/(pretrain|finetune|multinode)\S*\.sh|(scripts|examples)/quickstart\.sh", text))


def harness(command: Command) -> Command:
    """Apply the SUBSTITUTIONS (see the module docstring) to one command."""
    text = command.text
    code = text.split(" #")[0].rstrip()  # the command without its trailing comment
    if code in NOT_RUN:
        command.mode, command.reason, command.harnessed = "not-run", NOT_RUN[code], code
        return command
    if DOWNLOAD.match(code):
        command.mode, command.harnessed = "not-run", code
        command.reason = "a download: tests have no network; the file it fetches is staged as a PREREQUISITE"
        return command
    code = re.sub(r"--nproc-per-node[ =]\d+", "--nproc-per-node 2", code)
    code = re.sub(r"--workers[ =]\d+", "--workers 2", code)
    if "tools/build_corpus.py" in code and "--max-files" not in code:
        code += " --max-files 80"
    if is_training(code):
        if "quickstart.sh" in code:
            tiny = TINY_QUICKSTART
        elif "finetune" in code:
            tiny = TINY_RUN  # the architecture comes from the model it starts from
        else:
            tiny = TINY_MODEL + TINY_RUN
        code += " " + " ".join(tiny)
    if re.match(r"(phi1-eval|python -m phi1\.eval)\b", code):
        code = re.sub(r"--limit[ =]\d+", "", code).rstrip() + " --limit 2"
    if re.match(r"(phi1-serve|python -m phi1\.serve)\b", code):
        command.mode = "server"
    command.harnessed = code
    return command


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stage_hf_phi1(scratch: Path) -> None:
    """`~/models/phi-1`: a tiny random HuggingFace phi model, with the tokenizer the README's steps trained."""
    from transformers import PhiConfig, PhiForCausalLM

    target = scratch / "home" / "models" / "phi-1"
    if (target / "config.json").exists():
        return
    config = PhiConfig(vocab_size=51200, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=256, partial_rotary_factor=0.5)
    PhiForCausalLM(config).save_pretrained(target, safe_serialization=True)
    for tokenizer in sorted(scratch.glob("data/**/tokenizer.model"))[:1]:
        shutil.copy(tokenizer, target / "tokenizer.model")


def _write_records(path: Path, records: list[dict]) -> None:
    text = "".join(json.dumps(record) + "\n" for record in records)
    if path.suffix == ".gz":
        import gzip

        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)


def stage_mbpp(scratch: Path) -> None:
    """`mbpp.jsonl`: two problems of the test split (task ids 11-510) in google-research's format."""
    _write_records(scratch / "mbpp.jsonl", [
        {"text": "Write a function to add two numbers.", "code": "def add(a, b):\r\n  return a + b", "task_id": 11,
         "test_setup_code": "", "test_list": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"],
         "challenge_test_list": []},
        {"text": "Write a function to reverse a string.", "code": "def rev(s):\r\n  return s[::-1]", "task_id": 12,
         "test_setup_code": "", "test_list": ["assert rev('ab') == 'ba'"], "challenge_test_list": []},
    ])


def stage_humaneval_plus(scratch: Path) -> None:
    """`HumanEvalPlus.jsonl.gz`: two problems in EvalPlus's release format (base and plus inputs)."""
    _write_records(scratch / "HumanEvalPlus.jsonl.gz", [
        {"task_id": "HumanEval/2", "prompt": 'def truncate_number(number: float) -> float:\n    """Decimal part."""\n',
         "entry_point": "truncate_number", "canonical_solution": "    return number % 1.0\n",
         "base_input": [[3.5], [1.33]], "plus_input": [[123.456]], "atol": 0, "contract": "", "test": ""},
        {"task_id": "HumanEval/7", "prompt": 'def double(x: int) -> int:\n    """Twice x."""\n',
         "entry_point": "double", "canonical_solution": "    return 2 * x\n",
         "base_input": [[1], [2]], "plus_input": [[-3]], "atol": 0, "contract": "", "test": ""},
    ])


def stage_mbpp_plus(scratch: Path) -> None:
    """`MbppPlus.jsonl.gz`: two problems in EvalPlus's release format."""
    _write_records(scratch / "MbppPlus.jsonl.gz", [
        {"task_id": "Mbpp/2", "prompt": '"""\nWrite a function to find the shared elements.\n"""\n',
         "entry_point": "similar_elements",
         "canonical_solution": "def similar_elements(a, b):\n    return tuple(sorted(set(a) & set(b)))\n",
         "base_input": [[[3, 4, 5, 6], [5, 7, 4, 10]]], "plus_input": [[[], [1]]], "atol": 0, "test": "",
         "contract": ""},
        {"task_id": "Mbpp/3", "prompt": '"""\nWrite a function to tell non-prime numbers.\n"""\n',
         "entry_point": "is_not_prime",
         "canonical_solution": "def is_not_prime(n):\n    return n < 2 or any(n % i == 0 for i in range(2, n))\n",
         "base_input": [[2], [10]], "plus_input": [[35]], "atol": 0, "test": "", "contract": ""},
    ])


PREREQUISITES = {"~/models/phi-1": stage_hf_phi1, "mbpp.jsonl": stage_mbpp,
                 "HumanEvalPlus.jsonl.gz": stage_humaneval_plus, "MbppPlus.jsonl.gz": stage_mbpp_plus}


@dataclass
class Outcome:
    command: Command
    status: str
    """passed | failed | skipped"""
    detail: str = ""
    seconds: float = 0.0


@dataclass
class Runner:
    """Runs the documented commands in order in one scratch copy; each command's outcome is kept."""

    scratch: Path
    commands: list[Command]
    outcomes: list[Outcome] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK")}
        env.update(ENVIRONMENT, HOME=str(self.scratch / "home"), PYTHONPATH=str(REPO))
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        return env

    def outcome(self, index: int) -> Outcome:
        while len(self.outcomes) <= index:
            self.outcomes.append(self.run(self.commands[len(self.outcomes)]))
        return self.outcomes[index]

    def run(self, command: Command) -> Outcome:
        if command.mode == "not-run":
            return Outcome(command, "skipped", command.reason)
        for marker, stage in PREREQUISITES.items():
            if marker in command.harnessed and not (self.scratch / marker).exists():
                stage(self.scratch)
        started = time.monotonic()
        if command.mode == "server":
            status, detail = self.serve(command)
        else:
            status, detail = self.execute(command)
        earlier = [o.command.name for o in self.outcomes if o.status == "failed"]
        if status == "failed" and earlier:
            detail += f"\n(earlier commands failed too, their output may be missing: {earlier})"
        outcome = Outcome(command, status, detail, time.monotonic() - started)
        if status == "passed" and "quickstart.sh" in command.harnessed:
            self.queue_next_commands(detail)
        return outcome

    def log_path(self, command: Command) -> Path:
        return self.scratch / "logs" / f"{len(self.outcomes):02d}.log"

    def execute(self, command: Command) -> tuple[str, str]:
        timeout = QUICKSTART_TIMEOUT_S if "quickstart" in command.harnessed else DEFAULT_TIMEOUT_S
        log = self.log_path(command)
        log.parent.mkdir(exist_ok=True)
        with open(log, "w") as out:
            process = subprocess.Popen(["bash", "-c", f"set -eo pipefail\n{command.harnessed}"], cwd=self.scratch,
                                       env=self.env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                code = process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                code = f"killed after {timeout} s"
        output = log.read_text(errors="replace")
        if code == 0:
            return "passed", output
        return "failed", f"exit status {code}\n--- last lines of its output ---\n" + "\n".join(
            output.splitlines()[-40:])

    def serve(self, command: Command) -> tuple[str, str]:
        port = free_port()
        text = re.sub(r"--port[ =]\d+", f"--port {port}", command.harnessed)
        if "--port" not in text:
            text += f" --port {port}"
        log = self.log_path(command)
        log.parent.mkdir(exist_ok=True)
        base = f"http://127.0.0.1:{port}"
        with open(log, "w") as out:
            process = subprocess.Popen(["bash", "-c", f"exec {text}"], cwd=self.scratch, env=self.env(), stdout=out,
                                       stderr=subprocess.STDOUT, start_new_session=True)
            try:
                problem = self.probe(base, process)
            finally:
                if process.poll() is None:
                    os.killpg(process.pid, signal.SIGTERM)
                    try:
                        process.wait(20)
                    except subprocess.TimeoutExpired:
                        os.killpg(process.pid, signal.SIGKILL)
                        process.wait()
        output = log.read_text(errors="replace")
        if problem is None:
            return "passed", output
        return "failed", f"{problem}\n--- last lines of its output ---\n" + "\n".join(output.splitlines()[-40:])

    @staticmethod
    def probe(base: str, process: subprocess.Popen) -> str | None:
        """None when the server answers /health and one completion with 200, else what went wrong."""
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                return f"the server exited with status {process.returncode} before answering"
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                return "the server did not answer /health within 180 s"
            time.sleep(1)
        try:
            with urllib.request.urlopen(f"{base}/v1/models", timeout=30) as response:
                model = json.loads(response.read())["data"][0]["id"]
        except (urllib.error.URLError, KeyError, IndexError, ValueError) as error:
            return f"GET /v1/models gave no model id: {error}"
        request = urllib.request.Request(f"{base}/v1/completions", method="POST",
                                         data=json.dumps({"model": model, "prompt": "def add(a, b):",
                                                          "max_tokens": 8}).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as error:
            return f"POST /v1/completions answered {error.code}: {error.read()[:500]!r}"
        if not isinstance(body.get("choices"), list) or not body["choices"]:
            return f"POST /v1/completions answered without choices: {body}"
        return None

    def queue_next_commands(self, output: str) -> None:
        """Run the commands the quickstart prints under "Next:" right after it, as documentation too."""
        lines = output.splitlines()
        if "Next:" not in lines:
            return
        position = len(self.outcomes) + 1
        for offset, line in enumerate(lines[lines.index("Next:") + 1:]):
            if not line.startswith("  ") or line.startswith("     "):
                continue
            next_command = harness(Command(Path("quickstart-next"), offset + 1, line.strip()))
            self.commands.insert(position, next_command)
            position += 1


def make_scratch(directory: Path) -> Path:
    for name in SHARED:
        if (REPO / name).exists():
            (directory / name).symlink_to(REPO / name)
    (directory / "home").mkdir()
    return directory


COMMANDS = [harness(command) for guide in GUIDES for command in shell_commands(guide)]
# Commands the quickstart prints are appended at run time; each gets a test slot here.
QUICKSTART_NEXT_SLOTS = 3


@pytest.fixture(scope="module")
def runner(tmp_path_factory) -> Runner:
    return Runner(make_scratch(tmp_path_factory.mktemp("docs")), list(COMMANDS))


def table() -> str:
    return (f"harness: nproc 8 -> 2, workers 8 -> 2, build_corpus --max-files 80, training commands + "
            f"{' '.join(TINY_MODEL + TINY_RUN)} (quickstart: {' '.join(TINY_QUICKSTART)}), phi1-eval --limit 2, "
            f"environment {ENVIRONMENT}")


def check(outcome: Outcome) -> None:
    if outcome.status == "skipped":
        pytest.skip(f"{outcome.command.name}: not run: {outcome.detail}")
    assert outcome.status == "passed", (
        f"\n{outcome.command.guide.name} line {outcome.command.line}: this documented command failed\n"
        f"  as written: {outcome.command.text}\n  as run:     {outcome.command.harnessed}\n  ({table()})\n"
        f"{outcome.detail}")


def test_guides_have_commands() -> None:
    """The parser finds the README's blocks (a README rewritten without fences would otherwise test nothing)."""
    readme = [c for c in COMMANDS if c.guide.name == "README.md"]
    assert len(readme) >= 5, [c.text for c in readme]
    assert any("scripts/quickstart.sh" in c.text for c in readme)


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(COMMANDS) + QUICKSTART_NEXT_SLOTS),
                         ids=[c.name for c in COMMANDS] + [f"quickstart-next-{i + 1}" for i in range(QUICKSTART_NEXT_SLOTS)])
def test_documented_command(runner: Runner, index: int) -> None:
    if index >= len(COMMANDS):
        # the quickstart's "Next:" commands are inserted after it; run every documented command before them
        runner.outcome(len(runner.commands) - 1)
        printed = [c for c in runner.commands if c.guide.name == "quickstart-next"]
        quickstart_ran = any("quickstart.sh" in c.harnessed for c in COMMANDS)
        if not quickstart_ran:
            pytest.skip("no documented command runs the quickstart")
        assert len(printed) == QUICKSTART_NEXT_SLOTS, (
            f"the quickstart should end by printing {QUICKSTART_NEXT_SLOTS} next commands under 'Next:'; "
            f"found {[c.text for c in printed]}")
        check(runner.outcome(runner.commands.index(printed[index - len(COMMANDS)])))
        return
    check(runner.outcome(runner.commands.index(COMMANDS[index])))


def test_harness_parses_and_shrinks() -> None:
    """The harness's own rules, on a guide written for the test."""
    sample = [
        "python tools/build_corpus.py --output data/x.jsonl",
        "torchrun --nproc-per-node 8 -m phi1.train --config configs/pretrain_phi1.yaml data.path=d",
        "python -m phi1.train --config configs/pretrain_phi1.yaml --dry-run --world-size 8",
        "bash scripts/test.sh",
        "phi1-serve --model runs/x --port 8000",
        "phi1-eval --model runs/x",
    ]
    shrunk = [harness(Command(Path("x.md"), 1, text)) for text in sample]
    assert shrunk[0].harnessed.endswith("--max-files 80")
    assert "--nproc-per-node 2" in shrunk[1].harnessed and "schedule.train_steps=4" in shrunk[1].harnessed
    assert shrunk[2].harnessed == sample[2]
    assert shrunk[3].mode == "not-run"
    assert shrunk[4].mode == "server"
    assert shrunk[5].harnessed.endswith("--limit 2")


@pytest.mark.slow
def test_quickstart_artefacts_exist(runner: Runner) -> None:
    """Every path the quickstart lists under "Artefacts:" exists (TensorBoard folders included), and it ends with
    the next commands to run: eval on the run directory, serve it, and the full recipe."""
    indices = [i for i, c in enumerate(runner.commands) if "quickstart.sh" in c.harnessed and c.mode == "run"]
    if not indices:
        pytest.skip("no documented command runs the quickstart")
    outcome = runner.outcome(indices[0])
    check(outcome)
    lines = outcome.detail.splitlines()
    listed = lines[next(i for i, line in enumerate(lines) if line.rstrip().endswith("Artefacts:")) + 1:lines.index("Next:")]
    paths = [word for line in listed for word in re.findall(r"(?:runs|data)/[^\s(),;]+", line)]
    assert len(paths) >= 10, listed
    for path in paths:
        targets = [path] if not path.endswith(".bin/.idx") else [path[:-5], path[:-9] + ".idx"]
        for target in targets:
            assert (runner.scratch / target).exists(), f"the quickstart lists {target} but did not make it"
    assert any(p.endswith("pretrain/tensorboard") for p in paths) and any(p.endswith("finetune/tensorboard") for p in paths)
    assert any(list((runner.scratch / p).glob("events.out.tfevents.*")) for p in paths if p.endswith("tensorboard"))
    following = [line.strip() for line in lines[lines.index("Next:") + 1:] if line.startswith("  ") and not line.startswith("     ")]
    assert [line.split()[0] for line in following[:2]] == ["phi1-eval", "phi1-serve"], following
    assert "examples/pretrain_phi1.sh" in following[2], following
