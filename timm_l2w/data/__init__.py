"""Built-in data for training and evaluating multi-exit models: train / held-out / test splits.

Every dataset comes with a *held-out* split carved from its training data (the paper calibrates the
budgeted-evaluation thresholds on it), so one call gives the three sets the protocol needs:

- ``digits``: scikit-learn's 1,797 handwritten 8x8 digits (ships inside the wheel: fully offline),
  upscaled to the model input and repeated to 3 channels, fixed seeded split.
- ``digits-affine``: the same digits, each randomly rotated (up to 30 degrees), scaled (up to 25%)
  and shifted (up to 18% of the side) on a 16x16 canvas: a harder task where deeper exits pay off.
  The transforms are fixed by seed: :data:`DIGITS_AFFINE_COPIES` transformed copies of every training
  image, one of every held-out and test image (so resumed runs see exactly the same data).
- ``fashion-mnist``: Fashion-MNIST from its IDX files (plain or gzipped), by default where Debian's
  ``dataset-fashion-mnist`` package puts them, 28x28 resized to the model input.
- ``torch/cifar10``, ``torch/cifar100`` (torchvision's python-pickle batch files, through timm's
  :func:`timm.data.create_dataset`) and ImageFolder trees (any other name, with ``data_dir``; timm's
  ``ImageDataset``): ``DIR/train/<class>/`` + ``DIR/val/<class>/`` (the ImageNet layout: test = val), or
  class folders only, which are split by a fixed seed (a fifth of the images is the test split); images
  go through :func:`timm.data.create_transform`.

The small built-in sets stay in memory as uint8/float tensors; resizing, channel repeat and
normalisation run once per batch in the collate function (vectorised), so loaders are fast.
"""
from .builtin import (
    BUILTIN_DATASETS,
    DIGITS_AFFINE_COPIES,
    FASHION_MNIST_DIR,
    create_datasets,
    is_image_folder,
    read_idx,
)
from .loaders import EpochShuffleSampler, create_eval_loaders, create_loaders
from .splits import BatchTransform, DataSplits, InMemoryImages, describe_splits, held_out_too_small

__all__ = [
    "DataSplits",
    "InMemoryImages",
    "BatchTransform",
    "EpochShuffleSampler",
    "BUILTIN_DATASETS",
    "DIGITS_AFFINE_COPIES",
    "FASHION_MNIST_DIR",
    "create_datasets",
    "create_loaders",
    "create_eval_loaders",
    "is_image_folder",
    "describe_splits",
    "held_out_too_small",
    "read_idx",
]
