"""IMTA's gradient equilibrium and one-for-all knowledge distillation (issue 15, item 1): losses and
gradients against hand computations, composition with the L2W meta step, and the train CLI flags."""
from __future__ import annotations

import json
import math

import pytest
import timm
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from timm.models import register_model
from torch import nn

from tests.helpers import TinyMultiExit, register_tiny
from timm_l2w import L2W, Distillation, WeightPredictor, meta_step
from timm_l2w.exits import exit_distribution
from timm_l2w.models.base import MultiExitModel, equilibrium_split
from timm_l2w.weighting import distillation_losses, exit_losses, training_losses, weighted_multi_exit_loss


class StagedTiny(MultiExitModel):
    """Conv-tanh blocks with pooled linear exits, through the default stage (block, exit features, head)."""

    def __init__(self, num_exits: int = 3, num_classes: int = 4, in_chans: int = 1, width: int = 3):
        super().__init__()
        self.num_exits, self.num_classes, self.in_chans = num_exits, num_classes, in_chans
        chans = [in_chans] + [width] * num_exits
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(chans[k], chans[k + 1], 3, padding=1), nn.Tanh())
                                    for k in range(num_exits))
        self.heads = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))
                                   for k in range(num_exits))

    def forward_block(self, index, state):
        return self.blocks[index](state)

    def forward_exit_features(self, index, state):
        return state

    def forward_exit_head(self, index, x, pre_logits=False):
        return self.heads[index](x)


STAGED = "l2w_test_staged"
if not timm.is_model(STAGED):
    def l2w_test_staged(pretrained: bool = False, **kwargs):
        return StagedTiny(num_classes=kwargs.get("num_classes", 10), in_chans=kwargs.get("in_chans", 3), width=6)

    register_model(l2w_test_staged)


# ----------------------------------------------------------------------------- distillation


def _softmax(row, t=1.0):
    e = [math.exp(v / t) for v in row]
    return [v / sum(e) for v in e]


def test_distillation_loss_and_gradient_match_hand_computation():
    torch.manual_seed(0)
    B, K, C, T, alpha = 3, 3, 4, 2.0, 0.3
    logits = [torch.randn(B, C, dtype=torch.float64, requires_grad=True) for _ in range(K)]
    y = torch.tensor([0, 2, 3])
    got = training_losses(logits, y, distill=Distillation(T, alpha))
    for i in range(B):
        teacher = _softmax(logits[-1][i].tolist(), T)
        for k in range(K):
            ce = -math.log(_softmax(logits[k][i].tolist())[int(y[i])])
            if k == K - 1:
                expected = ce
            else:
                student = _softmax(logits[k][i].tolist(), T)
                kl = sum(p * math.log(p / q) for p, q in zip(teacher, student))
                expected = (1 - alpha) * ce + alpha * T * T * kl
            assert float(got[i, k].detach()) == pytest.approx(expected, rel=1e-10)
    got.sum().backward()
    for k in range(K):
        for i in range(B):
            p = _softmax(logits[k][i].tolist())
            onehot = [float(c == int(y[i])) for c in range(C)]
            if k == K - 1:  # the teacher: its own CE only, nothing from the students' KL terms
                expected = [a - b for a, b in zip(p, onehot)]
            else:  # d/dz [(1-a) CE + a T^2 KL] = (1-a)(p - y) + a T (softmax(z/T) - teacher)
                ps, pt = _softmax(logits[k][i].tolist(), T), _softmax(logits[-1][i].tolist(), T)
                expected = [(1 - alpha) * (a - b) + alpha * T * (s - t) for a, b, s, t in zip(p, onehot, ps, pt)]
            assert logits[k].grad[i].tolist() == pytest.approx(expected, abs=1e-10)
    # the last column of the KL table is 0; no distillation = the plain CE
    assert torch.equal(distillation_losses(logits, T)[:, -1], torch.zeros(B, dtype=torch.float64))
    assert torch.equal(training_losses(logits, y), exit_losses(logits, y))


