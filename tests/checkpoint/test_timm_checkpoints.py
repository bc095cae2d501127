"""timm's training checkpoints (the ``.pth.tar`` of ``timm.utils.CheckpointSaver``) in ``timm-l2w eval``,
``train --pretrained-path`` and ``export``: model and arguments from ``arch`` / ``args``, ``state_dict`` or
``state_dict_ema`` (``--use-ema``), errors as one clean line."""
from __future__ import annotations

import argparse
import json
import pathlib

import timm
import torch
import torch.nn.functional as F
from timm.utils import CheckpointSaver, ModelEmaV3

import timm_l2w
from tests.helpers import loader_images, register_tiny, register_tiny_with_cfg, spy_eval_loaders, write_image_folder
from timm_l2w.files import load_state_dict, read_metadata

TINY = register_tiny()
TINY_CFG = register_tiny_with_cfg()


def _train_args(**changes) -> argparse.Namespace:
    """The arguments timm's train.py keeps in its checkpoints (the ones that matter here, at its defaults)."""
    args = dict(model=TINY, pretrained=False, num_classes=10, model_kwargs={}, in_chans=None, input_size=None,
                img_size=16, crop_pct=None, interpolation="", mean=None, std=None, gp=None, bn_momentum=None,
                bn_eps=None, drop=0.0, drop_path=None, drop_block=None, opt="sgd", lr=0.1, epochs=2, model_ema=True,
                data_dir="data", dataset="", train_split="train", val_split="validation")
    args.update(changes)
    return argparse.Namespace(**args)


