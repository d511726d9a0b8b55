"""phi-1 cut into pipeline stages: plain PyTorch modules, no process groups of their own but the TP one.

A stage (or, under the interleaved schedule, one of a rank's virtual chunks) is a contiguous run of phi blocks;
the first also holds the token embedding, the last the final LayerNorm and the lm_head, and the loss is computed
on the last stage's output:

    stage 0:      input_ids (B, T) ── embed_tokens ── blocks 0 .. a-1 ──▶ h (B, T, d)
    stage s:      h ── blocks a .. b-1 ──▶ h
    stage S - 1:  h ── blocks .. n_layer-1 ── final_layernorm ── lm_head ──▶ logits (B, T, V / tp) ── loss

Under sequence parallelism the activations between stages are the sequence shards (B, T / tp, d) every TP rank
already holds, so each TP rank talks only to its own counterpart in the next stage.

Parameter names are the full model's (`layers.7.attn.qkv.weight`, not `layers.0...`): a stage loads its part of
a full state dict, and its gradients and checkpoints name the same tensors as one process does. Weights are
initialised per name exactly as `PhiForCausalLM.init_weights` does, so every stage starts from the weights of
the one-process model without that model ever being built.

The schedules that run these stages over a pipeline-parallel group are in `phi1.parallel.pipeline`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup

from phi1.core.activation_checkpointing import checkpointed, run_block
from phi1.core.chunked_cross_entropy import chunked_linear_cross_entropy
from phi1.core.config import ModelConfig
from phi1.core.model import PhiBlock, PhiForCausalLM
from phi1.core.pretrained import load_state_dict_into
from phi1.ops.reference import rotary_angles
from phi1.parallel.cross_entropy import IGNORE_INDEX, vocab_parallel_cross_entropy
from phi1.parallel.layers import ColumnParallelLinear, VocabParallelEmbedding
from phi1.parallel.mappings import group_size
from phi1.parallel.pipeline import stages_of_rank
from phi1.parallel.random import get_rng_tracker


def balanced_split(n_layer: int, num_stages: int) -> list[int]:
    """Layers per stage, as even as possible.

    Every stage gets n_layer // num_stages blocks; the remaining n_layer % num_stages go one each to stages
    1, 2, ... (the first stage already holds the embedding and, under 1F1B, the most activations).

    Raises:
        ValueError: num_stages < 1 or fewer layers than stages.
    """
    if num_stages < 1:
        raise ValueError(f"number of pipeline stages must be >= 1, got {num_stages}")
    if n_layer < num_stages:
        raise ValueError(
            f"n_layer={n_layer} cannot fill {num_stages} pipeline stages (every stage needs at least one block); "
            "lower parallel.pipeline_parallel or parallel.virtual_stages"
        )
    base, extra = divmod(n_layer, num_stages)
    return [base + (1 if (stage - 1) % num_stages < extra else 0) for stage in range(num_stages)]


def layer_ranges(n_layer: int, num_stages: int, split: Sequence[int] | None = None) -> list[range]:
    """The global block indices of every stage: `split` (blocks per stage) when given, else `balanced_split`.

    Raises:
        ValueError: a split with the wrong number of entries, an entry < 1, or a sum other than n_layer.
    """
    if split is None:
        counts = balanced_split(n_layer, num_stages)
    else:
        counts = list(split)
        if len(counts) != num_stages:
            raise ValueError(f"pipeline split {counts} has {len(counts)} entries; the pipeline has {num_stages} stages")
        if any(not isinstance(c, int) or c < 1 for c in counts):
            raise ValueError(f"pipeline split {counts}: every stage needs a whole number >= 1 of blocks")
        if sum(counts) != n_layer:
            raise ValueError(f"pipeline split {counts} sums to {sum(counts)} blocks; the model has n_layer={n_layer}")
    ranges, start = [], 0
    for count in counts:
        ranges.append(range(start, start + count))
        start += count
    return ranges


class PhiPipelineStage(nn.Module):
    """One pipeline stage of phi-1 (see the module docstring for what each stage holds).

    Args:
        config: the whole model's shape.
        stage_index: 0 .. num_stages - 1 (with V virtual stages per rank, num_stages = P x V).
        num_stages: stages of the whole pipeline.
        layers: global indices of the blocks this stage runs (contiguous).
        tp_group: tensor-parallel group of this stage's ranks; None for no TP.
        sequence_parallel: activations outside the TP region split along the sequence (needs TP > 1).
        fused_tp_reduce: one reduction per block for attention + MLP (see `PhiBlock`).
        init_seed: the seed `PhiForCausalLM` would be built with; the same seed gives the same weights.

    forward(x): x is input_ids (B, T) on the first stage and hidden states (B, T, d), (B, T / tp, d) under
    sequence parallelism, elsewhere. It returns hidden states, except on the last stage: logits (B, T, V / tp),
    or with `loss_chunk_size > 0` (and no TP) the final LayerNorm's output, which `loss` turns into the loss
    through the chunked lm_head. Positions are 0 .. T-1 (packed training samples, no padding mask; document
    masking is not done here: the stages after the first never see the token ids it is computed from).
    """

    def __init__(
        self,
        config: ModelConfig,
        stage_index: int,
        num_stages: int,
        layers: Sequence[int],
        tp_group: ProcessGroup | None = None,
        sequence_parallel: bool = False,
        fused_tp_reduce: bool = True,
        init_seed: int = 1234,
    ) -> None:
        super().__init__()
        tp = group_size(tp_group)
        config.validate(tensor_parallel_size=tp)
        if not 0 <= stage_index < num_stages:
            raise ValueError(f"stage_index {stage_index} is not a stage of a {num_stages}-stage pipeline")
        layers = list(layers)
        if not layers or layers != list(range(layers[0], layers[0] + len(layers))) or layers[-1] >= config.n_layer:
            raise ValueError(f"stage {stage_index}: blocks {layers} are not a contiguous run of 0 .. {config.n_layer - 1}")
        self.config = config
        self.stage_index = stage_index
        self.num_stages = num_stages
        self.is_first = stage_index == 0
        self.is_last = stage_index == num_stages - 1
        self.tp_group = tp_group
        self.sequence_parallel = sequence_parallel and tp > 1
        self.activation_checkpointing = "none"
        self.activation_checkpointing_every = 1
        """Under 'full': checkpoint the blocks whose global index is 0, k, 2k, ... (as the whole model does)."""
        self.loss_chunk_size = 0
        """Tokens per chunk of the fused lm_head + loss on the last stage (0: plain logits; TP = 1 only)."""
        self._fused_ops = False
        sp = self.sequence_parallel
        if self.is_first:
            self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.d_model, group=tp_group, sequence_parallel=sp)
        # A ModuleDict keyed by the global index keeps the full model's names: layers.<i>.<...>.
        self.layers = nn.ModuleDict({str(i): PhiBlock(config, i, tp_group, fused_tp_reduce, sp) for i in layers})
        if self.is_last:
            self.final_layernorm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
            self.lm_head = ColumnParallelLinear(config.d_model, config.vocab_size, group=tp_group, sequence_parallel=sp)
        if next(self.parameters()).device.type != "meta":
            self.init_weights(init_seed)

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """The weights `PhiForCausalLM(config, init_seed=seed)` gives these names, at this TP rank.

        That init draws each parameter from a generator seeded by (seed, full name) and reads only
        `self.config`, `self.tp_group` and the module tree, so it is called on this stage as it is, rather than
        copied here to drift apart from it.
        """
        PhiForCausalLM.init_weights(self, seed)

    # The model's own property ('none', 'full' or 'selective'; True / False set full / none): it reads and writes
    # only `_activation_checkpointing`, which the stage's forward reads as the model's does.
    activation_checkpointing = PhiForCausalLM.activation_checkpointing

    @property
    def fused_ops(self) -> bool:
        """Run csrc/fused_ops in this stage's blocks (as `PhiForCausalLM.fused_ops`; the trainer sets it)."""
        return self._fused_ops

    @fused_ops.setter
    def fused_ops(self, value: bool) -> None:
        self._fused_ops = bool(value)
        for block in self.layers.values():
            block.attn.fused_ops = block.mlp.fused_ops = self._fused_ops

    def compile_blocks(self, **options) -> None:
        """torch.compile each of this stage's blocks in place, as `PhiForCausalLM.compile_blocks` does."""
        for block in self.layers.values():
            block.compile(**options)

    @property
    def layer_indices(self) -> list[int]:
        """Global indices of this stage's blocks."""
        return [int(i) for i in self.layers]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_first:
            h = self.embed_tokens(x)  # (B, T, d), or (B, T/tp, d) under sequence parallelism
            if self.training and self.config.embd_dropout > 0:
                rng = get_rng_tracker().fork() if self.sequence_parallel else contextlib.nullcontext()
                with rng:
                    h = F.dropout(h, p=self.config.embd_dropout)
        else:
            h = x
        B = h.shape[0]
        T = h.shape[1] * (group_size(self.tp_group) if self.sequence_parallel else 1)  # whole sequence length
        position_ids = torch.arange(T, device=h.device).unsqueeze(0).expand(B, T)
        cos, sin = rotary_angles(position_ids, self.config.rotary_dim, self.config.rotary_base)  # (B, T, rd/2)
        mode = self.activation_checkpointing if self.training and torch.is_grad_enabled() else "none"
        for index, block in self.layers.items():
            if checkpointed(mode, self.activation_checkpointing_every, int(index)):
                # run_block replays the TP-region RNG state so recomputed dropout masks match the forward's.
                h = run_block(block, mode, h, cos, sin, None, None)
            else:
                h = block(h, cos, sin, None, None)
        if not self.is_last:
            return h
        h = self.final_layernorm(h)
        if self._chunked_loss:
            return h  # the chunked loss applies the lm_head itself
        return self.lm_head(h)  # (B, T, V/tp): the lm_head gathers sequence shards, not the vocabulary

    @property
    def _chunked_loss(self) -> bool:
        return self.loss_chunk_size > 0 and group_size(self.tp_group) == 1

    def loss(self, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean next-token loss of one micro-batch from the last stage's output, as `PhiForCausalLM` computes it.

        Args:
            output: this stage's forward output (logits, or hidden states under the chunked loss).
            labels: (B, T) targets, IGNORE_INDEX where no loss is taken.
        Raises:
            RuntimeError: called on a stage that is not the last.
        """
        if not self.is_last:
            raise RuntimeError(f"stage {self.stage_index} of {self.num_stages} has no lm_head; the loss is on the last stage")
        n_tokens = (labels != IGNORE_INDEX).sum().clamp(min=1)
        if self._chunked_loss:
            loss_sum = chunked_linear_cross_entropy(output, self.lm_head.weight, self.lm_head.bias, labels, self.loss_chunk_size)
            return loss_sum / n_tokens
        return vocab_parallel_cross_entropy(output, labels, self.tp_group).sum() / n_tokens

    def example_io(self, micro_batch_size: int, seq_len: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(input, output) of one micro-batch as meta tensors: the shapes the pipeline schedule sends and receives.

        dtype is the activations' dtype (the autocast dtype when running under autocast is the caller's concern).
        """
        tp = group_size(self.tp_group)
        local_seq = seq_len // tp if self.sequence_parallel else seq_len
        # Activations carry gradients between stages; schedules read requires_grad to know what to send back.
        hidden = torch.empty(micro_batch_size, local_seq, self.config.d_model, dtype=dtype, device="meta", requires_grad=True)
        if self.is_first:
            inputs = torch.empty(micro_batch_size, seq_len, dtype=torch.long, device="meta")
        else:
            inputs = hidden
        if not self.is_last:
            outputs = hidden
        elif self._chunked_loss:
            outputs = hidden
        else:
            outputs = torch.empty(
                micro_batch_size, seq_len, self.config.vocab_size // tp, dtype=dtype, device="meta", requires_grad=True
            )
        return inputs, outputs

    def sequence_parallel_param_names(self) -> list[str]:
        """Parameters whose gradient is a partial sum over sequence shards (see `PhiForCausalLM`)."""
        if not self.sequence_parallel:
            return []
        return [
            name
            for name, _ in self.named_parameters()
            if ".ln." in name or name.startswith("final_layernorm.") or name.endswith(("dense.bias", "fc2.bias"))
        ]


def build_stages(
    config: ModelConfig,
    pp_rank: int,
    pp_size: int,
    virtual_stages: int = 1,
    split: Sequence[int] | None = None,
    tp_group: ProcessGroup | None = None,
    sequence_parallel: bool = False,
    fused_tp_reduce: bool = True,
    init_seed: int = 1234,
    state_dict: dict[str, torch.Tensor] | None = None,
    device: torch.device | str | None = None,
) -> list[PhiPipelineStage]:
    """The stages pipeline rank `pp_rank` holds: one, or `virtual_stages` chunks (Megatron's interleaved
    assignment: rank r holds stages r, r + P, r + 2P, ...).

    Args:
        split: blocks per stage over all P x V stages (default: `balanced_split`).
        state_dict: whole tensors under the full model's names (a one-process model's `state_dict()`); each
            stage takes its own names and its TP shard of them. Without it, weights come from `init_seed`.
        device: where the stages' parameters live.
    Raises:
        ValueError: a split that does not fit, or a state dict missing one of the stages' tensors.
    """
    num_stages = pp_size * virtual_stages
    ranges = layer_ranges(config.n_layer, num_stages, split)
    stages = []
    for stage_index in stages_of_rank(pp_rank, pp_size, virtual_stages):
        stage = PhiPipelineStage(
            config, stage_index, num_stages, ranges[stage_index], tp_group=tp_group,
            sequence_parallel=sequence_parallel, fused_tp_reduce=fused_tp_reduce, init_seed=init_seed,
        )
        if state_dict is not None:
            names = {name for name, _ in stage.named_parameters()}
            load_state_dict_into(stage, {k: v for k, v in state_dict.items() if k in names}, source="full model state dict")
        stages.append(stage.to(device) if device is not None else stage)
    return stages


def stage_loss_fn(stages: Sequence[PhiPipelineStage]) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss function a pipeline schedule calls on the last stage's output: that stage's `loss`.

    On ranks without the last stage it is never called, but schedules need one to know they run a backward.
    """
    last = [stage for stage in stages if stage.is_last]

    def loss_fn(output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if not last:
            raise RuntimeError("the pipeline loss was asked for on a rank that does not hold the last stage")
        return last[0].loss(output, labels)

    return loss_fn


class StageParameters(nn.Module):
    """A rank's stage chunks seen as one module whose parameters carry the full model's names.

    `nn.ModuleList(stages)` would prefix every name with the chunk's index (`0.layers.3...`) and, with virtual
    stages, hold two `layers`; this view holds the chunks' own submodules (the embedding, one `layers` dict of
    every block it holds, the final LayerNorm and the lm_head), so code that walks `named_parameters()` (the
    non-finite guard, the finite-weights check, the optimizer's parameter groups, a phi1 checkpoint writer) sees
    `layers.7.attn.qkv.weight` exactly as one process names it. It shares the chunks' parameters (no copy) and is
    not itself run.
    """

    def __init__(self, stages: Sequence[PhiPipelineStage]) -> None:
        super().__init__()
        by_index = sorted(stages, key=lambda stage: stage.stage_index)
        for stage in by_index:
            if stage.is_first:
                self.embed_tokens = stage.embed_tokens
        self.layers = nn.ModuleDict({index: block for stage in by_index for index, block in stage.layers.items()})
        for stage in by_index:
            if stage.is_last:
                self.final_layernorm = stage.final_layernorm
                self.lm_head = stage.lm_head
        self.stages = list(by_index)  # a plain list: not registered, so the parameters are named once

    def forward(self, *args, **kwargs):
        raise RuntimeError("StageParameters is a view of a rank's stage parameters; run the stages through a "
                           "pipeline schedule (phi1.parallel.pipeline.PipelineRunner)")
