"""Micro-batch index samplers that resume from a count of consumed samples."""

from __future__ import annotations

from collections.abc import Iterator


class MicroBatchSampler:
    """Yields this data-parallel rank's micro-batch of indices, in order, from `consumed_samples` on.

    Global step k covers indices [consumed + k * M * D, consumed + (k + 1) * M * D) (M micro-batch size,
    D data-parallel size); rank r takes the r-th slice of M. Resuming with the consumed-sample count of a
    checkpoint continues exactly where the run stopped (Megatron's MegatronPretrainingSampler semantics).

    Args:
        total_samples: length of the dataset.
        consumed_samples: samples already consumed by all ranks together.
        micro_batch_size: samples per rank per micro-batch.
        data_parallel_rank: this rank, 0 <= rank < data_parallel_size.
        data_parallel_size: number of data-parallel ranks.
        drop_last: drop the final incomplete global micro-batch (default, so ranks stay in step).
    Raises:
        ValueError: on inconsistent arguments.
    """

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
        drop_last: bool = True,
    ) -> None:
        if total_samples <= 0:
            raise ValueError(f"total_samples must be positive, got {total_samples}")
        if not 0 <= consumed_samples < total_samples:
            raise ValueError(f"consumed_samples {consumed_samples} must be in [0, total_samples={total_samples})")
        if micro_batch_size <= 0 or data_parallel_size <= 0:
            raise ValueError("micro_batch_size and data_parallel_size must be positive")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data_parallel_rank {data_parallel_rank} not in [0, {data_parallel_size})")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.drop_last = drop_last
        self.global_micro_batch = micro_batch_size * data_parallel_size

    def __len__(self) -> int:
        """Micro-batches this rank will yield."""
        remaining = self.total_samples - self.consumed_samples
        full, rest = divmod(remaining, self.global_micro_batch)
        first = self.data_parallel_rank * self.micro_batch_size
        return full + int(not self.drop_last and rest > first)

    def __iter__(self) -> Iterator[list[int]]:
        first = self.consumed_samples + self.data_parallel_rank * self.micro_batch_size
        step = self.global_micro_batch
        # Arithmetic instead of Megatron's growing list: O(1) per batch even far into a long run.
        end_of_full = self.consumed_samples + (self.total_samples - self.consumed_samples) // step * step
        for start in range(first, end_of_full, step):
            yield list(range(start, start + self.micro_batch_size))
        if not self.drop_last:
            start = end_of_full + self.data_parallel_rank * self.micro_batch_size
            if start < self.total_samples:
                yield list(range(start, min(start + self.micro_batch_size, self.total_samples)))
