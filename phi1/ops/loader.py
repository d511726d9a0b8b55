"""Builds and loads the fused ops of csrc/fused_ops with `torch.utils.cpp_extension`: ahead of time with

    python -m phi1.ops                  # the CUDA build where a GPU and nvcc are present, else the CPU one

or at start-up (`prepare`), never in the middle of a run. A failed build is reported once, with the reason
and the command above, and the model runs the PyTorch references of phi1/ops/reference.py instead.

Builds are cached per torch version under $PHI1_EXTENSIONS_DIR (default ~/.cache/phi1/extensions); torch's
loader rebuilds when a source or flag changes, and a file lock lets every rank of a job load the same build.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import sysconfig
from pathlib import Path
from types import ModuleType

import torch

logger = logging.getLogger("phi1.ops")

SOURCE_DIR = Path(__file__).resolve().parents[2] / "csrc" / "fused_ops"
BUILD_COMMAND = "python -m phi1.ops"
MODES = ("auto", "on", "off")

_modules: dict[str, ModuleType] = {}
_failures: dict[str, str] = {}


class FusedOpsUnavailable(RuntimeError):
    """The extension could not be built or loaded; the message says why and how to build it."""


def _cuda_home() -> str | None:
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME


def build_directory(kind: str) -> Path:
    root = Path(os.environ.get("PHI1_EXTENSIONS_DIR", Path.home() / ".cache" / "phi1" / "extensions"))
    # The torch version is part of the key: an extension built against one torch's ABI crashes in another.
    return root / f"fused_ops_{kind}-torch{torch.__version__.replace('+', '_')}"


def _put_ninja_on_path() -> None:
    """torch runs `ninja` from PATH; pip installs it beside this interpreter, which a venv used without being
    activated does not put on PATH."""
    if shutil.which("ninja") is None:
        scripts = sysconfig.get_path("scripts")
        if scripts and (Path(scripts) / "ninja").exists():
            os.environ["PATH"] = scripts + os.pathsep + os.environ.get("PATH", "")


def build(kind: str, verbose: bool = False) -> ModuleType:
    """Compile (or load the cached build of) the extension. kind: 'cpu' (C++ only) or 'cuda' (C++ and CUDA).

    Raises FusedOpsUnavailable naming what is missing.
    """
    if kind in _modules:
        return _modules[kind]
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"kind must be 'cpu' or 'cuda', got {kind!r}")
    sources = [SOURCE_DIR / "fused_ops.cpp"] + ([SOURCE_DIR / "fused_ops_cuda.cu"] if kind == "cuda" else [])
    missing = [str(s) for s in sources if not s.is_file()]
    if missing:
        raise FusedOpsUnavailable(f"sources not found: {', '.join(missing)} (fused ops build from a source checkout)")
    if kind == "cuda":
        if torch.version.cuda is None:
            raise FusedOpsUnavailable(f"this torch ({torch.__version__}) is a CPU build")
        if _cuda_home() is None:
            raise FusedOpsUnavailable("nvcc not found: set CUDA_HOME to a CUDA toolkit matching torch.version.cuda "
                                      f"({torch.version.cuda})")
    from torch.utils.cpp_extension import load

    _put_ninja_on_path()
    directory = build_directory(kind)
    directory.mkdir(parents=True, exist_ok=True)
    # -fopenmp: at::parallel_for is an inline OpenMP loop; without the flag it runs on one thread.
    # -ffast-math lets gcc call glibc's vector exp (libmvec). The kernels hold no comparisons or isnan tests
    # for it to fold, so NaN and inf still propagate, which the non-finite guard relies on (tested).
    cflags = ["-O3", "-fopenmp", "-ffast-math"] + (["-DPHI1_WITH_CUDA"] if kind == "cuda" else [])
    try:
        module = load(
            name=f"phi1_fused_ops_{kind}",
            sources=[str(s) for s in sources],
            extra_cflags=cflags,
            extra_cuda_cflags=["-O3", "-DPHI1_WITH_CUDA"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(directory),
            with_cuda=kind == "cuda",
            verbose=verbose,
        )
    except Exception as exc:  # compiler errors arrive as RuntimeError, a missing ninja as others
        last_lines = "\n".join(str(exc).strip().splitlines()[-6:])
        raise FusedOpsUnavailable(f"build of {kind} fused ops in {directory} failed: {last_lines}") from exc
    _modules[kind] = module
    return module


def loaded(device: torch.device | str) -> ModuleType | None:
    """The extension for this device if `prepare` or `build` loaded it; never builds."""
    kind = torch.device(device).type
    module = _modules.get(kind)
    return module if module is not None and (kind == "cpu" or module.with_cuda) else None


def prepare(device: torch.device | str, mode: str = "auto") -> bool:
    """Decide at start-up whether the model runs the fused ops on `device`; build them if needed.

    mode 'auto': on CUDA, build (or load the cached build) and fall back to the PyTorch references with a
    warning if that fails. On CPU the references are kept: benchmarks/bench_fused_ops.py measured the C++
    kernels no faster there (see benchmarks/README.md), and a CPU first run should not wait for a compiler.
    mode 'on': build for this device or raise FusedOpsUnavailable. mode 'off': the references.
    Returns True when the fused ops will run.
    """
    if mode not in MODES:
        raise ValueError(f"fused_ops must be one of {MODES}, got {mode!r}")
    kind = torch.device(device).type
    if mode == "off" or (mode == "auto" and kind != "cuda"):
        logger.info("fused ops: off on %s (PyTorch references; requested %r)", kind, mode)
        return False
    if kind not in ("cpu", "cuda"):
        if mode == "on":
            raise FusedOpsUnavailable(f"no fused-op kernels for device type {kind!r}")
        return False
    try:
        build(kind)
    except FusedOpsUnavailable as exc:
        if mode == "on":
            raise
        if kind not in _failures:
            _failures[kind] = str(exc)
            logger.warning("fused ops: unavailable on %s, running the PyTorch references (%s). Build them with `%s`.",
                           kind, exc, BUILD_COMMAND)
        return False
    logger.info("fused ops: %s build loaded from %s", kind, build_directory(kind))
    return True


def _self_check(kind: str) -> float:
    """Largest difference between the fused ops and their references on a small random input."""
    from phi1.ops import fused, reference

    device = torch.device(kind)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 16, 256, generator=generator).to(device)
    bias = torch.randn(256, generator=generator).to(device)
    qkv = torch.randn(2, 16, 4, 3, 64, generator=generator).to(device)
    cos, sin = reference.rotary_angles(torch.arange(16, device=device).expand(2, 16), 32, 10000.0)
    errors = [(fused.bias_gelu(x, bias) - reference.bias_gelu_reference(x, bias)).abs().max()]
    for a, b in zip(fused.rotary_qkv(qkv, cos, sin), reference.rotary_qkv_reference(qkv, cos, sin)):
        errors.append((a - b).abs().max())
    return max(float(e) for e in errors)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build phi1's fused ops (csrc/fused_ops) and check them.")
    parser.add_argument("--kind", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--verbose", action="store_true", help="print the compiler's commands and output")
    args = parser.parse_args(argv)
    try:
        build(args.kind, verbose=args.verbose)
    except FusedOpsUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    error = _self_check(args.kind)
    print(f"fused ops ({args.kind}) built in {build_directory(args.kind)}; largest difference from the PyTorch "
          f"references on a random fp32 input: {error:.2e}")
    return 0 if error < 1e-4 else 1


