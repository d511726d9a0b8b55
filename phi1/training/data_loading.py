"""The trainer's data loader: the datasets of a run, the collate function and each rank's micro-batch iterator.

    build_datasets(config, tokenizer, state)   -> (train, valid): pretraining (phi1.data.gpt_dataset) or
                                                  fine-tuning exercises (phi1.training.finetune_data), sized for
                                                  the whole run up front
    micro_batches(dataset, config, state, consumed_samples)
                                               -> iterator of this rank's micro-batches from `consumed_samples`
                                                  on (phi1.data.samplers.MicroBatchSampler: rank dp_rank takes
                                                  every dp_size-th micro-batch of each global batch), so a resume
                                                  continues at the exact sample, neither skipping nor repeating
    collate(items)                             -> input_ids (B, T) and labels (B, T), IGNORE_INDEX off the loss
"""

from __future__ import annotations

import numpy as np
import torch

from phi1.data.samplers import MicroBatchSampler
from phi1.parallel.cross_entropy import IGNORE_INDEX
from phi1.parallel.state import ParallelState
from phi1.training.config import TrainConfig


def collate(items: list[dict]) -> dict[str, torch.Tensor]:
    """Stack samples into input_ids (B, T) and shifted labels (B, T) with IGNORE_INDEX where no loss is taken.

    Args:
        items: samples with "tokens" (T + 1 ids) and optionally "loss_mask" (T + 1 flags, 0 = no loss).
    """
    tokens = torch.from_numpy(np.stack([np.asarray(item["tokens"], dtype=np.int64) for item in items]))
    input_ids, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].clone()
    if "loss_mask" in items[0]:
        mask = torch.from_numpy(np.stack([np.asarray(item["loss_mask"], dtype=np.int64) for item in items]))
        labels[mask[:, 1:] == 0] = IGNORE_INDEX
    return {"input_ids": input_ids, "labels": labels}


def build_datasets(config: TrainConfig, tokenizer, state: ParallelState):
    """(train, valid) datasets sized for the whole run; valid is None when evaluation is off.

    Raises:
        ValueError: the data does not fit the tokenizer or the run (naming the file), from the dataset builders.
    """
    g = config.batch.global_batch_size
    train_samples = config.schedule.train_steps * g
    eval_on = config.eval.interval > 0 and config.eval.iters > 0
    valid_samples = config.eval.iters * config.batch.micro_batch_size * state.dp_size if eval_on else 0
    if config.finetune.data is not None:
        from phi1.training.finetune_data import build_exercise_datasets

        ft = config.finetune
        return build_exercise_datasets(
            ft.data, tokenizer, config.data.seq_len, config.data.split, (train_samples, valid_samples), config.seed,
            ft.loss_on_solution_only, ft.prompt_key, ft.solution_key,
        )
    from phi1.data.gpt_dataset import build_gpt_datasets

    train, valid, _ = build_gpt_datasets(
        config.data.path, config.data.split, config.data.seq_len, (train_samples, valid_samples, 0), config.seed,
        cache_dir=config.data.cache_dir,
        # Refuses another tokenizer's data (the PREFIX.json sidecar) and token ids beyond the vocabulary.
        tokenizer=tokenizer, tokenizer_path=config.data.tokenizer_model,
    )
    return train, valid


def micro_batches(dataset, config: TrainConfig, state: ParallelState, consumed_samples: int):
    """Iterator over this rank's micro-batches from `consumed_samples` on (a sample count of the whole job)."""
    sampler = MicroBatchSampler(len(dataset), consumed_samples, config.batch.micro_batch_size, state.dp_rank, state.dp_size)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=config.data.num_workers, collate_fn=collate,
        pin_memory=state.device.type == "cuda",
        # Its own generator: a DataLoader iterator draws a base seed, and from the global generator that draw
        # would shift dropout masks whenever an iterator is created (after a resume, for each evaluation).
        generator=torch.Generator().manual_seed(config.seed + consumed_samples),
    )
    return iter(loader)


__all__ = ["build_datasets", "collate", "micro_batches"]
