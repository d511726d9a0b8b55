"""The phi-1 model, readable top to bottom.

A decoder-only transformer whose blocks run attention and MLP in parallel from one LayerNorm (GPT-J / CodeGen
style), with rotary embeddings on the first `rotary_dim` dims of each head (NeoX rotate-half), gelu_new,
biases everywhere, and an untied lm_head with bias.

The linear layers are the tensor-parallel ones from `phi1.parallel.layers`; with `tp_group=None` they are plain
`nn.Linear` / `nn.Embedding` with the same state-dict names, so one model serves one CPU and many GPUs.
"""

from __future__ import annotations

import contextlib
import logging
import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup

from phi1.core.activation_checkpointing import activation_checkpointing_mode, checkpointed, run_block
from phi1.core.attention import (
    KERNELS,
    Documents,
    causal_keep_mask,
    default_scale,
    document_attention,
    find_documents,
    flash_attn_available,
    select_backend,
)
from phi1.core.chunked_cross_entropy import chunked_linear_cross_entropy
from phi1.core.config import ModelConfig
from phi1.ops.fused import bias_gelu, rotary_qkv
from phi1.ops.reference import gelu_new, rotary_angles, rotary_qkv_reference
from phi1.parallel.cross_entropy import IGNORE_INDEX, vocab_parallel_cross_entropy
from phi1.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    tensor_parallel_dims,
)
from phi1.parallel.mappings import (
    copy_to_tp,
    gather_from_sequence,
    gather_from_tp,
    group_rank,
    group_size,
    reduce_from_tp,
    reduce_scatter_to_sequence,
)
from phi1.parallel.random import get_rng_tracker

logger = logging.getLogger("phi1.model")


# ----------------------------------------------------------------------------------------------------------------
# KV cache


class KVCache:
    """Keys and values of every layer for B sequences, preallocated to `max_len` positions.

    All sequences of a batch advance together (prompts are left-padded), so one `length` serves all.
    """

    def __init__(self, n_layer: int, batch: int, n_head: int, max_len: int, head_dim: int, device, dtype) -> None:
        shape = (batch, n_head, max_len, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nh, T, hs) after the cached positions; return all keys and values so far."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} were asked for")
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def select(self, batch_index: torch.Tensor) -> None:
        """Keep only some sequences (finished ones dropped from the batch)."""
        self.keys = [k[batch_index] for k in self.keys]
        self.values = [v[batch_index] for v in self.values]


# ----------------------------------------------------------------------------------------------------------------
# The block


class PhiAttention(nn.Module):
    """Multi-head attention; this rank holds n_head / tp heads.

    q, k, v come from one fused projection whose output features are grouped by head, (nh, 3, hs), so that a
    column-parallel split along the output features hands each TP rank whole heads.
    """

    def __init__(self, config: ModelConfig, layer_index: int, group: ProcessGroup | None, fused_tp: bool, sp: bool):
        super().__init__()
        self.layer_index = layer_index
        self.config = config
        self.group = group
        self.n_local_heads = config.n_head // group_size(group)
        self.head_dim = config.head_dim
        self.qkv = ColumnParallelLinear(
            config.d_model, 3 * config.d_model, group=group, enter_tp_region=not fused_tp, sequence_parallel=sp
        )
        self.dense = RowParallelLinear(
            config.d_model, config.d_model, group=group, reduce_output=not fused_tp, sequence_parallel=sp
        )
        self.backend: str | None = None
        self._backend_key: tuple | None = None
        self.fused_ops = False  # set through PhiForCausalLM.fused_ops

    def resolve_backend(self, device: torch.device, dtype: torch.dtype) -> str:
        key = (device.type, dtype)
        if key != self._backend_key:
            self.backend, reason = select_backend(self.config.attention_backend, device, dtype)
            self._backend_key = key
            if self.layer_index == 0:
                logger.info("attention backend: %s (%s; requested %r)", self.backend, reason, self.config.attention_backend)
        return self.backend

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        key_padding: torch.Tensor | None,
        kv_cache: KVCache | None,
        documents: Documents | None = None,
    ) -> torch.Tensor:
        qkv = self.qkv(x)  # (B, T, 3 d / tp); T is the whole sequence even when x is a sequence shard
        B, T, _ = qkv.shape
        qkv = qkv.view(B, T, self.n_local_heads, 3, self.head_dim)
        # each (B, nh, T, hs), q and k rotated; the fused kernel also makes them contiguous for attention
        q, k, v = (rotary_qkv if self.fused_ops else rotary_qkv_reference)(qkv, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_index, k, v)  # (B, nh, Tk, hs)
        backend = self.resolve_backend(x.device, x.dtype)
        dropout_p = self.config.attn_dropout if self.training else 0.0
        # Each TP rank holds other heads: its attention dropout must draw other numbers.
        rng = get_rng_tracker().fork() if dropout_p > 0 else contextlib.nullcontext()
        with rng:
            if documents is not None:  # packed documents attend within themselves only
                y = document_attention(backend, q, k, v, documents, dropout_p, default_scale(self.head_dim))
            else:
                keep = causal_keep_mask(T, k.shape[2], key_padding, x.device)
                y = KERNELS[backend](q, k, v, keep, dropout_p, default_scale(self.head_dim))  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, self.n_local_heads * self.head_dim)
        return self.dense(y)