def test_weighted_loss_with_distillation_weights_the_mixed_losses():
    torch.manual_seed(1)
    logits = [torch.randn(6, 4) for _ in range(3)]
    y = torch.randint(0, 4, (6,))
    net = WeightPredictor(3, hidden_sizes=(5,))
    d = Distillation(3.0, 0.5)
    loss, W = weighted_multi_exit_loss(logits, y, net, eps=0.8, distill=d)
    _, W_plain = weighted_multi_exit_loss(logits, y, net, eps=0.8)
    assert torch.equal(W, W_plain)  # the predictor reads the CE losses either way
    assert float(loss) == pytest.approx(float((W * training_losses(logits, y, distill=d)).mean(0).sum()), rel=1e-6)
    equal, _ = weighted_multi_exit_loss(logits, y, None, distill=d)
    assert float(equal) == pytest.approx(float(training_losses(logits, y, distill=d).mean(0).sum()), rel=1e-6)


@pytest.mark.parametrize("kw, message", [(dict(temperature=0), "temperature"), (dict(alpha=1.5), "alpha"),
                                         (dict(alpha=float("nan")), "alpha")])
def test_distillation_settings_are_checked(kw, message):
    with pytest.raises(ValueError, match=message):
        Distillation(**kw)


# ----------------------------------------------------------------------------- gradient equilibrium


def test_equilibrium_split_rescales_only_what_the_exit_reads():
    t0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    t1 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    exit_state, onward = equilibrium_split([t0, t1], [t1], index=0, num_exits=3)  # a = 1/3, b = 2/3
    assert torch.equal(exit_state[1], t1) and torch.equal(onward[1], t1) and onward[0] is t0
    (3 * exit_state[1].sum() + 5 * onward[0].sum() + 7 * onward[1].sum()).backward()
    assert torch.allclose(t0.grad, torch.full_like(t0, 5.0))
    assert torch.allclose(t1.grad, torch.full_like(t1, 3 / 3 + 7 * 2 / 3))
    # forward mode: the tangent is the inner product with that rescaled gradient
    d0, d1 = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    with fwAD.dual_level():
        e, o = equilibrium_split([fwAD.make_dual(t0.detach(), d0), fwAD.make_dual(t1.detach(), d1)],
                                 [], 0, 3)  # nothing read: identity both ways
        out = fwAD.unpack_dual(3 * e[1].sum() + 5 * o[0].sum() + 7 * o[1].sum()).tangent
        assert float(out) == pytest.approx(float(5 * d0.sum() + 10 * d1.sum()))
    with fwAD.dual_level():
        x0, x1 = fwAD.make_dual(t0.detach(), d0), fwAD.make_dual(t1.detach(), d1)
        e, o = equilibrium_split([x0, x1], [x1], 0, 3)
        out = fwAD.unpack_dual(3 * e[1].sum() + 5 * o[0].sum() + 7 * o[1].sum()).tangent
        assert float(out) == pytest.approx(float((t0.grad * d0).sum() + (t1.grad * d1).sum()))


