"""Data parallelism with torch DDP over the DP group (bucketed all-reduce overlapped with backward)."""

from __future__ import annotations

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from phi1.parallel.state import ParallelState


def wrap_data_parallel(model: nn.Module, state: ParallelState, bucket_cap_mb: float = 25) -> nn.Module:
    """Wrap `model` in DDP over `state.dp_group`; return it unchanged when dp_size == 1.

    DDP averages gradients over the DP replicas in buckets of `bucket_cap_mb` MB, launching each bucket's
    all-reduce as soon as its gradients are ready, so communication overlaps the rest of the backward. At
    construction it broadcasts the parameters from the first rank of the DP group, which under TP holds the
    same shard (same tp_rank) as every other member. Under tensor parallelism each TP rank's DDP reduces only
    its own shards. The wrapped module is `.module`.

    Raises:
        ValueError: bucket_cap_mb <= 0.
    """
    if bucket_cap_mb <= 0:
        raise ValueError(f"bucket_cap_mb must be > 0, got {bucket_cap_mb}")
    if state.dp_size == 1:
        return model
    device_ids = [state.device.index] if state.device.type == "cuda" else None
    return DistributedDataParallel(
        model,
        device_ids=device_ids,
        process_group=state.dp_group,
        bucket_cap_mb=bucket_cap_mb,
        # Gradients live inside the buckets: no copy between .grad and the communication buffer.
        gradient_as_bucket_view=True,
    )