class PhiMLP(nn.Module):
    def __init__(self, config: ModelConfig, group: ProcessGroup | None, fused_tp: bool, sp: bool):
        super().__init__()
        self.fc1 = ColumnParallelLinear(
            config.d_model, config.d_mlp, group=group, enter_tp_region=not fused_tp, sequence_parallel=sp
        )
        self.fc2 = RowParallelLinear(config.d_mlp, config.d_model, group=group, reduce_output=not fused_tp, sequence_parallel=sp)
        self.fused_ops = False  # set through PhiForCausalLM.fused_ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_ops:
            return self.fc2(self.fc1(x, epilogue=bias_gelu))  # (B, T, d_mlp / tp) never holds x W + b apart
        return self.fc2(gelu_new(self.fc1(x)))


class PhiBlock(nn.Module):
    """One phi block: attention and MLP read the same LayerNorm output and their sum joins the residual.

        h ──┬──────────────────────────────────────────┐
            └─ LayerNorm ──┬── attention ──┐           │
                           └── MLP ────────┴─ + ─ dropout ─ + ── h'

    Under tensor parallelism both branches produce partial sums over this rank's heads / MLP columns. With
    `fused_tp` (the default) the block enters the TP region once and reduces `attention + MLP` with ONE
    all-reduce (or reduce-scatter under sequence parallelism) per layer, instead of one per branch; the two
    biases are added after the reduction. Residual dropout is applied once, to the sum (HuggingFace applies
    it to each branch; the expectation is the same and eval-mode outputs are identical).
    """

    def __init__(self, config: ModelConfig, layer_index: int, group: ProcessGroup | None, fused_tp: bool, sp: bool):
        super().__init__()
        self.group = group
        self.fused_tp = fused_tp
        self.sequence_parallel = sp
        self.ln = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.attn = PhiAttention(config, layer_index, group, fused_tp, sp)
        self.mlp = PhiMLP(config, group, fused_tp, sp)
        self.resid_dropout = config.resid_dropout

    def forward(self, h, cos, sin, key_padding, kv_cache, documents: Documents | None = None):
        x = self.ln(h)
        if self.fused_tp:
            x = gather_from_sequence(x, self.group) if self.sequence_parallel else copy_to_tp(x, self.group)
        out = self.attn(x, cos, sin, key_padding, kv_cache, documents) + self.mlp(x)
        if self.fused_tp:
            out = reduce_scatter_to_sequence(out, self.group) if self.sequence_parallel else reduce_from_tp(out, self.group)
            # Added one after the other, not as (b1 + b2): under torch.compile (2.13) the backward of the pair's
            # sum hands both biases one gradient tensor, and accumulating a second micro-batch into one bias
            # then doubles it in the other.
            out = out + self.attn.dense.bias + self.mlp.fc2.bias
        if self.training and self.resid_dropout > 0:
            # Sequence shards differ per TP rank; replicated activations must get the same mask everywhere.
            rng = get_rng_tracker().fork() if self.sequence_parallel else contextlib.nullcontext()
            with rng:
                out = F.dropout(out, p=self.resid_dropout)
        return h + out


# ----------------------------------------------------------------------------------------------------------------
# The model


@dataclass
class CausalLMOutput:
    logits: torch.Tensor | None
    """(B, T, V) — or (B, T, V / tp) when a loss was computed with tensor parallelism (never gathered)."""
    loss: torch.Tensor | None = None
    """Mean next-token loss over tokens whose label is not IGNORE_INDEX (fp32 scalar)."""


