"""MultiExitWrapper: timm backbones as staged multi-exit models."""
import json

import pytest
import timm
import torch
from torch import nn

import timm_l2w
from tests.helpers import assert_staged_matches_forward
from timm_l2w.errors import SplitError
from timm_l2w.flops import count_flops
from timm_l2w.models.wrapper import GENERIC_NAME, MultiExitWrapper

# (registered name, kwargs, input size): tiny inputs keep the tests fast
FAMILIES = [
    ("resnet18_l2w", {}, 32),
    ("convnext_atto_l2w", {}, 32),
    ("vit_tiny_l2w", {"img_size": 32}, 32),
]


def _count(run) -> float:
    """FLOPs of ``run()`` in exit_flops' convention (FlopCounterMode with the paper's ReLU/pooling/bias ops)."""
    return count_flops(run)


@pytest.mark.parametrize("name,kwargs,size", FAMILIES)
@pytest.mark.parametrize("head", ["linear", "conv"])
def test_registered_exits_staged_equals_forward(name, kwargs, size, head):
    model = timm.create_model(name, num_classes=7, head=head, **kwargs)
    assert model.num_exits == 4 and model.num_classes == 7
    assert_staged_matches_forward(model, torch.randn(3, 3, size, size), keep=torch.tensor([True, False, True]))


@pytest.mark.parametrize("name,kwargs,size", FAMILIES)
def test_flops_increasing_and_last_is_backbone_plus_heads(name, kwargs, size):
    model = timm.create_model(name, num_classes=5, **kwargs).eval()
    flops = timm_l2w.exit_flops(model, (3, size, size))
    assert all(b > a for a, b in zip(flops, flops[1:]))
    x = torch.zeros(1, 3, size, size)
    backbone = _count(lambda: model.backbone(x))  # plain timm forward (num_classes=0): forward_head(forward_features)
    state, heads = x, 0.0
    with torch.no_grad():
        for k in range(model.num_exits):
            state = model.forward_block(k, state)
            feats = model._exit_value(k, state)
            if k < model.num_exits - 1:
                heads += _count(lambda k=k, feats=feats: model.heads[k](feats))
        pooled = model.backbone.forward_head(feats, pre_logits=True)
    heads += _count(lambda: model.heads[-1].fc(pooled))
    assert heads > 0
    assert flops[-1] == pytest.approx(backbone + heads, rel=1e-9)
    # each exit counts only what its stages run: exit k + the next stage and head = exit k + 1
    assert flops[0] == pytest.approx(_count(lambda: model.forward_stage(0, x)), rel=1e-9)


def test_attention_flops_counted():
    model = timm.create_model("vit_tiny_l2w", img_size=32, num_classes=5)
    attn = model.backbone.blocks[0].attn
    x = torch.zeros(1, 5, 192)  # 4 patches + class token
    assert _count(lambda: attn(x)) == 2 * 5 * 5 * 192 + 5 * (192 * 576 + 576) + 5 * (192 * 192 + 192)


@pytest.mark.parametrize("name,kwargs", [("resnet18", {}), ("convnext_atto", {}),
                                         ("vit_tiny_patch16_224", {"img_size": 32})])
def test_plain_timm_state_dict_loads_into_trunk(name, kwargs):
    plain = timm.create_model(name, num_classes=0, **kwargs)
    wrapper = MultiExitWrapper(name, num_classes=3, **kwargs)
    wrapper.backbone.load_state_dict(plain.state_dict())  # unchanged, strict
    for a, b in zip(plain.state_dict().values(), wrapper.backbone.state_dict().values()):
        assert torch.equal(a, b)
    size = 32
    x = torch.randn(2, 3, size, size)
    plain.eval(), wrapper.eval()
    with torch.no_grad():
        torch.testing.assert_close(wrapper.trunk_features(x), plain.forward_features(x))
    # a full classifier state_dict (num_classes=1000) loads too, its classifier dropped
    full = timm.create_model(name, **kwargs)
    wrapper.load_backbone_state_dict(full.state_dict())


def test_any_timm_name_and_custom_exits():
    model = timm_l2w.MultiExitWrapper("resnet10t", exit_indices=(2, 4), num_classes=4, in_chans=1)
    assert model.num_exits == 2 and model.in_chans == 1
    outs = model(torch.randn(2, 1, 32, 32))  # train mode: every exit
    assert [o.shape for o in outs] == [(2, 4), (2, 4)]
    model.reset_classifier(6)
    assert model(torch.randn(2, 1, 32, 32))[0].shape == (2, 6)


