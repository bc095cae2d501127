"""Fine-tuning from a weights file (`timm-l2w train --pretrained-path`): another configuration fails clearly,
other classes reinitialise only the exit classifiers, the model the file records is taken."""
from __future__ import annotations

import timm
import torch

import timm_l2w
from tests.helpers import register_tiny
from timm_l2w.cli.train import main as train_main
from timm_l2w.files import read_metadata

TINY = register_tiny()


def test_pretrained_path_of_another_configuration_fails_clearly(tmp_path, capsys):
    tiny = timm.create_model("msdnet_l2w_cifar_tiny", num_classes=100)
    ckpt = timm_l2w.save_safetensors(tiny, tmp_path / "tiny.safetensors", metadata={"model": "msdnet_l2w_cifar_tiny"})
    code = train_main(["--model", "msdnet_l2w_cifar", "--pretrained-path", str(ckpt), "--max-steps", "1",
                       "--no-eval", "--output", str(tmp_path / "out"), "--log-with", "none"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "saved from msdnet_l2w_cifar_tiny" in err and "--model msdnet_l2w_cifar_tiny" in err
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_pretrained_path_with_other_classes_reinitialises_only_the_exit_classifiers(tmp_path, capsys):
    torch.manual_seed(1)
    pre = timm.create_model("msdnet_l2w_cifar_tiny", num_classes=100)
    ckpt = timm_l2w.save_safetensors(pre, tmp_path / "pre.safetensors")
    out = tmp_path / "ft"
    code = train_main(["--model", "msdnet_l2w_cifar_tiny", "--pretrained-path", str(ckpt), "--max-steps", "1",
                       "--lr", "1e-9", "--warmup-lr", "1e-9", "--no-eval", "--output", str(out), "--log-with", "none"])
    printed = capsys.readouterr().out
    assert code == 0
    heads = [f"classifier.{k}.linear.{p}" for k in range(5) for p in ("weight", "bias")]
    line = next(ln for ln in printed.splitlines() if "re-initialised" in ln)
    assert "10 exit classifier tensors re-initialised for 10 classes: " in line
    assert sorted(line.split("classes: ")[1].split(", ")) == sorted(heads)
    from safetensors.torch import load_file

    tuned = load_file(out / "model.safetensors")
    body = [k for k, v in pre.state_dict().items() if v.is_floating_point() and "running" not in k and k not in heads]
    assert body and all(torch.allclose(pre.state_dict()[k], tuned[k], atol=1e-6) for k in body)  # loaded
    assert all(tuned[k].shape[0] == 10 for k in heads)  # fresh 10-class exit classifiers


def test_train_pretrained_path_takes_the_model_the_file_records(tmp_path, capsys):
    ckpt = timm_l2w.save_safetensors(timm.create_model(TINY, num_classes=10), tmp_path / "pre.safetensors",
                                     metadata={"model": TINY})
    run = ["--pretrained-path", str(ckpt), "--max-steps", "1", "--batch-size", "8", "--no-eval", "--no-progress",
           "--log-with", "none", "--img-size", "16", "--device", "cpu"]  # timm-l2w eval's spellings
    assert train_main(run + ["--output", str(tmp_path / "a")]) == 0  # no --model
    assert f"; {TINY} on digits" in capsys.readouterr().out
    assert read_metadata(tmp_path / "a" / "model.safetensors")["model"] == TINY
    assert train_main(run + ["--model", "msdnet_l2w_cifar_tiny", "--output", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert f"--model msdnet_l2w_cifar_tiny, but {ckpt} was saved from {TINY}" in err and f"--model {TINY}" in err
