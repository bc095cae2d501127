"""The examples run (tiny settings, fresh processes as a user would start them)."""
from __future__ import annotations

import os
import subprocess
import sys

import timm
import torch
from safetensors.torch import load_file

import timm_l2w
from tests.helpers import ROOT

EXAMPLES = ROOT / "examples"
ENV = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")


def _run(script: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EXAMPLES / script), *argv], env=ENV, capture_output=True,
                          text=True, timeout=600)


def test_accelerate_loop_adds_few_marked_l2w_lines_and_runs():
    source = (EXAMPLES / "accelerate_loop.py").read_text()
    marked = [line for line in source.splitlines() if "# L2W" in line]
    assert 1 <= len(marked) <= 10
    proc = _run("accelerate_loop.py", "--steps", "2", "--batch-size", "8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("test accuracy per exit")]
    assert line and line[0].count("%") == 5


def test_finetune_loads_backbone_and_gets_new_heads(tmp_path):
    torch.manual_seed(1)
    pretrained = timm.create_model("msdnet_l2w_cifar_tiny", num_classes=100)
    with torch.no_grad():
        for p in pretrained.parameters():
            p.add_(0.5)  # far from any fresh initialisation
    ckpt = timm_l2w.save_safetensors(pretrained, tmp_path / "pre.safetensors")
    out = tmp_path / "ft.safetensors"
    proc = _run("finetune_pretrained.py", "--checkpoint", str(ckpt), "--model", "msdnet_l2w_cifar_tiny",
                "--steps", "2", "--batch-size", "8", "--lr", "0.001", "--output", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "100 -> 10 classes, exit classifiers start fresh" in proc.stdout
    tuned, before = load_file(out), pretrained.state_dict()
    back = timm.create_model("msdnet_l2w_cifar_tiny", pretrained=True, num_classes=10,  # the README's route
                             pretrained_cfg_overlay=dict(file=str(out), num_classes=10))
    assert all(torch.equal(v, tuned[k]) for k, v in back.state_dict().items())
    heads = [k for k, v in tuned.items() if v.shape != before[k].shape]
    assert heads and all(tuned[k].shape[0] == 10 for k in heads)  # digits: 10 classes
    body = [k for k in tuned if k not in heads and tuned[k].is_floating_point() and "running" not in k]
    # the backbone was loaded (then moved only slightly), not re-initialised
    assert max(float((tuned[k] - before[k]).abs().max()) for k in body) < 0.1


def test_finetune_rejects_a_checkpoint_of_another_architecture(tmp_path):
    other = timm.create_model("resnet18", num_classes=10)
    ckpt = timm_l2w.save_safetensors(other, tmp_path / "resnet.safetensors")
    proc = _run("finetune_pretrained.py", "--checkpoint", str(ckpt), "--model", "msdnet_l2w_cifar_tiny",
                "--steps", "1", "--batch-size", "8")
    assert proc.returncode != 0 and "another architecture" in proc.stderr


def test_timm_recipe_adds_at_most_six_marked_l2w_lines_and_runs():
    source = (EXAMPLES / "timm_recipe.py").read_text()
    marked = [line for line in source.splitlines() if "# L2W" in line]
    assert 1 <= len(marked) <= 6
    for piece in ("create_optimizer_v2", "layer_decay", "create_scheduler_v2", "Mixup", "ModelEmaV3",
                  "accelerator.accumulate", "clip_grad_norm_"):
        assert piece in source, piece
    proc = _run("timm_recipe.py", "--epochs", "1", "--max-steps", "2", "--batch-size", "8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 updates" in proc.stdout  # 2 loader batches = 4 halves, accumulated in pairs
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("EMA test accuracy per exit")]
    assert line and line[0].count("%") == 4


def test_finetune_timm_backbone_loads_a_local_timm_checkpoint_and_saves_a_rebuildable_wrapper(tmp_path):
    out = tmp_path / "tuned.safetensors"
    proc = _run("finetune_timm_backbone.py", "--backbone", "test_resnet", "--steps", "2", "--batch-size", "16",
                "--output", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = [ln for ln in proc.stdout.splitlines() if ln.startswith("backbone test_resnet:")]
    assert loaded and "90 of 90 tensors" in loaded[0] and "(2 classifier tensors dropped)" in loaded[0]
    assert sum(ln.startswith("budget:") for ln in proc.stdout.splitlines()) >= 3
    assert any(ln.startswith("early exit under") for ln in proc.stdout.splitlines())
    tuned = load_file(out)
    back = timm.create_model("multi_exit_l2w", pretrained=True, pretrained_cfg_overlay=dict(file=str(out)))
    assert back.num_classes == 10 and all(torch.equal(v, tuned[k]) for k, v in back.state_dict().items())
