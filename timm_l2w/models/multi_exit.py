"""Any timm backbone as a staged multi-exit model: exit heads on chosen intermediate outputs.

The trunk is the timm model itself (``wrapper.backbone``, created with ``num_classes=0``), so its
pretrained weights load through timm and a plain timm state_dict loads into it unchanged. The
backbone is run piecewise along the same intermediate points as timm's ``feature_info`` /
``forward_intermediates`` (ResNet: the stem activation and ``layer1..4``; ConvNeXt and other
``stem`` + ``stages`` models: each stage; ViT-style models: each transformer block). Stage ``k``
runs the backbone from the point of exit ``k - 1`` to the point of exit ``k``, then head ``k``,
so early-exit inference stops computing after the stage of the exit a sample takes.

Heads: ``'linear'`` is pooling + linear (tokens: LayerNorm, the backbone's token pooling, linear);
an exit on the backbone's final point uses the backbone's own pooling/norm (``forward_head`` with
``pre_logits=True``) and a new linear layer, so the last exit is exactly the backbone as a
classifier. ``'conv'`` is two 3x3 stride-2 conv-BN-ReLU, global average pooling and linear
(tokens are reshaped to their patch grid first).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import timm
import torch
from torch import Tensor, nn
from timm.layers import Attention, global_pool_nlc
from timm.models import generate_default_cfgs, register_model

from ..flops import register_flop_counter
from .base import MultiExitModel

__all__ = ["MultiExitWrapper", "multi_exit_model"]


def _attention_flops(m: nn.Module, inputs: Tuple[Tensor, ...], out: Tensor) -> float:
    """Attention matmuls (q k^T and attn v): 2 * N^2 * dim MACs per image (projections are Linear layers)."""
    b, n = inputs[0].shape[:2]
    dim = m.num_heads * m.head_dim
    return 2.0 * b * n * n * dim


register_flop_counter(Attention, _attention_flops)


def _trunk_plan(backbone: nn.Module) -> Tuple[str, List[List[str]], List[str]]:
    """How to run ``backbone`` piecewise: (layout, ops per intermediate point, ops that finish the features)."""
    if all(hasattr(backbone, a) for a in ("conv1", "bn1", "act1", "maxpool", "layer1", "layer4")):
        layers = [n for n in ("layer1", "layer2", "layer3", "layer4")]
        return "nchw", [["conv1", "bn1", "act1"], ["maxpool", "layer1"]] + [[n] for n in layers[1:]], []
    if isinstance(getattr(backbone, "stages", None), nn.Sequential) and hasattr(backbone, "stem"):
        points = [[f"stages.{i}"] for i in range(len(backbone.stages))]
        points[0].insert(0, "stem")
        return "nchw", points, ["norm_pre"] if hasattr(backbone, "norm_pre") else []
    if hasattr(backbone, "patch_embed") and isinstance(getattr(backbone, "blocks", None), nn.Sequential):
        points = [[f"blocks.{i}"] for i in range(len(backbone.blocks))]
        points[0][:0] = [a for a in ("patch_embed", "_pos_embed", "patch_drop", "norm_pre") if hasattr(backbone, a)]
        return "nlc", points, ["norm"] if hasattr(backbone, "norm") else []
    raise TypeError(
        f"{type(backbone).__name__} exposes no staged feature API that MultiExitWrapper can split "
        "(needs feature_info and ResNet layers, stem + stages, or patch_embed + blocks): use a resnet, "
        "convnext, vit (or similar) timm model, or write a MultiExitModel subclass"
    )


def _resolve(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


class _TokenHead(nn.Module):
    """LayerNorm, token pooling (class token or average of patch tokens), linear."""

    def __init__(self, dim: int, num_classes: int, pool: str, num_prefix_tokens: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.pool, self.num_prefix_tokens = pool, num_prefix_tokens
        self.fc = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = global_pool_nlc(self.norm(x), pool_type=self.pool, num_prefix_tokens=self.num_prefix_tokens)
        return self.fc(x)


class _ConvHead(nn.Module):
    """Two 3x3 stride-2 conv-BN-ReLU, global average pooling, linear (tokens go to their patch grid first)."""

    def __init__(self, in_chs: int, width: int, num_classes: int, num_prefix_tokens: Optional[int] = None):
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        layers: List[nn.Module] = []
        for c in (in_chs, width):
            layers += [nn.Conv2d(c, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.fc = nn.Linear(width, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        if self.num_prefix_tokens is not None:  # [B, N, D] tokens -> [B, D, H, W] patch grid
            x = x[:, self.num_prefix_tokens:]
            side = int(round(x.shape[1] ** 0.5))
            if side * side != x.shape[1]:
                raise ValueError(f"conv heads need a square patch grid, got {x.shape[1]} patch tokens")
            x = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)
        return self.fc(self.features(x))


class MultiExitWrapper(MultiExitModel):
    """A timm backbone with exit heads after chosen intermediate points (see the module docstring).

    Args:
        backbone: a timm model name (created with ``timm.create_model(name, num_classes=0, ...)``)
            or an already built timm model (its classifier is reset to ``num_classes=0``).
        exit_indices: increasing indices into the backbone's intermediate points (``feature_info``
            order; ViT: block indices). Default: ResNet ``layer1..4``; every stage; four evenly
            spaced ViT blocks ending at the last.
        head: ``'linear'`` (pooling + linear) or ``'conv'`` (small conv head).
        num_classes: classes of every exit.
        pretrained: load the backbone's pretrained weights through timm.
        head_width: conv head width.
        **timm_kwargs: passed to ``timm.create_model`` (``img_size``, ``in_chans``, ``drop_path_rate``...).
    """

    def __init__(
        self,
        backbone: Union[str, nn.Module],
        exit_indices: Optional[Sequence[int]] = None,
        head: str = "linear",
        num_classes: int = 1000,
        pretrained: bool = False,
        head_width: int = 128,
        **timm_kwargs: Any,
    ):
        super().__init__()
        if head not in ("linear", "conv"):
            raise ValueError(f"head must be 'linear' or 'conv', got {head!r}")
        if isinstance(backbone, str):
            backbone = timm.create_model(backbone, pretrained=pretrained, num_classes=0, **timm_kwargs)
        elif not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be a timm model name or nn.Module, got {type(backbone).__name__}")
        elif timm_kwargs or pretrained:
            raise ValueError("timm keyword arguments and pretrained=True only apply when backbone is a model name")
        if not hasattr(backbone, "feature_info") or not hasattr(backbone, "forward_head"):
            raise TypeError(
                f"{type(backbone).__name__} has no timm feature API (feature_info / forward_head): "
                "pass a timm model (or its name) such as 'resnet18', 'convnext_atto' or 'vit_tiny_patch16_224'"
            )
        if backbone.get_classifier() is not None and not isinstance(backbone.get_classifier(), nn.Identity):
            backbone.reset_classifier(0)
        self.backbone = backbone
        self.layout, self._points, self._finish = _trunk_plan(backbone)
        info = list(backbone.feature_info)
        n_points = len(self._points)
        if len(info) != n_points:
            raise TypeError(
                f"{type(backbone).__name__}: feature_info lists {len(info)} outputs but the trunk splits into "
                f"{n_points} points; this model family is not supported by MultiExitWrapper"
            )
        if exit_indices is None:
            if self.layout == "nlc":
                exit_indices = [(t + 1) * n_points // 4 - 1 for t in range(min(4, n_points))]
            else:
                exit_indices = list(range(1 if n_points == 5 and hasattr(backbone, "layer1") else 0, n_points))
        exit_indices = [int(i) for i in exit_indices]
        if not exit_indices or any(not 0 <= i < n_points for i in exit_indices):
            raise ValueError(
                f"exit_indices {exit_indices} out of range: {type(backbone).__name__} has {n_points} "
                f"intermediate outputs, pass indices in 0..{n_points - 1}"
            )
        if any(b <= a for a, b in zip(exit_indices, exit_indices[1:])):
            raise ValueError(f"exit_indices must be strictly increasing (cheapest exit first), got {exit_indices}")

        self.exit_indices = exit_indices
        self.num_exits = len(exit_indices)
        self.num_classes = num_classes
        self.in_chans = timm_kwargs.get("in_chans", getattr(backbone, "in_chans", 3))
        self.head_type, self.head_width = head, head_width
        self.exit_channels = [info[i]["num_chs"] for i in exit_indices]
        self.num_prefix_tokens = getattr(backbone, "num_prefix_tokens", 0)
        self.heads = nn.ModuleList(self._make_head(k) for k in range(self.num_exits))
        self.num_features = getattr(self.heads[-1], "in_features", backbone.num_features)
        cfg = dict(getattr(backbone, "pretrained_cfg", None) or {})
        img_size = getattr(getattr(backbone, "patch_embed", None), "img_size", None)
        if img_size is not None:
            cfg["input_size"] = (self.in_chans, *img_size)
        cfg["classifier"] = f"heads.{self.num_exits - 1}"
        self.pretrained_cfg = cfg

    def _uses_backbone_head(self, k: int) -> bool:
        return self.head_type == "linear" and self.exit_indices[k] == len(self._points) - 1

    def _make_head(self, k: int) -> nn.Module:
        chs, n = self.exit_channels[k], self.num_classes
        if self._uses_backbone_head(k):
            return nn.Linear(self.backbone.num_features, n) if n > 0 else nn.Identity()
        if self.head_type == "conv":
            prefix = self.num_prefix_tokens if self.layout == "nlc" else None
            return _ConvHead(chs, self.head_width, n, prefix)
        if self.layout == "nlc":
            pool = getattr(self.backbone, "global_pool", "token")
            pool = pool if pool in ("token", "avg", "max", "avgmax") and (pool != "token" or self.num_prefix_tokens) else "avg"
            return _TokenHead(chs, n, pool, self.num_prefix_tokens)
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(chs, n) if n > 0 else nn.Identity())

    def check_input(self, x: Tensor) -> None:
        super().check_input(x)
        patch_embed = getattr(self.backbone, "patch_embed", None)
        img_size = getattr(patch_embed, "img_size", None)
        if img_size is not None and getattr(patch_embed, "strict_img_size", False) and tuple(x.shape[-2:]) != tuple(img_size):
            raise ValueError(
                f"input is {tuple(x.shape[-2:])}, this ViT expects {tuple(img_size)}: pass img_size="
                f"{x.shape[-1]} (or dynamic_img_size=True) when creating the model, or resize the images"
            )

    def _run(self, ops: List[str], x: Tensor) -> Tensor:
        for name in ops:
            x = _resolve(self.backbone, name)(x)
        return x

    def forward_stage(self, index: int, state: Any) -> Tuple[Any, Tensor]:
        if not 0 <= index < self.num_exits:
            raise ValueError(f"stage index {index} out of range: this model has {self.num_exits} exits")
        start = self.exit_indices[index - 1] + 1 if index > 0 else 0
        x = state
        for point in range(start, self.exit_indices[index] + 1):
            x = self._run(self._points[point], x)
        if self._uses_backbone_head(index):
            feats = self.backbone.forward_head(self._run(self._finish, x), pre_logits=True)
            return x, self.heads[index](feats)
        return x, self.heads[index](x)

    def trunk_features(self, x: Tensor) -> Tensor:
        """The backbone's ``forward_features`` output computed by the staged trunk (all points)."""
        for ops in self._points:
            x = self._run(ops, x)
        return self._run(self._finish, x)

    def load_backbone_state_dict(self, state_dict: Dict[str, Tensor], strict: bool = True):
        """Load a plain timm state_dict into the trunk, dropping the classifier it had (``fc``, ``head``...)."""
        own = self.backbone.state_dict()
        classifier = self.backbone.pretrained_cfg.get("classifier") if hasattr(self.backbone, "pretrained_cfg") else None
        names = (classifier,) if isinstance(classifier, str) else tuple(classifier or ())
        kept = {k: v for k, v in state_dict.items() if k in own or not any(k.startswith(n + ".") for n in names)}
        return self.backbone.load_state_dict(kept, strict=strict)

    def get_classifier(self) -> nn.Module:
        return self.heads[-1]

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """New exit heads for ``num_classes`` (``0``: heads return features)."""
        self.num_classes = num_classes
        self.heads = nn.ModuleList(self._make_head(k) for k in range(self.num_exits))


