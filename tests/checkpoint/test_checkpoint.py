"""Checkpoints: safetensors round trip (atomic), release .pth.tar conversion, clear errors, CLI."""
from __future__ import annotations

import os

import pytest
import timm
import torch
from safetensors import safe_open

import timm_l2w
from timm_l2w import cli
from timm_l2w.checkpoint import convert_release_checkpoint, save_safetensors
from timm_l2w.errors import StateDictMismatchError
from timm_l2w.files import load_state_dict
from timm_l2w.state_checks import check_state_dict

TINY = "msdnet_l2w_cifar_tiny"


def _trained_like(num_classes: int = 10) -> torch.nn.Module:
    """A tiny MSDNet whose weights and BN statistics differ from any fresh init."""
    model = timm.create_model(TINY, num_classes=num_classes)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.05)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.uniform_(-0.1, 0.1)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 1.5)
    return model.eval()


def _outputs(model, x):
    with torch.no_grad():
        return model.eval().forward_exits(x)


def test_safetensors_round_trip_gives_identical_outputs(tmp_path):
    model = _trained_like()
    path = save_safetensors(model, tmp_path / "sub" / "w.safetensors", metadata={"epoch": 3, "note": "hi"})
    assert sorted(os.listdir(path.parent)) == ["w.safetensors"]  # no temp file left behind
    state = load_state_dict(path)
    assert set(state) == set(model.state_dict())  # safetensors stores keys in its own order
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["epoch"] == "3" and f.metadata()["note"] == "hi"
    clone = timm.create_model(TINY, num_classes=10)
    clone.load_state_dict(state)
    x = torch.randn(2, 3, 32, 32)
    for a, b in zip(_outputs(model, x), _outputs(clone, x), strict=True):
        assert torch.equal(a, b)


def test_save_plain_dict_with_shared_and_strided_tensors(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    tensors = {"a": base, "tied": base, "t": base.t(), "view": base[1]}
    save_safetensors(tensors, tmp_path / "d.safetensors")
    back = load_state_dict(tmp_path / "d.safetensors")
    assert all(torch.equal(back[k], v) for k, v in tensors.items())


def test_failed_save_keeps_previous_file(tmp_path):
    path = tmp_path / "w.safetensors"
    save_safetensors({"x": torch.ones(2)}, path)
    with pytest.raises(TypeError, match="epoch"):
        save_safetensors({"x": torch.zeros(2), "epoch": 5}, path)
    with pytest.raises(TypeError, match="nn.Module or a dict"):
        save_safetensors([torch.zeros(2)], path)
    assert torch.equal(load_state_dict(path)["x"], torch.ones(2))
    assert os.listdir(tmp_path) == ["w.safetensors"]


def test_converted_release_checkpoint_gives_identical_outputs(tmp_path):
    model = _trained_like(num_classes=10)
    release = {
        "epoch": 300,
        "arch": "msdnet",
        "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
        "best_prec1": 94.7,
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "momentum": 0.9, "params": [0, 1]}]},
    }
    src = tmp_path / "model_best.pth.tar"
    torch.save(release, src)
    out = convert_release_checkpoint(src, tmp_path / "w.safetensors", TINY)  # num_classes read from the file
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["model"] == TINY and f.metadata()["num_classes"] == "10"
    # the file's classes are declared in the overlay, so timm keeps the heads
    loaded = timm.create_model(TINY, pretrained=True, pretrained_cfg_overlay=dict(file=str(out), num_classes=10))
    via_path = timm.create_model(TINY, num_classes=10, checkpoint_path=str(out))
    x = torch.randn(2, 3, 32, 32)
    reference = _outputs(model, x)
    assert not torch.allclose(reference[-1][0], reference[-1][1])  # a non-degenerate network
    for a, b, c in zip(reference, _outputs(loaded, x), _outputs(via_path, x), strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
    # the nested-'model' layout of other training scripts, loaded directly
    torch.save({"model": model.state_dict()}, tmp_path / "other.pth")
    assert torch.equal(load_state_dict(tmp_path / "other.pth")["classifier.4.linear.bias"],
                       model.classifier[4].linear.bias)


def test_check_state_dict_names_every_problem():
    model = timm.create_model(TINY, num_classes=10)
    state = dict(model.state_dict())
    check_state_dict(model, state)  # fits: no error
    del state["blocks.0.0.layers.0.net.1.running_mean"]
    state["extra.weight"] = torch.zeros(1)
    state["blocks.1.0.layers.0.conv_normal.net.0.weight"] = torch.zeros(1, 1, 1, 1)
    with pytest.raises(StateDictMismatchError) as info:
        check_state_dict(model, state)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.missing == ["blocks.0.0.layers.0.net.1.running_mean"]
    assert err.unexpected == ["extra.weight"]
    assert [k for k, _, _ in err.mismatched] == ["blocks.1.0.layers.0.conv_normal.net.0.weight"]
    for key in ("blocks.0.0.layers.0.net.1.running_mean", "extra.weight", "(1, 1, 1, 1)", "fix:"):
        assert key in str(err)
    with pytest.raises(ValueError, match="num_classes=10"):
        check_state_dict(timm.create_model(TINY, num_classes=7), model.state_dict())


def test_convert_rejects_a_checkpoint_of_another_model(tmp_path):
    torch.save({"state_dict": {"conv.weight": torch.zeros(2, 3, 3, 3)}}, tmp_path / "x.pth.tar")
    with pytest.raises(ValueError, match="missing keys") as info:
        convert_release_checkpoint(tmp_path / "x.pth.tar", tmp_path / "x.safetensors", TINY)
    assert "unexpected keys (1):\n  conv.weight" in str(info.value)
    assert not (tmp_path / "x.safetensors").exists()


def test_unreadable_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_state_dict(tmp_path / "nope.safetensors")
    good = save_safetensors({"x": torch.ones(1000)}, tmp_path / "w.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[:200])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_state_dict(tmp_path / "cut.safetensors")
    torch.save({"state_dict": {"x": torch.ones(1000)}}, tmp_path / "w.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "w.pth").read_bytes()[:300])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_state_dict(tmp_path / "cut.pth")
    torch.save({"state_dict": {"x": torch.ones(1)}, "args": os.stat_result((0,) * 10)}, tmp_path / "obj.pth")
    with pytest.raises(ValueError, match="weights_only"):
        load_state_dict(tmp_path / "obj.pth")
    torch.save({"epoch": 1, "lr": 0.1}, tmp_path / "meta.pth")
    with pytest.raises(ValueError, match="no state dict"):
        load_state_dict(tmp_path / "meta.pth")


def test_cli_convert(tmp_path, capsys):
    model = _trained_like(num_classes=10)
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "r.pth.tar")
    out = tmp_path / "w.safetensors"
    assert cli.main(["convert", str(tmp_path / "r.pth.tar"), str(out), "--model", TINY, "--num-classes", "10"]) == 0
    assert "wrote" in capsys.readouterr().out
    state = load_state_dict(out)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    code = cli.main(["convert", str(tmp_path / "r.pth.tar"), str(tmp_path / "bad.safetensors"), "--model", TINY,
                     "--num-classes", "3"])
    assert code == 2
    assert "num_classes=10" in capsys.readouterr().err
    assert timm_l2w.save_safetensors is save_safetensors
