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
(tokens are reshaped to their patch grid first). Every head keeps its classifier in ``fc``.

timm's model API: ``forward_features`` is the trunk up to the last exit and that exit's unpooled
features (with the default heads: the backbone's own ``forward_features``), ``forward_head`` that
exit's pooling and classifier. ``feature_info`` is the backbone's, and ``features_only=True`` gives
the backbone's maps at the exit points (``forward_intermediates`` of the backbone).
"""
from __future__ import annotations

from functools import partial
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import timm
import torch
from torch import Tensor, nn
from timm.layers import Attention, SelectAdaptivePool2d, global_pool_nlc
from timm.models import (
    build_model_with_cfg, generate_default_cfgs, get_pretrained_cfg, register_model, register_notrace_function,
    resolve_pretrained_cfg,
)

from ..flops import register_flop_counter
from .base import MultiExitModel
from .layers import exit_classifier, is_symbolic

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


class _ExitHead(nn.Module):
    """What every exit head offers: ``forward_features`` (unpooled), ``forward_head`` (pool, ``fc``), ``reset``."""

    num_features: int
    head_hidden_size: int

    def forward_features(self, x: Tensor) -> Tensor:
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.pool(x)
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


class _PoolHead(_ExitHead):
    """Global pooling (timm's ``SelectAdaptivePool2d``) and linear, on a [B, C, H, W] map."""

    def __init__(self, chs: int, num_classes: int, pool_type: str = "avg"):
        super().__init__()
        self.num_features = chs
        self.reset(num_classes, pool_type)

    def reset(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None:
            self.pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
        self.head_hidden_size = self.num_features * self.pool.feat_mult()
        self.fc = exit_classifier(self.head_hidden_size, num_classes, bool(self.pool.pool_type))


class _TokenHead(_ExitHead):
    """LayerNorm, token pooling (class token or average of patch tokens), linear."""

    def __init__(self, dim: int, num_classes: int, pool: str, num_prefix_tokens: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.pool_type, self.num_prefix_tokens = pool, num_prefix_tokens
        self.num_features = self.head_hidden_size = dim
        self.fc = exit_classifier(dim, num_classes, bool(pool))

    def reset(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None:
            self.pool_type = global_pool
        self.fc = exit_classifier(self.num_features, num_classes, bool(self.pool_type))

    def forward_features(self, x: Tensor) -> Tensor:
        return self.norm(x)

    def pool(self, x: Tensor) -> Tensor:
        return global_pool_nlc(x, pool_type=self.pool_type, num_prefix_tokens=self.num_prefix_tokens)


@register_notrace_function  # the grid side comes from the token count: one call node when torch.fx traces
def tokens_to_grid(x: Tensor, num_prefix_tokens: int) -> Tensor:
    """[B, N, D] tokens -> [B, D, H, W] patch grid (the patch tokens must form a square)."""
    x = x[:, num_prefix_tokens:]
    side = int(round(x.shape[1] ** 0.5))
    if side * side != x.shape[1]:
        raise ValueError(f"conv heads need a square patch grid, got {x.shape[1]} patch tokens")
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)


class _ConvHead(_PoolHead):
    """Two 3x3 stride-2 conv-BN-ReLU, global pooling, linear (tokens go to their patch grid first)."""

    def __init__(self, in_chs: int, width: int, num_classes: int, num_prefix_tokens: Optional[int] = None,
                 pool_type: str = "avg"):
        super().__init__(width, num_classes, pool_type)
        self.num_prefix_tokens = num_prefix_tokens
        layers: List[nn.Module] = []
        for c in (in_chs, width):
            layers += [nn.Conv2d(c, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)

    def forward_features(self, x: Tensor) -> Tensor:
        if self.num_prefix_tokens is not None:
            x = tokens_to_grid(x, self.num_prefix_tokens)
        return self.features(x)


class _LinearHead(_ExitHead):
    """The classifier alone: the exit on the backbone's last point pools with the backbone's own head."""

    def __init__(self, dim: int, num_classes: int, pooled: bool = True):
        super().__init__()
        self.num_features = self.head_hidden_size = dim
        self.fc = exit_classifier(dim, num_classes, pooled)

    def pool(self, x: Tensor) -> Tensor:
        return x


def _pool_type(model: nn.Module) -> Optional[str]:
    """A timm model's current global pooling type (its ``global_pool`` or its head's)."""
    for pool in (getattr(model, "global_pool", None), getattr(getattr(model, "head", None), "global_pool", None)):
        pool = getattr(pool, "pool_type", pool)
        if isinstance(pool, str):
            return pool
    return None


def _pool_feat_mult(model: nn.Module) -> int:
    pool = getattr(model, "global_pool", None) or getattr(getattr(model, "head", None), "global_pool", None)
    return pool.feat_mult() if isinstance(pool, SelectAdaptivePool2d) else 1


class MultiExitWrapper(MultiExitModel):
    """A timm backbone with exit heads after chosen intermediate points (see the module docstring).

    Args:
        backbone: a timm model name (created with ``timm.create_model(name, num_classes=0, ...)``)
            or an already built timm model (its classifier is reset to ``num_classes=0``).
        exit_indices: increasing indices into the backbone's intermediate points (``feature_info``
            order; ViT: block indices). Default: ResNet ``layer1..4``; every stage; four evenly
            spaced ViT blocks ending at the last.
        head: ``'linear'`` (pooling + linear) or ``'conv'`` (small conv head).
        num_classes: classes of every exit (0: exits return pooled features).
        pretrained: load the backbone's pretrained weights through timm.
        head_width: conv head width.
        global_pool: pooling of every exit (timm's values; ``None``: the backbone's own, ``'avg'`` for
            map heads); the backbone is created or reset with it.
        **timm_kwargs: passed to ``timm.create_model`` (``img_size``, ``dynamic_img_size``, ``in_chans``,
            ``drop_path_rate``...).
    """

    def __init__(
        self,
        backbone: Union[str, nn.Module],
        exit_indices: Optional[Sequence[int]] = None,
        head: str = "linear",
        num_classes: int = 1000,
        pretrained: bool = False,
        head_width: int = 128,
        global_pool: Optional[str] = None,
        **timm_kwargs: Any,
    ):
        super().__init__()
        if head not in ("linear", "conv"):
            raise ValueError(f"head must be 'linear' or 'conv', got {head!r}")
        if isinstance(backbone, str):
            if global_pool is not None:
                timm_kwargs["global_pool"] = global_pool
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
        if global_pool is not None:
            backbone.reset_classifier(0, global_pool)
        elif not isinstance(backbone.get_classifier(), nn.Identity):
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
        self.global_pool = _pool_type(backbone) if global_pool is None else global_pool
        self.heads = nn.ModuleList(self._make_head(k) for k in range(self.num_exits))
        self._set_feature_sizes()
        # features_only: the backbone's intermediate points (module names inside this wrapper)
        self.feature_info = [dict(d, module=f"backbone.{d['module']}") for d in info]
        cfg = dict(getattr(backbone, "pretrained_cfg", None) or {})
        img_size = getattr(getattr(backbone, "patch_embed", None), "img_size", None)
        if img_size is not None:
            cfg["input_size"] = (self.in_chans, *img_size)
        cfg["classifier"] = tuple(f"heads.{k}.fc" for k in range(self.num_exits))
        if isinstance(cfg.get("first_conv"), str):
            cfg["first_conv"] = f"backbone.{cfg['first_conv']}"
        self.pretrained_cfg = self.default_cfg = cfg  # registered variants get theirs from build_model_with_cfg

    def _set_feature_sizes(self) -> None:
        if self._uses_backbone_head(self.num_exits - 1):
            self.num_features = self.backbone.num_features
            self.head_hidden_size = self.heads[-1].num_features
        else:
            self.num_features, self.head_hidden_size = self.heads[-1].num_features, self.heads[-1].head_hidden_size

    def _uses_backbone_head(self, k: int) -> bool:
        return self.head_type == "linear" and self.exit_indices[k] == len(self._points) - 1

    def _head_pool(self) -> str:
        """Pooling of the exits with heads of their own: the backbone's where that head can do it, else 'avg'."""
        pool = self.global_pool
        if self.layout == "nlc" and self.head_type == "linear":  # timm's token pooling
            usable = ("avg", "max", "avgmax", "") + (("token",) if self.num_prefix_tokens else ())
            return pool if pool in usable else "avg"
        return "avg" if pool in (None, "token") else pool

    def _make_head(self, k: int) -> nn.Module:
        chs, n = self.exit_channels[k], self.num_classes
        if self._uses_backbone_head(k):
            dim = getattr(self.backbone, "head_hidden_size", self.backbone.num_features) * _pool_feat_mult(self.backbone)
            return _LinearHead(dim, n, pooled=self.global_pool != "")
        if self.head_type == "conv":
            prefix = self.num_prefix_tokens if self.layout == "nlc" else None
            return _ConvHead(chs, self.head_width, n, prefix, self._head_pool())
        if self.layout == "nlc":
            return _TokenHead(chs, n, self._head_pool(), self.num_prefix_tokens)
        return _PoolHead(chs, n, self._head_pool())

    def check_input(self, x: Tensor) -> None:
        super().check_input(x)
        if is_symbolic(x):
            return
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

    def forward_block(self, index: int, state: Any) -> Tensor:
        """The backbone from the point after exit ``index - 1`` to exit ``index``'s point."""
        start = self.exit_indices[index - 1] + 1 if index > 0 else 0
        x = state
        for point in range(start, self.exit_indices[index] + 1):
            x = self._run(self._points[point], x)
        return x

    def forward_exit_features(self, index: int, state: Tensor) -> Tensor:
        if self._uses_backbone_head(index):
            return self._run(self._finish, state)  # the backbone's final norm: its forward_features output
        return self.heads[index].forward_features(state)

    def forward_exit_head(self, index: int, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self._uses_backbone_head(index):
            x = self.backbone.forward_head(x, pre_logits=True)
        return self.heads[index].forward_head(x, pre_logits)

    def intermediate_features(self, x: Tensor, indices: Optional[Union[int, List[int]]] = None,
                              **kwargs: Any) -> List[Tensor]:
        """The backbone's ``forward_intermediates`` maps (same arguments: ``norm``, ``output_fmt``...)."""
        return self.backbone.forward_intermediates(x, indices=indices, intermediates_only=True, **kwargs)

    def prune_intermediate_layers(
        self, indices: Optional[Union[int, List[int]]] = 1, prune_norm: bool = False, prune_head: bool = True,
    ) -> List[int]:
        """The backbone pruned to what ``forward_intermediates(indices)`` needs; the exit heads dropped."""
        take = self.backbone.prune_intermediate_layers(indices, prune_norm=prune_norm, prune_head=True)
        self.heads = nn.ModuleList()
        self.exit_heads_pruned = True
        return take

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

    def get_classifier(self) -> nn.ModuleList:
        """The linear layer of every exit head, cheapest exit first."""
        return nn.ModuleList(head.fc for head in self.heads)

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Fresh classifiers for ``num_classes`` on every exit (``0``: exits return pooled features).

        ``global_pool`` (timm's values) changes every exit's pooling, the backbone's included.
        """
        exit_classifier(1, num_classes, global_pool != "")  # bad values fail here, before anything changes
        if global_pool is not None:
            self.backbone.reset_classifier(0, global_pool)
            self.global_pool = global_pool
        self.num_classes = num_classes
        for k, head in enumerate(self.heads):
            if self._uses_backbone_head(k):  # the backbone's pooled width may have changed
                self.heads[k] = self._make_head(k)
            else:
                head.reset(num_classes, None if global_pool is None else self._head_pool())
        self._set_feature_sizes()


def multi_exit_model(model_name: str, **kwargs: Any) -> MultiExitWrapper:
    """Any timm model name as a multi-exit model: ``multi_exit_model('resnet50', num_classes=10)``."""
    return MultiExitWrapper(model_name, **kwargs)


def _create_multi_exit(variant: str, backbone: str, pretrained: bool = False, **kwargs: Any) -> MultiExitWrapper:
    """timm's builder; ``pretrained=True`` loads the variant's own checkpoint when its cfg names one (a hub
    repo, a file, ``local-dir:``), else the backbone's timm weights (never both: no backbone download
    when a full multi-exit checkpoint is loaded)."""
    n_exits = len(kwargs["exit_indices"])
    overlay = {"classifier": tuple(f"heads.{k}.fc" for k in range(n_exits)),
               **(kwargs.pop("pretrained_cfg_overlay", None) or {})}
    cfg = resolve_pretrained_cfg(variant, kwargs.get("pretrained_cfg"), overlay).to_dict()
    full_checkpoint = any(cfg.get(key) for key in ("url", "file", "state_dict", "hf_hub_id"))
    return build_model_with_cfg(
        partial(MultiExitWrapper, backbone, pretrained=pretrained and not full_checkpoint),
        variant,
        pretrained and full_checkpoint,
        pretrained_cfg_overlay=overlay,
        feature_cfg=dict(feature_cls="getter", out_indices=tuple(kwargs["exit_indices"])),
        **kwargs,
    )


_BACKBONE_CFG_KEYS = ("input_size", "pool_size", "crop_pct", "interpolation", "mean", "std", "fixed_input_size",
                      "min_input_size")


def _cfg(backbone: str, n_exits: int = 4) -> Dict[str, Any]:
    """The backbone's input and preprocessing settings; no weights of its own (``untrained``)."""
    src = get_pretrained_cfg(backbone).to_dict()
    return {
        "url": "", "num_classes": 1000, **{k: src[k] for k in _BACKBONE_CFG_KEYS if src.get(k) is not None},
        "first_conv": f"backbone.{src['first_conv']}", "classifier": tuple(f"heads.{k}.fc" for k in range(n_exits)),
    }


default_cfgs = generate_default_cfgs({
    "resnet18_l2w.untrained": _cfg("resnet18"),
    "convnext_atto_l2w.untrained": _cfg("convnext_atto"),
    "vit_tiny_l2w.untrained": _cfg("vit_tiny_patch16_224"),
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
