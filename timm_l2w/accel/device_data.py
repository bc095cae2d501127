"""Training data held on the device: no DataLoader, no workers, no host-to-device copy per batch.

For data sets that fit in memory (``digits``, ``digits-affine``, ``fashion-mnist``, and the CIFAR arrays of
``torch/cifar10`` / ``torch/cifar100``) the whole training split is copied to the device once, as the raw
images (uint8 for Fashion-MNIST and CIFAR). Every batch is gathered there and transformed there by the
data set's own vectorised transform (:class:`timm_l2w.data.BatchTransform`: scale, resize, channels,
normalise; CIFAR: scale and normalise with the statistics of its evaluation transform), so a loader batch
costs a few kernels.

The order of epoch ``e`` is :class:`timm_l2w.data.EpochShuffleSampler`'s for ``(seed, e)``, so without
augmentation the batches are exactly those of :func:`timm_l2w.data.create_loaders`. Augmentation
(``augment='crop-flip'``, the CIFAR recipe: random crop of the image padded by ``padding`` pixels of
zeros, then a horizontal flip with probability 1/2) is drawn on the device from a generator seeded by
``(seed, epoch)``, for every position of the epoch at once: the same run gives the same images, resumed
or not. Ranks take every ``world_size``-th batch, starting at their own index.
"""
from __future__ import annotations

import copy
from typing import Any, Iterator, Optional, Tuple

import torch
from torch import Tensor

from ..data import BatchTransform, DataSplits, EpochShuffleSampler
from ..validation import check_labels

__all__ = ["AUGMENTATIONS", "DeviceLoader", "device_arrays", "crop_flip"]

AUGMENTATIONS = ("none", "crop-flip")
_AUGMENT_SEED = 7_919  # a second stream beside the shuffle's, per (seed, epoch)


def _normalize_of(transform: Any) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """(mean, std) of the ``Normalize`` inside a torchvision / timm transform pipeline."""
    for t in getattr(transform, "transforms", [transform]):
        if hasattr(t, "mean") and hasattr(t, "std"):
            return tuple(float(v) for v in torch.as_tensor(t.mean).reshape(-1)), \
                tuple(float(v) for v in torch.as_tensor(t.std).reshape(-1))
    raise ValueError("the evaluation transform has no Normalize step: cannot reproduce it on the device")


def device_arrays(splits: DataSplits) -> Tuple[Tensor, Tensor, BatchTransform]:
    """(raw training images ``[N, C, h, w]``, labels ``[N]``, the transform that makes model input) of ``splits``.

    Raises a ValueError naming the fix for a training set that is not held in memory (ImageFolder trees).
    """
    train = splits.train
    if hasattr(train, "images") and hasattr(train, "labels") and splits.train_collate_fn is not None:
        return train.images, train.labels, splits.train_collate_fn
    base = getattr(train, "dataset", None)
    if base is not None and hasattr(base, "data") and hasattr(base, "targets"):  # torchvision CIFAR in a Subset
        index = torch.as_tensor(train.indices, dtype=torch.long)
        images = torch.as_tensor(base.data)[index].permute(0, 3, 1, 2).contiguous()  # uint8 [N, 3, 32, 32]
        labels = torch.as_tensor(base.targets, dtype=torch.long)[index]
        mean, std = _normalize_of(splits.held_out.dataset.transform if hasattr(splits.held_out, "dataset")
                                  else splits.held_out.transform)
        return images, labels, BatchTransform(splits.input_size[-1], splits.input_size[0], mean, std)
    raise ValueError(f"--device-data needs a training set held in memory (digits, digits-affine, fashion-mnist, "
                     f"torch/cifar10, torch/cifar100), not {type(train).__name__}: leave --device-data out for "
                     f"ImageFolder trees (they stream through the DataLoader)")


