"""The timm.optim virtual-step rules against the optimizers' own step(), in float64.

For every option set (reached through timm's create_optimizer_v2 names and flags): theta' of the
rule equals the real step() on a deep copy, from an empty state and from a warmed-up state (a
scheduler-like lr change, one parameter that skipped a step), the state and groups are left as they
were, and the rule is differentiable in the gradients (gradcheck, reverse and forward mode).
"""
from __future__ import annotations

import copy
from typing import Dict, List, Optional, Sequence

import pytest
import timm
import timm.optim
import timm.optim.kron
import torch
import torch.autograd.forward_ad as fwAD
from timm.optim import create_optimizer_v2, list_optimizers
from torch import Tensor, nn

from timm_l2w.optim_step.timm_rules import GLOBAL_INPUTS, LAMB_CLIP_KEY, REFUSED, RULES

# torch's forward AD scripts its decompositions on first use (a jit deprecation warning)
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:FutureWarning")

LR = 0.01

# (create_optimizer_v2 name, extra kwargs, warm-up steps)
CASES = [
    ("sgdw", {}, 3),
    ("sgdw", dict(nesterov=False, dampening=0.1), 3),
    ("sgdw", dict(momentum=0.0, nesterov=False, maximize=True), 2),
    ("nesterovw", {}, 2),
    ("sgdc", {}, 3),
    ("csgdw", {}, 3),
    ("csgdw", dict(nesterov=False), 2),
    ("csgdc", dict(foreach=True), 3),
    ("nadamw", {}, 3),
    ("nadamw", dict(maximize=True, clipping_threshold=0.5), 3),
    ("nadamc", {}, 3),
    ("cnadamw", {}, 3),
    ("cnadamc", dict(foreach=True, clipping_threshold=0.5), 3),
    ("adamwlegacy", {}, 3),
    ("adamwlegacy", dict(amsgrad=True, maximize=True), 3),
    ("adamc", {}, 3),
    ("cadamw", {}, 3),
    ("cadamc", dict(amsgrad=True, clipping_threshold=0.5, foreach=True), 3),
    ("nadamlegacy", {}, 3),
    ("radamlegacy", {}, 3),
    ("radamlegacy", {}, 6),  # past 5 SMA steps: the rectified adaptive update
    ("rmsproptf", {}, 3),
    ("rmsproptf", dict(centered=True, lr_in_momentum=False), 3),
    ("rmsproptf", dict(momentum=0.0, centered=True), 2),
    ("rmsproptfw", {}, 3),
    ("rmsproptfc", dict(centered=True), 3),
    ("crmsproptf", {}, 3),
    ("crmsproptf", dict(lr_in_momentum=False, foreach=True), 3),
    ("lamb", {}, 3),
    ("lamb", dict(always_adapt=True, grad_averaging=False, bias_correction=False), 3),
    ("lamb", dict(max_grad_norm=None), 2),
    ("lamb", dict(max_grad_norm=1e3, foreach=True), 2),  # clipping inactive
    ("lambc", {}, 3),
    ("lambw", {}, 3),
    ("lambcw", dict(foreach=True), 3),
    ("lambcd", {}, 3),
    ("clamb", {}, 3),
    ("clambw", dict(always_adapt=True, foreach=True), 3),
    ("lars", {}, 3),
    ("lars", dict(momentum=0.0), 2),
    ("lars", dict(dampening=0.1, always_adapt=True), 3),
    ("larc", {}, 3),
    ("nlars", {}, 3),
    ("nlarc", dict(always_adapt=True, foreach=True), 3),
    ("adan", {}, 3),
    ("adanw", {}, 3),
    ("cadan", {}, 3),
    ("cadanw", dict(foreach=True), 3),
    ("adopt", {}, 3),
    ("adopt", dict(clip_exp=None, maximize=True), 3),
    ("adoptw", {}, 3),
    ("adoptc", {}, 3),
    ("cadopt", {}, 3),
    ("cadoptw", {}, 3),
    ("cadoptc", dict(foreach=True), 3),
    ("laprop", {}, 3),
    ("lapropc", {}, 3),
    ("claprop", dict(foreach=True), 3),
    ("adabelief", {}, 3),
    ("adabelief", dict(amsgrad=True), 3),
    ("adabelief", dict(decoupled_decay=False, foreach=True), 3),
    ("adabelief", dict(fixed_decay=True), 3),
    ("radabelief", {}, 3),  # below 5 SMA steps: the SGD-like update
    ("radabelief", dict(amsgrad=True, foreach=True), 6),  # the rectified adaptive update
    ("radabelief", dict(degenerated_to_sgd=False), 3),  # no update below 5 SMA steps, decay only
]

