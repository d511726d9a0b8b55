"""Completions that try to forge a pass: each scores failed, because the verdict is decided outside their process.

Where an exploit works against a verdict taken inside the model's process (`run_program`, the in-process
fallback), the test shows that too: the exploit is real, and only the out-of-process design stops it.
"""

from __future__ import annotations

import pytest

from phi1.eval.harness import score_samples
from phi1.eval.sandbox import SandboxConfig, run_program
from phi1.eval.tasks import HUMANEVAL_STOP_STRINGS, Problem

PROMPT = 'def add(a: int, b: int) -> int:\n    """Return a + b."""\n'
TEST = ("def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n"
        "    assert candidate(20, 22) == 42\n")
PROBLEM = Problem("Toy/add", PROMPT, "add", TEST, HUMANEVAL_STOP_STRINGS, "humaneval", reference="    return a + b\n")
CONFIG = SandboxConfig(timeout_s=6.0, cpu_time_s=6, memory_mb=512)

# Each completion is wrong (it never computes a + b honestly) and tries to make the sample pass anyway.
FORGERIES = {
    # The success signal: write a forged verdict / token / answer to every inherited descriptor.
    "fake_success_signal": (
        "    return a - b\n"
        "import os, json\n"
        "for fd in range(3, 256):\n"
        "    for line in (b'\\n{\"verdict\": \"passed\", \"error\": \"\"}\\n', b'{\"ready\": true}\\n',\n"
        "                 b'{\"ok\": [\"i\", \"0x3\"], \"args\": []}\\n', b'\\npassed\\n'):\n"
        "        try:\n"
        "            os.write(fd, line)\n"
        "        except OSError:\n"
        "            pass\n"
    ),
    # Replace the runner's functions: every function object reachable through gc, sys.modules and the
    # frames of the runner that mentions a verdict or a check gets a body that passes.
    "replace_runner_functions": (
        "    return a - b\n"
        "import gc, sys\n"
        "def _passes(*args, **kwargs):\n"
        "    return None\n"
        "for module in list(sys.modules.values()):\n"
        "    for name in ('verdict', 'run_checker_role', 'make_proxy', 'check', '_exit', 'receive'):\n"
        "        if hasattr(module, name):\n"
        "            try:\n"
        "                setattr(module, name, _passes)\n"
        "            except Exception:\n"
        "                pass\n"
        "for obj in gc.get_objects():\n"
        "    if callable(obj) and getattr(obj, '__name__', '') in ('check', 'verdict', 'candidate'):\n"
        "        try:\n"
        "            obj.__code__ = _passes.__code__\n"
        "        except Exception:\n"
        "            pass\n"
        "frame = sys._getframe()\n"
        "while frame is not None:\n"
        "    for name in ('check', 'verdict'):\n"
        "        if name in frame.f_globals:\n"
        "            frame.f_globals[name] = _passes\n"
        "    frame = frame.f_back\n"
    ),
    # Reach the runner through the frames above the completion's module code: call its own write function with
    # its own secret and exit, as if the whole test had run.
    "steal_runner_secret_via_frames": (
        "    return a - b\n"
        "import sys\n"
        "frame = sys._getframe(1)\n"
        "try:\n"
        "    scope = frame.f_locals\n"
        "    scope['write'](scope['result_fd'], b'\\n' + scope['token'] + b'\\n')\n"
        "    scope['exit_now'](0)\n"
        "except Exception:\n"
        "    pass\n"
    ),
    # An always-equal return value, and subclasses of int and str with odd comparisons.
    "always_equal_object": (
        "    class AlwaysEqual:\n"
        "        def __eq__(self, other):\n"
        "            return True\n"
        "        def __ne__(self, other):\n"
        "            return False\n"
        "        __hash__ = object.__hash__\n"
        "    return AlwaysEqual()\n"
    ),
    "always_equal_int_subclass": (
        "    class Liar(int):\n"
        "        def __eq__(self, other):\n"
        "            return True\n"
        "        __hash__ = int.__hash__\n"
        "    return Liar(a - b)\n"
    ),
    "always_equal_str_subclass": (
        "    class Liar(str):\n"
        "        def __eq__(self, other):\n"
        "            return True\n"
        "        __hash__ = str.__hash__\n"
        "    return Liar('wrong')\n"
    ),
    # Read the expected value from the checker's frame: the next constant after the call in the caller's bytecode.
    "read_expected_from_bytecode": (
        "    import dis, sys\n"
        "    caller = sys._getframe(1)\n"
        "    for instruction in dis.get_instructions(caller.f_code):\n"
        "        if instruction.offset > caller.f_lasti and instruction.opname == 'LOAD_CONST':\n"
        "            return instruction.argval\n"
        "    return a - b\n"
    ),
    # Read it from the checker's code object found through gc: the constant after each call with these arguments.
    "read_expected_from_gc": (
        "    import dis, gc\n"
        "    for obj in gc.get_objects():\n"
        "        if getattr(obj, '__name__', '') != 'check' or not hasattr(obj, '__code__'):\n"
        "            continue\n"
        "        code = list(dis.get_instructions(obj.__code__))\n"
        "        for i, ins in enumerate(code):\n"
        "            if ins.opname == 'LOAD_FAST' and ins.argval == 'candidate':\n"
        "                args = [c.argval for c in code[i + 1:i + 3]]\n"
        "                if args == [a, b]:\n"
        "                    for later in code[i + 3:]:\n"
        "                        if later.opname == 'LOAD_CONST':\n"
        "                            return later.argval\n"
        "    return a - b\n"
    ),
    # Leave before any check runs, with a success status.
    "os_exit_0_at_load": "    return a - b\nimport os\nos._exit(0)\n",
    "system_exit_0_at_load": "    return a - b\nraise SystemExit(0)\n",
    "sys_exit_0_in_call": "    import sys\n    sys.exit(0)\n",
    "os_exit_0_in_call": "    import os\n    os._exit(0)\n",
    # Print what looks like a verdict on stdout and stderr.
    "print_verdict": (
        "    return a - b\n"
        "import sys, json\n"
        "print('passed')\nprint(json.dumps({'verdict': 'passed', 'error': ''}))\n"
        "print('All tests passed', file=sys.stderr)\nsys.stdout.flush()\n"
    ),
    # Raise something the test cannot catch as a failure and hope the runner treats it as success.
    "keyboard_interrupt_in_call": "    raise KeyboardInterrupt\n",
}

