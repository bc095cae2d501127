"""Weight predictor, weight normalisation and the weighted multi-exit loss."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from timm_l2w import WeightedMultiExitLoss, WeightPredictor
from timm_l2w.weighting import (
    exit_confidences,
    exit_losses,
    normalize_weights,
    predictor_inputs,
    sample_weights,
    weighted_multi_exit_loss,
)


def _outputs(batch=6, num_exits=3, num_classes=5):
    return [torch.randn(batch, num_classes, requires_grad=True) for _ in range(num_exits)]


def test_predictor_layout_is_a_plain_mlp_and_loads_its_state_dict():
    plain = nn.Sequential(nn.Linear(3, 7), nn.ReLU(), nn.Linear(7, 3), nn.Tanh())
    net = WeightPredictor(3, "loss", hidden_sizes=(7,))
    assert list(net.state_dict()) == list(plain.state_dict())
    net.load_state_dict(plain.state_dict())
    x = torch.randn(4, 3)
    torch.testing.assert_close(net(x), plain(x))
    # sizes inferred from a prefixed state_dict (e.g. saved from a DDP-wrapped MLP)
    both = nn.Sequential(nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 4), nn.Tanh())
    loaded = WeightPredictor.from_state_dict({f"module.{k}": v for k, v in both.state_dict().items()}, "both")
    assert (loaded.num_exits, loaded.in_features, loaded.hidden_sizes) == (4, 8, (5, 5))
    x = torch.randn(2, 8)
    torch.testing.assert_close(loaded(x), both(x))
    with pytest.raises(ValueError, match="input_type"):
        WeightPredictor.from_state_dict(both.state_dict(), "loss")


def test_predictor_output_range_and_input_sizes():
    for input_type, width in [("loss", 4), ("conf", 4), ("both", 8)]:
        net = WeightPredictor(4, input_type, hidden_sizes=(6, 5))
        G = net(torch.randn(10, width) * 10)
        assert G.shape == (10, 4) and (G.abs() < 1).all()
        with pytest.raises(ValueError, match="predictor_inputs"):
            net(torch.randn(10, width + 1))


@pytest.mark.parametrize("constraint,dim", [("row", 0), ("col", 1), ("mat", None)])
def test_each_constraint_gives_zero_mean_along_its_axis(constraint, dim):
    G = torch.rand(7, 4, dtype=torch.float64) * 2 - 1
    eps = 0.8
    W = normalize_weights(G, eps, constraint)
    centred = (W - 1) / eps
    mean = centred.mean() if dim is None else centred.mean(dim=dim)
    torch.testing.assert_close(mean, torch.zeros_like(mean), atol=1e-12, rtol=0)
    # and only along that axis: the other means are generally not zero
    if dim is not None:
        assert centred.mean(dim=1 - dim).abs().max() > 1e-3
    torch.testing.assert_close(W - 1, eps * (G - (G.mean() if dim is None else G.mean(dim, keepdim=True))))


def test_exit_losses_match_per_exit_cross_entropy_with_label_smoothing():
    outputs, target = _outputs(), torch.randint(0, 5, (6,))
    for ls in (0.0, 0.1):
        L = exit_losses(outputs, target, label_smoothing=ls)
        assert L.shape == (6, 3)
        for k, logits in enumerate(outputs):
            expected = F.cross_entropy(logits, target, reduction="none", label_smoothing=ls)
            torch.testing.assert_close(L[:, k], expected)


def test_predictor_inputs_are_detached_rows():
    outputs, target = _outputs(), torch.randint(0, 5, (6,))
    L = exit_losses(outputs, target)
    conf = exit_confidences(outputs)
    torch.testing.assert_close(conf, torch.stack([o.softmax(-1).amax(-1) for o in outputs], 1).detach())
    assert not predictor_inputs(L, outputs, "loss").requires_grad
    torch.testing.assert_close(predictor_inputs(L, outputs, "conf"), conf)
    torch.testing.assert_close(predictor_inputs(L, outputs, "both"), torch.cat([L.detach(), conf], 1))
    with pytest.raises(ValueError, match="outputs="):
        predictor_inputs(L, None, "conf")


def test_eps_zero_or_no_predictor_is_exactly_the_equal_weight_loss():
    outputs, target = _outputs(), torch.randint(0, 5, (6,))
    baseline = sum(F.cross_entropy(o, target) for o in outputs)
    net = WeightPredictor(3, hidden_sizes=(8,))
    for loss, W in [weighted_multi_exit_loss(outputs, target, net, eps=0.0),
                    weighted_multi_exit_loss(outputs, target, None)]:
        assert torch.equal(W, torch.ones(6, 3))
        torch.testing.assert_close(loss, baseline, rtol=1e-6, atol=0)
    module = WeightedMultiExitLoss(net, eps=0.0)
    torch.testing.assert_close(module(outputs, target), baseline, rtol=1e-6, atol=0)


def test_weighted_loss_uses_predictor_weights_without_gradient_into_it():
    outputs, target = _outputs(), torch.randint(0, 5, (6,))
    net = WeightPredictor(3, "both", hidden_sizes=(8,))
    crit = WeightedMultiExitLoss(net, eps=0.8, constraint="mat")
    loss = crit(outputs, target)
    L = exit_losses(outputs, target)
    W = 1 + 0.8 * (net(predictor_inputs(L, outputs, "both")) - net(predictor_inputs(L, outputs, "both")).mean())
    torch.testing.assert_close(crit.last_weights, W.detach())
    torch.testing.assert_close(loss, (W.detach() * L).mean(0).sum())
    loss.backward()
    assert all(p.grad is None for p in net.parameters())
    assert all(o.grad is not None for o in outputs)
    # sample_weights itself stays differentiable (the meta step needs it)
    assert sample_weights(net, L, outputs, 0.8, "col").requires_grad


def test_bad_inputs_give_clear_errors():
    outputs, target = _outputs(), torch.randint(0, 5, (6,))
    with pytest.raises(ValueError, match="eps must be >= 0"):
        normalize_weights(torch.zeros(2, 3), -0.1)
    with pytest.raises(ValueError, match="unknown constraint 'rows'"):
        normalize_weights(torch.zeros(2, 3), 0.5, "rows")
    with pytest.raises(ValueError, match="unknown input_type 'logits'"):
        WeightPredictor(3, "logits")
    with pytest.raises(ValueError, match="num_exits=3"):
        weighted_multi_exit_loss(outputs, target, WeightPredictor(4, hidden_sizes=(4,)))
    with pytest.raises(TypeError, match="forward_exits"):
        exit_losses(outputs[0], target)
    with pytest.raises(ValueError, match="class indices"):
        exit_losses(outputs, target[:3])
