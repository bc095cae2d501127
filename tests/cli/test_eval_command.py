"""The `timm-l2w eval` command: the model, data set and class names from the file's metadata, clear errors."""
from __future__ import annotations

import json

import timm

import timm_l2w
from tests.helpers import register_tiny
from timm_l2w.cli.train import main as train_main
from timm_l2w.files import read_metadata

TINY = register_tiny()


def test_eval_takes_the_model_from_the_checkpoint_metadata(tmp_path, capsys):
    from timm_l2w.cli.eval import main as eval_main

    model = timm.create_model("msdnet_l2w_cifar_tiny", num_classes=10)
    ckpt = timm_l2w.save_safetensors(model, tmp_path / "model.safetensors")  # records model and num_classes
    assert eval_main([str(ckpt), "--dataset", "digits", "--output", str(tmp_path / "eval")]) == 0
    captured = capsys.readouterr()
    assert "msdnet_l2w_cifar_tiny" in captured.out and captured.out.count("MFLOPs") >= 5
    assert "\r" not in captured.err  # no progress bar when stderr is not a terminal
    assert eval_main([str(ckpt), "--model", "msdnet_l2w_cifar", "--output", str(tmp_path / "e2")]) == 2
    assert "saved from msdnet_l2w_cifar_tiny" in capsys.readouterr().err


def test_model_file_records_class_names_and_data_and_eval_uses_them(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--model", TINY, "--batch-size", "32", "--lr", "0.05", "--log-with", "none", "--max-steps", "2"]
    assert train_main(args + ["--dataset", "digits-affine", "--input-size", "16", "--no-progress",
                              "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "loss" in printed and "(sum over the 3 exits)" in printed  # the printed loss is labelled
    assert "data: 7,182 / 300 / 300 images (train / held-out / test), 10 classes: 0, 1, 2" in printed
    meta = read_metadata(out / "model.safetensors")
    assert json.loads(meta["class_names"]) == [str(d) for d in range(10)]
    assert (meta["dataset"], meta["input_size"]) == ("digits-affine", "16")
    assert eval_main_cli([str(out / "model.safetensors"), "--output", str(tmp_path / "ev"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "data set digits-affine, 16x16 images (recorded in" in printed
    assert json.loads((tmp_path / "ev" / f"{TINY}.json").read_text())["num_test"] == 300


def eval_main_cli(argv):
    from timm_l2w.cli.eval import main as eval_main

    return eval_main(argv)


def test_eval_of_a_missing_file_says_so(tmp_path, capsys):
    assert eval_main_cli([str(tmp_path / "nope.safetensors"), "--output", str(tmp_path / "ev")]) == 2
    err = capsys.readouterr().err
    assert "no such file" in err and "nope.safetensors" in err and "records no model name" not in err


def test_eval_without_dataset_on_a_checkpoint_without_a_record_says_what_it_uses(tmp_path, capsys):
    model = timm.create_model(TINY, num_classes=10)
    ckpt = timm_l2w.save_safetensors(model, tmp_path / "m.safetensors", metadata={"model": TINY})
    assert eval_main_cli([str(ckpt), "--input-size", "8", "--cpu", "--output", str(tmp_path / "ev"),
                          "--no-progress"]) == 0  # --input-size and --cpu: the spellings of timm-l2w train
    assert "records none: evaluating on digits" in capsys.readouterr().out
    five = timm_l2w.save_safetensors(timm.create_model(TINY, num_classes=5), tmp_path / "five.safetensors",
                                     metadata={"model": TINY})
    assert eval_main_cli([str(five), "--img-size", "8", "--output", str(tmp_path / "ev5")]) == 2
    err = capsys.readouterr().err  # not a label error from deep inside: which data to pass
    assert "has 10 classes but the model only 5" in err and "--dataset" in err
