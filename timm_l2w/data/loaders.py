"""Loaders over :class:`~timm_l2w.data.splits.DataSplits`: the seeded epoch shuffle (the same order on every
rank and after a resume), the training / held-out / test loaders and the evaluation loaders of a data set.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Tuple

import torch
from torch.utils.data import DataLoader, Sampler

from .builtin import create_datasets
from .splits import DataSplits

__all__ = ["EpochShuffleSampler", "create_loaders", "create_eval_loaders"]


class EpochShuffleSampler(Sampler[int]):
    """A shuffle that depends only on ``(seed, epoch)``: call :meth:`set_epoch` before each epoch.

    Unlike a shared RNG, the order of epoch e is the same whether training ran straight through or
    was stopped and resumed, and it is the same on every rank (accelerate then shards the batches).
    """

    def __init__(self, num_samples: int, seed: int = 0):
        self.num_samples, self.seed, self.epoch = int(num_samples), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=gen).tolist())


def create_loaders(splits: DataSplits, batch_size: int, eval_batch_size: Optional[int] = None,
                   seed: int = 0, num_workers: int = 0, drop_last: bool = True
                   ) -> Tuple[DataLoader, DataLoader, DataLoader]:
    """Train (shuffled by :class:`EpochShuffleSampler`, ``drop_last``), held-out and test loaders of ``splits``.

    Set the training epoch with ``train.sampler.set_epoch(epoch)`` to get a new order each epoch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if drop_last and len(splits.train) < batch_size:
        raise ValueError(
            f"batch size {batch_size} is larger than the training set ({len(splits.train)} images): "
            f"pass a smaller --batch-size"
        )
    eval_batch_size = eval_batch_size or batch_size
    train = DataLoader(splits.train, batch_size=batch_size, sampler=EpochShuffleSampler(len(splits.train), seed),
                       drop_last=drop_last, num_workers=num_workers, collate_fn=splits.train_collate_fn)
    held = DataLoader(splits.held_out, batch_size=eval_batch_size, shuffle=False, num_workers=num_workers,
                      collate_fn=splits.collate_fn)
    test = DataLoader(splits.test, batch_size=eval_batch_size, shuffle=False, num_workers=num_workers,
                      collate_fn=splits.collate_fn)
    return train, held, test


def create_eval_loaders(name: str, data_dir: Optional[str] = None, batch_size: int = 256, input_size: int = 32,
                        in_chans: int = 3, held_out: Optional[int] = None, num_workers: int = 0,
                        eval_config: Optional[Mapping[str, Any]] = None) -> Tuple[DataLoader, DataLoader, dict]:
    """Held-out and test loaders of ``name`` plus ``{"num_classes", "in_chans", "input_size", "class_names"}``;
    ``eval_config``: an ImageFolder's preprocessing (timm's data config, :func:`create_datasets`)."""
    splits = create_datasets(name, data_dir=data_dir, input_size=input_size, in_chans=in_chans, held_out=held_out,
                             eval_config=eval_config)
    _, held, test = create_loaders(splits, batch_size, seed=0, num_workers=num_workers, drop_last=False)
    info = {"num_classes": splits.num_classes, "in_chans": splits.input_size[0], "input_size": splits.input_size,
            "class_names": splits.class_names}
    return held, test, info
