"""The L2W meta step (virtual SGD step, meta loss, second-order gradient) and the L2W hook."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import timm_l2w
from tests.helpers import P3, DropoutMultiExit, TinyMultiExit
from timm_l2w import L2W, WeightPredictor, meta_step
from timm_l2w.exits import assign_exits, exit_distribution
from timm_l2w.meta import meta_loss
from timm_l2w.optim_step import virtual_step
from timm_l2w.weighting import exit_confidences


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest (and steadiest on a loaded machine) on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _setup(dtype=torch.float32, momentum=0.9, dampening=0.0, nesterov=False, weight_decay=1e-3, lr=0.5,
           input_type="loss", warm=True, hidden=6):
    """Tiny model + SGD with momentum buffers already present (one real step taken) + predictor."""
    model = TinyMultiExit().to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, dampening=dampening,
                          nesterov=nesterov, weight_decay=weight_decay)
    x, y = torch.randn(16, 1, 6, 6, dtype=dtype), torch.randint(0, 4, (16,))
    if warm:
        sum(F.cross_entropy(o, y) for o in model(x)).backward()
        opt.step()
        opt.zero_grad()
    net = WeightPredictor(3, input_type, hidden_sizes=(hidden,)).to(dtype)
    return model, opt, net, (x[:8], y[:8]), (x[8:], y[8:])


def _snapshot(model, opt):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    opt_state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    return state, opt_state


def _assert_unchanged(model, opt, snap):
    state, opt_state = snap
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), f"{k} changed"
    assert {id(p) for p in opt.state} == set(opt_state)
    for p, s in opt.state.items():
        for k, v in s.items():
            assert torch.equal(v, opt_state[id(p)][k]), f"optimizer state {k} changed"


@pytest.mark.parametrize("config", [
    dict(dampening=0.1, nesterov=False, constraint="col", input_type="loss"),
    dict(dampening=0.0, nesterov=True, constraint="mat", input_type="both"),
])
def test_meta_gradient_matches_central_finite_differences(config):
    model, opt, net, train, meta = _setup(torch.float64, dampening=config["dampening"],
                                          nesterov=config["nesterov"], input_type=config["input_type"], hidden=3)
    assert all("momentum_buffer" in s for s in opt.state.values())
    kw = dict(eps=0.8, constraint=config["constraint"], backend="func")
    grads = torch.cat([g.reshape(-1) for g in meta_step(model, opt, net, train, meta, P3, **kw).grads])
    phi = list(net.parameters())
    h, fd = 1e-6, []
    with torch.no_grad():
        for t in phi:
            flat = t.view(-1)
            for j in range(flat.numel()):
                old = float(flat[j])
                values = []
                for sign in (1, -1):
                    flat[j] = old + sign * h
                    values.append(float(meta_step(model, opt, net, train, meta, P3, **kw).meta_loss))
                flat[j] = old
                fd.append((values[0] - values[1]) / (2 * h))
    fd = torch.tensor(fd, dtype=torch.float64)
    assert fd.norm() > 1e-6, "meta gradient is trivially zero: the test would prove nothing"
    rel = float((grads - fd).norm() / fd.norm())
    assert rel <= 1e-4, rel


@pytest.mark.parametrize("kw", [
    dict(momentum=0.0, weight_decay=0.0),
    dict(momentum=0.9, weight_decay=1e-2),
    dict(momentum=0.9, dampening=0.3, weight_decay=1e-2),
    dict(momentum=0.8, nesterov=True, weight_decay=1e-2),
    dict(momentum=0.9, weight_decay=1e-2, maximize=True),
])
@pytest.mark.parametrize("warm", [False, True])
def test_virtual_sgd_step_reproduces_torch_sgd(kw, warm):
    model = TinyMultiExit().double()
    heads = list(model.heads.parameters())
    others = [p for n, p in model.named_parameters() if not n.startswith("heads")]
    opt = torch.optim.SGD([{"params": others}, {"params": heads, "lr": 0.05}], lr=0.3, **kw)
    x, y = torch.randn(8, 1, 6, 6, dtype=torch.float64), torch.randint(0, 4, (8,))
    for _ in range(2 if warm else 1):
        opt.zero_grad()
        sum(F.cross_entropy(o, y) for o in model(x)).backward()
        params = list(model.parameters())
        grads = [p.grad.clone() for p in params]
        grads[0] = None  # a parameter without gradient is skipped, like SGD does
        params[0].grad = None
        expected = virtual_step(opt, params, grads)
        opt.step()
        for e, p in zip(expected, params):
            torch.testing.assert_close(e, p, rtol=1e-12, atol=1e-12)


def test_backends_agree_on_tiny_model_and_shared_forward_is_the_same_step():
    model, opt, net, train, meta = _setup(torch.float64)
    results = {b: meta_step(model, opt, net, train, meta, P3, backend=b) for b in ("higher", "func")}
    shared = meta_step(model, opt, net, train, meta, P3, backend="func", train_outputs=model(train[0]))
    shared_higher = meta_step(model, opt, net, train, meta, P3, backend="higher", train_outputs=model(train[0]))
    for r in (results["func"], shared_higher, shared):
        torch.testing.assert_close(r.meta_loss, results["higher"].meta_loss)
        for a, b in zip(r.grads, results["higher"].grads):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    # the gradient is left in .grad too
    for t, g in zip(net.parameters(), shared.grads):
        torch.testing.assert_close(t.grad, g)


def test_backends_agree_on_msdnet_cifar():
    if "msdnet_l2w_cifar" not in timm.list_models("msdnet*"):
        pytest.skip("msdnet_l2w_cifar is not registered yet")
    model = timm.create_model("msdnet_l2w_cifar", num_classes=10)
    num_exits = model.num_exits
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    sum(F.cross_entropy(o, y) for o in model(x)).backward()
    opt.step()
    opt.zero_grad()
    net = WeightPredictor(num_exits, hidden_sizes=(32,))
    p = exit_distribution(0.75, num_exits)
    snap = _snapshot(model, opt)
    r = {b: meta_step(model, opt, net, (x[:4], y[:4]), (x[4:], y[4:]), p, backend=b) for b in ("higher", "func")}
    _assert_unchanged(model, opt, snap)
    torch.testing.assert_close(r["higher"].meta_loss, r["func"].meta_loss)
    scale = max(float(g.abs().max()) for g in r["func"].grads)
    assert scale > 0
    for a, b in zip(r["higher"].grads, r["func"].grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4 * scale)


@pytest.mark.parametrize("backend", ["higher", "func"])
def test_meta_part_leaves_params_buffers_and_optimizer_state_unchanged(backend):
    model, opt, net, train, meta = _setup()
    snap = _snapshot(model, opt)
    meta_step(model, opt, net, train, meta, P3, backend=backend)
    _assert_unchanged(model, opt, snap)
    # inside the hook: after the user's own forward, l2w.loss (the meta part) changes nothing
    l2w = L2W(model, opt, backend=backend, hidden_sizes=(6,))
    x, y = torch.cat([train[0], meta[0]]), torch.cat([train[1], meta[1]])
    for xt, yt in l2w.split(x, y):
        outputs = model(xt)
        snap = _snapshot(model, opt)
        loss = l2w.loss(outputs, yt)
        _assert_unchanged(model, opt, snap)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert l2w.step == 2 and l2w.last_meta_loss is not None


def test_meta_loss_is_mean_ce_per_assigned_exit():
    outputs = [torch.randn(12, 5, dtype=torch.float64) for _ in range(3)]
    target = torch.randint(0, 5, (12,))
    exits = assign_exits(exit_confidences(outputs), P3)
    expected = sum(F.cross_entropy(outputs[k][exits == k], target[exits == k])
                   for k in range(3) if (exits == k).any())
    torch.testing.assert_close(meta_loss(outputs, target, P3), expected)
    # an exit with no sample assigned contributes nothing
    p = torch.tensor([0.0, 0.5, 0.5], dtype=torch.float64)
    exits = assign_exits(exit_confidences(outputs), p)
    assert not (exits == 0).any()
    expected = sum(F.cross_entropy(outputs[k][exits == k], target[exits == k]) for k in (1, 2))
    torch.testing.assert_close(meta_loss(outputs, target, p), expected)


def test_l2w_schedule_interval_updated_weights_and_cosine_meta_lr():
    model, opt, _, train, meta = _setup()
    l2w = L2W(model, opt, hidden_sizes=(6,), meta_interval=3, meta_lr=1e-2, total_steps=8, backend="func")
    calls = []
    original = l2w.meta_update
    l2w.meta_update = lambda *a, **k: calls.append(l2w.step) or original(*a, **k)
    x, y = torch.cat([train[0], meta[0]]), torch.cat([train[1], meta[1]])
    lrs = []
    for _ in range(4):
        for xt, yt in l2w.split(x, y):
            outputs = model(xt)
            loss = l2w.loss(outputs, yt)
            # the real step's weights come from the (updated) predictor, on the detached losses
            with torch.no_grad():
                losses = timm_l2w.weighting.exit_losses(outputs, yt)
                expected = timm_l2w.weighting.sample_weights(l2w.weight_net, losses, outputs)
            torch.testing.assert_close(l2w.last_weights, expected)
            opt.zero_grad()
            loss.backward()
            opt.step()
            lrs.append(l2w.meta_optimizer.param_groups[0]["lr"])
    assert calls == [0, 3, 6]
    assert l2w.step == 8
    torch.testing.assert_close(torch.tensor(lrs[3]), torch.tensor(1e-2 * 0.5), rtol=1e-6, atol=0)
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)
    # outside split: weighted loss only, no meta step, no step counted
    l2w.loss(model(x), y)
    assert l2w.step == 8 and calls == [0, 3, 6]


def test_l2w_state_dict_resume_reproduces_the_run():
    def run(l2w, model, opt, batches):
        for x, y in batches:
            for xt, yt in l2w.split(x, y):
                loss = l2w.loss(model(xt), yt)
                opt.zero_grad()
                loss.backward()
                opt.step()

    model, opt, _, train, meta = _setup(torch.float64)
    batches = [(torch.randn(8, 1, 6, 6, dtype=torch.float64), torch.randint(0, 4, (8,))) for _ in range(3)]
    l2w = L2W(model, opt, hidden_sizes=(6,), meta_lr=1e-2, total_steps=6, backend="func")
    run(l2w, model, opt, batches[:1])
    saved = copy.deepcopy((l2w.state_dict(), model.state_dict(), opt.state_dict()))
    run(l2w, model, opt, batches[1:])
    model2 = TinyMultiExit().double()
    model2.load_state_dict(saved[1])
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.5)
    opt2.load_state_dict(saved[2])
    resumed = L2W(model2, opt2, hidden_sizes=(6,), meta_lr=1e-2, total_steps=6, backend="func")
    resumed.load_state_dict(saved[0])
    run(resumed, model2, opt2, batches[1:])
    assert resumed.step == l2w.step == 6
    for a, b in zip(resumed.weight_net.parameters(), l2w.weight_net.parameters()):
        torch.testing.assert_close(a, b)
    assert resumed.meta_optimizer.param_groups[0]["lr"] == pytest.approx(l2w.meta_optimizer.param_groups[0]["lr"])


class _TensorModel(nn.Module):
    num_exits = 3

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        return self.fc(x)


def test_bad_inputs_give_clear_errors():
    model, opt, net, train, meta = _setup()
    l2w = L2W(model, opt, hidden_sizes=(6,))
    with pytest.raises(ValueError, match="cannot be split"):
        next(iter(l2w.split(train[0][:1], train[1][:1])))
    with pytest.raises(ValueError, match="different batch sizes"):
        next(iter(l2w.split(train[0], train[1][:3])))
    with pytest.raises(ValueError, match="eps must be >= 0"):
        L2W(model, opt, eps=-0.5)
    with pytest.raises(ValueError, match="sum to 1"):
        L2W(model, opt, target_p=[0.5, 0.4, 0.2])
    with pytest.raises(ValueError, match="sum to 1"):
        meta_step(model, opt, net, train, meta, [0.5, 0.4, 0.2])
    with pytest.raises(ValueError, match="num_exits=3"):
        L2W(model, opt, weight_net=WeightPredictor(4, hidden_sizes=(6,)))
    with pytest.raises(ValueError, match="model has 3 exits"):
        L2W(model, opt, num_exits=5)
    with pytest.raises(ValueError, match="unknown constraint"):
        L2W(model, opt, constraint="column")
    with pytest.raises(ValueError, match="unknown input_type"):
        L2W(model, opt, input_type="logits")
    with pytest.raises(ValueError, match="unknown backend"):
        L2W(model, opt, backend="jax")
    with pytest.raises(TypeError, match="sign"):  # AdamW & co. are supported (tests/test_virtual_step.py)
        L2W(model, torch.optim.Rprop(model.parameters()))
    with pytest.raises(ValueError, match="meta_interval"):
        L2W(model, opt, meta_interval=0)
    with pytest.raises(TypeError, match="forward_exits"):
        l2w.loss(model(train[0])[0], train[1])
    bad = _TensorModel()
    bad_opt = torch.optim.SGD(bad.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="forward_exits"):
        meta_step(bad, bad_opt, net, (torch.randn(4, 4), train[1][:4]), (torch.randn(4, 4), train[1][:4]), P3)
    l2w_bad = L2W(bad, bad_opt, hidden_sizes=(6,))
    with pytest.raises(TypeError, match="forward_exits"):
        for xt, yt in l2w_bad.split(torch.randn(4, 4), train[1][:4]):
            l2w_bad.loss(bad(xt), yt)


def test_backends_agree_with_dropout_by_replaying_the_masks():
    torch.manual_seed(0)
    model = DropoutMultiExit().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-3)
    net = WeightPredictor(3, hidden_sizes=(6,)).double()
    x, y = torch.randn(16, 1, 6, 6, dtype=torch.float64), torch.randint(0, 4, (16,))
    results = []
    for backend in ("higher", "func"):
        torch.manual_seed(1)
        results.append(meta_step(model, opt, net, (x[:8], y[:8]), (x[8:], y[8:]), P3, backend=backend))
        results[-1].after = torch.rand(1)
    assert torch.equal(results[0].after, results[1].after), "the meta step must leave the RNG stream as the model did"
    for a, b in zip(results[0].grads, results[1].grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_higher_backend_ignores_an_instance_level_forward_wrapper():
    """accelerate's mixed precision replaces ``model.forward`` on the instance; the patch must still work."""
    model, opt, net, train, meta = _setup(torch.float64)
    original = model.forward
    model.forward = lambda x: original(x)  # what accelerate.prepare does, minus the autocast
    results = [meta_step(model, opt, net, train, meta, P3, backend=b) for b in ("higher", "func")]
    for a, b in zip(results[0].grads, results[1].grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_an_op_without_second_derivatives_names_the_other_backend():
    """torch has no double backward for hardsigmoid (MobileNetV3's gates): 'higher' says to use 'func', which works."""
    from tests.helpers import TinyMultiExit

    model = TinyMultiExit()
    for block in model.blocks:
        block[2] = nn.Hardsigmoid()
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 4, (8,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    net = WeightPredictor(model.num_exits, hidden_sizes=(4,))
    p = exit_distribution(0.75, model.num_exits)
    with pytest.raises(ValueError, match=r"'higher' meta backend needs second derivatives.*backend='func'"):
        meta_step(model, opt, net, (x[:4], y[:4]), (x[4:], y[4:]), p, backend="higher")
    result = meta_step(model, opt, net, (x[:4], y[:4]), (x[4:], y[4:]), p, backend="func")
    assert torch.isfinite(result.meta_loss) and any(g.abs().sum() > 0 for g in result.grads)


def _hardsigmoid_model(seed: int = 0) -> TinyMultiExit:
    torch.manual_seed(seed)
    model = TinyMultiExit()
    for block in model.blocks:
        block[2] = nn.Hardsigmoid()
    return model


def test_the_default_backend_switches_to_func_when_higher_lacks_a_derivative_and_says_so_once(caplog):
    """backend='auto' (default): 'higher' until a model op has no second derivative (MobileNetV3's hardsigmoid),
    then 'func' with one log line; training goes on. An explicit 'higher' keeps the error."""
    from tests.helpers import l2w_loader_batch
    from timm_l2w.meta import MissingDerivativeError

    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 4, (8,))
    model = _hardsigmoid_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    l2w = L2W(model, opt, hidden_sizes=(4,))
    with caplog.at_level("INFO", logger="timm_l2w"):
        for _ in range(2):
            l2w_loader_batch(l2w, model, opt, x, y)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("timm_l2w")]
    assert len(lines) == 1 and "hardsigmoid" in lines[0] and "using backend='func'" in lines[0], lines
    assert l2w.backend.name == "func" and l2w.step == 4 and l2w.meta_skipped == 0
    assert any(g.abs().sum() > 0 for g in l2w.last_meta_grads)
    model = _hardsigmoid_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(MissingDerivativeError, match="'higher' meta backend needs second derivatives"):
        l2w_loader_batch(L2W(model, opt, hidden_sizes=(4,), backend="higher"), model, opt, x, y)


