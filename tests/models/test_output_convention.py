"""The output convention: train mode -> tuple of every exit, eval mode -> the last exit,
``forward_exits`` -> every exit in any mode; a clear error where one tensor reaches code that needs all."""
import pytest
import timm
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import timm_l2w
from tests.helpers import TinyMultiExit
from timm_l2w.meta import make_backend
from timm_l2w.models import MSDNet, MultiExitModel, MultiExitWrapper
from timm_l2w.models.ranet import RANet

# every model timm_l2w registers: (kwargs, input size) to run it for real, or None for the large
# ImageNet variants whose forward is slow on a CPU (MSDNet and RANet: the same classes run here
# through cheaper registered variants, and no class overrides forward / forward_exits)
REGISTERED = {
    "msdnet_l2w_cifar_tiny": ({}, 32),
    "msdnet_l2w_cifar": ({}, 32),
    "ranet_l2w_cifar": ({}, 32),
    "resnet18_l2w": ({}, 32),
    "convnext_atto_l2w": ({}, 32),
    "vit_tiny_l2w": ({"img_size": 32}, 32),
    "multi_exit_l2w": ({"backbone": "test_efficientnet"}, 32),  # any timm backbone
    "msdnet_l2w": ({}, 129),  # the ImageNet stem's minimum input
    "msdnet_l2w_step6": None,
    "msdnet_l2w_step7": None,
    "ranet_l2w": None,  # needs at least 160x160
}
RUN = [(name, *spec) for name, spec in REGISTERED.items() if spec is not None]


def test_the_table_lists_every_registered_model():
    registered = {n for n in timm.list_models() if timm.models.model_entrypoint(n).__module__.startswith("timm_l2w.")}
    assert registered == set(REGISTERED), f"add {sorted(registered - set(REGISTERED))} to REGISTERED"


@pytest.mark.parametrize("cls", [MSDNet, RANet, MultiExitWrapper, TinyMultiExit])
def test_models_inherit_forward_and_forward_exits(cls):
    assert cls.forward is MultiExitModel.forward
    assert cls.forward_exits is MultiExitModel.forward_exits


@pytest.mark.parametrize("name,kwargs,size", RUN, ids=[r[0] for r in RUN])
def test_train_tuple_eval_last_exit_and_staged_run(name, kwargs, size):
    model = timm.create_model(name, num_classes=3, **kwargs)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        train_out = model.train()(x)
        assert isinstance(train_out, tuple) and len(train_out) == model.num_exits
        assert all(o.shape == (2, 3) for o in train_out)
        model.eval()
        exits = model.forward_exits(x)
        last = model(x)
        state, staged = x, []
        for k in range(model.num_exits):
            state, logits = model.forward_stage(k, state)
            staged.append(logits)
    assert isinstance(exits, tuple) and len(exits) == model.num_exits
    assert isinstance(last, torch.Tensor) and last.shape == (2, 3)
    assert torch.equal(last, exits[-1])
    for a, b in zip(exits, staged, strict=True):
        assert torch.equal(a, b)
    assert not model.training  # forward_exits does not change the mode


@pytest.mark.parametrize("name", ["msdnet_l2w_cifar_tiny", "ranet_l2w_cifar", "resnet18_l2w"])
def test_eval_forward_runs_only_the_last_exit_head(name, monkeypatch):
    """Eval mode skips the earlier exits' heads (block-API models); train mode runs every head."""
    model = timm.create_model(name, num_classes=3)
    heads = []
    original = type(model).forward_exit_head

    def counting(self, index, x, pre_logits=False):
        heads.append(index)
        return original(self, index, x, pre_logits)

    monkeypatch.setattr(type(model), "forward_exit_head", counting)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model.eval()(x)
        assert heads == [model.num_exits - 1]
        heads.clear()
        model.train()(x)
    assert heads == list(range(model.num_exits))


def test_eval_forward_of_a_stage_only_model_keeps_the_last_exit(tiny_model):
    """A model that overrides forward_stage (no block API) still gets its last exit in eval mode."""
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(tiny_model.eval()(x), tiny_model.forward_exits(x)[-1])


def test_forward_exits_in_train_mode_equals_train_forward(tiny_model):
    x = torch.randn(6, 1, 8, 8)
    tiny_model.train()
    a, b = tiny_model(x), tiny_model.forward_exits(x)  # batch statistics: deterministic
    assert isinstance(b, tuple) and all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


def test_train_mode_gradients_reach_every_exit(tiny_model):
    outputs = tiny_model.train()(torch.randn(4, 1, 8, 8))
    sum(o.sum() for o in outputs).backward()
    assert all(h[-1].weight.grad is not None for h in tiny_model.heads)