def test_wrapper_trains():
    model = timm.create_model("convnext_atto_l2w", num_classes=3)
    loss = sum(nn.functional.cross_entropy(o, torch.tensor([0, 2])) for o in model(torch.randn(2, 3, 32, 32)))
    loss.backward()
    assert all(h.weight.grad is not None for h in model.modules() if isinstance(h, nn.Linear))


class _DataDependent(nn.Module):
    """A timm-style model whose forward_features branches on the values of its input (FX cannot trace it)."""

    feature_info = [dict(num_chs=4, reduction=1, module="conv"), dict(num_chs=4, reduction=1, module="conv2")]
    num_classes = 0

    def __init__(self):
        super().__init__()
        self.conv, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

    def forward_features(self, x):
        x = self.conv(x)
        return self.conv2(x) if x.mean() > 0 else x

    def forward_head(self, x, pre_logits=False):
        return x.mean((2, 3))

    def get_classifier(self):
        return nn.Identity()


def test_bad_inputs():
    with pytest.raises(ValueError, match="out of range.*0..4"):
        MultiExitWrapper("resnet18", exit_indices=(1, 5))
    with pytest.raises(ValueError, match="strictly increasing"):
        MultiExitWrapper("resnet18", exit_indices=(3, 2))
    with pytest.raises(ValueError, match="head must be"):
        MultiExitWrapper("resnet18", head="mlp")
    with pytest.raises(TypeError, match="no timm feature API"):
        MultiExitWrapper(nn.Sequential(nn.Conv2d(3, 4, 3)))
    with pytest.raises(SplitError, match=r"cannot trace its forward_features.*MultiExitModel subclass"):
        MultiExitWrapper(_DataDependent(), num_classes=3)
    vit = timm.create_model("vit_tiny_l2w", img_size=32, num_classes=3)
    with pytest.raises(ValueError, match="img_size=64"):
        vit(torch.randn(1, 3, 64, 64))


def _family_models():
    """One small model of each family: RANet, and the wrapper on resnet, convnext and vit."""
    from tests.helpers import small_ranet as _small

    return [
        ("ranet", lambda: _small(num_classes=3, num_blocks=1, block_step=1)),
        # timm's tiny test_* models: the same families as resnet18_l2w, convnext_atto_l2w, vit_tiny_l2w
        ("resnet", lambda: MultiExitWrapper("test_resnet", num_classes=3)),
        ("convnext", lambda: MultiExitWrapper("test_convnext", num_classes=3, head="conv")),
        ("vit", lambda: MultiExitWrapper("test_vit", num_classes=3, img_size=32)),
    ]


@pytest.mark.parametrize("family,make", _family_models(), ids=[f for f, _ in _family_models()])
def test_l2w_step_budgeted_evaluation_and_early_exit_per_family(family, make):
    model = make()
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,))
    # an L2W training step (meta step through the virtual SGD step, then the weighted real step)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    l2w = timm_l2w.L2W(model, optimizer, eps=0.8, constraint="col", hidden_sizes=(8,))
    before = [p.detach().clone() for p in l2w.weight_net.parameters()]
    # the user's forward may use fused attention kernels; the meta step copes (no sdpa_kernel needed here)
    for xt, yt in l2w.split(x, y):
        loss = l2w.loss(model(xt), yt)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.isfinite(loss) and l2w.last_meta_loss is not None
    assert any(not torch.equal(a, b) for a, b in zip(before, l2w.weight_net.parameters()))
    # budgeted evaluation over the paper's distributions
    flops = timm_l2w.exit_flops(model, (3, 32, 32))
    outputs = timm_l2w.collect_exit_outputs(model, [(x[:4], y[:4]), (x[4:], y[4:])])
    results = timm_l2w.budgeted_evaluation(outputs, outputs, flops)
    assert len(results) == 39 and bool((results.expected_flops <= flops[-1] + 1e-6).all())
    # real early exits: each sample's prediction is its exit's argmax in the full forward
    predictor = timm_l2w.EarlyExitPredictor.from_distribution(model, outputs, 0.75)
    pred = predictor.predict(x)
    with torch.no_grad():
        full = torch.stack(model.forward_exits(x))  # [K, N, C]
    torch.testing.assert_close(pred.predictions, full[pred.exit_index, torch.arange(8)].argmax(-1))