# timm.optim classes create_optimizer_v2 returns that have no rule (and are not refused): see timm_rules
NOT_COVERED = {
    timm.optim.Adafactor, timm.optim.AdafactorBigVision, timm.optim.Adahessian, timm.optim.AdamP,
    timm.optim.SGDP, timm.optim.kron.Kron, timm.optim.MADGRAD, timm.optim.Mars, timm.optim.Muon,
    timm.optim.NvNovoGrad,
}


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 2), nn.Flatten(), nn.Linear(8, 2)).double()


def _random_grads(params: Sequence[Tensor], skip: Optional[int] = None, spread: bool = False) -> List[Optional[Tensor]]:
    """Standard normal gradients; ``spread``: magnitudes log-uniform over 1e-3..1 (second moments that
    shrink, so amsgrad's running max binds)."""
    grads = [None if i == skip else torch.randn_like(p) for i, p in enumerate(params)]
    if spread:
        grads = [g if g is None else g * 10.0 ** -torch.rand_like(g).mul(3.0) for g in grads]
    return grads


def _real_step(model: nn.Module, opt: torch.optim.Optimizer, grads: Sequence[Optional[Tensor]]) -> None:
    for p, g in zip(model.parameters(), grads):
        p.grad = None if g is None else g.clone()
    opt.step()
    model.zero_grad(set_to_none=True)


def _virtual(model: nn.Module, opt: torch.optim.Optimizer, grads: Sequence[Optional[Tensor]]) -> List[Tensor]:
    """theta' by the rules, group by group, the way the virtual-step dispatch calls them."""
    params = list(model.parameters())
    index = {id(p): i for i, p in enumerate(params)}
    grads_of = {id(p): g for p, g in zip(params, grads)}
    rule = RULES[type(opt)]
    extra: Dict = {}
    if type(opt) in GLOBAL_INPUTS:
        extra = GLOBAL_INPUTS[type(opt)](
            opt, [grads_of[id(p)] for group in opt.param_groups for p in group["params"]])
    new = list(params)
    for group in opt.param_groups:
        ps = [p for p in group["params"] if grads_of[id(p)] is not None]
        if not ps:
            continue
        out = rule(ps, [grads_of[id(p)] for p in ps], [opt.state.get(p, {}) for p in ps], {**group, **extra})
        for p, q in zip(ps, out):
            new[index[id(p)]] = q
    return new