def crop_flip(x: Tensor, fill: Tensor, offsets: Tensor, flips: Tensor, padding: int) -> Tensor:
    """Random crop of ``x`` ``[B, C, H, W]`` padded by ``padding`` pixels of ``fill`` (``[C]``, the value a
    zero pixel has after normalisation), at ``offsets`` ``[B, 2]`` (row, column in ``0..2 * padding``), then a
    horizontal flip where ``flips`` ``[B]`` is True. Vectorised: one gather, no per-sample loop."""
    b, c, h, w = x.shape
    canvas = fill.to(x.dtype).view(1, c, 1, 1).expand(b, c, h + 2 * padding, w + 2 * padding).clone()
    canvas[:, :, padding:padding + h, padding:padding + w] = x
    rows = offsets[:, 0, None] + torch.arange(h, device=x.device)  # [B, H]
    cols = offsets[:, 1, None] + torch.arange(w, device=x.device)  # [B, W]
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    batch = torch.arange(b, device=x.device)[:, None, None]
    return canvas.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


class DeviceLoader:
    """Batches of an in-memory training set, gathered and transformed on ``device`` (see the module docstring).

    Iterating gives ``(inputs, labels)`` on the device, ``len()`` batches per epoch (``drop_last``);
    :meth:`set_epoch` picks the order and augmentation of an epoch; :meth:`skip_first_batches` resumes
    inside one.
    """

    def __init__(self, images: Tensor, labels: Tensor, transform: BatchTransform, batch_size: int,
                 device: torch.device | str, seed: int = 0, augment: str = "none", padding: int = 4,
                 num_classes: Optional[int] = None, world_size: int = 1, rank: int = 0, channels_last: bool = False):
        if augment not in AUGMENTATIONS:
            raise ValueError(f"unknown augmentation {augment!r}: use one of {', '.join(map(repr, AUGMENTATIONS))}")
        if batch_size < 1 or images.shape[0] < batch_size * world_size:
            raise ValueError(f"batch size {batch_size} x {world_size} process(es) is larger than the training set "
                             f"({images.shape[0]} images): pass a smaller --batch-size")
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        self.device = torch.device(device)
        labels = check_labels(labels, num_classes, images.shape[0], "training labels")  # once, with a clear error
        self.images, self.labels = images.to(self.device), labels.to(self.device)
        self.transform = copy.copy(transform)  # its normalisation constants on the device
        self.transform.mean, self.transform.std = transform.mean.to(self.device), transform.std.to(self.device)
        self.batch_size, self.seed, self.augment, self.padding = int(batch_size), int(seed), augment, int(padding)
        self.world_size, self.rank, self.channels_last = int(world_size), int(rank), channels_last
        self.sampler = EpochShuffleSampler(images.shape[0], seed)
        self._start = 0

    @classmethod
    def from_splits(cls, splits: DataSplits, batch_size: int, device: torch.device | str,
                    **kwargs: Any) -> "DeviceLoader":
        """The loader of ``splits``' training set (:func:`device_arrays`)."""
        images, labels, transform = device_arrays(splits)
        return cls(images, labels, transform, batch_size, device, num_classes=splits.num_classes, **kwargs)

    def __len__(self) -> int:
        return (self.images.shape[0] // self.batch_size) // self.world_size

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def skip_first_batches(self, count: int) -> "DeviceLoader":
        """This loader starting at batch ``count`` of the current epoch (once; the next pass starts at 0)."""
        loader = copy.copy(self)
        loader._start = int(count)
        return loader

    def _augmentation(self, n: int) -> Tuple[Tensor, Tensor]:
        gen = torch.Generator(device=self.device).manual_seed(
            (self.seed * 1_000_003 + self.sampler.epoch) * _AUGMENT_SEED + 1)
        offsets = torch.randint(0, 2 * self.padding + 1, (n, 2), generator=gen, device=self.device)
        flips = torch.rand(n, generator=gen, device=self.device) < 0.5
        return offsets, flips

    def __iter__(self) -> Iterator[Tuple[Tensor, Tensor]]:
        order = torch.tensor(list(self.sampler), dtype=torch.long).to(self.device)  # one copy per epoch
        augment = self._augmentation(order.shape[0]) if self.augment == "crop-flip" else None
        fill = (0 - self.transform.mean.reshape(-1)) / self.transform.std.reshape(-1)
        start, self._start = self._start, 0
        for i in range(start, len(self)):
            begin = (i * self.world_size + self.rank) * self.batch_size
            positions = slice(begin, begin + self.batch_size)
            index = order[positions]
            x = self.transform.transform(self.images.index_select(0, index))
            if augment is not None:
                x = crop_flip(x, fill, augment[0][positions], augment[1][positions], self.padding)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.labels.index_select(0, index)
