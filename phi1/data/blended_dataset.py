"""A dataset that draws from several datasets by weight, in exact proportions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from phi1.data.helpers import build_blending_indices


@dataclass(frozen=True)
class BlendPlan:
    """Which dataset serves each blended sample.

    dataset_index: int16 (size,); dataset_sample_index: int64 (size,); samples_per_dataset: exact counts.
    """

    dataset_index: np.ndarray
    dataset_sample_index: np.ndarray
    samples_per_dataset: list[int]


class BlendedDataset(torch.utils.data.Dataset):
    """Blends datasets by weight: after any n samples, dataset d has served floor or ceil of weight[d] * n.

    Args:
        datasets: the parts (None allowed for a part that the plan never draws from).
        weights: one per part; normalised here.
        size: number of blended samples.
    Raises:
        ValueError: a part is shorter than the samples the blend draws from it.
    """

    def __init__(self, datasets: Sequence[torch.utils.data.Dataset | None], weights: Sequence[float], size: int) -> None:
        if len(datasets) != len(weights):
            raise ValueError(f"{len(datasets)} datasets but {len(weights)} weights")
        self.datasets = list(datasets)
        self.weights = _normalise(weights)
        self.size = int(size)
        plan = self.plan(self.weights, self.size)
        for number, (dataset, count) in enumerate(zip(self.datasets, plan.samples_per_dataset)):
            available = 0 if dataset is None else len(dataset)
            if available < count:
                raise ValueError(f"blended dataset part {number} has {available} samples, the blend needs {count}")
        self.dataset_index = plan.dataset_index
        self.dataset_sample_index = plan.dataset_sample_index

    @staticmethod
    def plan(weights: Sequence[float], size: int) -> BlendPlan:
        """The blending indices for `size` samples (cheap: one C++ pass)."""
        dataset_index, dataset_sample_index = build_blending_indices(_normalise(weights), int(size))
        counts = np.bincount(dataset_index, minlength=len(weights)).tolist() if size else [0] * len(weights)
        return BlendPlan(dataset_index, dataset_sample_index, [int(c) for c in counts])

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.size:
            raise IndexError(f"blended sample {index} out of range ({self.size})")
        dataset = self.datasets[int(self.dataset_index[index])]
        sample = dataset[int(self.dataset_sample_index[index])]
        return dict(sample, dataset_id=int(self.dataset_index[index]))


def _normalise(weights: Sequence[float]) -> np.ndarray:
    array = np.asarray(weights, dtype=np.float64)
    if array.ndim != 1 or array.size == 0 or np.any(array < 0) or array.sum() <= 0:
        raise ValueError(f"weights {list(weights)}: need non-negative numbers with a positive sum")
    return array / array.sum()