@pytest.mark.parametrize("backbone", ["test_vit", "test_efficientnet"])
def test_meta_step_through_the_split_backbone_both_backends(backbone):
    """The stages read parameters through the module tree: the virtual step's re-bound parameters
    (higher's patched copy, functional_call's swap) reach every op, pos_embed and cls_token included."""
    from timm_l2w.meta import meta_step
    from timm_l2w.weighting import WeightPredictor

    torch.manual_seed(0)
    model = MultiExitWrapper(backbone, num_classes=4, img_size=32) if backbone == "test_vit" else \
        MultiExitWrapper(backbone, num_classes=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))
    net = WeightPredictor(model.num_exits, hidden_sizes=(8,))
    p = timm_l2w.exits.exit_distribution(0.75, model.num_exits)
    results = {b: meta_step(model, opt, net, (x[:4], y[:4]), (x[4:], y[4:]), p, backend=b) for b in ("higher", "func")}
    torch.testing.assert_close(results["higher"].meta_loss, results["func"].meta_loss)
    scale = max(float(g.abs().max()) for g in results["func"].grads)
    assert scale > 0  # the meta loss depends on the predictor through the virtual step: parameters were re-bound
    for a, b in zip(results["higher"].grads, results["func"].grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4 * scale)
    # the virtual step's parameters are what the stages ran with: the meta loss differs from the loss at theta
    with torch.no_grad():
        at_theta = timm_l2w.meta.meta_loss(model.train()(x[4:]), y[4:], p)
    assert not torch.allclose(at_theta, results["func"].meta_loss)


def test_command_line_wraps_any_timm_model_with_a_local_timm_checkpoint_and_eval_rebuilds_it(tmp_path):
    """``timm-l2w train --model <timm name> --exit-indices ... --pretrained FILE`` -> ``timm-l2w eval FILE``."""
    from safetensors.torch import save_file

    from timm_l2w.cli.eval import main as eval_main
    from timm_l2w.cli.train import main as train_main
    from timm_l2w.files import read_metadata

    torch.manual_seed(0)
    plain = timm.create_model("test_efficientnet")  # a timm checkpoint, classifier included
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(0.3)  # far from a fresh initialisation
    timm_file = tmp_path / "timm_backbone.safetensors"
    save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, str(timm_file))
    common = ["--max-steps", "1", "--weighting", "uniform", "--batch-size", "16", "--lr", "1e-9", "--warmup-lr",
              "1e-9", "--no-eval", "--log-with", "none", "--no-progress"]
    out = tmp_path / "run"
    assert train_main(["--model", "test_efficientnet", "--exit-indices", "1", "3", "4", "--exit-head", "conv",
                       "--pretrained", str(timm_file), "--output", str(out), *common]) == 0
    weights = out / "model.safetensors"
    meta = read_metadata(weights)
    assert meta["model"] == GENERIC_NAME
    assert json.loads(meta["model_kwargs"]) == {"backbone": "test_efficientnet", "exit_indices": [1, 3, 4],
                                                "head": "conv",
                                                "head_width": 128, "in_chans": 3}
    rebuilt = timm.create_model(GENERIC_NAME, pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)))
    assert rebuilt.exit_indices == [1, 3, 4] and rebuilt.head_type == "conv" and rebuilt.num_classes == 10
    source = plain.state_dict()
    for key, value in rebuilt.backbone.state_dict().items():  # the backbone started from the timm file
        if value.is_floating_point() and "running" not in key:
            torch.testing.assert_close(value, source[key], atol=1e-5, rtol=0)
    assert eval_main([str(weights), "--held-out", "20", "--output", str(tmp_path / "eval"), "--name", "e",
                      "--no-progress"]) == 0
    assert len(json.loads((tmp_path / "eval" / "e.json").read_text())["anytime"]) == 3
    # --pretrained-path: the file's metadata says how the wrapper was built (no --exit-indices needed)
    again = tmp_path / "again"
    assert train_main(["--model", "test_efficientnet", "--pretrained-path", str(weights), "--output", str(again),
                       *common]) == 0
    assert json.loads(read_metadata(again / "model.safetensors")["model_kwargs"])["exit_indices"] == [1, 3, 4]


def test_exit_choices_for_a_model_with_its_own_exits_are_refused():
    from timm_l2w.models.factory import create_multi_exit_model

    with pytest.raises(ValueError, match="has its own exits"):
        create_multi_exit_model("msdnet_l2w_cifar_tiny", exit_indices=[0, 1])
    with pytest.raises(ValueError, match=r"any of timm.list_models\(\)"):
        create_multi_exit_model("no_such_model")