def _eval_tensor(model, x):
    with torch.no_grad():
        return model.eval()(x)


def test_check_multi_exit_output_explains_an_eval_mode_tensor(tiny_model):
    x = torch.randn(4, 1, 8, 8)
    single = _eval_tensor(tiny_model, x)
    with pytest.raises(TypeError, match=r"eval mode returns only its last exit.*forward_exits.*train mode"):
        timm_l2w.models.base.check_multi_exit_output(single)
    assert timm_l2w.models.base.check_multi_exit_output(tiny_model.forward_exits(x), 3)[0].shape == (4, 4)
    assert isinstance(timm_l2w.models.base.check_multi_exit_output([single, single]), list)  # a list is accepted too
    with pytest.raises(TypeError, match="tuple of exit logits, got dict"):
        timm_l2w.models.base.check_multi_exit_output({"logits": single})
    with pytest.raises(TypeError, match=r"\[batch, num_classes\]"):
        timm_l2w.models.base.check_multi_exit_output((single[0],))
    with pytest.raises(TypeError, match=r"\[batch, num_classes\]"):
        timm_l2w.models.base.check_multi_exit_output(())


def test_weighted_loss_and_l2w_hook_reject_an_eval_mode_tensor(tiny_model):
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 4, (8,))
    single = _eval_tensor(tiny_model, x)
    loss = timm_l2w.WeightedMultiExitLoss(timm_l2w.WeightPredictor(3, hidden_sizes=(4,)))
    with pytest.raises(TypeError, match="forward_exits"):
        loss(single, y)
    optimizer = torch.optim.SGD(tiny_model.parameters(), lr=0.1)
    l2w = timm_l2w.L2W(tiny_model, optimizer, hidden_sizes=(4,))
    with pytest.raises(TypeError, match="forward_exits"):
        for xt, yt in l2w.split(x, y):
            l2w.loss(tiny_model.eval()(xt), yt)
    # the same loop in train mode works
    tiny_model.train()
    for xt, yt in l2w.split(x, y):
        assert torch.isfinite(l2w.loss(tiny_model(xt), yt))
    assert l2w.last_meta_loss is not None


@pytest.mark.parametrize("backend", ["higher", "func"])
@pytest.mark.parametrize("training", [True, False])
def test_meta_step_backends_get_every_exit_in_either_mode(tiny_model, backend, training):
    tiny_model.train(training)
    runner = make_backend(backend, tiny_model)
    outputs = runner.forward(runner.params(), torch.randn(4, 1, 8, 8))
    assert isinstance(outputs, tuple) and len(outputs) == 3 and all(o.shape == (4, 4) for o in outputs)
    assert tiny_model.training == training  # the real model's mode is left as it was


@pytest.mark.parametrize("training", [True, False])
def test_collect_exit_outputs_in_either_mode_restores_it(tiny_model, training):
    x, y = torch.randn(10, 1, 8, 8), torch.randint(0, 4, (10,))
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    tiny_model.train(training)
    out = timm_l2w.collect_exit_outputs(tiny_model, loader)
    assert tiny_model.training == training
    tiny_model.eval()
    with torch.no_grad():
        expected = timm_l2w.ExitOutputs.from_logits(tiny_model.forward_exits(x), y)
    assert out.num_exits == 3 and out.num_samples == 10
    torch.testing.assert_close(out.confidences, expected.confidences)
    assert torch.equal(out.predictions, expected.predictions)


def test_collect_exit_outputs_unwraps_the_model(tiny_model):
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 4, (6,))
    wrapped = nn.DataParallel(tiny_model)  # eval forward of the wrapper would give the last exit only
    out = timm_l2w.collect_exit_outputs(wrapped, [(x, y)])
    assert out.num_exits == 3 and wrapped.training


class _ListModel(nn.Module):
    """Not a MultiExitModel: its forward returns the exits itself (or, with ``single``, one tensor)."""

    def __init__(self, single: bool = False):
        super().__init__()
        self.a, self.b, self.single = nn.Linear(4, 3), nn.Linear(4, 3), single

    def forward(self, x):
        return self.b(x) if self.single else [self.a(x), self.b(x)]


def test_collect_exit_outputs_on_a_module_without_forward_exits():
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    assert timm_l2w.collect_exit_outputs(_ListModel(), [(x, y)]).num_exits == 2
    with pytest.raises(TypeError, match="forward_exits"):
        timm_l2w.collect_exit_outputs(_ListModel(single=True), [(x, y)])
