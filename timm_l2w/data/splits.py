"""The three splits every data set comes with (train / held-out / test): :class:`DataSplits`, the
in-memory image set and its vectorised batch transform, the seeded split, and what a split tells a run.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["DataSplits", "InMemoryImages", "BatchTransform", "SPLIT_SEED", "split_indices", "check_held_out",
           "split_sizes", "describe_splits", "held_out_too_small"]

SPLIT_SEED = 0  # the train / held-out / test split is fixed, independent of the training seed


@dataclass
class DataSplits:
    """The three splits of the paper's protocol plus what a model needs to know about them."""

    train: Dataset
    held_out: Dataset
    test: Dataset
    num_classes: int
    input_size: Tuple[int, int, int]
    collate_fn: Optional[Callable] = None
    train_collate_fn: Optional[Callable] = None
    class_names: Optional[Tuple[str, ...]] = None  # one name per class index, when the data set has them
    note: Optional[str] = None  # how the splits were made, when the data did not come split
    eval_config: Optional[Dict[str, Any]] = None  # timm's data config of the held-out / test transform (ImageFolder)


class InMemoryImages(Dataset):
    """Images ``[N, C, h, w]`` (uint8 or float in [0, 1]) and labels ``[N]`` held in memory."""

    def __init__(self, images: Tensor, labels: Tensor):
        if images.ndim != 4 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"images must be [N, C, H, W] and labels [N] with the same N, got "
                f"{tuple(images.shape)} and {tuple(labels.shape)}"
            )
        self.images, self.labels = images, labels.long()

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> Tuple[Tensor, Tensor]:
        return self.images[index], self.labels[index]


class BatchTransform:
    """Collate function: stack a batch, scale to [0, 1], resize, repeat channels, normalise."""

    def __init__(self, size: int, in_chans: int, mean: Sequence[float], std: Sequence[float]):
        self.size, self.in_chans = size, in_chans
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, batch: List[Tuple[Tensor, Tensor]]) -> Tuple[Tensor, Tensor]:
        images = torch.stack([b[0] for b in batch])
        labels = torch.stack([b[1] for b in batch])
        return self.transform(images), labels

    def transform(self, images: Tensor) -> Tensor:
        """Vectorised transform of a raw ``[B, C, h, w]`` batch into normalised model input."""
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        if x.shape[1] == 1 and self.in_chans != 1:
            x = x.expand(-1, self.in_chans, -1, -1)
        return (x - self.mean) / self.std


def split_indices(n: int, sizes: Sequence[int]) -> List[Tensor]:
    """A fixed seeded permutation of ``range(n)`` cut into consecutive pieces of ``sizes``."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    out, start = [], 0
    for size in sizes:
        out.append(perm[start:start + size])
        start += size
    return out


def check_held_out(held_out: int, n_train: int, name: str) -> None:
    if not 0 < held_out < n_train:
        raise ValueError(
            f"held_out={held_out} must be between 1 and {n_train - 1} (the {name} training split has "
            f"{n_train} images): pass a smaller --held-out"
        )


def split_sizes(n: int, held_out: Optional[int], name: str) -> int:
    """The held-out size for ``n`` training images: the flag's, else a tenth (at most 5,000), checked."""
    held_out = min(5000, max(1, n // 10)) if held_out is None else held_out
    check_held_out(held_out, n, name)
    return held_out


def describe_splits(splits: DataSplits, shown: int = 10) -> str:
    """One line: images per split, the classes (names when known, the first ``shown``) and how the data was split."""
    sizes = " / ".join(f"{len(s):,}" for s in (splits.train, splits.held_out, splits.test))
    text = f"{sizes} images (train / held-out / test), {splits.num_classes} classes"
    names = splits.class_names or ()
    if names:
        more = f", ... ({len(names) - shown} more)" if len(names) > shown else ""
        text += ": " + ", ".join(names[:shown]) + more
    return text + (f"; {splits.note}" if splits.note else "")


def held_out_too_small(n: int, num_exits: int) -> Optional[str]:
    """A warning text when ``n`` held-out images cannot give the paper's 39 budgets 39 different
    calibrations (the exit counts ``floor(n p_k)`` of neighbouring budgets coincide), else None."""
    from ..exits import paper_distributions

    def distinct(m: int) -> int:
        return len({tuple(row) for row in torch.floor(m * paper_distributions(num_exits)).tolist()})

    budgets = paper_distributions(num_exits).shape[0]
    have = distinct(n)
    if have >= budgets:
        return None
    enough = next((m for m in range(n + 1, 100 * budgets) if distinct(m) == budgets), 100 * budgets)
    return (f"the held-out split has {n} images: too few to calibrate the {budgets} budgets (only {have} get "
            f"thresholds of their own, neighbours share them); pass --held-out {enough} or more for {num_exits} exits")
