"""RANet: Resolution Adaptive Networks (Yang et al., CVPR 2020) as a staged multi-exit model.

Built from the RANet paper's description (its L2W application has no released code):

* A stem produces the image at several resolutions ("levels"; level 0 is the lowest resolution).
* Scale flows run from low to high resolution. Flow ``i`` starts at level ``scale_list[i] - 1``
  and has ``num_blocks + block_step * i`` dense blocks. The lowest-resolution flow (flow 0) carries
  the first classifiers.
* The first ``n_{i-1}`` blocks of flow ``i`` fuse the matching block outputs of flow ``i - 1``:
  a 1x1 conv-BN-ReLU compresses them (``compress_factor``, 0.25), bilinear upsampling brings them
  to this flow's resolution, and they are concatenated. Transition layers (1x1 conv-BN-ReLU with
  ``reduction`` 0.5) join consecutive blocks of a flow; 2x2 average pooling in those spread over the
  fused blocks brings the flow down to the lowest resolution.
* The remaining ``block_step`` blocks of flow ``i`` are new: a classifier follows each of them.
  Exits are ordered lowest-resolution flow first.
* Dense layers: 1x1 bottleneck (``bn_factor * growth`` channels) then 3x3 conv of ``growth``
  channels, with ``growth = growth_rate * gr_factor[i]`` in flow ``i``.
* Classifier: two 3x3 stride-2 conv-BN-ReLU (128 channels on CIFAR, the input width on ImageNet),
  2x2 average pooling, linear.

Stage ``k`` computes exactly what exit ``k`` needs beyond earlier stages: stage 0 runs the stem and
the first block of flow 0; the first exit of flow ``i > 0`` runs that flow's fused blocks and its
first new block; every other stage runs one block. The state carries the stem outputs of flows not
started yet and the block outputs of the latest flow (the next flow fuses them).

timm's model API: ``forward_features`` is the trunk and the last classifier's two convs (the map its
pooling reads), ``forward_head`` that classifier's pooling and linear layer. ``feature_info`` /
``forward_intermediates`` (``features_only=True``) give the highest-resolution flow at each of its
resolutions (the last block at that resolution, before its transition), finest first.

One file for the family, as timm lays out its models (over 400 lines): the layers, the network, its
timm API and the registered variants are read together.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model, register_notrace_function
from timm.models._features import feature_take_indices  # what timm's own models use
from torch import Tensor, nn

from .base import MultiExitModel
from .layers import ExitPool, check_timm_kwargs, exit_classifier, is_symbolic, set_bn_args

__all__ = ["RANet"]

CIFAR_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR_STD = (0.2673, 0.2564, 0.2762)


def _conv_bn_relu(in_chs: int, out_chs: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_chs, out_chs, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(out_chs),
        nn.ReLU(inplace=True),
    )


class _DenseLayer(nn.Module):
    """Bottleneck dense layer: output is ``cat(x, conv3x3(conv1x1(x)))`` (``growth`` new channels)."""

    def __init__(self, in_chs: int, growth: int, bn_width: int):
        super().__init__()
        inner = min(in_chs, bn_width * growth)
        self.bottleneck = _conv_bn_relu(in_chs, inner, 1)
        self.conv = _conv_bn_relu(inner, growth, 3)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, self.conv(self.bottleneck(x))], dim=1)


@register_notrace_function  # a shape-dependent branch: one call when torch.fx traces (public name: fx skips _names)
def upsample_to(low: Tensor, x: Tensor) -> Tensor:
    """``low`` resized (bilinear) to the spatial size of ``x`` where the sizes differ."""
    if low.shape[-2:] != x.shape[-2:]:
        low = F.interpolate(low, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return low


class _Fusion(nn.Module):
    """Fuse a lower-resolution flow: 1x1 conv-BN-ReLU, bilinear upsampling, concatenation."""

    def __init__(self, low_chs: int, out_chs: int):
        super().__init__()
        self.conv = _conv_bn_relu(low_chs, out_chs, 1)

    def forward(self, x: Tensor, low: Tensor) -> Tensor:
        return torch.cat([x, upsample_to(self.conv(low), x)], dim=1)


class _Transition(nn.Sequential):
    """Channel reduction (1x1 conv-BN-ReLU), then 2x2 average pooling where the flow halves its resolution."""

    def __init__(self, in_chs: int, out_chs: int, downsample: bool):
        super().__init__(_conv_bn_relu(in_chs, out_chs, 1), *([nn.AvgPool2d(2)] if downsample else []))


class _Block(nn.Module):
    """Dense layers, optional fusion of the lower flow, optional transition down one level."""

    def __init__(self, layers: nn.Sequential, fusion: Optional[_Fusion], transition: Optional[_Transition]):
        super().__init__()
        self.layers = layers
        self.fusion = fusion
        self.transition = transition

    def features(self, x: Tensor, low: Optional[Tensor] = None) -> Tensor:
        """Dense layers and fusion: the block's map before its transition."""
        x = self.layers(x)
        if self.fusion is not None:
            x = self.fusion(x, low)
        return x

    def forward(self, x: Tensor, low: Optional[Tensor] = None) -> Tensor:
        x = self.features(x, low)
        if self.transition is not None:
            x = self.transition(x)
        return x