def _snapshot(opt: torch.optim.Optimizer) -> Dict:
    state = {id(p): {k: v.clone() if torch.is_tensor(v) else copy.deepcopy(v) for k, v in s.items()}
             for p, s in opt.state.items()}
    groups = [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return {"state": state, "groups": groups}


def _assert_same(a, b) -> None:
    assert type(a) is type(b)
    if torch.is_tensor(a):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


def _check_against_step(model: nn.Module, opt: torch.optim.Optimizer, grads: Sequence[Optional[Tensor]]) -> None:
    before = _snapshot(opt)
    params_before = [p.detach().clone() for p in model.parameters()]
    got = _virtual(model, opt, grads)
    _assert_same(_snapshot(opt), before)  # the rule read the state and groups, never wrote them
    for p, q in zip(model.parameters(), params_before):
        assert torch.equal(p, q)
    model_copy, opt_copy = copy.deepcopy((model, opt))
    _real_step(model_copy, opt_copy, grads)
    for new, real in zip(got, model_copy.parameters()):
        assert new.dtype == real.dtype
        torch.testing.assert_close(new, real, rtol=1e-12, atol=1e-14)


def _gradcheck(model: nn.Module, opt: torch.optim.Optimizer, grads: Sequence[Tensor]) -> None:
    """theta' of all groups together (LAMB's clip couples them) as a function of all the gradients."""
    def step(*gs):
        return tuple(_virtual(model, opt, list(gs)))

    inputs = tuple(g.detach().clone().requires_grad_() for g in grads)
    if isinstance(opt, timm.optim.RAdamLegacy):  # float32 inside: a coarser finite difference
        assert torch.autograd.gradcheck(step, inputs, eps=1e-3, atol=1e-4, rtol=1e-2)
    else:
        assert torch.autograd.gradcheck(step, inputs, check_forward_ad=True)


def _schedule(opt: torch.optim.Optimizer, i: int) -> None:
    """What a scheduler does between steps: a new lr per group (timm's lr_scale honoured if present)."""
    for group in opt.param_groups:
        group["lr"] = LR * group.get("lr_scale", 1.0) * (1.0 - 0.15 * i)


@pytest.mark.parametrize("name,kwargs,steps", CASES, ids=[f"{n}-{'-'.join(k) or 'default'}-{s}" for n, k, s in CASES])
def test_rule_is_the_real_step(name, kwargs, steps):
    model = _tiny_model()
    opt = create_optimizer_v2(model, name, lr=LR, weight_decay=0.05, **kwargs)
    assert type(opt) in RULES
    params = list(model.parameters())
    torch.manual_seed(1)
    first = _random_grads(params)
    _check_against_step(model, opt, first)  # empty state: lazily initialised as step() would
    _gradcheck(model, opt, first)
    for i in range(steps):
        _schedule(opt, i)
        _real_step(model, opt, _random_grads(params, skip=len(params) - 1 if i == 0 else None))
    _schedule(opt, steps)
    grads = _random_grads(params, spread=True)
    _check_against_step(model, opt, grads)
    _gradcheck(model, opt, grads)
    _check_against_step(model, opt, _random_grads(params, skip=0))  # a parameter without a gradient
    if isinstance(opt, timm.optim.Adan):
        opt.restart_opt()  # group step back to 0, moments zeroed, the previous gradients kept
        _check_against_step(model, opt, _random_grads(params))


def _zero_heavy_grads(params: Sequence[Tensor]) -> List[Tensor]:
    grads = [torch.randn_like(p) for p in params]
    grads[0].view(-1)[::2] = 0.0  # zero entries with a fresh zero second moment: sqrt(0)
    grads[1].zero_()  # a whole zero gradient: zero norms in trust ratios and clipping
    return grads


@pytest.mark.parametrize("name", sorted({n for n, _, _ in CASES}))
def test_derivative_is_finite_at_zero_gradients(name):
    """From an empty state, zero gradient entries and an all-zero tensor (and a zero parameter): the real
    step's values, and finite derivatives in both modes."""
    model = _tiny_model()
    with torch.no_grad():
        model[2].bias.zero_()
    opt = create_optimizer_v2(model, name, lr=LR, weight_decay=0.05, **({"always_adapt": True}
                              if name in ("lamb", "lars") else {}))
    params = list(model.parameters())
    torch.manual_seed(2)
    grads = _zero_heavy_grads(params)
    _check_against_step(model, opt, grads)
    inputs = [g.clone().requires_grad_() for g in grads]
    out = _virtual(model, opt, inputs)
    total = sum((o * torch.randn_like(o)).sum() for o in out)
    derivs = torch.autograd.grad(total, inputs, allow_unused=True)
    assert all(d is None or torch.isfinite(d).all() for d in derivs)
    with fwAD.dual_level():
        duals = [fwAD.make_dual(g, torch.randn_like(g)) for g in grads]
        tangents = [fwAD.unpack_dual(o).tangent for o in _virtual(model, opt, duals)]
    assert all(t is None or torch.isfinite(t).all() for t in tangents)


def _small_vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=16, embed_dim=24,
                             depth=2, num_heads=2, num_classes=4).double()