class PhiForCausalLM(nn.Module):
    """phi-1: token embedding, `n_layer` parallel blocks, final LayerNorm, untied lm_head with bias.

    Args:
        config: the model's shape.
        tp_group: tensor-parallel process group; None for one process.
        sequence_parallel: keep LayerNorm / dropout activations split along the sequence across the TP group.
        fused_tp_reduce: one reduction per block for attention + MLP (see PhiBlock); False reduces per branch.
        init_seed: seed of the weight init; the same seed gives the same full weights at any TP size.
    """

    def __init__(
        self,
        config: ModelConfig,
        tp_group: ProcessGroup | None = None,
        sequence_parallel: bool = False,
        fused_tp_reduce: bool = True,
        init_seed: int = 1234,
    ) -> None:
        super().__init__()
        config.validate(tensor_parallel_size=group_size(tp_group))
        if sequence_parallel and group_size(tp_group) == 1:
            sequence_parallel = False  # nothing to split
        self.config = config
        self.tp_group = tp_group
        self.sequence_parallel = sequence_parallel
        self.activation_checkpointing = "none"
        self.activation_checkpointing_every = 1
        """Under 'full': checkpoint blocks 0, k, 2k, ... (k = 1: every block)."""
        self.document_eod_token_id: int | None = None
        """Document masking in training (`data.document_mask`): attention stays inside the documents that this
        end-of-document token ends, rotary positions restart at each, and no loss predicts a document's first
        token from the previous one. Forwards with a KV cache or a padding mask (generation) ignore it."""
        # Tokens per chunk of the fused lm_head + cross-entropy (0: plain path). Not under ZeRO-3, whose
        # parameter gathering hooks the lm_head's own forward, which the chunked path bypasses.
        self.loss_chunk_size = 0
        self._fused_ops = False
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.d_model, group=tp_group, sequence_parallel=sequence_parallel)
        self.layers = nn.ModuleList(
            PhiBlock(config, i, tp_group, fused_tp_reduce, sequence_parallel) for i in range(config.n_layer)
        )
        self.final_layernorm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.lm_head = ColumnParallelLinear(config.d_model, config.vocab_size, group=tp_group, sequence_parallel=sequence_parallel)
        if self.embed_tokens.weight.device.type != "meta":
            self.init_weights(init_seed)

    # -- init -----------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """GPT-style init: normal(0, init_std), output projections scaled by 1/sqrt(2 n_layer), zero biases,
        unit LayerNorms.

        Each parameter draws its FULL tensor from a generator seeded by (seed, name) and keeps this rank's shard,
        so a model at TP = 2 starts from exactly the weights of TP = 1.
        """
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.n_layer)
        tp, rank = group_size(self.tp_group), group_rank(self.tp_group)
        norm_weights = {id(m.weight) for m in self.modules() if isinstance(m, nn.LayerNorm)}
        dims = tensor_parallel_dims(self)
        for name, param in self.named_parameters():
            if name.endswith("bias"):
                param.zero_()
                continue
            if id(param) in norm_weights:
                param.fill_(1.0)
                continue
            dim = dims[name]
            full_shape = list(param.shape)
            if dim is not None:
                full_shape[dim] *= tp
            generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            scale = out_std if name.endswith(("dense.weight", "fc2.weight")) else std
            full = torch.randn(full_shape, generator=generator) * scale
            shard = full if dim is None else full.chunk(tp, dim=dim)[rank]
            param.copy_(shard)

    # -- forward --------------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> CausalLMOutput:
        """Logits, and the loss when `labels` are given.

        Args:
            input_ids: (B, T) token ids.
            labels: (B, T) next-token targets aligned with input_ids (labels[:, t] is the token after
                input_ids[:, t]); IGNORE_INDEX (-100) marks positions without loss.
            attention_mask: (B, Tk) 1 for real tokens, 0 for padding, over cached plus new positions.
            position_ids: (B, T) rotary positions; by default the cache length onwards.
            kv_cache: a KVCache to read and extend (generation).
        """
        h = self.hidden_states(input_ids, attention_mask, position_ids, kv_cache)
        if labels is not None and self._documents_apply(attention_mask, kv_cache):
            # The prediction made at an eod token is the next document's first token: not learnable from here.
            labels = labels.masked_fill(input_ids == self.document_eod_token_id, IGNORE_INDEX)
        if labels is not None and self.loss_chunk_size > 0 and group_size(self.tp_group) == 1:
            # Chunked lm_head + loss: the (B, T, V) logits are never held at once (no logits returned).
            n_tokens = (labels != IGNORE_INDEX).sum().clamp(min=1)
            loss_sum = chunked_linear_cross_entropy(h, self.lm_head.weight, self.lm_head.bias, labels, self.loss_chunk_size)
            return CausalLMOutput(logits=None, loss=loss_sum / n_tokens)
        logits = self.lm_head(h)  # (B, T, V/tp): the lm_head gathers sequence shards, not the vocabulary
        if labels is None:
            return CausalLMOutput(logits=gather_from_tp(logits, self.tp_group))
        losses = vocab_parallel_cross_entropy(logits, labels, self.tp_group)  # (B, T) fp32
        n_tokens = (labels != IGNORE_INDEX).sum().clamp(min=1)
        return CausalLMOutput(logits=logits, loss=losses.sum() / n_tokens)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """The final LayerNorm's output (B, T, d) — (B, T / tp, d) under sequence parallelism.

        What the lm_head reads; the quality filter and decontamination embed code with its mean over tokens.
        """
        B, T = input_ids.shape
        past = kv_cache.length if kv_cache is not None else 0
        if past + T > self.config.max_seq_len:
            raise ValueError(f"sequence of {past + T} tokens exceeds ModelConfig.max_seq_len={self.config.max_seq_len}")
        documents = None
        if self._documents_apply(attention_mask, kv_cache):
            varlen = flash_attn_available() and input_ids.device.type == "cuda"
            documents = find_documents(input_ids, self.document_eod_token_id, varlen=varlen)
            if position_ids is None:
                position_ids = documents.position_ids
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device).unsqueeze(0).expand(B, T)

        h = self.embed_tokens(input_ids)  # (B, T, d), or (B, T/tp, d) under sequence parallelism
        if self.training and self.config.embd_dropout > 0:
            rng = get_rng_tracker().fork() if self.sequence_parallel else contextlib.nullcontext()
            with rng:
                h = F.dropout(h, p=self.config.embd_dropout)
        cos, sin = rotary_angles(position_ids, self.config.rotary_dim, self.config.rotary_base)  # (B, T, rd/2) fp32

        mode = self.activation_checkpointing if self.training and torch.is_grad_enabled() else "none"
        for i, block in enumerate(self.layers):
            if checkpointed(mode, self.activation_checkpointing_every, i):
                # run_block replays the TP-region RNG state so recomputed dropout masks match the forward's.
                h = run_block(block, mode, h, cos, sin, attention_mask, kv_cache, documents)
            else:
                h = block(h, cos, sin, attention_mask, kv_cache, documents)
        if kv_cache is not None:
            kv_cache.length += T
        return self.final_layernorm(h)

    # -- helpers --------------------------------------------------------------------------------------------------

    def _documents_apply(self, attention_mask: torch.Tensor | None, kv_cache: KVCache | None) -> bool:
        return self.document_eod_token_id is not None and attention_mask is None and kv_cache is None

    @property
    def activation_checkpointing(self) -> str:
        """'none', 'full' or 'selective' (see phi1.core.activation_checkpointing); True / False set full / none."""
        return self._activation_checkpointing

    @activation_checkpointing.setter
    def activation_checkpointing(self, value: str | bool) -> None:
        self._activation_checkpointing = activation_checkpointing_mode(value)

    def compile_blocks(self, **options) -> None:
        """torch.compile each block in place (regional compilation): one block's graph is compiled once and
        reused by the others, so compile time does not grow with depth; parameter names are unchanged.
        The fused-ops kernels stand aside while compiled code runs (the compiler fuses their references)."""
        for block in self.layers:
            block.compile(**options)

    @property
    def fused_ops(self) -> bool:
        """Run csrc/fused_ops (bias + gelu, rotary on q/k/v) where `phi1.ops.prepare` loaded them for the
        activations' device; the PyTorch references elsewhere. Off by default: the trainer turns it on after
        `prepare` says the kernels are there."""
        return self._fused_ops

    @fused_ops.setter
    def fused_ops(self, value: bool) -> None:
        self._fused_ops = bool(value)
        for block in self.layers:
            block.attn.fused_ops = block.mlp.fused_ops = self._fused_ops

    def new_kv_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        p = self.lm_head.weight
        return KVCache(
            self.config.n_layer,
            batch,
            self.config.n_head // group_size(self.tp_group),
            max_len or self.config.max_seq_len,
            self.config.head_dim,
            p.device,
            p.dtype,
        )

    def sequence_parallel_param_names(self) -> list[str]:
        """Parameters that see only a sequence shard under sequence parallelism (LayerNorms, and the biases
        added after the reduce-scatter): their gradients are partial sums to all-reduce over the TP group."""
        if not self.sequence_parallel:
            return []
        return [
            name
            for name, _ in self.named_parameters()
            if ".ln." in name or name.startswith("final_layernorm.") or name.endswith(("dense.bias", "fc2.bias"))
        ]

    @property
    def attention_backend(self) -> str | None:
        """The backend the last forward used (None before the first forward)."""
        return self.layers[0].attn.backend if len(self.layers) else None