class _Head(nn.Module):
    """Two 3x3 stride-2 conv-BN-ReLU, pooling (2x2 average), dropout, linear classifier."""

    def __init__(self, in_chs: int, width: int, num_classes: int, global_pool: str = "avg", drop_rate: float = 0.0):
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn_relu(in_chs, width, 3, stride=2),
            _conv_bn_relu(width, width, 3, stride=2),
        )
        self.num_features = width
        self.drop_rate = drop_rate
        self.pool = ExitPool(global_pool)
        self.fc = exit_classifier(width * self.pool.feat_mult(), num_classes, bool(self.pool.pool_type))

    def reset(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None:
            self.pool = ExitPool(global_pool)
        self.fc = exit_classifier(self.num_features * self.pool.feat_mult(), num_classes, bool(self.pool.pool_type))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.pool(x)
        if self.drop_rate > 0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.features(x))


def _parse_factors(name: str, value: Sequence[int] | str, n: int) -> List[int]:
    if isinstance(value, str):
        value = [int(v) for v in value.split("-")]
    value = [int(v) for v in value]
    if len(value) != n or any(v < 1 for v in value):
        raise ValueError(f"{name} must list {n} positive integers (one per scale flow), got {value}")
    return value


def _downsample_after(num_fused: int, num_down: int) -> List[int]:
    """Indices of the fused blocks after which a flow halves its resolution (spread evenly)."""
    return [(t + 1) * num_fused // num_down - 1 for t in range(num_down)]


class RANet(MultiExitModel):
    """Resolution Adaptive Network with one exit after every new block of every scale flow.

    Args:
        scale_list: for each flow (low to high resolution), how many resolution levels it spans;
            starts at 1 and grows by 0 or 1 per flow (e.g. ``(1, 2, 3)``).
        gr_factor: growth-rate factor of each flow (e.g. ``(4, 2, 1)``).
        bn_factor: bottleneck width factor of each flow.
        growth_rate: base growth rate (times ``gr_factor``).
        num_channels: base stem width (times ``gr_factor``).
        num_blocks: blocks of the lowest-resolution flow; flow ``i`` has ``num_blocks + block_step * i``.
        block_step: extra blocks per flow (the new, classifier-carrying blocks of flows ``i > 0``).
        step: dense layers per block (``step_mode='even'``) or the increment (``'lin_grow'``:
            block ``j`` of a flow has ``step * (j + 1)`` layers).
        compress_factor: width of the fused lower-flow features relative to their input width.
        reduction: channel reduction of the transition layers.
        stem: ``'cifar'`` (3x3 conv) or ``'imagenet'`` (7x7 stride-2 conv and max-pool).
        head_width: classifier conv width; ``None`` uses the head's input width (ImageNet head).
        global_pool: classifier pooling: ``'avg'`` (2x2 average), ``''`` (none, with ``num_classes=0``:
            exits return maps) or a timm pool type (``'max'``, ``'avgmax'``...).
        drop_rate: dropout before every classifier's linear layer (timm's classifier dropout; 0: none).
        drop_path_rate, drop_block_rate: timm's standard arguments; RANet has neither, so only ``None`` / 0.
        bn_momentum, bn_eps: set on every BatchNorm (``None``: PyTorch's defaults).
    """

    def __init__(
        self,
        scale_list: Sequence[int] | str = (1, 2, 3),
        gr_factor: Sequence[int] | str = (4, 2, 1),
        bn_factor: Sequence[int] | str = (4, 2, 1),
        growth_rate: int = 6,
        num_channels: int = 16,
        num_blocks: int = 2,
        block_step: int = 2,
        step: int = 2,
        step_mode: str = "even",
        compress_factor: float = 0.25,
        reduction: float = 0.5,
        stem: str = "cifar",
        head_width: Optional[int] = 128,
        num_classes: int = 100,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
        drop_path_rate: Optional[float] = None,
        drop_block_rate: Optional[float] = None,
        bn_momentum: Optional[float] = None,
        bn_eps: Optional[float] = None,
        **kwargs: Any,
    ):
        super().__init__()
        check_timm_kwargs(RANet, drop_rate, drop_path_rate, drop_block_rate, bn_momentum, bn_eps, **kwargs)
        if isinstance(scale_list, str):
            scale_list = [int(v) for v in scale_list.split("-")]
        scale_list = [int(s) for s in scale_list]
        if not scale_list or scale_list[0] != 1 or any(b - a not in (0, 1) for a, b in zip(scale_list, scale_list[1:])):
            raise ValueError(
                f"scale_list must start at 1 and grow by 0 or 1 per flow (e.g. (1, 2, 3)), got {scale_list}"
            )
        n_flows = len(scale_list)
        gr_factor = _parse_factors("gr_factor", gr_factor, n_flows)
        bn_factor = _parse_factors("bn_factor", bn_factor, n_flows)
        if step_mode not in ("even", "lin_grow"):
            raise ValueError(f"step_mode must be 'even' or 'lin_grow', got {step_mode!r}")
        if stem not in ("cifar", "imagenet"):
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
        if min(growth_rate, num_channels, num_blocks, step) < 1 or block_step < 0:
            raise ValueError("growth_rate, num_channels, num_blocks and step must be >= 1, block_step >= 0")
        if n_flows > 1 and block_step < 1:
            raise ValueError("block_step must be >= 1 when there are several flows (each flow needs a new block)")

        self.num_classes, self.in_chans, self.drop_rate = num_classes, in_chans, drop_rate
        self.global_pool = global_pool
        self.scale_list = scale_list
        self.stem_type = stem
        n_levels = scale_list[-1]
        self.num_levels = n_levels
        start_level = [s - 1 for s in scale_list]
        flow_blocks = [num_blocks + block_step * i for i in range(n_flows)]
        self.flow_blocks = flow_blocks

        # Stem: full resolution (top level) first, then one stride-2 conv per lower level.
        level_chs = [num_channels * gr_factor[start_level.index(level)] for level in range(n_levels)]
        top = n_levels - 1
        if stem == "cifar":
            first = _conv_bn_relu(in_chans, level_chs[top], 3)
        else:
            first = nn.Sequential(
                _conv_bn_relu(in_chans, level_chs[top], 7, stride=2),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        stem_layers = [first] + [
            _conv_bn_relu(level_chs[level + 1], level_chs[level], 3, stride=2) for level in reversed(range(top))
        ]
        self.stem = nn.ModuleList(stem_layers)  # stem[j] produces level top - j

        # Flows.
        self.flows = nn.ModuleList()
        self.heads = nn.ModuleList()
        self.exit_plan: List[Tuple[int, int]] = []  # (flow, block) of each exit, in exit order
        prev_out_chs: List[int] = []
        prev_levels: List[int] = []
        self.head_in_chs: List[int] = []
        for i in range(n_flows):
            growth = growth_rate * gr_factor[i]
            n_fused = flow_blocks[i - 1] if i > 0 else 0
            n_down = start_level[i]
            if n_down > n_fused and i > 0:
                raise ValueError(
                    f"flow {i} must halve its resolution {n_down} times within its {n_fused} fused blocks: "
                    "increase num_blocks or use a flatter scale_list"
                )
            down_after = set(_downsample_after(n_fused, n_down)) if n_down else set()
            chs, level = level_chs[start_level[i]], start_level[i]
            blocks, out_chs, levels = nn.ModuleList(), [], []
            pre_chs, in_levels = [], []  # channels and level of each block's map before its transition
            for j in range(flow_blocks[i]):
                n_layers = step if step_mode == "even" else step * (j + 1)
                layers = []
                for _ in range(n_layers):
                    layers.append(_DenseLayer(chs, growth, bn_factor[i]))
                    chs += growth
                fusion = None
                in_levels.append(level)
                if j < n_fused:
                    if prev_levels[j] > level:
                        raise ValueError(f"flow {i} block {j} would fuse a higher-resolution flow: check scale_list")
                    fused = max(1, int(prev_out_chs[j] * compress_factor))
                    fusion = _Fusion(prev_out_chs[j], fused)
                    chs += fused
                transition = None
                pre_chs.append(chs)
                if j < flow_blocks[i] - 1:  # a transition between consecutive blocks of a flow
                    reduced = max(1, int(chs * reduction))
                    transition = _Transition(chs, reduced, downsample=j in down_after)
                    chs, level = reduced, level - (j in down_after)
                blocks.append(_Block(nn.Sequential(*layers), fusion, transition))
                out_chs.append(chs)
                levels.append(level)
                if j >= n_fused:
                    self.exit_plan.append((i, j))
                    self.head_in_chs.append(chs)
                    self.heads.append(_Head(chs, head_width or chs, num_classes, global_pool, drop_rate))
            self.flows.append(blocks)
            prev_out_chs, prev_levels = out_chs, levels
        self.num_exits = len(self.exit_plan)
        self.num_features = self.heads[-1].num_features
        self.head_hidden_size = self.num_features * self.heads[-1].pool.feat_mult()
        # features_only: the last (highest-resolution) flow, at each level the last block there, before its transition
        stem_reduction = 4 if stem == "imagenet" else 1
        self._taps = [max(j for j, lv in enumerate(in_levels) if lv == level)
                      for level in range(in_levels[0], -1, -1) if level in in_levels]
        self.feature_info = [
            dict(num_chs=pre_chs[j], reduction=stem_reduction * 2 ** (top - in_levels[j]),
                 module=f"flows.{n_flows - 1}.{j}")
            for j in self._taps
        ]
        self._init_weights()
        set_bn_args(self, bn_momentum, bn_eps)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def check_input(self, x: Tensor) -> None:
        super().check_input(x)
        if is_symbolic(x):
            return
        stride = 2 ** (self.num_levels - 1) * (4 if self.stem_type == "imagenet" else 1)
        lowest = min(x.shape[-2:]) // stride
        if not 5 <= lowest <= 12:
            raise ValueError(
                f"input {tuple(x.shape[-2:])} gives a {lowest}x{lowest} lowest resolution, but the RANet classifiers "
                f"(two stride-2 convs and a 2x2 pool) need 5..12 (input {5 * stride}..{12 * stride + stride - 1}, "
                "e.g. 32x32 for CIFAR models, 224x224 for ImageNet ones): resize the images or change scale_list"
            )

    def _stem(self, x: Tensor) -> Dict[str, Tensor]:
        """The image at every level (keys: level numbers as strings, 0 = lowest resolution)."""
        starts: Dict[str, Tensor] = {}
        for j, layer in enumerate(self.stem):
            x = layer(x)
            starts[str(self.num_levels - 1 - j)] = x
        return starts

    def forward_block(self, index: int, state: Any) -> Dict[str, Any]:
        """What exit ``index`` needs beyond the earlier stages (see the module docstring)."""
        flow, block = self.exit_plan[index]
        if index == 0:
            state = {"starts": self._stem(state), "outs": []}
        starts, outs = dict(state["starts"]), list(state["outs"])
        blocks = self.flows[flow]
        if index == 0 or self.exit_plan[index - 1][0] == flow:  # continue the current flow: one block
            x = outs[-1] if outs else self._take_start(starts, flow)
            outs.append(blocks[block](x))
        else:  # start a new flow: fused blocks over the previous flow's outputs, then one new block
            prev, outs = outs, []
            x = self._take_start(starts, flow)
            for j in range(block + 1):
                x = blocks[j](x, prev[j] if j < len(prev) else None)
                outs.append(x)
        return {"starts": starts, "outs": outs}

    def forward_exit_features(self, index: int, state: Dict[str, Any]) -> Tensor:
        return self.heads[index].features(state["outs"][-1])

    def exit_reads(self, index: int, state: Dict[str, Any]) -> List[Tensor]:
        """Exit ``index`` reads the last output of the current flow."""
        return [state["outs"][-1]]

    def forward_exit_head(self, index: int, x: Tensor, pre_logits: bool = False) -> Tensor:
        return self.heads[index].forward_head(x, pre_logits)

    def intermediate_features(self, x: Tensor, indices: Optional[Union[int, List[int]]] = None,
                              output_fmt: str = "NCHW", **kwargs: Any) -> List[Tensor]:
        """The ``feature_info`` maps selected by ``indices``; the last flow stops at the last block needed.

        ``norm`` and ``stop_early`` (timm's other arguments) change nothing here: RANet has no final norm.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"RANet features are NCHW maps, got output_fmt={output_fmt!r}")
        take, max_index = feature_take_indices(len(self._taps), indices)
        wanted = {self._taps[i]: i for i in take}
        starts, prev, last = self._stem(x), [], len(self.flows) - 1
        found: Dict[int, Tensor] = {}
        for i, blocks in enumerate(self.flows):
            h, outs = self._take_start(starts, i), []
            for j in range(self._taps[max_index] + 1 if i == last else len(blocks)):
                pre = blocks[j].features(h, prev[j] if j < len(prev) else None)
                if i == last and j in wanted:
                    found[wanted[j]] = pre
                h = blocks[j].transition(pre) if blocks[j].transition is not None else pre
                outs.append(h)
            prev = outs
        return [found[i] for i in take]

    def prune_intermediate_layers(
        self, indices: Optional[Union[int, List[int]]] = 1, prune_norm: bool = False, prune_head: bool = True,
    ) -> List[int]:
        """Keep only what ``forward_intermediates(indices)`` needs: drop the classifiers and later blocks."""
        take, max_index = feature_take_indices(len(self._taps), indices)
        keep = self._taps[max_index] + 1
        if prune_head or keep < len(self.flows[-1]):
            self.flows[-1] = self.flows[-1][:keep]
            self.heads = nn.ModuleList()
            self.exit_heads_pruned = True
        return take

    def _take_start(self, starts: Dict[str, Tensor], flow: int) -> Tensor:
        """The stem output flow ``flow`` starts from; kept in the state while a later flow needs it too."""
        level = self.scale_list[flow] - 1
        if any(s - 1 == level for s in self.scale_list[flow + 1:]):
            return starts[str(level)]
        return starts.pop(str(level))

    def get_classifiers(self) -> nn.ModuleList:
        """The linear layer of every exit head, cheapest exit first."""
        return nn.ModuleList(head.fc for head in self.heads)

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the linear layer of every exit head (``num_classes=0``: heads return pooled features).

        ``global_pool`` (timm's values, see the class docstring) changes every head's pooling.
        """
        for head in self.heads:
            head.reset(num_classes, global_pool)
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
            self.head_hidden_size = self.num_features * self.heads[-1].pool.feat_mult()


def _create_ranet(variant: str, pretrained: bool = False, **kwargs: Any) -> RANet:
    # every exit's classifier, so a pretrained file with other classes re-initialises all of them
    scale_list = kwargs["scale_list"]
    n_flows = len(scale_list.split("-") if isinstance(scale_list, str) else scale_list)
    n_exits = kwargs["num_blocks"] + kwargs["block_step"] * (n_flows - 1)
    overlay = {"classifier": tuple(f"heads.{k}.fc" for k in range(n_exits)),
               **(kwargs.pop("pretrained_cfg_overlay", None) or {})}
    return build_model_with_cfg(RANet, variant, pretrained, pretrained_cfg_overlay=overlay,
                                feature_cfg=dict(feature_cls="getter", out_indices=None), **kwargs)


def _cfg(url: str = "", **kwargs: Any) -> Dict[str, Any]:
    return {
        "url": url,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "min_input_size": (3, 160, 160),
        "pool_size": (2, 2),
        "crop_pct": 0.875,
        "interpolation": "bilinear",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.0.0.0",
        "classifier": tuple(f"heads.{k}.fc" for k in range(8)),
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "ranet_l2w_cifar.untrained": _cfg(
        num_classes=100, input_size=(3, 32, 32), min_input_size=(3, 20, 20), crop_pct=1.0, mean=CIFAR_MEAN,
        std=CIFAR_STD, first_conv="stem.0.0", classifier=tuple(f"heads.{k}.fc" for k in range(6)),
    ),
    "ranet_l2w.untrained": _cfg(),
})


@register_model
def ranet_l2w_cifar(pretrained: bool = False, **kwargs: Any) -> RANet:
    """RANet for 32x32 images: scale list 1-2-3, growth/bottleneck factors 4-2-1, 16 channels, 6 exits."""
    model_args = dict(
        scale_list=(1, 2, 3), gr_factor=(4, 2, 1), bn_factor=(4, 2, 1), growth_rate=6, num_channels=16,
        num_blocks=2, block_step=2, step=2, step_mode="lin_grow", stem="cifar", head_width=128, num_classes=100,
    )
    return _create_ranet("ranet_l2w_cifar", pretrained, **dict(model_args, **kwargs))


@register_model
def ranet_l2w(pretrained: bool = False, **kwargs: Any) -> RANet:
    """RANet for ImageNet: scale list 1-2-3-4, growth factors 4-2-2-1, growth rate 16, 32 channels, 8 exits."""
    model_args = dict(
        scale_list=(1, 2, 3, 4), gr_factor=(4, 2, 2, 1), bn_factor=(4, 2, 2, 1), growth_rate=16, num_channels=32,
        num_blocks=2, block_step=2, step=8, step_mode="even", stem="imagenet", head_width=None, num_classes=1000,
    )
    return _create_ranet("ranet_l2w", pretrained, **dict(model_args, **kwargs))
