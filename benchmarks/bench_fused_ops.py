#!/usr/bin/env python
"""Each fused op of csrc/fused_ops against its PyTorch reference: milliseconds forward and forward + backward.

    python benchmarks/bench_fused_ops.py --preset phi-1 --micro-batch 8 --seq-len 2048     # on a GPU, bf16
    python benchmarks/bench_fused_ops.py --preset phi-1-tiny --micro-batch 4 --seq-len 512 # on CPU, fp32

Shapes are one layer's of the preset: bias + gelu over (micro-batch x seq, d_mlp), rotary over the fused q/k/v
projection (micro-batch, seq, heads, 3, head dim). Also times `torch.compile` of the reference, the other way
to fuse it, with --compile. The kernels are built first (python -m phi1.ops); each time is the median of
--repeats runs after warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from phi1 import ops  # noqa: E402
from phi1.core.config import PRESETS, get_preset  # noqa: E402
from phi1.training.metrics import device_name  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def median_ms(fn, device: torch.device, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def forward_and_backward(fn, inputs, grads):
    def run():
        out = fn(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(outs, grads)
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="phi-1-tiny", choices=sorted(PRESETS))
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of each reference")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    ops.build(device.type)
    config = get_preset(args.preset)
    B, T = args.micro_batch, args.seq_len
    g = torch.Generator().manual_seed(0)

    x = torch.randn(B, T, config.d_mlp, generator=g).to(device, dtype).requires_grad_()
    bias = torch.randn(config.d_mlp, generator=g).to(device).requires_grad_()
    x_grad = torch.randn(B, T, config.d_mlp, generator=g).to(device, dtype)
    qkv = torch.randn(B, T, config.n_head, 3, config.head_dim, generator=g).to(device, dtype).requires_grad_()
    cos, sin = ops.rotary_angles(torch.arange(T, device=device).expand(B, T), config.rotary_dim, config.rotary_base)
    qkv_grads = tuple(torch.randn(B, config.n_head, T, config.head_dim, generator=g).to(device, dtype) for _ in range(3))

    cases = {
        "bias_gelu": (ops.bias_gelu, ops.bias_gelu_reference, (x, bias), (x_grad,)),
        "rotary_qkv": (ops.rotary_qkv, ops.rotary_qkv_reference, (qkv, cos, sin), qkv_grads),
    }
    rows = []
    for name, (fused, reference, inputs, grads) in cases.items():
        variants = {"fused (csrc)": fused, "PyTorch reference": reference}
        if args.compile:
            variants["torch.compile(reference)"] = torch.compile(reference)
        for variant, fn in variants.items():
            with torch.no_grad():
                forward = median_ms(lambda fn=fn, inputs=inputs: fn(*inputs), device, args.repeats)
            both = median_ms(forward_and_backward(fn, inputs, grads), device, args.repeats)
            rows.append({"op": name, "variant": variant, "forward_ms": forward, "forward_backward_ms": both})

    print(f"device: {device_name(device)}; {args.preset} layer shapes, micro-batch {B} x seq {T}, {dtype}")
    print(f"{'op':<12} {'variant':<26} {'fwd ms':>9} {'fwd+bwd ms':>11} {'vs reference':>13}")
    for row in rows:
        base = next(r for r in rows if r["op"] == row["op"] and r["variant"] == "PyTorch reference")
        speedup = base["forward_backward_ms"] / row["forward_backward_ms"]
        print(f"{row['op']:<12} {row['variant']:<26} {row['forward_ms']:>9.3f} {row['forward_backward_ms']:>11.3f} {speedup:>12.2f}x")
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps({"device": device_name(device), "dtype": str(dtype), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
