"""MSDNet: multi-scale dense networks (Huang et al., ICLR 2018) as a timm multi-exit model.

The network keeps feature maps at ``n_scales`` resolutions. Each layer adds ``growth_rate * gr_factor[s]``
channels at scale ``s``: from the same scale (a "normal" conv) and, for ``s > 0``, from the next
finer scale (a stride-2 "down" conv). With ``prune='max'`` the finest scales are dropped as the network
gets deeper, each drop followed by a 1x1 transition that shrinks every scale by ``reduction``. An exit
head (two stride-2 conv-BN-ReLU, 2x2 average pool, linear) sits on the coarsest scale after every block.

Module names and shapes follow the L2W / MSDNet release, so its checkpoints load as they are
(``timm_l2w.checkpoint`` strips a DDP ``module.`` prefix). Stage ``k`` of :meth:`MSDNet.forward_stage`
is block ``k`` followed by exit head ``k``; the state between stages is the list of feature maps,
finest scale first.

timm's model API: ``forward_features`` is every block and the last exit's two convs (the map its
pooling reads, 2x2 at the native size), ``forward_head`` that exit's pooling and linear layer.
``feature_info`` / ``forward_intermediates`` (``features_only=True``) give one map per scale, each
taken after the last block that still has that scale (reductions 4, 8, 16, 32 on ImageNet).

One file for the family, as timm lays out its models (over 400 lines): the layers, the network, its
timm API and the registered variants are read together.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices  # what timm's own models use
from torch import Tensor, nn

from .base import MultiExitModel
from .layers import ExitPool, check_timm_kwargs, exit_classifier, is_symbolic, set_bn_args

__all__ = ["MSDNet", "msdnet_kwargs_from_release_args", "CIFAR_MEAN", "CIFAR_STD"]

CIFAR_MEAN = (0.4914, 0.4824, 0.4467)
CIFAR_STD = (0.2471, 0.2435, 0.2616)

STEP_MODES = ("even", "lin_grow")
STEMS = ("cifar", "imagenet")


class ConvBNReLU(nn.Module):
    """Conv (no bias) -> BN -> ReLU, kept in ``net`` (the release's key layout)."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 3, stride: int = 1, padding: int = 1):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding, bias=False),
            nn.BatchNorm2d(out_chs),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ConvBranch(nn.Module):
    """Optional 1x1 bottleneck (width ``min(in, bn_width * out)``) then a 3x3 conv of ``stride``."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, bottleneck: bool, bn_width: int):
        super().__init__()
        layers: List[nn.Module] = []
        inner = in_chs
        if bottleneck:
            inner = min(in_chs, bn_width * out_chs)
            layers += [nn.Conv2d(in_chs, inner, 1, 1, 0, bias=False), nn.BatchNorm2d(inner), nn.ReLU(inplace=True)]
        layers += [nn.Conv2d(inner, out_chs, 3, stride, 1, bias=False), nn.BatchNorm2d(out_chs), nn.ReLU(inplace=True)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ScaleNormal(nn.Module):
    """Dense growth at one scale from the same scale only: ``[x, conv(x)]``."""

    def __init__(self, in_chs: int, growth: int, bottleneck: bool, bn_width: int):
        super().__init__()
        self.conv_normal = ConvBranch(in_chs, growth, 1, bottleneck, bn_width)

    def forward(self, inputs: List[Tensor]) -> Tensor:
        x = inputs[-1]
        return torch.cat([x, self.conv_normal(x)], dim=1)


class ScaleDownNormal(nn.Module):
    """Dense growth at one scale from the finer scale (stride 2) and the same scale, half each."""

    def __init__(self, in_fine: int, in_same: int, growth: int, bottleneck: bool, bn_fine: int, bn_same: int):
        super().__init__()
        self.conv_down = ConvBranch(in_fine, growth // 2, 2, bottleneck, bn_fine)
        self.conv_normal = ConvBranch(in_same, growth // 2, 1, bottleneck, bn_same)

    def forward(self, inputs: List[Tensor]) -> Tensor:
        fine, same = inputs
        return torch.cat([same, self.conv_down(fine), self.conv_normal(same)], dim=1)


class StemLayer(nn.Module):
    """First layer: the image to one feature map per scale (each scale halves the previous one)."""

    def __init__(self, in_chans: int, channels: Sequence[int], stem: str):
        super().__init__()
        self.layers = nn.ModuleList()
        if stem == "cifar":
            self.layers.append(ConvBNReLU(in_chans, channels[0], 3, 1, 1))
        else:
            self.layers.append(nn.Sequential(
                nn.Conv2d(in_chans, channels[0], 7, 2, 3),
                nn.BatchNorm2d(channels[0]),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, 2, 1),
            ))
        for s in range(1, len(channels)):
            self.layers.append(ConvBNReLU(channels[s - 1], channels[s], 3, 2, 1))

    def forward(self, x: Tensor) -> List[Tensor]:
        out = []
        for layer in self.layers:
            x = layer(x)
            out.append(x)
        return out


class MSDLayer(nn.Module):
    """One multi-scale dense layer from ``in_scales`` feature maps to the ``out_scales`` coarsest ones."""

    def __init__(
            self, in_chs: int, growth_rate: int, n_scales: int, in_scales: int, out_scales: int,
            gr_factor: Sequence[int], bn_factor: Sequence[int], bottleneck: bool,
    ):
        super().__init__()
        offset = n_scales - out_scales
        self.discard = in_scales - out_scales
        self.layers = nn.ModuleList()
        first = offset
        if self.discard == 0:
            self.layers.append(ScaleNormal(
                in_chs * gr_factor[offset], growth_rate * gr_factor[offset], bottleneck, bn_factor[offset]))
            first = offset + 1
        for s in range(first, n_scales):
            self.layers.append(ScaleDownNormal(
                in_chs * gr_factor[s - 1], in_chs * gr_factor[s], growth_rate * gr_factor[s],
                bottleneck, bn_factor[s - 1], bn_factor[s]))

    def forward(self, x: List[Tensor]) -> List[Tensor]:
        if self.discard > 0:  # the finest input scale only feeds the down conv of the next one
            pairs = [[x[i - 1], x[i]] for i in range(1, len(x))]
        else:
            pairs = [[x[0]]] + [[x[i - 1], x[i]] for i in range(1, len(x))]
        return [layer(inp) for layer, inp in zip(self.layers, pairs)]


class Transition(nn.Module):
    """1x1 conv-BN-ReLU on every scale (channel reduction after a scale was dropped)."""

    def __init__(self, in_chs: Sequence[int], out_chs: Sequence[int]):
        super().__init__()
        self.m = nn.ModuleList(ConvBNReLU(i, o, 1, 1, 0) for i, o in zip(in_chs, out_chs))

    def forward(self, x: List[Tensor]) -> List[Tensor]:
        return [m(t) for m, t in zip(self.m, x)]


class ExitHead(nn.Module):
    """Exit classifier on the coarsest scale: 2x (3x3/s2 conv-BN-ReLU), pooling (the release's 2x2 average),
    dropout (``drop_rate``, timm's classifier dropout; none by default, as in the release), linear."""

    def __init__(self, in_chs: int, width: int, num_classes: int, global_pool: str = "avg", drop_rate: float = 0.0):
        super().__init__()
        self.m = nn.Sequential(ConvBNReLU(in_chs, width, 3, 2, 1), ConvBNReLU(width, width, 3, 2, 1))
        self.num_features = width
        self.drop_rate = drop_rate
        self.pool = ExitPool(global_pool)
        self.linear = _linear(width * self.pool.feat_mult(), num_classes, global_pool)

    def reset(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A fresh linear layer for ``num_classes`` (0: none), and new pooling if ``global_pool`` is given."""
        if global_pool is not None:
            self.pool = ExitPool(global_pool)
        self.linear = _linear(self.num_features * self.pool.feat_mult(), num_classes, self.pool.pool_type)

    def forward_features(self, x: List[Tensor]) -> Tensor:
        return self.m(x[-1])

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.pool(x)  # at the native input size the map is 2x2: the 2x2 average pool is global
        if self.drop_rate > 0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.linear(x)

    def forward(self, x: List[Tensor]) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _linear(in_features: int, num_classes: int, global_pool: str) -> nn.Module:
    """An exit's classifier, its bias zero-initialised like the release's."""
    linear = exit_classifier(in_features, num_classes, bool(global_pool))
    if isinstance(linear, nn.Linear):
        nn.init.zeros_(linear.bias)
    return linear


def _block_steps(n_blocks: int, step_mode: str, step: int, base: int) -> List[int]:
    if step_mode == "even":
        return [base] + [step] * (n_blocks - 1)
    return [base] + [step * i + 1 for i in range(1, n_blocks)]


class MSDNet(MultiExitModel):
    """Multi-scale dense network with one exit per block.

    Args:
        n_blocks: number of blocks (= exits).
        step_mode: ``'even'`` (every block after the first has ``step`` layers) or ``'lin_grow'``
            (block ``i`` has ``step * i + 1`` layers).
        step: layers per block (see ``step_mode``); base: layers of the first block.
        n_channels: channels of the finest scale after the stem (scale ``s`` has ``n_channels * gr_factor[s]``).
        growth_rate: channels added per layer at scale 0 (``growth_rate * gr_factor[s]`` at scale ``s``).
        gr_factor, bn_factor: per-scale growth and bottleneck-width factors (length ``n_scales``).
        n_scales: number of resolutions.
        prune: ``'max'`` drops the finest scale as depth grows (the paper's setting).
        reduction: channel reduction of the transitions after a scale is dropped (0 disables them).
        bottleneck: 1x1 bottleneck before each 3x3 conv.
        stem: ``'cifar'`` (3x3 conv) or ``'imagenet'`` (7x7/s2 conv + 3x3/s2 max pool).
        head_channels: width of the exit heads' convs; ``None`` keeps the input width (ImageNet).
        num_classes: classes of every exit (0: exits return pooled features).
        in_chans: image channels.
        global_pool: exit pooling: ``'avg'`` (the release's 2x2 average), ``''`` (none, with
            ``num_classes=0``: exits return maps) or a timm pool type (``'max'``, ``'avgmax'``...).
        drop_rate: dropout before every exit's linear layer (timm's classifier dropout; 0: none, the release's).
        drop_path_rate, drop_block_rate: timm's standard arguments; MSDNet has neither, so only ``None`` / 0.
        bn_momentum, bn_eps: set on every BatchNorm (``None``: PyTorch's defaults, the release's).
    """

    def __init__(
            self,
            n_blocks: int = 5,
            step_mode: str = "even",
            step: int = 4,
            base: int = 4,
            n_channels: int = 32,
            growth_rate: int = 16,
            gr_factor: Sequence[int] = (1, 2, 4, 4),
            bn_factor: Sequence[int] = (1, 2, 4, 4),
            n_scales: int = 4,
            prune: str = "max",
            reduction: float = 0.5,
            bottleneck: bool = True,
            stem: str = "imagenet",
            head_channels: Optional[int] = None,
            num_classes: int = 1000,
            in_chans: int = 3,
            global_pool: str = "avg",
            drop_rate: float = 0.0,
            drop_path_rate: Optional[float] = None,
            drop_block_rate: Optional[float] = None,
            bn_momentum: Optional[float] = None,
            bn_eps: Optional[float] = None,
            **kwargs: Any,
    ):
        super().__init__()
        check_timm_kwargs(MSDNet, drop_rate, drop_path_rate, drop_block_rate, bn_momentum, bn_eps, **kwargs)
        if step_mode not in STEP_MODES:
            raise ValueError(f"unknown step_mode {step_mode!r}: use one of {STEP_MODES}")
        if stem not in STEMS:
            raise ValueError(f"unknown stem {stem!r}: use one of {STEMS}")
        if prune != "max":
            raise ValueError(f"unknown prune {prune!r}: only 'max' (the paper's setting) is implemented")
        if len(gr_factor) != n_scales or len(bn_factor) != n_scales:
            raise ValueError(
                f"gr_factor {tuple(gr_factor)} and bn_factor {tuple(bn_factor)} need one entry per scale "
                f"(n_scales={n_scales})")
        for name, value in (("n_blocks", n_blocks), ("step", step), ("base", base), ("n_channels", n_channels),
                            ("growth_rate", growth_rate), ("n_scales", n_scales), ("in_chans", in_chans)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if any(growth_rate * g % 2 for g in gr_factor[1:]):
            raise ValueError(f"growth_rate * gr_factor[s] must be even for s > 0 (split between down and normal "
                             f"convs), got growth_rate={growth_rate}, gr_factor={tuple(gr_factor)}")
        if not 0 <= reduction < 1:
            raise ValueError(f"reduction must be in [0, 1), got {reduction}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")

        self.num_exits = n_blocks
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.n_scales = n_scales
        self.stem = stem
        self.steps = _block_steps(n_blocks, step_mode, step, base)
        n_layers_all = sum(self.steps)
        interval = math.ceil(n_layers_all / n_scales)

        self.blocks = nn.ModuleList()
        self.classifier = nn.ModuleList()
        chs, n_layer = n_channels, 0
        block_out: List[Tuple[int, int]] = []  # (channels per gr_factor unit, scales) after each block
        for b, n_steps in enumerate(self.steps):
            layers: List[nn.Module] = []
            if b == 0:
                layers.append(StemLayer(in_chans, [n_channels * g for g in gr_factor], stem))
            for _ in range(n_steps):
                n_layer += 1
                in_scales = n_scales - math.floor(max(0, n_layer - 2) / interval)
                out_scales = n_scales - math.floor((n_layer - 1) / interval)
                layers.append(MSDLayer(chs, growth_rate, n_scales, in_scales, out_scales, gr_factor, bn_factor,
                                       bottleneck))
                chs += growth_rate
                if in_scales > out_scales and reduction > 0:
                    offset = n_scales - out_scales
                    new_chs = math.floor(reduction * chs)
                    layers.append(Transition([chs * g for g in gr_factor[offset:]],
                                             [new_chs * g for g in gr_factor[offset:]]))
                    chs = new_chs
            self.blocks.append(nn.Sequential(*layers))
            block_out.append((chs, out_scales))
            head_in = chs * gr_factor[-1]
            self.classifier.append(ExitHead(head_in, head_channels or head_in, num_classes, global_pool, drop_rate))
        self.num_features = self.classifier[-1].num_features
        self.head_hidden_size = self.num_features * self.classifier[-1].pool.feat_mult()
        # features_only: each scale after the last block that still has it (list position in that block's output)
        self._taps: List[Tuple[int, int]] = []
        self.feature_info: List[Dict[str, Any]] = []
        for s in range(n_scales):
            having = [b for b, (_, n_out) in enumerate(block_out) if s >= n_scales - n_out]
            if having:
                b = having[-1]
                c, n_out = block_out[b]
                self._taps.append((b, s - (n_scales - n_out)))
                self.feature_info.append(dict(
                    num_chs=c * gr_factor[s], reduction=(1 if stem == "cifar" else 4) * 2 ** s, module=f"blocks.{b}"))
        # total downsampling before the head's 2x2 pool: stem, the scales, the head's two stride-2 convs
        self.downsample = (1 if stem == "cifar" else 4) * 2 ** (n_scales - 1) * 4
        self._init_weights()
        set_bn_args(self, bn_momentum, bn_eps)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    @property
    def min_input_size(self) -> int:
        """Smallest height/width the network accepts (the head's pool needs a 2x2 map)."""
        return self.downsample + 1

    def check_input(self, x: Tensor) -> None:
        super().check_input(x)
        if is_symbolic(x):
            return
        h, w = x.shape[-2:]
        if min(h, w) < self.min_input_size:
            raise ValueError(
                f"input {h}x{w} is too small for this MSDNet: it downsamples by {self.downsample} before the "
                f"exit heads' 2x2 pool, so height and width must be at least {self.min_input_size}; "
                f"resize the images (native size: {'32' if self.stem == 'cifar' else '224'})")

    def forward_block(self, index: int, state: Any) -> List[Tensor]:
        """Block ``index`` (the stem first, for ``index == 0``): the feature maps, finest scale first."""
        return self.blocks[index](state)

    def forward_exit_features(self, index: int, state: List[Tensor]) -> Tensor:
        return self.classifier[index].forward_features(state)

    def exit_reads(self, index: int, state: List[Tensor]) -> List[Tensor]:
        """Exit ``index`` reads the coarsest scale only (its classifier's input)."""
        return [state[-1]]

    def forward_exit_head(self, index: int, x: Tensor, pre_logits: bool = False) -> Tensor:
        return self.classifier[index].forward_head(x, pre_logits)

    def intermediate_features(self, x: Tensor, indices: Optional[Union[int, List[int]]] = None,
                              output_fmt: str = "NCHW", **kwargs: Any) -> List[Tensor]:
        """The ``feature_info`` maps selected by ``indices``; blocks after the last one needed are not run.

        ``norm`` and ``stop_early`` (timm's other arguments) change nothing here: MSDNet has no final norm.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"MSDNet features are NCHW maps, got output_fmt={output_fmt!r}")
        take, max_index = feature_take_indices(len(self._taps), indices)
        found: Dict[int, Tensor] = {}
        state: Any = x
        for b in range(self._taps[max_index][0] + 1):
            state = self._run_block(b, state)
            found.update({i: state[self._taps[i][1]] for i in take if self._taps[i][0] == b})
        return [found[i] for i in take]

    def prune_intermediate_layers(
            self, indices: Optional[Union[int, List[int]]] = 1, prune_norm: bool = False, prune_head: bool = True,
    ) -> List[int]:
        """Keep only what ``forward_intermediates(indices)`` needs: drop later blocks and the exit heads."""
        take, max_index = feature_take_indices(len(self._taps), indices)
        keep = self._taps[max_index][0] + 1
        if prune_head or keep < len(self.blocks):
            self.blocks = self.blocks[:keep]
            self.classifier = nn.ModuleList()
            self.exit_heads_pruned = True
        return take

    def get_classifiers(self) -> nn.ModuleList:
        """The final linear layer of every exit head, cheapest exit first."""
        return nn.ModuleList(head.linear for head in self.classifier)

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Fresh linear layers for ``num_classes`` on every exit (0: exits return pooled features).

        ``global_pool`` (timm's values, see the class docstring) changes every exit's pooling.
        """
        for head in self.classifier:
            head.reset(num_classes, global_pool)
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
            self.head_hidden_size = self.num_features * self.classifier[-1].pool.feat_mult()


_RELEASE_ARG_NAMES = {
    "nBlocks": "n_blocks", "stepmode": "step_mode", "step": "step", "base": "base", "nChannels": "n_channels",
    "growthRate": "growth_rate", "grFactor": "gr_factor", "bnFactor": "bn_factor", "nScales": "n_scales",
    "prune": "prune", "reduction": "reduction", "bottleneck": "bottleneck",
}


def msdnet_kwargs_from_release_args(args: Dict[str, Any]) -> Dict[str, Any]:
    """Map the release's argparse settings (``nBlocks``, ``grFactor``, ``data``...) to :class:`MSDNet` kwargs."""
    kwargs = {new: args[old] for old, new in _RELEASE_ARG_NAMES.items() if old in args}
    for key in ("gr_factor", "bn_factor"):
        if isinstance(kwargs.get(key), str):  # the release passes '1-2-4'
            kwargs[key] = [int(v) for v in kwargs[key].split("-")]
    data = str(args.get("data", "ImageNet"))
    if data.startswith("cifar"):
        kwargs.update(stem="cifar", head_channels=128, num_classes=10 if data == "cifar10" else 100)
    else:
        kwargs.update(stem="imagenet", head_channels=None, num_classes=1000)
    return kwargs


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    cfg = {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "min_input_size": (3, 129, 129),
        "pool_size": (2, 2),
        "crop_pct": 0.875,
        "interpolation": "bilinear",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "blocks.0.0.layers.0.0",
        "classifier": tuple(f"classifier.{k}.linear" for k in range(5)),
        "license": "mit",
    }
    cfg.update(kwargs)
    return cfg


_CIFAR_CFG = dict(
    num_classes=100, input_size=(3, 32, 32), min_input_size=(3, 17, 17), crop_pct=1.0, mean=CIFAR_MEAN,
    std=CIFAR_STD, first_conv="blocks.0.0.layers.0.net.0",
)

default_cfgs = generate_default_cfgs({
    "msdnet_l2w": _cfg(),
    "msdnet_l2w_step6": _cfg(),
    "msdnet_l2w_step7": _cfg(),
    "msdnet_l2w_cifar": _cfg(**_CIFAR_CFG),
    "msdnet_l2w_cifar_tiny": _cfg(**_CIFAR_CFG),
})


def _create_msdnet(variant: str, pretrained: bool = False, **kwargs: Any) -> MSDNet:
    # every exit's classifier, so a pretrained file with other classes re-initialises all of them
    classifier = tuple(f"classifier.{k}.linear" for k in range(kwargs.get("n_blocks", 5)))
    overlay = {"classifier": classifier, **(kwargs.pop("pretrained_cfg_overlay", None) or {})}
    return build_model_with_cfg(MSDNet, variant, pretrained, pretrained_cfg_overlay=overlay,
                                feature_cfg=dict(feature_cls="getter", out_indices=None), **kwargs)


_IMAGENET_ARGS = dict(
    n_blocks=5, step_mode="even", n_channels=32, growth_rate=16, gr_factor=(1, 2, 4, 4), bn_factor=(1, 2, 4, 4),
    n_scales=4, prune="max", reduction=0.5, bottleneck=True, stem="imagenet", head_channels=None,
)
_CIFAR_ARGS = dict(
    n_blocks=5, step_mode="lin_grow", step=1, base=1, n_channels=16, growth_rate=6, gr_factor=(1, 2, 4),
    bn_factor=(1, 2, 4), n_scales=3, prune="max", reduction=0.5, bottleneck=True, stem="cifar", head_channels=128,
)


@register_model
def msdnet_l2w(pretrained: bool = False, **kwargs: Any) -> MSDNet:
    """MSDNet ImageNet, step 4 (5 exits, 224x224): the L2W release's ImageNet layout."""
    return _create_msdnet("msdnet_l2w", pretrained, **{**_IMAGENET_ARGS, "step": 4, "base": 4, **kwargs})


@register_model
def msdnet_l2w_step6(pretrained: bool = False, **kwargs: Any) -> MSDNet:
    """MSDNet ImageNet, step 6 (5 exits, 224x224)."""
    return _create_msdnet("msdnet_l2w_step6", pretrained, **{**_IMAGENET_ARGS, "step": 6, "base": 6, **kwargs})


@register_model
def msdnet_l2w_step7(pretrained: bool = False, **kwargs: Any) -> MSDNet:
    """MSDNet ImageNet, step 7 (5 exits, 224x224)."""
    return _create_msdnet("msdnet_l2w_step7", pretrained, **{**_IMAGENET_ARGS, "step": 7, "base": 7, **kwargs})


@register_model
def msdnet_l2w_cifar(pretrained: bool = False, **kwargs: Any) -> MSDNet:
    """MSDNet CIFAR (5 exits, 32x32, 100 classes by default; pass num_classes=10 for CIFAR-10)."""
    return _create_msdnet("msdnet_l2w_cifar", pretrained, **{**_CIFAR_ARGS, **kwargs})


@register_model
def msdnet_l2w_cifar_tiny(pretrained: bool = False, **kwargs: Any) -> MSDNet:
    """The CIFAR architecture with small widths, for demos, fast tests and CPU studies."""
    return _create_msdnet("msdnet_l2w_cifar_tiny", pretrained,
                          **{**_CIFAR_ARGS, "n_channels": 8, "growth_rate": 4, "head_channels": 32, **kwargs})
