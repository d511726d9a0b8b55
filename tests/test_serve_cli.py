"""phi1-serve's command line: every bad option or model is one line naming it, exit status 2, no traceback."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from phi1.testing.hostile import assert_clear_error, python, run_bounded
from phi1.testing.toy_model import build_toy_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_toy_model_dir(tmp_path_factory.mktemp("model") / "toy", "phi-1-nano", max_seq_len=128)


# (arguments after the model, what the message must name); "MODEL" stands for the toy model directory.
CASES = {
    "no --model": (["--port", "0"], "--model"),
    "missing model directory": (["--model", "/nonexistent/phi1-model"], "/nonexistent/phi1-model"),
    "empty model directory": (["--model", "EMPTY"], "EMPTY"),
    "unknown option": (["--model", "MODEL", "--frobnicate"], "--frobnicate"),
    "port out of range": (["--model", "MODEL", "--port", "70000"], "--port"),
    "port not a number": (["--model", "MODEL", "--port", "eighty"], "--port"),
    "zero concurrency": (["--model", "MODEL", "--max-concurrent-requests", "0"], "--max-concurrent-requests"),
    "NaN timeout": (["--model", "MODEL", "--header-timeout", "nan"], "--header-timeout"),
    "negative body timeout": (["--model", "MODEL", "--body-timeout", "-1"], "--body-timeout"),
    "zero batch size": (["--model", "MODEL", "--max-batch-size", "0"], "--max-batch-size"),
    "unknown dtype": (["--model", "MODEL", "--dtype", "float8"], "--dtype"),
    "host that does not resolve": (["--model", "MODEL", "--host", "no-such-host.invalid", "--port", "0"], "--host"),
}


@pytest.mark.parametrize("arguments, names", list(CASES.values()), ids=list(CASES))
def test_bad_options_are_one_clear_line(model_dir, tmp_path, arguments, names):
    (tmp_path / "EMPTY").mkdir()
    substitute = {"MODEL": str(model_dir), "EMPTY": str(tmp_path / "EMPTY")}
    argv = [substitute.get(a, a) for a in arguments]
    outcome = run_bounded(python("-m", "phi1.serve", *argv), timeout_s=120)
    assert_clear_error(outcome, names=substitute.get(names, names))
    lines = outcome.stderr.strip().splitlines()
    assert lines[-1].startswith("phi1-serve: error: ") and sum("error" in line for line in lines) == 1, \
        outcome.describe()


def test_a_port_in_use_is_a_clear_error(model_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        outcome = run_bounded(python("-m", "phi1.serve", "--model", str(model_dir), "--port", str(port)),
                              timeout_s=120)
    assert_clear_error(outcome, names=f"--port {port}")