def test_gradient_equilibrium_gives_each_block_the_mean_of_its_exits_gradients():
    """Hand form: block j (0-based) gets (1 / (K - j)) * sum_{k >= j} dL_k/dtheta_j; exit heads their own gradient."""
    torch.manual_seed(2)
    K = 3
    model = StagedTiny(K).double()
    x, y = torch.randn(5, 1, 6, 6, dtype=torch.float64), torch.randint(0, 4, (5,))
    reference = []  # reference[k][name]: gradient of exit k's loss alone, no equilibrium
    for k in range(K):
        model.zero_grad()
        F.cross_entropy(model.forward_exits(x)[k], y).backward()
        reference.append({n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
                          for n, p in model.named_parameters()})
    plain_outputs = model.forward_exits(x)
    model.set_gradient_equilibrium(True)
    model.zero_grad()
    outputs = model.forward_exits(x)
    assert all(torch.equal(a, b) for a, b in zip(outputs, plain_outputs))  # forward values unchanged
    sum(F.cross_entropy(o, y) for o in outputs).backward()
    for name, p in model.named_parameters():
        j = int(name.split(".")[1])
        if name.startswith("blocks"):
            expected = sum(reference[k][name] for k in range(j, K)) / (K - j)
        else:
            expected = reference[j][name]
        assert torch.allclose(p.grad, expected, atol=1e-12), name
    with torch.inference_mode():  # no rescaling (and no autograd) in inference
        assert torch.equal(model.forward_exits(x)[-1], plain_outputs[-1].detach())


def test_gradient_equilibrium_needs_the_default_stage():
    with pytest.raises(TypeError, match="overrides forward_stage"):
        TinyMultiExit().set_gradient_equilibrium(True)
    TinyMultiExit().set_gradient_equilibrium(False)  # switching it off is always fine


def test_gradient_equilibrium_on_msdnet_keeps_outputs_and_trains():
    model = timm.create_model("msdnet_l2w_cifar_tiny", num_classes=5)
    model.train()
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    plain = model(x)
    model.set_gradient_equilibrium(True)
    torch.manual_seed(0)
    outputs = model(x)
    assert all(torch.equal(a, b) for a, b in zip(outputs, plain))
    sum(o.sum() for o in outputs).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- with L2W


def _l2w_setup():
    torch.manual_seed(3)
    model = StagedTiny(3).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9, weight_decay=1e-3)
    x, y = torch.randn(16, 1, 6, 6, dtype=torch.float64), torch.randint(0, 4, (16,))
    sum(F.cross_entropy(o, y) for o in model(x)).backward()
    opt.step()
    opt.zero_grad()
    net = WeightPredictor(3, hidden_sizes=(4,)).double()
    return model, opt, net, (x[:8], y[:8]), (x[8:], y[8:])


def test_meta_gradient_with_equilibrium_and_distillation_agrees_across_backends():
    model, opt, net, train, meta = _l2w_setup()
    p = exit_distribution(0.75, 3)
    d = Distillation(2.0, 0.4)
    plain = torch.cat([g.reshape(-1) for g in meta_step(model, opt, net, train, meta, p, backend="func").grads])
    model.set_gradient_equilibrium(True)
    grads = {}
    for backend in ("higher", "func"):
        result = meta_step(model, opt, net, train, meta, p, backend=backend, distill=d)
        grads[backend] = torch.cat([g.reshape(-1) for g in result.grads])
    # 'higher' differentiates through the rescaled backward, 'func' uses the forward-mode adjoint
    assert torch.allclose(grads["higher"], grads["func"], rtol=1e-8, atol=1e-12)
    assert not torch.allclose(grads["func"], plain, rtol=1e-3)  # the methods change the virtual step