def test_the_default_backend_stays_higher_where_it_works_and_steps_like_it():
    from tests.helpers import l2w_loader_batch

    x, y = torch.randn(8, 1, 8, 8, dtype=torch.float64), torch.randint(0, 4, (8,))
    predictors = []
    for backend in ("auto", "higher"):
        torch.manual_seed(0)
        model = TinyMultiExit().to(torch.float64)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        l2w = L2W(model, opt, hidden_sizes=(4,), backend=backend)
        for _ in range(2):
            l2w_loader_batch(l2w, model, opt, x, y)
        assert l2w.backend.name == "higher"
        predictors.append([p.detach() for p in l2w.weight_net.parameters()])
    for a, b in zip(*predictors):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_meta_imports_no_accelerator_or_upper_layer_and_models_import_no_higher():
    """The layer rule for the meta step (docs/architecture.md): ``timm_l2w.meta`` imports nothing from the
    accelerators or above, and the models know nothing of the 'higher' backend."""
    import ast
    from pathlib import Path

    root = Path(timm_l2w.__file__).parent
    upper = ("accel", "evaluation", "evaluate", "inference", "training", "train", "cli", "deploy", "study",
             "checkpoint", "data", "demo")

    def imported(path):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                parts = path.parent.relative_to(root.parent).parts  # ('timm_l2w', 'meta')
                base = ".".join(parts[:len(parts) - node.level + 1]) if node.level else ""
                module = ".".join(p for p in (base, node.module or "") if p)
                yield module
                yield from (f"{module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                yield from (a.name for a in node.names)

    bad = [(p.name, m) for p in (root / "meta").glob("*.py") for m in imported(p)
           if m.startswith("timm_l2w.") and m.split(".")[1] in upper]
    assert not bad, bad
    higher = [(p.name, m) for p in (root / "models").glob("*.py") for m in imported(p) if m.split(".")[0] == "higher"]
    assert not higher, higher
