"""The virtual step is the real update (issue 21): every supported optimizer, clipping, accumulation.

For each optimizer built by timm's ``create_optimizer_v2`` (weight decay + layer-wise lr decay, so
several param groups with their own lr and decay), with warmed-up state, float64:
(a) the meta loss ``meta_step`` reports equals the meta loss of the model after the REAL optimizer's
``step()`` on the same weighted-loss gradient, and (b) the meta gradient matches central finite
differences of that real-step meta loss in the predictor's parameters, for both backends; the same
with gradient clipping (timm's modes) and with gradient accumulation over two micro-batches.
Also: the torch rules against ``step()`` (every option, fresh and warm state, state untouched,
gradcheck), the refusals, the clip functions against torch/timm, and L2W's accumulation schedule
under accelerate and without it.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional, Sequence, Tuple

import pytest
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.utils import dispatch_clip_grad

from tests.helpers import P3, TinyMultiExit, cpu_accelerator
from timm_l2w import L2W, WeightPredictor, meta_step, optim_step
from timm_l2w.exits import assign_exits, exit_distribution
from timm_l2w.meta import meta_loss
from timm_l2w.optim_step import clip_gradients, virtual_step
from timm_l2w.weighting import exit_confidences, weighted_multi_exit_loss

F64 = torch.float64

EPS, CONSTRAINT = 0.8, "col"
BACKENDS = ("higher", "func")

# create_optimizer_v2 names -> lr (each optimizer at a typical scale, large enough for a clear meta gradient)
TORCH_NAMES = {"sgd": 0.1, "momentum": 0.1, "adam": 1e-2, "adamw": 1e-2, "nadam": 1e-2, "radam": 1e-2,
               "adamax": 1e-2, "rmsprop": 1e-3, "adagrad": 5e-2, "adadelta": 1.0}
TIMM_NAMES = {"sgdw": 0.1, "nadamw": 1e-2, "rmsproptf": 1e-3, "lamb": 1e-2, "lars": 0.1, "adan": 1e-2,
              "adopt": 1e-2, "laprop": 1e-2, "adabelief": 1e-2, "adamwlegacy": 1e-2}
NAMES = {**TORCH_NAMES, **TIMM_NAMES}
# how the real loop turns the gradient into the update: (clip, accumulate two micro-batches)
VARIANTS = {
    "plain": (None, False),
    "clip-norm": (("norm", 0.05), False),
    "clip-value": (("value", 2e-3), False),
    "accumulate": (None, True),
    "accumulate-clip-agc": (("agc", 0.01), True),
}


class LayeredTiny(TinyMultiExit):
    """TinyMultiExit with a timm ``group_matcher``: layer-wise lr decay gives each block its own lr."""

    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(blocks=[(r"^(?:blocks|heads)\.(\d+)", None)])


def _setup(name: str, seed: int = 0, warm: int = 3):
    """Model, optimizer with timm's param groups and warmed-up state, predictor, and the batches:
    training half, meta half, an earlier micro-batch of the accumulation window."""
    torch.manual_seed(seed)
    model = LayeredTiny(num_exits=3, num_classes=4, in_chans=1).to(F64)
    opt = create_optimizer_v2(model, name, lr=NAMES[name], weight_decay=0.05, layer_decay=0.75)
    for group in opt.param_groups:  # what timm's schedulers do with layer_decay's lr_scale
        group["lr"] = NAMES[name] * group.get("lr_scale", 1.0)
    assert len({g["lr"] for g in opt.param_groups}) == 3 and len(opt.param_groups) == 6
    for _ in range(warm):
        x, y = torch.randn(8, 1, 6, 6, dtype=F64), torch.randint(0, 4, (8,))
        opt.zero_grad()
        sum(F.cross_entropy(o, y) for o in model(x)).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    net = WeightPredictor(3, hidden_sizes=(8,)).to(F64)
    x, y = torch.randn(24, 1, 6, 6, dtype=F64), torch.randint(0, 4, (24,))
    return model, opt, net, (x[:8], y[:8]), (x[8:16], y[8:16]), (x[16:], y[16:])


def _weighted_loss(model, net, batch) -> torch.Tensor:
    return weighted_multi_exit_loss(model(batch[0]), batch[1], net, EPS, CONSTRAINT)[0]


def _real_meta_loss(model, opt, net, train, meta, clip=None, earlier=None, net0=None,
                    p=P3) -> Tuple[float, torch.Tensor]:
    """Meta loss (and exit assignment) of the model after the REAL update: (the earlier micro-batch's
    backward with the predictor ``net0``, then) the training half's weighted loss with ``net``, each
    scaled by 1/(micro-batches) as accelerate scales it, backward, timm's clip, ``optimizer.step()``."""
    model, opt = copy.deepcopy((model, opt))
    opt.zero_grad(set_to_none=True)
    micro = 1 if earlier is None else 2
    if earlier is not None:
        (_weighted_loss(model, net0, earlier) / micro).backward()
    (_weighted_loss(model, net, train) / micro).backward()
    if clip is not None:
        dispatch_clip_grad(model.parameters(), clip[1], mode=clip[0])
    opt.step()
    with torch.no_grad():
        outputs = model(meta[0])
    return float(meta_loss(outputs, meta[1], p)), assign_exits(exit_confidences(outputs), p)