def test_timm_param_groups_with_layer_decay():
    """timm's groups (no weight decay on 1-d params, layer-wise lr) for every name the rules cover."""
    names = sorted({n for n, _, _ in CASES})
    for name in names:
        model = _small_vit()
        opt = create_optimizer_v2(model, name, lr=LR, weight_decay=0.05, layer_decay=0.75)
        assert len({g["lr_scale"] for g in opt.param_groups}) > 1
        params = list(model.parameters())
        torch.manual_seed(3)
        for i in range(2):
            _schedule(opt, i)
            _real_step(model, opt, [0.1 * g for g in _random_grads(params)])
        _schedule(opt, 2)
        _check_against_step(model, opt, [0.1 * g for g in _random_grads(params)])


def test_every_factory_name_is_covered_refused_or_listed():
    """Every timm.optim class create_optimizer_v2 builds has a rule, a refusal or is listed as not covered;
    every factory name of a covered class appears in CASES (each of timm's option presets is tested)."""
    info = timm.optim.get_optimizer_info
    names = [n for n in list_optimizers() if not isinstance(info(n).opt_class, str)]  # apex / bnb: lazy imports
    tested = {n for n, _, _ in CASES}
    for name in names:
        cls = info(name).opt_class
        if not cls.__module__.startswith("timm.optim"):
            continue  # torch.optim classes: torch_rules
        assert cls in RULES or cls in REFUSED or cls in NOT_COVERED, name
        if cls in RULES:
            assert name in tested, name
    assert not set(RULES) & set(REFUSED)
    assert not set(RULES) & NOT_COVERED


@pytest.mark.parametrize("name,dtype", [("adabelief", torch.bfloat16), ("radabelief", torch.float16),
                                        ("radamlegacy", torch.float64)])
def test_classes_that_compute_in_float32(name, dtype):
    """AdaBelief steps low-precision parameters in float32, RAdamLegacy every parameter (float64 too):
    the rules do the same, to the bit."""
    model = _tiny_model().to(dtype)
    opt = create_optimizer_v2(model, name, lr=LR, weight_decay=0.05)
    params = list(model.parameters())
    torch.manual_seed(4)
    for _ in range(6):
        _real_step(model, opt, _random_grads(params))
    grads = _random_grads(params)
    model_copy, opt_copy = copy.deepcopy((model, opt))
    _real_step(model_copy, opt_copy, grads)
    for new, real in zip(_virtual(model, opt, grads), model_copy.parameters()):
        assert new.dtype == real.dtype and torch.equal(new, real)


def test_lion_is_refused_with_the_reason():
    reason = REFUSED[timm.optim.Lion]
    assert "sign" in reason and "zero derivative" in reason and "meta gradient" in reason
    assert "'adamw'" in reason  # says what to use instead
    model = _tiny_model()
    assert type(create_optimizer_v2(model, "clion", lr=LR)) in REFUSED


def test_lamb_rule_needs_the_global_clip():
    """Lamb's max_grad_norm clips by all groups' gradients together: without lamb_global_inputs the rule
    refuses rather than clip by one group alone."""
    model = _tiny_model()
    opt = create_optimizer_v2(model, "lamb", lr=LR, weight_decay=0.05)
    params = list(model.parameters())
    group = opt.param_groups[0]
    with pytest.raises(ValueError, match="lamb_global_inputs"):
        RULES[type(opt)](group["params"], [torch.ones_like(p) for p in group["params"]],
                         [{} for _ in group["params"]], group)
    clip = GLOBAL_INPUTS[type(opt)](opt, [torch.full_like(p, 3.0) for p in params])[LAMB_CLIP_KEY]
    total = sum(p.numel() for p in params)
    torch.testing.assert_close(clip, torch.tensor(3.0 * total ** 0.5, dtype=torch.float64))


def test_adopt_first_step_leaves_the_parameters():
    """ADOPT's first step only records g**2: theta' is theta and does not depend on the gradient."""
    model = _tiny_model()
    opt = create_optimizer_v2(model, "adoptw", lr=LR, weight_decay=0.05)
    grads = [torch.randn_like(p).requires_grad_() for p in model.parameters()]
    out = _virtual(model, opt, grads)
    for p, q in zip(model.parameters(), out):
        assert torch.equal(p, q) and q is not p
    assert all(d is None for d in torch.autograd.grad(sum(q.sum() for q in out), grads, allow_unused=True))