@pytest.mark.parametrize("backend", ["higher", "func"])
def test_l2w_hook_trains_with_both_methods_on(backend):
    model, opt, net, _, _ = _l2w_setup()
    l2w = L2W(model, opt, eps=0.8, hidden_sizes=(4,), backend=backend, distill=Distillation(), meta_lr=1e-2)
    model.set_gradient_equilibrium(True)  # after building the hook: the 'higher' copy follows the model
    before = [t.detach().clone() for t in l2w.weight_net.parameters()]
    x, y = torch.randn(16, 1, 6, 6, dtype=torch.float64), torch.randint(0, 4, (16,))
    for xt, yt in l2w.split(x, y):
        loss = l2w.loss(model(xt), yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert l2w.step == 2 and math.isfinite(l2w.last_meta_loss) and not l2w.last_meta_skipped
    assert any(not torch.equal(a, b) for a, b in zip(before, l2w.weight_net.parameters()))
    with pytest.raises(TypeError, match="Distillation"):
        L2W(model, opt, distill={"temperature": 2})


# ----------------------------------------------------------------------------- the train CLI


@pytest.mark.parametrize("weighting", ["l2w", "uniform"])
def test_train_cli_flags(tmp_path, weighting):
    from timm_l2w.cli.train import main, parse_args

    args = parse_args(["--model", STAGED, "--distill", "--distill-temperature", "3", "--distill-alpha", "0.5",
                       "--gradient-equilibrium"])
    assert args.distill and args.distill_temperature == 3.0 and args.distill_alpha == 0.5 and args.gradient_equilibrium
    defaults = parse_args(["--model", STAGED])
    assert not defaults.distill and not defaults.gradient_equilibrium
    assert (defaults.distill_temperature, defaults.distill_alpha) == (1.0, 0.1)
    out = tmp_path / weighting
    code = main(["--model", STAGED, "--no-progress", "--batch-size", "16", "--lr", "0.05", "--max-steps", "2",
                 "--held-out", "100", "--no-eval", "--weighting", weighting, "--output", str(out),
                 "--distill", "--gradient-equilibrium"])
    assert code == 0
    row = json.loads((out / "log.json").read_text())[-1]
    assert math.isfinite(row["loss"])


def test_train_cli_method_errors(tmp_path, capsys):
    from timm_l2w.cli.train import main

    base = ["--no-progress", "--batch-size", "16", "--max-steps", "1", "--no-eval", "--output", str(tmp_path)]
    assert main(["--model", register_tiny(), "--gradient-equilibrium"] + base) == 2
    err = capsys.readouterr().err
    assert "overrides forward_stage" in err and "Traceback" not in err
    for flag, value in (("--distill-alpha", "2"), ("--distill-temperature", "0"), ("--distill-temperature", "nan")):
        assert main(["--model", STAGED, "--distill", flag, value] + base) == 2
        err = capsys.readouterr().err
        assert flag in err and "Traceback" not in err, err  # named as the flag the user typed


def test_resume_with_other_method_flags_is_refused(tmp_path, capsys):
    from timm_l2w.cli.train import main

    base = ["--model", STAGED, "--no-progress", "--batch-size", "16", "--max-steps", "2", "--held-out", "100",
            "--no-eval", "--output", str(tmp_path), "--weighting", "uniform", "--distill"]
    assert main(base + ["--stop-after-steps", "1"]) == 0
    assert main([a for a in base if a != "--distill"] + ["--resume", "auto"]) == 2
    err = capsys.readouterr().err
    assert "--distill True (now False)" in err and "Traceback" not in err
    assert main(base + ["--resume", "auto"]) == 0  # the same flags resume


def test_l2w_split_swaps_the_halves():
    """Each half of a loader batch is the training half of one update and the meta half of the other."""
    model, opt, _, _, _ = _l2w_setup()
    l2w = L2W(model, opt, hidden_sizes=(4,), backend="func")
    seen = []
    l2w.meta_update = lambda train, meta, *a, **k: seen.append((train, meta)) or 0.0
    x, y = torch.randn(10, 1, 6, 6, dtype=torch.float64), torch.arange(10) % 4
    halves = []
    for xt, yt in l2w.split(x, y):
        halves.append((xt, yt))
        l2w.loss(model(xt), yt)
    assert torch.equal(halves[0][0], x[:5]) and torch.equal(halves[1][0], x[5:])
    (t0, m0), (t1, m1) = seen
    assert torch.equal(t0[0], x[:5]) and torch.equal(t0[1], y[:5])
    assert torch.equal(m0[0], x[5:]) and torch.equal(m0[1], y[5:])
    assert torch.equal(t1[0], x[5:]) and torch.equal(t1[1], y[5:])
    assert torch.equal(m1[0], x[:5]) and torch.equal(m1[1], y[:5])
