"""Tensor-parallel layers: column- and row-parallel Linear, vocab-parallel Embedding.

With `group=None` (or a group of one rank) each layer holds the whole weight and computes exactly what
`nn.Linear` / `nn.Embedding` compute, with the same state-dict names, so the model is written once.

Each layer class declares in `partition_dims` the dim along which each of its parameters is split (None when
replicated); `tensor_parallel_dims(model)` reads them for initialisation, gradient-norm accounting and
checkpoint resharding. (A class attribute, not a tag on the Parameter: tags do not survive `to_empty`, `.to()`
or DeepSpeed's parameter replacement.)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup

from phi1.parallel.mappings import (
    copy_to_tp,
    gather_from_sequence,
    gather_from_tp,
    group_rank,
    group_size,
    reduce_from_tp,
    reduce_scatter_to_sequence,
)


def _divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator != 0:
        raise ValueError(f"{what}={numerator} is not divisible by the tensor parallel size {denominator}")
    return numerator // denominator


def tensor_parallel_dims(model: nn.Module) -> dict[str, int | None]:
    """{parameter name: dim it is split along over the TP group, or None when every TP rank holds all of it}."""
    dims: dict[str, int | None] = {}
    for module_name, module in model.named_modules():
        declared = getattr(type(module), "partition_dims", {})
        for param_name, _ in module.named_parameters(recurse=False):
            full_name = f"{module_name}.{param_name}" if module_name else param_name
            dims[full_name] = declared.get(param_name)
    return dims


class _ParallelLinear(nn.Module):
    """What the column- and row-parallel Linear share: the TP group, the sizes, the sequence-parallel flag, and a
    weight (out_features, in_features) split over the group along the dim the subclass's `partition_dims`
    declares for it, with a bias of the weight's (local) output size when `bias`.

    Raises:
        ValueError: the split dim's size is not divisible by the TP group's size.
    """

    partition_dims: dict[str, int | None]  # set by each subclass; "weight" is 0 (output features) or 1 (input)

    def __init__(
        self, in_features: int, out_features: int, bias: bool, group: ProcessGroup | None, sequence_parallel: bool
    ) -> None:
        super().__init__()
        self.group = group
        self.in_features = in_features
        self.out_features = out_features
        self.sequence_parallel = sequence_parallel
        shape = [out_features, in_features]
        split = self.partition_dims["weight"]
        shape[split] = _divide(shape[split], group_size(group), ("out_features", "in_features")[split])
        self.weight = nn.Parameter(torch.empty(*shape))
        self.bias = nn.Parameter(torch.empty(shape[0])) if bias else None

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, tp={group_size(self.group)}"


class ColumnParallelLinear(_ParallelLinear):
    """Y = X A^T + b with A split by rows (output features) over the TP group.

    Input: (..., in_features), the whole input on every rank (or, under sequence parallelism, a sequence shard
    that is all-gathered first). Output: (..., out_features / tp), or the whole (..., out_features) when
    `gather_output`. Set `enter_tp_region=False` when the caller already applied the entering mapping (phi's
    parallel block enters once for both attention and MLP).
    """

    partition_dims = {"weight": 0, "bias": 0}

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        group: ProcessGroup | None = None,
        gather_output: bool = False,
        enter_tp_region: bool = True,
        sequence_parallel: bool = False,
    ) -> None:
        super().__init__(in_features, out_features, bias, group, sequence_parallel)
        self.gather_output = gather_output
        self.enter_tp_region = enter_tp_region

    def forward(
        self, x: torch.Tensor, epilogue: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None
    ) -> torch.Tensor:
        """`epilogue(y, bias)`, when given, adds the bias (None without one) instead of the GEMM: a fused bias +
        activation, the MLP's bias + gelu. It runs inside this forward, where ZeRO-3 has gathered the bias."""
        if self.enter_tp_region:
            x = gather_from_sequence(x, self.group) if self.sequence_parallel else copy_to_tp(x, self.group)
        if epilogue is not None:
            y = epilogue(F.linear(x, self.weight), self.bias)
        else:
            y = F.linear(x, self.weight, self.bias)
        return gather_from_tp(y, self.group) if self.gather_output else y


class RowParallelLinear(_ParallelLinear):
    """Y = X A^T + b with A split by columns (input features) over the TP group.

    Input: (..., in_features / tp), already sharded (the output of a ColumnParallelLinear). Output: the whole
    (..., out_features) after an all-reduce (or a reduce-scatter along the sequence under sequence
    parallelism). With `reduce_output=False` the layer returns the partial product WITHOUT the bias: the caller
    sums partials, reduces once and adds `self.bias` (phi's parallel block does this for attention + MLP).
    """

    partition_dims = {"weight": 1, "bias": None}

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        group: ProcessGroup | None = None,
        reduce_output: bool = True,
        sequence_parallel: bool = False,
    ) -> None:
        super().__init__(in_features, out_features, bias, group, sequence_parallel)
        self.reduce_output = reduce_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.reduce_output:
            return F.linear(x, self.weight)
        if group_size(self.group) == 1:
            return F.linear(x, self.weight, self.bias)
        y = F.linear(x, self.weight)
        y = reduce_scatter_to_sequence(y, self.group) if self.sequence_parallel else reduce_from_tp(y, self.group)
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """Embedding with the vocabulary split into contiguous ranges over the TP group.

    Input: token ids (B, T). Output: (B, T, dim) on every rank, or (B, T / tp, dim) under sequence parallelism.
    Each rank looks up the ids in its range, zeroes the rest, and the partial results are summed.
    """

    partition_dims = {"weight": 0}

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        group: ProcessGroup | None = None,
        sequence_parallel: bool = False,
    ) -> None:
        super().__init__()
        self.group = group
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.sequence_parallel = sequence_parallel
        local_rows = _divide(num_embeddings, group_size(group), "num_embeddings (vocab size)")
        self.vocab_start = group_rank(group) * local_rows
        self.vocab_end = self.vocab_start + local_rows
        self.weight = nn.Parameter(torch.empty(local_rows, embedding_dim))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if group_size(self.group) == 1:
            return F.embedding(input_ids, self.weight)
        outside = (input_ids < self.vocab_start) | (input_ids >= self.vocab_end)
        local_ids = (input_ids - self.vocab_start).masked_fill(outside, 0)
        partial = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence(partial, self.group)
        return reduce_from_tp(partial, self.group)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, tp={group_size(self.group)}"
