"""Soft targets (timm's Mixup / CutMix, label smoothing) and timm's loss modules in the multi-exit loss."""
from __future__ import annotations

import pytest
import torch
from timm.data import Mixup
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn

from timm_l2w import ExitCriterion, WeightedMultiExitLoss, WeightPredictor
from timm_l2w.errors import LabelError
from timm_l2w.weighting import exit_losses, weighted_multi_exit_loss


def _mixed(batch=8, num_classes=5, num_exits=3, dtype=torch.float64):
    torch.manual_seed(0)
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=num_classes)
    x, y = mixup(torch.randn(batch, 1, 8, 8), torch.randint(0, num_classes, (batch,)))
    outputs = [torch.randn(batch, num_classes, dtype=dtype, requires_grad=True) for _ in range(num_exits)]
    return outputs, y.to(dtype), x


def test_mixup_targets_with_equal_weighting_are_timms_soft_target_loss_summed_over_exits():
    outputs, y, _ = _mixed()
    assert y.shape == (8, 5) and not torch.equal(y.max(dim=1).values, torch.ones(8, dtype=y.dtype))
    expected = sum(SoftTargetCrossEntropy()(o, y) for o in outputs)
    for criterion in (None, SoftTargetCrossEntropy()):
        loss = WeightedMultiExitLoss(eps=0.0, criterion=criterion)(outputs, y)
        torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    # and through the learned weights: W * L with the soft per-sample losses
    net = WeightPredictor(3, hidden_sizes=(4,)).double()
    loss, weights = weighted_multi_exit_loss(outputs, y, net, eps=0.8, constraint="col")
    per_sample = torch.stack([-(y * o.log_softmax(-1)).sum(-1) for o in outputs], 1)
    torch.testing.assert_close(loss, (weights * per_sample).mean(0).sum(), rtol=1e-12, atol=0)


def test_timm_loss_modules_give_their_own_loss_per_sample():
    torch.manual_seed(1)
    logits = [torch.randn(6, 4, dtype=torch.float64) for _ in range(2)]
    hard = torch.randint(0, 4, (6,))
    soft = torch.softmax(torch.randn(6, 4, dtype=torch.float64), -1)
    cases = [
        (LabelSmoothingCrossEntropy(0.1), hard),
        (nn.CrossEntropyLoss(label_smoothing=0.2), hard),
        (nn.CrossEntropyLoss(), soft),
        (BinaryCrossEntropy(smoothing=0.1), hard),
        (BinaryCrossEntropy(smoothing=0.0, target_threshold=0.2), soft),
        (BinaryCrossEntropy(smoothing=0.1, sum_classes=True), hard),
        (BinaryCrossEntropy(smoothing=0.1, pos_weight=2.0), hard),
    ]
    for module, target in cases:
        losses = exit_losses(logits, target, criterion=module)
        assert losses.shape == (6, 2)
        for k, z in enumerate(logits):
            torch.testing.assert_close(losses[:, k].mean(), module(z, target).double(), rtol=1e-10, atol=1e-12,
                                       msg=f"{module} exit {k}")


def test_bce_per_sample_losses_are_not_just_the_batch_mean():
    logits = [torch.randn(4, 3, dtype=torch.float64)]
    losses = exit_losses(logits, torch.tensor([0, 1, 2, 0]), criterion=BinaryCrossEntropy(smoothing=0.0))
    assert losses[:, 0].unique().numel() == 4
    expected = nn.functional.binary_cross_entropy_with_logits(
        logits[0], nn.functional.one_hot(torch.tensor([0, 1, 2, 0]), 3).double(), reduction="none").mean(-1)
    torch.testing.assert_close(losses[:, 0], expected)


def test_unsmoothed_criterion_drops_only_the_smoothing():
    c = ExitCriterion.from_module(BinaryCrossEntropy(smoothing=0.1, target_threshold=0.3))
    plain = c.unsmoothed()
    assert (plain.kind, plain.label_smoothing, plain.target_threshold) == ("bce", 0.0, 0.3)
    assert ExitCriterion("ce", 0.0).unsmoothed() == ExitCriterion("ce", 0.0)


def test_bad_soft_targets_and_losses_give_clear_errors():
    outputs, y, _ = _mixed()
    with pytest.raises(LabelError, match=r"\[batch, num_classes\] = \[8, 5\]"):
        exit_losses(outputs, y[:, :4])
    with pytest.raises(LabelError, match="probabilities in"):
        exit_losses(outputs, y * float("nan"))
    with pytest.raises(LabelError, match="probabilities in"):
        exit_losses(outputs, y - 1)
    with pytest.raises(TypeError, match="unsupported loss MSELoss"):
        exit_losses(outputs, y, criterion=nn.MSELoss())
    with pytest.raises(ValueError, match="set the smoothing in one place"):
        exit_losses(outputs, y, label_smoothing=0.1, criterion=SoftTargetCrossEntropy())
    with pytest.raises(ValueError, match="class weights"):
        exit_losses(outputs, torch.zeros(8, dtype=torch.long), criterion=nn.CrossEntropyLoss(weight=torch.ones(5)))


@pytest.mark.parametrize("criterion", [SoftTargetCrossEntropy(), BinaryCrossEntropy(smoothing=0.1)])
def test_mixup_targets_through_l2w_both_backends_agree(tiny_model, criterion):
    from timm_l2w import L2W

    model = tiny_model.double()
    num_classes = model.num_classes
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=num_classes)
    x, y = mixup(torch.randn(8, 1, 8, 8, dtype=torch.float64), torch.randint(0, num_classes, (8,)))
    y = y.double()
    grads, losses = {}, {}
    for backend in ("higher", "func"):
        torch.manual_seed(3)
        net = WeightPredictor(model.num_exits, hidden_sizes=(6,)).double()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        l2w = L2W(model, opt, eps=0.8, backend=backend, weight_net=net, meta_lr=1e-2, criterion=criterion)
        (xt, yt), (xm, ym) = list(l2w.split(x, y))[0], (x[4:], y[4:])
        result_loss = l2w.meta_update((xt, yt), (xm, ym))
        grads[backend] = torch.cat([g.reshape(-1) for g in l2w.last_meta_grads])
        losses[backend] = result_loss
        assert grads[backend].abs().sum() > 0
        loss = l2w.loss(model(xt), yt)
        assert torch.isfinite(loss)
    torch.testing.assert_close(grads["higher"], grads["func"], rtol=1e-9, atol=1e-12)
    assert losses["higher"] == pytest.approx(losses["func"], rel=1e-12)
