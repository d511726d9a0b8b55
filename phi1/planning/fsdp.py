"""FSDP2 in the planner: the memory of one process under `parallel.fsdp=true` (`phi1.parallel.fsdp.shard_model`).

What FSDP2 (torch's `fully_shard`, as phi1 applies it: each block, then the root) keeps on one of D data-parallel
ranks, P parameters of this TP rank, B of them in one block, R in the root (embedding, final LayerNorm, lm_head):

- always: 1/D of the fp32 parameters (4 P / D) and of AdamW's two moments (8 P / D), like ZeRO-3;
- gradients, 1/D (4 P / D): each block's are reduce-scattered in its backward and kept as shards (views of the
  reduce-scatter output) until the optimizer's `zero_grad(set_to_none=True)`; none exist during the forward;
- gathered parameters, in the compute dtype (fp32 as they are, 16-bit under the mixed-precision policy), freed
  after use: the root's for the whole forward and backward (torch never reshards the root after its forward),
  the block being computed, the last block from its forward through its backward (phi1 leaves it gathered), and
  in the backward one block more, the next one, which torch prefetches by default
  (`FSDPParamGroup._backward_prefetch`); each all-gather briefly holds its flat output beside the copied-out
  parameters (one block more);
- a block's full gradient while its backward runs, then its fp32 reduce-scatter input, which torch keeps until
  the next block's reduce-scatter starts (`reduce_scatter_max_input_buffers` = 1);
- with gradient accumulation (`set_requires_gradient_sync(False)` for all micro-batches but the last), every
  block's FULL gradient in fp32 (4 P) from the first micro-batch's backward to the last one's reduce-scatter:
  the price of reducing once per step;
- with `fsdp_cpu_offload`, the sharded parameters, gradients and AdamW states live in CPU memory (torch's
  CPUOffloadPolicy; the optimizer steps there): on a GPU they leave the device's total and are reported as
  `MemoryEstimate.host`; on a CPU rank they are the same memory and stay counted.

The activations and logits of the micro-batch are a single process's (`phi1.planning.memory.block_activations`,
`_logits_bytes`): FSDP shards the model, not the batch. The peak is the largest of the moments of a steady-state
step's last micro-batch (the others hold less: no reduce-scatter buffers, no sharded gradients): the end of the
forward, the start of the backward, the backward of each block, the root's reduce-scatter, the optimizer step.
`benchmarks/bench_fsdp_memory.py` and `tests/test_planner_fsdp.py` check the total against the measured peak of
real FSDP2 steps on CPU.
"""

from __future__ import annotations

from phi1.core.config import ModelConfig
from phi1.planning.memory import (
    Layout,
    MemoryEstimate,
    _compute_bytes,
    _layer_backward_working_set,
    _logits_bytes,
    block_activations,
    parameter_counts,
)


def fsdp_memory(config: ModelConfig, layout: Layout) -> MemoryEstimate:
    """Peak bytes of one FSDP2 process (see the module docstring); what `estimate_memory` returns when
    `layout.fsdp`.

    One data-parallel rank is counted as FSDP2 over a group of one (nothing sharded); the training config refuses
    that layout with its own message, and the estimate stays defined for it.

    Raises:
        ValueError: a ZeRO stage or pipeline with FSDP2 (phi1 refuses both; `estimate_memory` sends those layouts
            to their own models).
    """
    if layout.zero_stage != 0 or layout.pipeline_parallel != 1:
        raise ValueError("FSDP2 runs with zero_stage 0 and pipeline_parallel 1 only, as parallel.fsdp validates")
    counts = parameter_counts(config, layout.tensor_parallel)
    L, dp, h = config.n_layer, max(1, layout.data_parallel), config.d_model
    P, B = counts.per_rank, counts.per_layer
    R = P - L * B  # the root's own parameters: embedding, final LayerNorm, lm_head
    c = _compute_bytes(layout.precision)  # the gathered parameters' dtype (the mixed-precision policy's)
    offloaded = layout.fsdp_cpu_offload and layout.gpu  # on a CPU rank "offloaded" is the same memory

    weights, grads, optim = 4.0 * P / dp, 4.0 * P / dp, 8.0 * P / dp
    # foreach AdamW's sqrt(v) list: on a CPU rank, and in CPU memory when offloaded (the step runs there)
    step_temporaries = 0.0 if layout.gpu and not offloaded else 4.0 * counts.decay / dp
    host = weights + grads + optim + step_temporaries if offloaded else 0.0
    resident = 0.0 if offloaded else weights + optim

    kept, recomputed, final_norm = block_activations(config, layout)
    activations = sum(kept) + final_norm
    logits_forward, logits_backward = _logits_bytes(config, layout)
    working = _layer_backward_working_set(config, layout)
    root, block = c * R, c * B
    accumulating = layout.gradient_accumulation > 1
    # The full fp32 gradients accumulated over the earlier micro-batches (unsharded, on the device).
    accumulated = 4.0 * P if accumulating else 0.0
    # The lm_head's and final LayerNorm's gradients (compute dtype) appear first in the backward. Without
    # accumulation they wait there for the root's reduce-scatter at its end; with it autograd makes each new one
    # before adding it into the accumulated gradient, so it is there at the backward's start all the same.
    head_grads = c * (counts.lm_head + 2 * h)
    # block i's gradient as autograd makes it (with accumulation, before it is added into the accumulated one)
    block_grad = c * B

    moments = {
        # the root and the last block stay gathered from their forward to their backward
        "end of forward": activations + logits_forward + root + block + accumulated,
        "start of backward": activations + logits_backward + root + block + head_grads + accumulated,
    }
    for i in range(L - 1, -1, -1):
        reduced = L - 1 - i  # blocks above i: reduce-scattered, their shards kept, their full gradients freed
        gathered = block * (2 if i > 0 else 1) + block  # block i, block i-1 prefetched, an all-gather's flat output
        reduce_input = 4.0 * B if i < L - 1 else 0.0  # block i+1's, kept until this block's reduce-scatter
        moments[f"backward of block {i}"] = (
            sum(kept[:i]) + kept[i] + recomputed[i] + working + root + head_grads + gathered + block_grad
            + reduce_input + reduced * 4.0 * B / dp + accumulated - reduced * 4.0 * B
        )
    # the root's reduce-scatter: its full gradients (fp32 accumulated, or the compute dtype) and the fp32 input
    root_grads = 4.0 * R if accumulating else c * R
    sharded_blocks = 0.0 if offloaded else L * 4.0 * B / dp
    moments["reduce-scatter of the root"] = sharded_blocks + root_grads + 4.0 * R
    moments["optimizer step"] = 0.0 if offloaded else grads + step_temporaries
    if offloaded:  # the reduced shards go to CPU memory as they are made
        for name in moments:
            if name.startswith("backward of block"):
                i = int(name.rsplit(" ", 1)[1])
                moments[name] -= (L - 1 - i) * 4.0 * B / dp
    peak_moment = max(moments, key=moments.get)
    total = resident + layout.runtime_overhead_bytes + moments[peak_moment]
    buffers = layout.runtime_overhead_bytes + root + 3 * block + block_grad + 4.0 * B + working + accumulated
    return MemoryEstimate(
        weights=0.0 if offloaded else weights, gradients=0.0 if offloaded else grads,
        optimizer=0.0 if offloaded else optim, activations=float(activations), logits=float(logits_backward),
        buffers=float(buffers), total=float(total), peak_moment=peak_moment, host=float(host),
    )


__all__ = ["fsdp_memory"]