def _accumulated(model, net, earlier) -> List[Optional[torch.Tensor]]:
    """``.grad`` after the earlier micro-batch's backward (loss / 2), in named_parameters order."""
    model = copy.deepcopy(model)
    (_weighted_loss(model, net, earlier) / 2).backward()
    return [p.grad for _, p in model.named_parameters()]


def _shifted(net: WeightPredictor, direction: torch.Tensor, h: float) -> WeightPredictor:
    net = copy.deepcopy(net)
    with torch.no_grad():
        offset = 0
        for t in net.parameters():
            t += h * direction[offset: offset + t.numel()].view_as(t)
            offset += t.numel()
    return net


def _check_real_update(model, opt, net, train, meta, clip=None, earlier=None, h=1e-5):
    """(a) and (b) for both backends."""
    kwargs: Dict[str, Any] = {}
    if clip is not None:
        kwargs.update(clip_mode=clip[0], clip_grad=clip[1])
    if earlier is not None:
        kwargs.update(accumulated_grads=_accumulated(model, net, earlier), grad_accum_steps=2)
    state = copy.deepcopy(opt.state_dict())
    real = lambda n: _real_meta_loss(model, opt, n, train, meta, clip, earlier, net)  # noqa: E731
    value, assigned = real(net)
    grads = {}
    for backend in BACKENDS:
        result = meta_step(model, opt, net, train, meta, P3, eps=EPS, constraint=CONSTRAINT, backend=backend, **kwargs)
        assert abs(float(result.meta_loss) - value) <= 1e-12 * abs(value), (backend, float(result.meta_loss), value)
        grads[backend] = torch.cat([g.reshape(-1) for g in result.grads])
    assert str(opt.state_dict()) == str(state), "the meta step changed the optimizer state"
    g = grads["higher"]
    assert g.norm() > 1e-6, "meta gradient is trivially zero: the test would prove nothing"
    torch.testing.assert_close(grads["func"], g, rtol=1e-9, atol=1e-12 * float(g.norm()))
    gen = torch.Generator().manual_seed(1)
    directions = [g / g.norm()] + [torch.randn(g.numel(), generator=gen, dtype=F64) for _ in range(2)]
    for d in directions:
        d = d / d.norm()
        (plus, a_plus), (minus, a_minus) = real(_shifted(net, d, h)), real(_shifted(net, d, -h))
        assert torch.equal(a_plus, assigned) and torch.equal(a_minus, assigned), "exit assignment flipped: FD invalid"
        fd = (plus - minus) / (2 * h)
        # h small enough that no ReLU (model or predictor) crosses its kink; allow for the rounding of the quotient
        rounding = 100 * torch.finfo(F64).eps * abs(value) / h
        assert abs(fd - float(g @ d)) <= 1e-6 * float(g.norm()) + rounding, (fd, float(g @ d), float(g.norm()))


