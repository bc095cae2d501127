"""The L2W hook at its edges: a skipped first meta step, a single-exit model, eps above the sign bound."""
from __future__ import annotations

import math
import warnings

import pytest
import timm
import torch

import timm_l2w
from tests.helpers import ROOT, register_tiny
from timm_l2w.cli.train import main as train_main
from timm_l2w.meta import step as meta_mod

TINY = register_tiny()
BASE = ["--model", TINY, "--batch-size", "32", "--lr", "0.05", "--held-out", "1197", "--log-with", "none"]


def test_skipped_first_meta_step_gives_no_scheduler_warning_and_the_meta_lr_follows_the_updates(monkeypatch):
    model = timm.create_model(TINY, num_classes=4, in_chans=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    l2w = timm_l2w.L2W(model, opt, hidden_sizes=(8,), meta_lr=1e-3, total_steps=4)
    real = meta_mod.meta_step

    def first_is_nan(*a, **k):  # the first meta step has a non-finite meta loss and is skipped
        result = real(*a, **k)
        if l2w.step == 0:
            result.meta_loss = torch.tensor(float("nan"))
        return result

    monkeypatch.setattr(meta_mod, "meta_step", first_is_nan)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 4, (8,))
    lrs = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            for xt, yt in l2w.split(x, y):
                l2w.loss(model(xt), yt)
                lrs.append(l2w.meta_optimizer.param_groups[0]["lr"])
    assert l2w.meta_skipped == 1
    assert not [w for w in caught if "lr_scheduler" in str(w.message)]
    assert lrs == pytest.approx([0.5e-3 * (1 + math.cos(math.pi * min(t, 4) / 4)) for t in range(1, 7)])


def test_l2w_on_a_single_exit_model_points_to_multi_exit_wrapper():
    model = timm.create_model("resnet18", num_classes=10)
    with pytest.raises(ValueError, match=r"not a multi-exit model.*MultiExitWrapper\('resnet18'"):
        timm_l2w.L2W(model, torch.optim.SGD(model.parameters(), lr=0.1))




def test_eps_above_the_sign_bound_warns_and_is_allowed():
    from timm_l2w.validation import negative_weights_note
    from timm_l2w.weighting import normalize_weights

    note = negative_weights_note(0.8, "col", 5, 32)  # the paper's CIFAR setting, 5 exits
    assert note and "0.625" in note and "-0.28" in note and "docs/method.md" in note
    extreme = torch.tensor([[-1.0, 1.0, 1.0, 1.0, 1.0]])  # G's limits: one exit low, the others high
    assert float(normalize_weights(extreme, 0.8, "col").min()) == pytest.approx(-0.28)
    assert negative_weights_note(0.625, "col", 5, 32) is None and negative_weights_note(0.3, "mat", 5, 32) is None
    assert "Weights can be negative" in (ROOT / "docs" / "method.md").read_text()


def test_eps_warning_during_training(tmp_path):
    with pytest.warns(UserWarning, match="below zero"):
        args = BASE + ["--max-steps", "1", "--no-eval", "--no-progress", "--output", str(tmp_path / "a")]
        assert train_main(args) == 0
    import warnings as _warnings

    with _warnings.catch_warnings():
        _warnings.simplefilter("error", UserWarning)  # 3 exits: 0.75 keeps every weight >= 0, no warning
        assert train_main(BASE + ["--max-steps", "1", "--eps", "0.75", "--no-eval", "--no-progress",
                                  "--output", str(tmp_path / "b")]) == 0