def multi_exit_model(model_name: str, **kwargs: Any) -> MultiExitWrapper:
    """Any timm model name as a multi-exit model: ``multi_exit_model('resnet50', num_classes=10)``."""
    return MultiExitWrapper(model_name, **kwargs)


def _create_multi_exit(variant: str, backbone: str, pretrained: bool = False, **kwargs: Any) -> MultiExitWrapper:
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm's create_model passes these
        kwargs.pop(key, None)
    model = MultiExitWrapper(backbone, pretrained=pretrained, **kwargs)
    model.pretrained_cfg = {**default_cfgs[variant].default.to_dict(), **model.pretrained_cfg, "architecture": variant}
    return model


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    return {"url": "", "num_classes": 1000, "input_size": (3, 224, 224), "classifier": "heads.3", **kwargs}


default_cfgs = generate_default_cfgs({
    "resnet18_l2w.untrained": _cfg(),
    "convnext_atto_l2w.untrained": _cfg(),
    "vit_tiny_l2w.untrained": _cfg(),
})


@register_model
def resnet18_l2w(pretrained: bool = False, **kwargs: Any) -> MultiExitWrapper:
    """ResNet-18 with exits after layer1..layer4 (pretrained=True loads timm's ResNet-18 weights)."""
    return _create_multi_exit("resnet18_l2w", "resnet18", pretrained, **dict(dict(exit_indices=(1, 2, 3, 4)), **kwargs))


@register_model
def convnext_atto_l2w(pretrained: bool = False, **kwargs: Any) -> MultiExitWrapper:
    """ConvNeXt-Atto with an exit after each of its four stages."""
    return _create_multi_exit("convnext_atto_l2w", "convnext_atto", pretrained, **dict(dict(exit_indices=(0, 1, 2, 3)), **kwargs))


@register_model
def vit_tiny_l2w(pretrained: bool = False, **kwargs: Any) -> MultiExitWrapper:
    """ViT-Tiny/16 with exits after blocks 3, 6, 9 and 12."""
    return _create_multi_exit("vit_tiny_l2w", "vit_tiny_patch16_224", pretrained, **dict(dict(exit_indices=(2, 5, 8, 11)), **kwargs))