def _clip_is_active(model, net, train, clip) -> None:
    """The clip threshold of the test really changes the gradient (else the clip test proves nothing)."""
    model = copy.deepcopy(model)
    _weighted_loss(model, net, train).backward()
    before = [p.grad.clone() for p in model.parameters()]
    dispatch_clip_grad(model.parameters(), clip[1], mode=clip[0])
    assert any(not torch.equal(b, p.grad) for b, p in zip(before, model.parameters())), clip


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("name", list(NAMES))
def test_virtual_step_is_the_real_update_and_meta_gradient_matches_finite_differences(name, variant):
    clip, accumulate = VARIANTS[variant]
    model, opt, net, train, meta, earlier = _setup(name)
    if clip is not None:
        _clip_is_active(model, net, train, clip)
    _check_real_update(model, opt, net, train, meta, clip, earlier if accumulate else None)


def test_first_step_of_a_fresh_optimizer_and_a_registered_model_with_timm_layer_decay():
    """msdnet_l2w_cifar_tiny, AdamW with timm's layer decay (dozens of groups), no optimizer state yet."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("msdnet_l2w_cifar_tiny", num_classes=4).to(F64)
    opt = create_optimizer_v2(model, "adamw", lr=1e-2, weight_decay=0.05, layer_decay=0.75)
    for group in opt.param_groups:
        group["lr"] = 1e-2 * group["lr_scale"]
    assert len({g["lr"] for g in opt.param_groups}) > 10
    net = WeightPredictor(model.num_exits, hidden_sizes=(8,)).to(F64)
    x, y = torch.randn(16, 3, 32, 32, dtype=F64), torch.randint(0, 4, (16,))
    p = exit_distribution(0.75, model.num_exits)
    value, _ = _real_meta_loss(model, opt, net, (x[:8], y[:8]), (x[8:], y[8:]), p=p)
    results = [meta_step(model, opt, net, (x[:8], y[:8]), (x[8:], y[8:]), p, eps=EPS, constraint=CONSTRAINT, backend=b)
               for b in BACKENDS]
    for r in results:
        assert abs(float(r.meta_loss) - value) <= 1e-12 * value
    assert not opt.state, "the meta step initialised the real optimizer's state"
    a, b = (torch.cat([g.reshape(-1) for g in r.grads]) for r in results)
    assert a.norm() > 0
    torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12 * float(a.norm()))


# --- the torch rules against step() -------------------------------------------------------------------
TORCH_OPTIONS = [
    (torch.optim.SGD, dict(lr=0.1)),
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0.2, weight_decay=1e-2, maximize=True)),
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2)),
    (torch.optim.Adam, dict(lr=1e-2, weight_decay=1e-2)),
    (torch.optim.Adam, dict(lr=1e-2, amsgrad=True, maximize=True, betas=(0.8, 0.99))),
    (torch.optim.Adam, dict(lr=1e-2, weight_decay=1e-2, decoupled_weight_decay=True)),
    (torch.optim.AdamW, dict(lr=1e-2, weight_decay=5e-2, amsgrad=True)),
    (torch.optim.NAdam, dict(lr=1e-2, weight_decay=5e-2, momentum_decay=6e-3)),
    (torch.optim.NAdam, dict(lr=1e-2, weight_decay=5e-2, decoupled_weight_decay=True, maximize=True)),
    (torch.optim.RAdam, dict(lr=1e-2, weight_decay=5e-2)),
    (torch.optim.RAdam, dict(lr=1e-2, weight_decay=5e-2, decoupled_weight_decay=True, maximize=True)),
    (torch.optim.Adamax, dict(lr=1e-2, weight_decay=5e-2, maximize=True)),
    (torch.optim.RMSprop, dict(lr=1e-3, weight_decay=5e-2)),
    (torch.optim.RMSprop, dict(lr=1e-3, momentum=0.9, centered=True, maximize=True)),
    (torch.optim.Adagrad, dict(lr=5e-2, weight_decay=5e-2, lr_decay=1e-2, initial_accumulator_value=0.1)),
    (torch.optim.Adagrad, dict(lr=5e-2, maximize=True)),
    (torch.optim.Adadelta, dict(lr=1.0, rho=0.8, weight_decay=5e-2, maximize=True)),
]


@pytest.mark.parametrize("warm", [0, 6])
@pytest.mark.parametrize("cls,kwargs", TORCH_OPTIONS, ids=lambda v: getattr(v, "__name__", None) or str(v))
def test_torch_rule_reproduces_step_and_is_differentiable(cls, kwargs, warm):
    torch.manual_seed(0)
    model = LayeredTiny().to(F64)
    heads = [p for n, p in model.named_parameters() if n.startswith("heads")]
    others = [p for n, p in model.named_parameters() if not n.startswith("heads")]
    opt = cls([{"params": others}, {"params": heads, "lr": kwargs["lr"] / 3}], **kwargs)
    x, y = torch.randn(8, 1, 6, 6, dtype=F64), torch.randint(0, 4, (8,))
    params = list(model.parameters())
    for _ in range(warm):  # warm = 0: the optimizer's first step (empty state)
        opt.zero_grad()
        sum(F.cross_entropy(o, y) for o in model(x)).backward()
        opt.step()
    opt.zero_grad()
    sum(F.cross_entropy(o, y) for o in model(torch.randn_like(x))).backward()
    params[0].grad = None  # a parameter without gradient is skipped, as step() does
    grads = [p.grad for p in params]
    state = copy.deepcopy(opt.state_dict())
    expected = virtual_step(opt, params, grads)
    assert str(opt.state_dict()) == str(state), "the rule modified the optimizer state"
    opt.step()
    for e, p in zip(expected, params):
        torch.testing.assert_close(e, p, rtol=1e-12, atol=1e-14)
    # differentiable in the gradients (float64 gradcheck on a few parameters, the rest held fixed)
    values = [p.detach() for p in params]
    index = [1, len(params) - 2, len(params) - 1]

    def step_of(*chosen):
        g = list(grads)
        for i, c in zip(index, chosen):
            g[i] = c
        new = virtual_step(opt, params, g, values)
        return tuple(new[i] for i in index)

    assert torch.autograd.gradcheck(step_of, [grads[i].detach().clone().requires_grad_() for i in index],
                                    eps=1e-7, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.NAdam, torch.optim.RMSprop, torch.optim.Adagrad])
def test_zero_gradient_entries_give_a_finite_exact_derivative(cls):
    """A fresh state and an exactly-zero gradient entry (a dead unit): sqrt(0) must not turn the meta
    gradient into NaN. For Adam the update there is ``-lr * g / (|g| + eps)``: derivative ``-lr / eps``."""
    p = torch.zeros(4, dtype=F64, requires_grad=True)
    opt = cls([p], lr=1e-3)
    g = torch.tensor([0.0, 0.5, -0.25, 0.0], dtype=F64, requires_grad=True)
    (new,) = virtual_step(opt, [p], [g], [p.detach()])
    (u,) = torch.autograd.grad(new, g, torch.ones_like(new))
    assert torch.isfinite(u).all()
    if cls is torch.optim.Adam:
        torch.testing.assert_close(u[0], torch.tensor(-1e-3 / 1e-8, dtype=F64))


# --- refusals and lookup ------------------------------------------------------------------------------
def test_sign_and_closure_optimizers_are_refused_with_the_reason_and_unknown_ones_list_the_supported(tiny_model):
    with pytest.raises(TypeError, match="sign"):
        L2W(tiny_model, torch.optim.Rprop(tiny_model.parameters()))
    with pytest.raises(TypeError, match="closure"):
        L2W(tiny_model, torch.optim.LBFGS(tiny_model.parameters()))
    with pytest.raises(TypeError, match="torch.AdamW") as info:
        L2W(tiny_model, torch.optim.ASGD(tiny_model.parameters()))
    assert "no rule for torch.optim.asgd.ASGD" in str(info.value)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        L2W(tiny_model, object())


def test_lion_is_refused_saying_why(tiny_model):
    with pytest.raises(TypeError, match="sign"):
        L2W(tiny_model, create_optimizer_v2(tiny_model, "lion"))


def test_subclasses_use_their_base_rule_only_when_they_step_like_it(tiny_model):
    class RenamedAdamW(torch.optim.AdamW):
        def __init__(self, params):
            super().__init__(params, lr=1e-3)

    class OwnStep(torch.optim.AdamW):
        def step(self, closure=None):
            return super().step(closure)

    assert optim_step.rule_for(RenamedAdamW(tiny_model.parameters())) is optim_step.RULES[torch.optim.AdamW]
    with pytest.raises(TypeError, match="no rule for"):
        optim_step.rule_for(OwnStep(tiny_model.parameters()))


# --- clipping -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode,value", [("norm", 0.1), ("norm", 1e3), ("value", 0.01), ("agc", 0.01)])
def test_clip_gradients_is_timms_dispatch_clip_grad(mode, value):
    torch.manual_seed(0)
    model = TinyMultiExit().to(F64)
    x, y = torch.randn(8, 1, 6, 6, dtype=F64), torch.randint(0, 4, (8,))
    sum(F.cross_entropy(o, y) for o in model(x)).backward()
    params = list(model.parameters())
    params[0].grad = None  # skipped by both
    grads = [p.grad for p in params]
    clipped = clip_gradients(grads, params, value, mode)
    dispatch_clip_grad(params, value, mode=mode)
    assert clipped[0] is None
    for c, p in zip(clipped[1:], params[1:]):
        torch.testing.assert_close(c, p.grad, rtol=1e-13, atol=1e-16)
    with pytest.raises(ValueError, match="norm, value, agc"):
        clip_gradients(grads, params, value, "max")


def test_l2w_checks_the_clip_and_accumulation_settings(tiny_model):
    opt = torch.optim.SGD(tiny_model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="clip_grad"):
        L2W(tiny_model, opt, clip_grad=0.0)
    with pytest.raises(ValueError, match="unknown clip_mode"):
        L2W(tiny_model, opt, clip_grad=1.0, clip_mode="max")
    with pytest.raises(ValueError, match="grad_accum_steps"):
        L2W(tiny_model, opt, grad_accum_steps=0)
    with pytest.raises(ValueError, match="1 tensor\\(s\\) that are not parameters of the model"):
        L2W(tiny_model, opt, clip_grad=1.0, clip_parameters=[*tiny_model.parameters(), torch.zeros(1)])
    with pytest.raises(ValueError, match="accum_steps"):
        L2W(tiny_model, opt).loss(tiny_model(torch.randn(2, 1, 6, 6)), torch.tensor([0, 1]), accum_steps=0)


# --- L2W's accumulation schedule ------------------------------------------------------------------------
def _accumulating_run(use_accelerate: bool, batches: Sequence[Tuple[torch.Tensor, torch.Tensor]], meta_interval=1,
                      clip=None, scaler_scale: Optional[float] = None, dtype=F64):
    """L2W with AdamW in a loop accumulating 2 micro-batches (the halves of a loader batch) per update,
    accelerate's order (backward, step, zero_grad). Returns the L2W hook and, for every meta step, the
    meta loss L2W reported beside the real-step meta loss of a snapshot taken just before it."""
    torch.manual_seed(0)
    model = LayeredTiny().to(dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    kwargs = {} if clip is None else dict(clip_grad=clip[1], clip_mode=clip[0])
    if use_accelerate:
        acc = cpu_accelerator(gradient_accumulation_steps=2)
        if scaler_scale is not None:  # accelerate's fp16 loss scaling, on the CPU
            acc.scaler = torch.amp.GradScaler("cpu", init_scale=scaler_scale)
        l2w = L2W(model, opt, meta_interval=meta_interval, hidden_sizes=(8,), backend="func", accelerator=acc, **kwargs)
        model, opt = acc.prepare(model, opt)
        l2w.model, l2w.optimizer = model, opt
    else:
        acc = None
        l2w = L2W(model, opt, meta_interval=meta_interval, hidden_sizes=(8,), backend="func", grad_accum_steps=2,
                  **kwargs)
    pairs = []
    for x, y in batches:
        for xt, yt in l2w.split(x.to(dtype), y):
            with acc.accumulate(model) if acc is not None else _nothing():
                snapshot = (*copy.deepcopy((model, opt.optimizer if acc else opt, l2w.weight_net)),
                            [None if p.grad is None else p.grad.clone() for p in model.parameters()])
                meta_half = l2w._halves[1 - l2w._current]
                loss = l2w.loss(model(xt), yt)
                if l2w.meta_step_ran:
                    real = _snapshot_real_meta_loss(snapshot, (xt, yt), meta_half, clip, acc)
                    pairs.append((l2w.last_meta_loss, real))
                if acc is not None:
                    acc.backward(loss)
                else:
                    (loss / 2).backward()  # the loop scales the loss by 1/N, as timm's train.py and accelerate do
                if acc is not None or l2w._micro == 0:
                    if clip is not None:
                        if acc is not None:
                            acc.unscale_gradients()
                        dispatch_clip_grad(model.parameters(), clip[1], mode=clip[0])
                    opt.step()
                    opt.zero_grad()
    return l2w, pairs


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _snapshot_real_meta_loss(snapshot, train, meta, clip, acc) -> float:
    """The real-step meta loss from a snapshot of (model, optimizer, predictor, .grad) before the meta step."""
    model, opt, net, accumulated = snapshot
    scale = float(acc.scaler.get_scale()) if acc is not None and acc.scaler is not None else 1.0
    for p, g in zip(model.parameters(), accumulated):
        p.grad = None if g is None else g / scale
    (_weighted_loss(model, net, train) / 2).backward()
    if clip is not None:
        dispatch_clip_grad(model.parameters(), clip[1], mode=clip[0])
    opt.step()
    with torch.no_grad():
        return float(meta_loss(model(meta[0]), meta[1], P3))


def _batches(n: int, dtype=F64):
    gen = torch.Generator().manual_seed(3)
    return [(torch.randn(16, 1, 6, 6, generator=gen, dtype=dtype), torch.randint(0, 4, (16,), generator=gen))
            for _ in range(n)]


@pytest.mark.parametrize("use_accelerate", [True, False])
def test_accumulation_meta_step_where_the_optimizer_steps_models_the_accumulated_update(use_accelerate):
    l2w, pairs = _accumulating_run(use_accelerate, _batches(3), clip=("norm", 0.05))
    assert l2w.step == 3 and len(pairs) == 3  # 6 micro-batches, 3 real updates, a meta step at each
    for reported, real in pairs:
        assert abs(reported - real) <= 1e-12 * abs(real), (reported, real)


def test_accumulation_meta_interval_counts_real_updates_and_resume_keeps_the_window():
    l2w, pairs = _accumulating_run(False, _batches(4), meta_interval=2)
    assert l2w.step == 4 and len(pairs) == 2  # updates 0 and 2
    state = l2w.state_dict()
    assert state["step"] == 4 and state["micro_step"] == 0


def test_accumulation_unscales_accelerates_fp16_loss_scale():
    """Under fp16 .grad holds the scaled gradients: the virtual step divides the loss scale out."""
    l2w, pairs = _accumulating_run(True, _batches(2, torch.float32), scaler_scale=1024.0, dtype=torch.float32)
    assert l2w.step == 2 and len(pairs) == 2
    for reported, real in pairs:
        assert abs(reported - real) <= 1e-5 * abs(real), (reported, real)


def test_accumulation_with_zero_grad_before_backward_is_a_clear_error():
    """README's order (zero_grad, backward, step) under accumulate() drops the window's earlier gradients
    on the step and leaks the last ones into the next window: L2W says which order to use."""
    acc = cpu_accelerator(gradient_accumulation_steps=2)
    torch.manual_seed(0)
    model = LayeredTiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    l2w = L2W(model, opt, hidden_sizes=(8,), accelerator=acc)
    model, opt = acc.prepare(model, opt)
    l2w.model, l2w.optimizer = model, opt
    with pytest.raises(RuntimeError, match="zero_grad\\(\\) right after optimizer.step\\(\\)"):
        for x, y in _batches(2, torch.float32):
            for xt, yt in l2w.split(x, y):
                with acc.accumulate(model):
                    loss = l2w.loss(model(xt), yt)
                    opt.zero_grad()
                    acc.backward(loss)
                    opt.step()


def test_accumulation_steps_given_twice_must_agree(tiny_model):
    acc = cpu_accelerator(gradient_accumulation_steps=2)
    opt = torch.optim.SGD(tiny_model.parameters(), lr=0.1)
    assert L2W(tiny_model, opt, accelerator=acc, grad_accum_steps=2).grad_accum_steps == 2
    assert L2W(tiny_model, opt, accelerator=acc).grad_accum_steps == 2
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        L2W(tiny_model, opt, accelerator=acc, grad_accum_steps=4)