def _timm_checkpoint(folder: pathlib.Path, ema: bool = True, **changes):
    """``last.pth.tar`` of timm's CheckpointSaver after one SGD step (the EMA, decay 0.5, then differs from the
    model); returns the file, the model and the EMA's module."""
    torch.manual_seed(0)
    args = _train_args(model_ema=ema, **changes)
    model = timm.create_model(args.model, num_classes=args.num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model_ema = ModelEmaV3(model, decay=0.5) if ema else None
    x, y = torch.randn(16, 3, 16, 16), torch.arange(16) % args.num_classes
    sum(F.cross_entropy(logits, y) for logits in model.forward_exits(x)).backward()
    optimizer.step()
    if model_ema is not None:
        model_ema.update(model)
    folder.mkdir(parents=True, exist_ok=True)
    saver = CheckpointSaver(model, optimizer, args=args, model_ema=model_ema, checkpoint_dir=str(folder),
                            recovery_dir=str(folder), max_history=1)
    saver.save_checkpoint(epoch=0, metric=10.0)
    return folder / "last.pth.tar", model, None if model_ema is None else model_ema.module


def _eval(argv, out):
    from timm_l2w.cli.eval import main as eval_main

    code = eval_main(argv + ["--dataset", "digits", "--output", str(out), "--no-progress"])
    return code, (json.loads((out / f"{TINY}.json").read_text()) if code == 0 else None)


def test_a_checkpoint_saver_file_evaluates_as_the_same_weights_in_safetensors(tmp_path, capsys):
    ckpt, model, ema = _timm_checkpoint(tmp_path / "timm")
    meta = read_metadata(ckpt)
    assert (meta["model"], meta["num_classes"], meta["input_size"]) == (TINY, "10", "16")
    plain = timm_l2w.save_safetensors(model, tmp_path / "plain.safetensors", metadata={"model": TINY})
    averaged = timm_l2w.save_safetensors(ema, tmp_path / "ema.safetensors", metadata={"model": TINY})
    size = ["--input-size", "16"]
    code, from_timm = _eval([str(ckpt)], tmp_path / "a")  # no --model, no --input-size: arch / args say
    assert code == 0 and f"timm-l2w eval: {TINY} (num_classes=10" in capsys.readouterr().out
    assert from_timm == _eval([str(plain)] + size, tmp_path / "b")[1]
    code, from_timm_ema = _eval([str(ckpt), "--use-ema"], tmp_path / "c")
    assert code == 0 and from_timm_ema == _eval([str(averaged)] + size, tmp_path / "d")[1]
    assert [r["loss"] for r in from_timm["anytime"]] != [r["loss"] for r in from_timm_ema["anytime"]]
    loaded = load_state_dict(ckpt, use_ema=True)
    assert all(torch.equal(loaded[k], v) for k, v in ema.state_dict().items())


def _one_clean_line(err: str) -> str:
    text = err.strip()
    assert text.startswith("timm-l2w") and "\n" not in text and "\x1b" not in text and "Traceback" not in text
    return text


def test_use_ema_on_a_file_without_ema_weights_is_a_clean_error(tmp_path, capsys):
    ckpt, _, _ = _timm_checkpoint(tmp_path / "timm", ema=False)
    assert _eval([str(ckpt), "--use-ema"], tmp_path / "ev")[0] == 2
    err = _one_clean_line(capsys.readouterr().err)
    assert "has no EMA weights (no 'state_dict_ema' entry" in err and "drop --use-ema" in err
    plain = timm_l2w.save_safetensors(timm.create_model(TINY, num_classes=10), tmp_path / "m.safetensors",
                                      metadata={"model": TINY})
    assert _eval([str(plain), "--use-ema", "--input-size", "16"], tmp_path / "ev2")[0] == 2
    assert "model_ema.safetensors" in _one_clean_line(capsys.readouterr().err)


def test_corrupt_and_foreign_checkpoints_are_one_clean_line(tmp_path, capsys):
    ckpt, model, _ = _timm_checkpoint(tmp_path / "timm")
    data = ckpt.read_bytes()
    files = {"truncated": data[: len(data) // 2], "garbage": b"not a checkpoint" * 8}
    for name, content in files.items():
        (tmp_path / f"{name}.pth.tar").write_bytes(content)
    torch.save({"state_dict": model.state_dict(), "where": pathlib.PurePosixPath("/data")},
               tmp_path / "foreign.pth.tar")  # a class weights_only loading does not allow
    for name, said in (("truncated", "truncated or corrupt"), ("garbage", "is not a PyTorch checkpoint"),
                       ("foreign", "refuses (pathlib.PurePosixPath)")):
        for model_flag in ([], ["--model", TINY]):  # with and without a name to build
            assert _eval([str(tmp_path / f"{name}.pth.tar"), "--input-size", "16"] + model_flag,
                         tmp_path / "ev")[0] == 2
            err = _one_clean_line(capsys.readouterr().err)
            assert said in err and "pass a .safetensors file" in err and "CheckpointSaver" in err, err


def test_read_metadata_maps_timm_arguments(tmp_path):
    args = _train_args(model="multi_exit_l2w", model_kwargs={"backbone": "resnet18", "exit_indices": (2, 4)},
                       img_size=None, input_size=[1, 20, 20], gp="max", bn_eps=1e-3, num_classes=7, crop_pct=0.9,
                       interpolation="bicubic", mean=[0.5], std=[0.25])
    torch.save({"epoch": 3, "arch": args.model, "args": args, "state_dict": {"w": torch.ones(1)}, "version": 2},
               tmp_path / "c.pth.tar")
    meta = read_metadata(tmp_path / "c.pth.tar")
    assert json.loads(meta.pop("model_kwargs")) == {"backbone": "resnet18", "exit_indices": [2, 4],
                                                    "global_pool": "max", "bn_eps": 1e-3}
    assert meta == {"model": "multi_exit_l2w", "num_classes": "7", "in_chans": "1", "input_size": "20",
                    "crop_pct": "0.9", "interpolation": "bicubic", "mean": "[0.5]", "std": "[0.25]"}
    torch.save({"arch": "tinymultiexit", "state_dict": {"w": torch.ones(1)}}, tmp_path / "no_args.pth.tar")
    assert read_metadata(tmp_path / "no_args.pth.tar") == {}  # CheckpointSaver without args: a class name only


def test_train_pretrained_path_and_export_accept_a_timm_checkpoint(tmp_path, capsys):
    from timm_l2w.cli.eval import main as eval_main
    from timm_l2w.cli.export import main as export_main
    from timm_l2w.cli.train import main as train_main

    ckpt, _, _ = _timm_checkpoint(tmp_path / "timm")
    run = ["--batch-size", "32", "--max-steps", "1", "--eps", "0.7", "--log-with", "none", "--no-progress", "--no-eval",
           "--input-size", "16", "--dataset", "digits"]
    assert train_main(run + ["--pretrained-path", str(ckpt), "--output", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out  # no --model: the checkpoint's args.model
    assert f"initialised from {ckpt} (every tensor)" in out
    assert read_metadata(tmp_path / "run" / "model.safetensors")["model"] == TINY
    assert eval_main([str(ckpt), "--use-ema", "--q", "1", "--output", str(tmp_path / "ev"), "--no-progress"]) == 0
    policy, = (tmp_path / "ev").glob("*_policy.json")
    package = tmp_path / "package"  # the EMA weights the policy was calibrated on; no --model: the file's
    assert export_main([str(ckpt), "--use-ema", "--policy", str(policy), "--output", str(package)]) == 0
    capsys.readouterr()
    assert export_main([str(ckpt), "--policy", str(policy), "--output", str(tmp_path / "plain")]) == 2
    assert "was calibrated on weights with sha256" in capsys.readouterr().err  # on the EMA, not the state_dict
    manifest = json.loads((package / "manifest.json").read_text())
    assert (manifest["num_classes"], manifest["input_size"], manifest["num_exits"]) == (10, [3, 16, 16], 3)


def test_eval_of_a_timm_checkpoint_on_an_image_folder_prepares_images_as_its_train_py_did(tmp_path, monkeypatch):
    from timm.data import ImageDataset, create_transform, resolve_data_config

    from timm_l2w.cli.eval import main as eval_main

    root = write_image_folder(tmp_path / "tree" / "train", per_class=4, size=(23, 31)).parent
    write_image_folder(root / "val", per_class=2, size=(31, 23), seed=1)
    ckpt, model, _ = _timm_checkpoint(tmp_path / "timm", model=TINY_CFG, num_classes=3, img_size=20, crop_pct=0.7,
                                      interpolation="nearest")
    seen = spy_eval_loaders(monkeypatch)
    assert eval_main([str(ckpt), "--dataset", "tree", "--data-dir", str(root), "--held-out", "2",
                      "--output", str(tmp_path / "ev"), "--no-progress"]) == 0
    args = torch.load(ckpt, weights_only=False)["args"]  # train.py's eval transform: its args over the model's cfg
    expected = create_transform(**resolve_data_config(vars(args), model=model), is_training=False)
    images = torch.stack([image for image, _ in ImageDataset(str(root / "val"), transform=expected)])
    assert images.shape == (6, 3, 20, 20)
    torch.testing.assert_close(loader_images(seen[0][1]), images, rtol=0, atol=0)
