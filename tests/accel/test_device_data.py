"""The GPU-resident input pipeline (timm_l2w.accel.device_data), on the CPU: the ordinary loader's batches without
augmentation, the CIFAR recipe's crop + flip checked by construction and by statistics, determinism by seed."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from tests.helpers import register_tiny
from timm_l2w.accel.device_data import DeviceLoader, crop_flip, device_arrays
from timm_l2w.data import DataSplits, create_datasets, create_loaders


@pytest.fixture(scope="module")
def digits():
    return create_datasets("digits", input_size=16)


def test_without_augmentation_the_batches_are_the_ordinary_loaders(digits):
    train, _, _ = create_loaders(digits, 32, seed=3)
    device = DeviceLoader.from_splits(digits, 32, "cpu", seed=3)
    assert len(device) == len(train)
    for epoch in (0, 1):
        train.sampler.set_epoch(epoch)
        device.set_epoch(epoch)
        pairs = list(zip(train, device))
        assert len(pairs) == len(train)
        for (x, y), (dx, dy) in pairs:
            assert torch.equal(x, dx) and torch.equal(y, dy)
    resumed = [y for _, y in device.skip_first_batches(5)]
    assert len(resumed) == len(device) - 5 and torch.equal(resumed[0], pairs[5][1][1])
    assert len(list(device)) == len(device)  # the skip holds for one pass only


def test_ranks_take_every_other_batch(digits):
    whole = DeviceLoader.from_splits(digits, 16, "cpu", seed=1)
    ranks = [DeviceLoader.from_splits(digits, 16, "cpu", seed=1, world_size=2, rank=r) for r in (0, 1)]
    batches = [y for _, y in whole]
    assert len(ranks[0]) == len(batches) // 2
    for r, loader in enumerate(ranks):
        for i, (_, y) in enumerate(loader):
            assert torch.equal(y, batches[2 * i + r])


def test_crop_flip_by_construction():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    fill = torch.tensor([-1.0, -2.0, -3.0])
    centre = torch.full((2, 2), 2)
    assert torch.equal(crop_flip(x, fill, centre, torch.tensor([False, False]), 2), x)
    flipped = crop_flip(x, fill, centre, torch.tensor([True, False]), 2)
    assert torch.equal(flipped[0], x[0].flip(-1)) and torch.equal(flipped[1], x[1])
    corner = crop_flip(x, fill, torch.zeros(2, 2, dtype=torch.long), torch.tensor([False, False]), 2)
    assert torch.equal(corner[:, :, 2:, 2:], x[:, :, :2, :3])  # shifted down-right by the padding
    assert torch.equal(corner[:, :, :2], fill.view(1, 3, 1, 1).expand(2, 3, 2, 5))  # padded rows hold the fill
    far = crop_flip(x, fill, torch.full((2, 2), 4), torch.tensor([False, False]), 2)
    assert torch.equal(far[:, :, :2, :3], x[:, :, 2:, 2:])
    assert torch.equal(far[:, :, 2:], fill.view(1, 3, 1, 1).expand(2, 3, 2, 5))


def test_augmentation_is_fixed_by_seed_and_epoch_and_has_the_recipes_statistics():
    n = 4096
    images = torch.rand(n, 3, 8, 8)
    labels = torch.randint(0, 10, (n,))
    from timm_l2w.data import BatchTransform

    tf = BatchTransform(8, 3, [0.5] * 3, [0.25] * 3)

    def epoch(seed, e):
        loader = DeviceLoader(images, labels, tf, 512, "cpu", seed=seed, augment="crop-flip", num_classes=10)
        loader.set_epoch(e)
        return torch.cat([x for x, _ in loader])

    a = epoch(0, 0)
    assert a.shape == (n, 3, 8, 8) and torch.equal(a, epoch(0, 0))
    assert not torch.equal(a, epoch(0, 1)) and not torch.equal(a, epoch(1, 0))
    loader = DeviceLoader(images, labels, tf, 512, "cpu", augment="crop-flip")
    offsets, flips = loader._augmentation(200_000)
    assert set(offsets.unique().tolist()) == set(range(9))  # 4-pixel padding: offsets 0..8, uniform
    assert abs(offsets.double().mean().item() - 4.0) < 0.02 and abs(flips.double().mean().item() - 0.5) < 0.005
    # the padded border holds the normalised zero pixel: (0 - 0.5) / 0.25 = -2
    assert (a == -2.0).any() and a.max() <= (1 - 0.5) / 0.25


def test_bad_inputs_are_clear(digits):
    with pytest.raises(ValueError, match="held in memory"):
        device_arrays(DataSplits(TensorDataset(torch.zeros(4, 1)), None, None, 2, (1, 1, 1)))
    with pytest.raises(ValueError, match="smaller --batch-size"):
        DeviceLoader.from_splits(digits, 100_000, "cpu")
    with pytest.raises(ValueError, match="unknown augmentation"):
        DeviceLoader.from_splits(digits, 8, "cpu", augment="mixup")
    images, labels, tf = device_arrays(digits)
    with pytest.raises(ValueError, match="training labels must be class indices in \\[0, 9\\]"):
        DeviceLoader(images, labels * 2, tf, 8, "cpu", num_classes=10)


def test_cifar_arrays_are_read_from_torchvisions_dataset():
    """torch/cifar*: the uint8 HWC arrays of the torchvision dataset inside the Subset, normalised with the
    statistics of the evaluation transform (what the held-out loader applies)."""
    import numpy as np
    from torch.utils.data import Subset
    from torchvision import transforms

    class FakeCifar(torch.utils.data.Dataset):
        def __init__(self):
            self.data = np.random.default_rng(0).integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
            self.targets = list(range(10)) * 2
            self.transform = transforms.Compose(
                [transforms.ToTensor(), transforms.Normalize((0.4, 0.5, 0.6), (0.2, 0.25, 0.3))])

        def __len__(self):
            return 20

        def __getitem__(self, i):
            from PIL import Image

            return self.transform(Image.fromarray(self.data[i])), self.targets[i]

    base = FakeCifar()
    splits = DataSplits(Subset(base, [3, 5, 7, 11]), Subset(base, [0, 1]), base, 10, (3, 32, 32))
    images, labels, tf = device_arrays(splits)
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 32, 32) and labels.tolist() == [3, 5, 7, 1]
    for row, i in enumerate([3, 5, 7, 11]):  # the device transform is the evaluation transform, image by image
        torch.testing.assert_close(tf.transform(images[row:row + 1])[0], base[i][0], rtol=0, atol=1e-6)


def test_training_with_device_data_is_training_with_the_loader(tmp_path):
    """`timm-l2w train --device-data` on the CPU: the same batches, so the same weights bit for bit (resumed
    inside an epoch too)."""
    from safetensors.torch import load_file

    from timm_l2w.cli.train import main

    base = ["--model", register_tiny(), "--no-progress", "--batch-size", "32", "--lr", "0.05", "--no-eval",
            "--log-with", "none", "--held-out", "1197", "--max-steps", "6", "--cpu"]
    assert main(base + ["--output", str(tmp_path / "loader")]) == 0
    assert main(base + ["--device-data", "--output", str(tmp_path / "device")]) == 0
    assert main(base + ["--device-data", "--stop-after-steps", "4", "--output", str(tmp_path / "resumed")]) == 0
    assert main(base + ["--device-data", "--resume", "auto", "--output", str(tmp_path / "resumed")]) == 0
    ref = load_file(tmp_path / "loader" / "model.safetensors")
    for run in ("device", "resumed"):
        got = load_file(tmp_path / run / "model.safetensors")
        assert all(torch.equal(ref[k], got[k]) for k in ref), run