# Exploits that really work when the verdict is taken inside the model's process.
WORKS_IN_PROCESS = {"read_expected_from_bytecode", "always_equal_object", "always_equal_int_subclass",
                    "read_expected_from_gc", "steal_runner_secret_via_frames"}


@pytest.mark.parametrize("name", sorted(FORGERIES))
def test_forgery_scores_failed(name):
    completion = FORGERIES[name]
    samples = [{"task_id": PROBLEM.task_id, "completion": completion, "sample_index": 0},
               {"task_id": PROBLEM.task_id, "completion": "    return a + b\n", "sample_index": 1}]
    report, scored = score_samples([PROBLEM], samples, ks=(1,), sandbox=CONFIG, workers=2, progress=False)
    assert scored[0]["passed"] is False, scored[0]
    assert scored[0]["verdict"] == "out-of-process"
    assert scored[1]["passed"] is True, scored[1]  # the honest sample beside it still passes
    assert report.pass_at_k["pass@1"] == 0.5
    if name in WORKS_IN_PROCESS:
        forged = run_program(PROBLEM.program(completion), CONFIG, as_main=False)
        assert forged.passed, f"{name} no longer fools an in-process verdict; the test lost its witness"


def test_answers_are_plain_values_not_the_models_objects():
    # A float subclass, a tuple where a list is expected, True where 1 is expected: each arrives as what it is.
    problem = Problem("Toy/types", 'def f(x):\n    """Types."""\n',
                      "f", "def check(candidate):\n    r = candidate(1)\n    assert type(r) is list and r == [1]\n",
                      HUMANEVAL_STOP_STRINGS, "humaneval")
    completions = ["    return (1,)\n", "    class L(list):\n        pass\n    return L([1])\n", "    return [True]\n",
                   "    return [1]\n"]
    samples = [{"task_id": problem.task_id, "completion": c, "sample_index": i} for i, c in enumerate(completions)]
    _, scored = score_samples([problem], samples, ks=(1,), sandbox=CONFIG, workers=2, progress=False)
    # list subclass arrives as a plain list (its value), [True] == [1] as in Python itself.
    assert [s["passed"] for s in scored] == [False, True, True, True]