@pytest.mark.parametrize("backbone,kwargs", [("test_vit", {"img_size": 32}), ("test_efficientnet", {}),
                                             ("test_mambaout", {})])
def test_real_early_exit_spends_exactly_the_flops_of_the_exits_taken(backbone, kwargs):
    """Counted while it runs: a sample that leaves at exit k costs exit_flops[k], nothing of the later stages."""
    model = MultiExitWrapper(backbone, num_classes=3, **kwargs).eval()
    x = torch.randn(6, 3, 32, 32)
    flops = timm_l2w.exit_flops(model, (3, 32, 32))
    everyone_first = timm_l2w.EarlyExitPredictor(model, [-1.0] * model.num_exits)  # confidence >= -1: exit 1
    assert count_flops(everyone_first.predict, x) == pytest.approx(6 * flops[0], rel=1e-9)
    with torch.no_grad():
        conf = torch.stack([o.softmax(-1).amax(-1) for o in model.forward_exits(x)], dim=1)
    thresholds = conf.median(dim=0).values.double()
    predictor = timm_l2w.EarlyExitPredictor(model, thresholds)
    spent = count_flops(predictor.predict, x)
    taken = predictor.predict(x).exit_index
    assert len(set(taken.tolist())) > 1  # a mix of exits
    assert spent == pytest.approx(float(torch.tensor(list(flops), dtype=torch.float64)[taken].sum()), rel=1e-9)


def test_default_exits_per_layout():
    from timm_l2w.models.wrapper import _default_exits

    resnet = [dict(module="act1", reduction=2)] + [dict(module=f"layer{i}", reduction=2 ** (i + 1))
                                                   for i in range(1, 5)]
    assert _default_exits(resnet) == [1, 2, 3, 4]  # the stride-2 stem point has no exit
    vit = [dict(module=f"blocks.{i}", reduction=16) for i in range(12)]
    assert _default_exits(vit) == [2, 5, 8, 11]
    # one entry per branch and block (CrossViT): one exit per block, on its last entry
    branches = [dict(module=f"blocks.{i}", reduction=r) for r in (12, 16) for i in range(3)]
    assert _default_exits(branches) == [3, 4, 5]


class _TokenBlock(nn.Module):
    def __init__(self, dim: int = 8):
        super().__init__()
        self.fc = nn.Linear(dim, dim)

    def forward(self, t, h: int, w: int):
        return t + self.fc(t) / (h * w)


class _CrossingValues(nn.Module):
    """A timm-style model whose stages pass the batch size, the grid size and a mask made from it."""

    feature_info = [dict(num_chs=8, reduction=2, module=f"s{i}") for i in (1, 2, 3)]
    num_classes, num_features = 0, 8
    pretrained_cfg = {"input_size": (3, 16, 16)}

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.s1, self.s2, self.s3 = _TokenBlock(), _TokenBlock(), _TokenBlock()

    def forward_features(self, x):
        x = self.stem(x)
        b, c, h, w = x.shape
        mask = x.new_ones((h, w)).cumsum(0)  # from the image size, the same for every sample
        t = self.s1(x.flatten(2).transpose(1, 2), h, w)
        t = self.s2(t, h, w)
        t = t.reshape(b, h, w, c) * mask[..., None]  # b, h, w and mask cross the cuts
        return self.s3(t.reshape(b, h * w, c), h, w)

    def forward_head(self, x, pre_logits=False):
        return x.mean(1)

    def reset_classifier(self, num_classes, global_pool=None):
        pass


def test_values_crossing_cuts_without_a_batch_dimension_survive_dropped_samples():
    from timm_l2w.models.fx_stages import Shared

    model = MultiExitWrapper(_CrossingValues(), num_classes=3)
    kinds = {k for stage in model._stages.plans[False].stages for k, _ in stage.in_kinds}
    assert {"batched", "shared", "batch_sized"} <= kinds
    assert model.exit_layouts == ["nlc", "nlc", "nlc"]
    assert_staged_matches_forward(model, torch.randn(4, 3, 16, 16), keep=torch.tensor([True, False, True, True]))
    state = model.forward_block(0, torch.randn(2, 3, 16, 16))
    assert any(isinstance(v, Shared) for v in state)  # select_samples leaves these alone
