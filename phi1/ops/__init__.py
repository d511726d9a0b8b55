"""Fused ops of the phi-1 block (csrc/fused_ops) with their PyTorch references and a loader.

    from phi1.ops import prepare, bias_gelu, rotary_qkv
    prepare(device, "auto")        # at start-up: builds / loads the kernels, or logs why not
    y = bias_gelu(x, bias)         # the kernel when loaded for x's device, the reference otherwise
"""

from phi1.ops.fused import bias_gelu, rotary_qkv
from phi1.ops.loader import BUILD_COMMAND, MODES, FusedOpsUnavailable, build, loaded, prepare
from phi1.ops.reference import (
    apply_rotary,
    bias_gelu_reference,
    gelu_new,
    rotary_angles,
    rotary_qkv_reference,
)

__all__ = [
    "BUILD_COMMAND",
    "MODES",
    "FusedOpsUnavailable",
    "apply_rotary",
    "bias_gelu",
    "bias_gelu_reference",
    "build",
    "gelu_new",
    "loaded",
    "prepare",
    "rotary_angles",
    "rotary_qkv",
    "rotary_qkv_reference",
]
