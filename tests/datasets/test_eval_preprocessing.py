"""``timm-l2w eval`` prepares ImageFolder images as timm's ``validate.py`` does (the model's data config,
``--crop-pct`` / ``--interpolation`` / ``--input-size`` over it), or as ``timm-l2w train`` recorded it; the
policy's ``preprocess`` entry describes that transform; the built-in sets keep their fixed preprocessing."""
from __future__ import annotations

import json
import math

import pytest
import timm
import torch
from timm.data import ImageDataset, create_transform, resolve_data_config

from tests.helpers import TINY_DATA_CFG, loader_images, register_tiny_with_cfg, spy_eval_loaders, write_image_folder
from timm_l2w.files import read_metadata

TINY_CFG = register_tiny_with_cfg()


@pytest.fixture
def tree(tmp_path):
    """train/ + val/ class folders of non-square images (crop and resize of the shorter side both matter)."""
    root = tmp_path / "tree"
    write_image_folder(root / "train", per_class=4, size=(37, 29))
    write_image_folder(root / "val", per_class=2, size=(26, 41), seed=1)
    return root


def _eval_images(monkeypatch, tmp_path, argv):
    """The test images ``timm-l2w eval argv`` evaluated (and its output folder)."""
    from timm_l2w.cli.eval import main as eval_main

    seen = spy_eval_loaders(monkeypatch)
    out = tmp_path / "ev"
    assert eval_main(argv + ["--held-out", "2", "--output", str(out), "--no-progress"]) == 0
    return loader_images(seen[-1][1]), out


def _validate_py_images(root, config):
    """val/ through timm's eval transform of ``config``, as validate.py builds it."""
    dataset = ImageDataset(str(root / "val"), transform=create_transform(**config, is_training=False))
    return torch.stack([image for image, _ in dataset])


def test_eval_prepares_image_folder_images_as_validate_py(tree, tmp_path, monkeypatch, capsys):
    folder = ["--model", TINY_CFG, "--dataset", "tree", "--data-dir", str(tree)]
    images, out = _eval_images(monkeypatch, tmp_path, folder + ["--q", "1"])
    config = resolve_data_config({}, model=timm.create_model(TINY_CFG), use_test_size=True)
    assert (config["crop_pct"], config["interpolation"], config["input_size"]) == (0.8, "bicubic", (3, 24, 24))
    torch.testing.assert_close(images, _validate_py_images(tree, config), rtol=0, atol=0)
    assert "ImageFolder images at 24x24: centre crop 0.8 of the shorter side, bicubic resize" in capsys.readouterr().out
    policy = json.loads(next(out.glob("*_policy.json")).read_text())  # what an exported package will do
    assert policy["preprocess"] == {"input_size": [3, 24, 24], "color": "RGB", "resize": "shorter_side",
                                    "resize_size": math.floor(24 / 0.8), "interpolation": "bicubic",
                                    "mean": pytest.approx(list(TINY_DATA_CFG["mean"])),
                                    "std": pytest.approx(list(TINY_DATA_CFG["std"]))}


def test_crop_pct_interpolation_and_input_size_override_the_model_config(tree, tmp_path, monkeypatch):
    flags = {"crop_pct": 1.0, "interpolation": "nearest", "input_size": (3, 20, 20)}
    images, _ = _eval_images(monkeypatch, tmp_path, ["--model", TINY_CFG, "--dataset", "tree", "--data-dir",
                                                     str(tree), "--crop-pct", "1", "--interpolation", "nearest",
                                                     "--input-size", "20"])
    config = resolve_data_config(flags, model=timm.create_model(TINY_CFG), use_test_size=True)  # validate.py's flags
    assert images.shape == (6, 3, 20, 20)
    torch.testing.assert_close(images, _validate_py_images(tree, config), rtol=0, atol=0)
    default = resolve_data_config({"input_size": (3, 20, 20)}, model=timm.create_model(TINY_CFG))
    assert not torch.equal(images, _validate_py_images(tree, default))  # the flags changed the images


def test_eval_of_a_trained_checkpoint_uses_the_recorded_recipe_not_the_model_config(tree, tmp_path, monkeypatch,
                                                                                     capsys):
    from timm_l2w.cli.train import main as train_main
    from timm_l2w.data import create_datasets

    run = tmp_path / "run"
    with pytest.warns(UserWarning, match="too few to calibrate the 39 budgets"):  # 2 held-out images
        assert train_main(["--model", TINY_CFG, "--dataset", "tree", "--data-dir", str(tree), "--input-size", "16",
                           "--held-out", "2", "--batch-size", "8", "--max-steps", "1", "--eps", "0.7", "--no-eval",
                           "--log-with", "none", "--no-progress", "--output", str(run)]) == 0
    meta = read_metadata(run / "model.safetensors")  # the training recipe's eval transform, recorded
    assert (meta["crop_pct"], meta["interpolation"], meta["input_size"]) == ("0.875", "bilinear", "16")
    assert json.loads(meta["mean"]) == pytest.approx([0.485, 0.456, 0.406])
    capsys.readouterr()
    images, _ = _eval_images(monkeypatch, tmp_path, [str(run / "model.safetensors")])  # data set recorded too
    assert "(flags, else the checkpoint's record" in capsys.readouterr().out
    recipe = create_datasets("tree", data_dir=str(tree), input_size=16, held_out=2)  # what training evaluated
    torch.testing.assert_close(images, torch.stack([recipe.test[i][0] for i in range(len(recipe.test))]),
                               rtol=0, atol=0)
    model_config = resolve_data_config({"input_size": (3, 16, 16)}, model=timm.create_model(TINY_CFG))
    assert not torch.equal(images, _validate_py_images(tree, model_config))


def test_builtin_sets_keep_their_preprocessing_and_refuse_the_folder_flags(tmp_path, capsys):
    from timm_l2w.cli.eval import main as eval_main

    assert eval_main(["--model", TINY_CFG, "--dataset", "digits", "--crop-pct", "0.9", "--input-size", "8",
                      "--output", str(tmp_path / "ev")]) == 2
    err = capsys.readouterr().err
    assert "--crop-pct / --interpolation set the preprocessing of ImageFolder data; digits has its own" in err
    assert eval_main(["--model", TINY_CFG, "--dataset", "tree", "--data-dir", str(tmp_path), "--crop-pct", "1.5",
                      "--output", str(tmp_path / "ev")]) == 2
    assert "--crop-pct must be in (0, 1], got 1.5" in capsys.readouterr().err
