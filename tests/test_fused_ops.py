"""csrc/fused_ops against the PyTorch references of phi1/ops/reference.py.

CPU: the C++ kernels (built once per torch version into the extensions cache, ~30 s) forward and backward, the
model with them against the model without, and the fallback and its messages when a build is impossible.
GPU: the CUDA kernels in fp32, bf16 and fp16, run where a GPU is present and skipped, saying why, where not.
Without a GPU the CUDA source is still compiled (not run) with nvcc when one is installed.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from phi1 import ops
from phi1.core.config import get_preset
from phi1.core.generation import SamplingParams, generate
from phi1.core.model import PhiForCausalLM
from phi1.ops import loader as build_module
from phi1.ops.reference import bias_gelu_reference, rotary_angles, rotary_qkv_reference

# Tolerances per dtype: the kernels compute in fp32 and round once; the references round after each op.
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU: the CUDA kernels of csrc/fused_ops run only there"
)


@pytest.fixture(scope="module")
def cpu_kernels():
    return ops.build("cpu")


def _graph_names(t: torch.Tensor) -> set[str]:
    """Names of every autograd node behind t."""
    seen, stack, names = set(), [t.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return names


def _check_bias_gelu(device: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(1)
    x = (2 * torch.randn(shape, generator=g)).to(device, dtype).requires_grad_()
    bias = torch.randn(shape[-1], generator=g).to(device).requires_grad_()  # fp32, as the parameter is
    grad = torch.randn(shape, generator=g).to(device, dtype)

    y = ops.bias_gelu(x, bias)
    assert "_BiasGeluBackward" in _graph_names(y), "the kernel did not run"
    gx, gb = torch.autograd.grad(y, (x, bias), grad)
    # Reference in fp32 from the same inputs: the truth both are rounded from.
    x32, b32 = x.detach().float().requires_grad_(), bias.detach().requires_grad_()
    y32 = bias_gelu_reference(x32, b32)
    gx32, gb32 = torch.autograd.grad(y32, (x32, b32), grad.float())
    tol = TOLERANCE[dtype]
    assert y.dtype == dtype and gx.dtype == dtype and gb.dtype == torch.float32
    torch.testing.assert_close(y.float(), y32, rtol=tol, atol=tol)
    torch.testing.assert_close(gx.float(), gx32, rtol=tol, atol=tol)
    # The bias gradient sums every row: compare relative to its size.
    torch.testing.assert_close(gb, gb32, rtol=tol, atol=tol * gb32.abs().max().item())


def _check_rotary(device: str, dtype: torch.dtype, B: int, T: int, nh: int, hs: int, rotary_dim: int) -> None:
    g = torch.Generator().manual_seed(2)
    qkv = torch.randn(B, T, nh, 3, hs, generator=g).to(device, dtype).requires_grad_()
    # Per-sequence positions, as left-padded generation has them.
    positions = torch.arange(T).unsqueeze(0) + torch.arange(B).unsqueeze(1) * 7
    cos, sin = rotary_angles(positions.to(device), rotary_dim, 10000.0)
    grads = [torch.randn(B, nh, T, hs, generator=g).to(device, dtype) for _ in range(3)]

    out = ops.rotary_qkv(qkv, cos, sin)
    assert "_RotaryQKVBackward" in _graph_names(out[0]), "the kernel did not run"
    assert all(t.is_contiguous() and t.shape == (B, nh, T, hs) and t.dtype == dtype for t in out)
    (grad_qkv,) = torch.autograd.grad(out, qkv, grads)

    q32 = qkv.detach().float().requires_grad_()
    ref = rotary_qkv_reference(q32, cos, sin)
    (grad_ref,) = torch.autograd.grad(ref, q32, [gr.float() for gr in grads])
    tol = TOLERANCE[dtype]
    for name, a, b in zip("qkv", out, ref):
        torch.testing.assert_close(a.float(), b, rtol=tol, atol=tol, msg=lambda m, n=name: f"{n}: {m}")
    torch.testing.assert_close(grad_qkv.float(), grad_ref, rtol=tol, atol=tol)
    # v and the dims past rotary_dim are copied exactly.
    assert torch.equal(out[2], qkv.detach()[:, :, :, 2].transpose(1, 2))
    assert torch.equal(out[0][..., rotary_dim:], qkv.detach()[:, :, :, 0, rotary_dim:].transpose(1, 2))


# -- CPU kernels ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# 37: a row length no vector width divides; 4 x 75 rows: several blocks of bias-gradient partial sums, the last
# one short.
@pytest.mark.parametrize("shape", [(3, 17, 64), (5, 37), (4, 75, 48)])
def test_bias_gelu_cpu_matches_reference(cpu_kernels, dtype, shape):
    _check_bias_gelu("cpu", dtype, shape)


def test_bias_gradient_has_the_same_bits_every_run(cpu_kernels):
    x = torch.randn(8, 100, 96)
    grad = torch.randn(8, 100, 96)
    bias = torch.randn(96)
    first = cpu_kernels.bias_gelu_backward(grad, x, bias)
    for _ in range(3):
        again = cpu_kernels.bias_gelu_backward(grad, x, bias)
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hs,rotary_dim", [(16, 8), (16, 16), (64, 32)])
def test_rotary_qkv_cpu_matches_reference(cpu_kernels, dtype, hs, rotary_dim):
    _check_rotary("cpu", dtype, B=2, T=9, nh=3, hs=hs, rotary_dim=rotary_dim)


def test_bias_gelu_propagates_non_finite_values(cpu_kernels):
    x = torch.tensor([float("nan"), float("inf"), 3.0, -3.0])
    y = ops.bias_gelu(x, torch.zeros(4))
    torch.testing.assert_close(y, bias_gelu_reference(x, torch.zeros(4)), equal_nan=True)
    assert torch.isnan(y[0]) and torch.isinf(y[1])


def test_kernels_reject_mismatched_shapes(cpu_kernels):
    with pytest.raises(RuntimeError, match="bias_gelu: bias of 5 features for x whose last dim is 4"):
        cpu_kernels.bias_gelu_forward(torch.zeros(2, 4), torch.zeros(5))
    cos = torch.zeros(1, 3, 4)
    with pytest.raises(RuntimeError, match="rotary_dim 8 does not fit head dim 6"):
        cpu_kernels.rotary_qkv_forward(torch.zeros(1, 3, 2, 3, 6), cos, cos, 8)


def _tiny_model(fused: bool) -> PhiForCausalLM:
    model = PhiForCausalLM(get_preset("phi-1-nano"), init_seed=3)
    model.fused_ops = fused
    return model


def test_model_with_fused_ops_matches_model_without(cpu_kernels):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 512, (2, 24), generator=g)
    results = {}
    for fused, checkpointing in ((False, False), (True, False), (True, True)):
        model = _tiny_model(fused).train()
        model.activation_checkpointing = checkpointing  # the kernels' backward also runs after recomputation
        out = model(tokens[:, :-1], labels=tokens[:, 1:])
        out.loss.backward()
        if not checkpointing:
            names = _graph_names(out.loss)
            assert ("_BiasGeluBackward" in names) == fused and ("_RotaryQKVBackward" in names) == fused
        results[fused, checkpointing] = (out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    loss_ref, grads_ref = results[False, False]
    for key in ((True, False), (True, True)):
        loss, grads = results[key]
        torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
        for name in grads_ref:
            torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-5,
                                       msg=lambda m, n=name, k=key: f"{k} {n}: {m}")


def test_generation_with_fused_ops_matches_without(cpu_kernels):
    prompts = [[5, 6, 7, 8, 9], [3], [100, 200]]  # left padding: per-sequence rotary positions
    params = SamplingParams(max_new_tokens=12)
    reference = generate(_tiny_model(False).eval(), prompts, params)
    fused = generate(_tiny_model(True).eval(), prompts, params)
    assert fused == reference


# -- loading, fallback and messages --------------------------------------------------------------------------------


def test_prepare_auto_keeps_references_on_cpu_and_on_builds_them(cpu_kernels, caplog):
    with caplog.at_level(logging.INFO, logger="phi1.ops"):
        assert ops.prepare("cpu", "auto") is False
        assert ops.prepare("cpu", "on") is True
    assert "fused ops: off on cpu" in caplog.text and "cpu build loaded" in caplog.text
    assert ops.loaded("cpu") is cpu_kernels
    with pytest.raises(ValueError, match="fused_ops must be one of"):
        ops.prepare("cpu", "yes")


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the message of a CPU-only torch")
def test_cuda_build_on_cpu_torch_falls_back_with_the_build_command(caplog):
    with caplog.at_level(logging.WARNING, logger="phi1.ops"):
        assert ops.prepare("cuda", "auto") is False
    assert "this torch" in caplog.text and "CPU build" in caplog.text and ops.BUILD_COMMAND in caplog.text
    with pytest.raises(ops.FusedOpsUnavailable, match="CPU build"):
        ops.prepare("cuda", "on")


def test_missing_sources_name_the_path(monkeypatch, tmp_path):
    monkeypatch.setattr(build_module, "SOURCE_DIR", tmp_path / "nowhere")
    monkeypatch.setattr(build_module, "_modules", {})
    with pytest.raises(ops.FusedOpsUnavailable, match="nowhere/fused_ops.cpp"):
        ops.build("cpu")
    # Nothing loaded: the entry points run the references.
    x = torch.randn(2, 8)
    assert torch.equal(ops.bias_gelu(x, torch.ones(8)), bias_gelu_reference(x, torch.ones(8)))


def test_command_line_build_checks_the_kernels():
    result = subprocess.run([sys.executable, "-m", "phi1.ops", "--kind", "cpu"], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    assert "largest difference from the PyTorch references" in result.stdout


@pytest.mark.slow
def test_training_with_fused_ops_follows_the_reference_run(cpu_kernels, tmp_path):
    """`fused_ops=on` through phi1.train on 2 processes at tensor parallel 2 with sequence parallelism (each
    rank's kernels see half the heads and half of d_mlp): the kernels load at start-up and the loss curve is
    the one without them."""
    from phi1.testing.runs import assert_succeeded, run_overrides, run_train, step_losses, train_env
    from phi1.testing.synthetic import write_synthetic_dataset

    write_synthetic_dataset(tmp_path / "data")
    runs = {}
    for mode in ("off", "on"):
        args = run_overrides(tmp_path / "data", tmp_path / mode, **{
            "model.attn_dropout": 0.1, "model.resid_dropout": 0.1, "precision": "auto",
            "batch.global_batch_size": 8, "schedule.train_steps": 4, "checkpoint.interval": 100,
            "eval.interval": 3, "eval.iters": 2, "fused_ops": mode, "parallel.tensor_parallel": 2,
            "parallel.sequence_parallel": True})
        result = run_train(args, 2, env=train_env(DS_ACCELERATOR="cpu"), timeout=150)
        assert_succeeded(result)
        runs[mode] = (result.stdout + result.stderr, step_losses(tmp_path / mode))
    assert "fused ops: cpu build loaded" in runs["on"][0] and "fused ops: off on cpu" in runs["off"][0]
    reference, fused = runs["off"][1], runs["on"][1]
    assert sorted(fused) == sorted(reference) == [1, 2, 3, 4]
    for step in reference:
        assert abs(fused[step] - reference[step]) <= 1e-4 * abs(reference[step]), f"step {step}"


def test_training_config_names_a_bad_fused_ops_mode():
    from phi1.training.config import ConfigError, TrainConfig, validate_config

    config = TrainConfig()
    config.fused_ops = "yes"
    with pytest.raises(ConfigError, match="fused_ops: must be one of"):
        validate_config(config, world_size=1, check_files=False)


# -- CUDA ---------------------------------------------------------------------------------------------------------


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME")
    candidates = [Path(home) / "bin" / "nvcc"] if home else []
    found = shutil.which("nvcc")
    candidates += [Path(found)] if found else []
    return next((str(c) for c in candidates if c.is_file()), None)


@pytest.mark.slow
@pytest.mark.skipif(_nvcc() is None, reason="needs nvcc to compile the CUDA source")
def test_cuda_source_compiles(tmp_path):
    """Where a GPU is absent the CUDA kernels cannot run, but a typo in them still fails here, not on a GPU."""
    include = Path(torch.__file__).parent / "include"
    extra = []
    if not (include / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").is_file():
        # A CPU build of torch ships c10/cuda headers without this generated one.
        stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
        stub.mkdir(parents=True)
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        extra = ["-I", str(tmp_path / "stub")]
    source = build_module.SOURCE_DIR / "fused_ops_cuda.cu"
    command = [_nvcc(), "-c", str(source), "-o", str(tmp_path / "fused_ops_cuda.o"), *extra, "-I", str(include),
               "-I", str(include / "torch" / "csrc" / "api" / "include"), "-std=c++17", "--expt-relaxed-constexpr",
               "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
               "-gencode", "arch=compute_80,code=sm_80", "-Xcompiler", "-fPIC", "-w"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def cuda_kernels():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: the CUDA kernels of csrc/fused_ops run only there")
    return ops.build("cuda")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(4, 128, 8192), (3, 17, 37)])  # phi-1's d_mlp, and one with no packs
def test_bias_gelu_cuda_matches_reference(cuda_kernels, dtype, shape):
    _check_bias_gelu("cuda", dtype, shape)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hs,rotary_dim", [(64, 32), (16, 16)])
def test_rotary_qkv_cuda_matches_reference(cuda_kernels, dtype, hs, rotary_dim):
    _check_rotary("cuda", dtype, B=2, T=33, nh=4, hs=hs, rotary_dim=rotary_dim)


@pytest.mark.gpu
@needs_cuda
def test_model_with_cuda_fused_ops_matches_without_in_bf16(cuda_kernels):
    tokens = torch.randint(0, 512, (2, 65), generator=torch.Generator().manual_seed(0)).cuda()
    losses = {}
    for fused in (False, True):
        model = _tiny_model(fused).cuda().train()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            losses[fused] = model(tokens[:, :-1], labels=tokens[:, 1:]).loss.item()
    assert abs(losses[True] - losses[False]) < 2e-2 * abs(losses[False])
