"""Any timm backbone as a staged multi-exit model: exit heads on its ``feature_info`` points.

The trunk is the timm model itself (``wrapper.backbone``, created with ``num_classes=0``), so its
pretrained weights load through timm and a plain timm state_dict loads into it unchanged.

**How the backbone is split.** ``forward_features`` is traced with torch.fx under timm's own FX rules
(the leaf modules and autowrapped functions timm registers for its feature extraction) and the graph
is cut at the outputs of the ``feature_info`` modules chosen as exits (:mod:`.fx_stages`). Stage ``k``
is the code between cut ``k - 1`` and cut ``k``, the state between stages is exactly the values that
cross the cut, and the stages call the backbone's own modules at run time. Why FX and not
``forward_intermediates``: ``forward_intermediates(x, indices=k)`` always starts from the image, so
early-exit inference would recompute the trunk for every exit (or need each family's loop
re-implemented to resume from a stage), and families differ in what they return between stages
(Swin and MambaOut NHWC maps, ViT tokens with class tokens, HRNet lists of branches, LeViT tokens
with their grid). The traced graph has one generic answer for all of them: what crosses the cut.
The price is that a family must trace with FX, which timm tests for its models; a family that does
not gets a clear :class:`~timm_l2w.errors.SplitError` naming the reason and the
alternative (a :class:`~timm_l2w.models.base.MultiExitModel` subclass).

**Heads.** ``'linear'`` is pooling + linear: NCHW and NHWC maps (the layout is read from the traced
shapes and ``feature_info`` widths) through timm's ``SelectAdaptivePool2d``, tokens ``[B, N, C]``
through LayerNorm and timm's token pooling (class token or the average of the patch tokens). An
exit on the backbone's last feature point uses the backbone's own head (``forward_head`` with
``pre_logits=True``: its pooling, norm, pre-logits layers) and a new linear layer, so in eval mode
the last exit is exactly ``fc(backbone.forward_head(backbone.forward_features(x)))``, bit for bit.
``'conv'`` is two 3x3 stride-2 conv-BN-ReLU, global average pooling and linear (tokens go to their
patch grid, NHWC maps to NCHW first). Every head keeps its classifier in ``fc``.

timm's model API: ``forward_features`` is the trunk up to the last exit and that exit's unpooled
features (with the default heads: the backbone's own ``forward_features``), ``forward_head`` that
exit's pooling and classifier. ``feature_info`` is the backbone's, and ``features_only=True`` gives
the backbone's maps at the exit points (``forward_intermediates`` of the backbone).

The registered names and the factory that builds a wrapper from a model name live in
:mod:`timm_l2w.models.factory`; the split itself in :mod:`.fx_stages` and :mod:`.fx_trace`. This module is
just over 400 lines because it is one class (the wrapper and its heads' wiring), timm's one file per family.
"""
from __future__ import annotations

import inspect
import json
import re
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import timm
import torch
import torch.nn.functional as F
from timm.models import get_model_input_config
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves, tree_map

from ..errors import SplitError
from .base import MultiExitModel
from .fx_stages import BackboneStages, TensorSpec
from .fx_trace import fake_tensors
from .heads import ConvHead, LinearHead, PoolHead, TokenHead
from .layers import exit_classifier, is_symbolic, set_bn_args

__all__ = ["MultiExitWrapper", "GENERIC_NAME"]

GENERIC_NAME = "multi_exit_l2w"  # the registered wrapper of any backbone: create_model(GENERIC_NAME, backbone=...)

_ALTERNATIVE = ("pick other exit_indices, another model of the family, or write a timm_l2w.MultiExitModel "
                "subclass (forward_block / forward_exit_features / forward_exit_head) for this architecture")


def _pool_type(model: nn.Module) -> Optional[str]:
    """A timm model's current global pooling type (its ``global_pool`` or its head's)."""
    for pool in (getattr(model, "global_pool", None), getattr(getattr(model, "head", None), "global_pool", None)):
        pool = getattr(pool, "pool_type", pool)
        if isinstance(pool, str):
            return pool
    return None


def _layout(shape: Tuple[int, ...], chs: int, output_fmt: str) -> Tuple[str, int]:
    """(layout, channels) of a feature value of ``shape`` (batch dropped) whose ``feature_info`` width is ``chs``."""
    if len(shape) == 2:
        return "nlc", shape[-1]
    if len(shape) != 3:
        raise SplitError(f"a feature point gives a value of shape {shape} (no batch): neither a map nor tokens")
    first, last = shape[0] == chs, shape[2] == chs
    if first != last:
        return ("nchw", shape[0]) if first else ("nhwc", shape[2])
    return ("nhwc", shape[2]) if str(output_fmt).upper() == "NHWC" else ("nchw", shape[0])


def _input_size(backbone: nn.Module, in_chans: int) -> Tuple[int, int, int]:
    try:
        size = tuple(get_model_input_config(backbone)["input_size"])
    except Exception:  # noqa: BLE001 - models without a timm input config
        size = tuple((getattr(backbone, "pretrained_cfg", None) or {}).get("input_size", (in_chans, 224, 224)))
    return (in_chans, int(size[-2]), int(size[-1]))


def _default_exits(info: Sequence[Dict[str, Any]]) -> List[int]:
    """Four evenly spaced points ending at the last for block-wise points (ViTs), else every stage but a
    stride-2 stem point (ResNet: ``layer1..4``). A module listed several times (one entry per branch:
    CrossViT, CoaT) counts once, with its last entry."""
    last_entry: Dict[str, int] = {}
    for i, d in enumerate(info):
        last_entry[d["module"]] = i
    points = list(last_entry.values())
    n = len(points)
    if n > 5:
        return [points[(t + 1) * n // 4 - 1] for t in range(4)]
    if n >= 4 and info[points[0]].get("reduction", 4) <= 2:
        return points[1:]
    return points


def _json_ready(value: Any) -> Any:
    json.dumps(value)
    return value


_TIMM_STANDARD = ("drop_rate", "drop_path_rate", "drop_block_rate", "global_pool", "bn_momentum", "bn_eps")
_NEUTRAL_RATES = ("drop_rate", "drop_path_rate", "drop_block_rate")
_UNEXPECTED = re.compile(r"(\w+)\.__init__\(\) got an unexpected keyword argument '(\w+)'")


def _create_backbone(name: str, pretrained: bool, timm_kwargs: Dict[str, Any]) -> nn.Module:
    """``timm.create_model(name, num_classes=0, ...)``. timm's standard arguments at their neutral value (a drop
    rate of 0) are dropped where the backbone has no such argument (removed from ``timm_kwargs``); any other
    argument the backbone refuses is a ``TypeError`` naming what it takes."""
    while True:
        try:
            return timm.create_model(name, pretrained=pretrained, num_classes=0, **timm_kwargs)
        except TypeError as err:
            match = _UNEXPECTED.search(str(err))
            key = match.group(2) if match else None
            if key not in timm_kwargs:
                raise
            if key in _NEUTRAL_RATES and not timm_kwargs[key]:
                del timm_kwargs[key]  # neutral: as if not given
                continue
            try:
                module = sys.modules.get(timm.models.model_entrypoint(name.split(".")[0]).__module__)
            except Exception:  # noqa: BLE001 - a hub name: no class to read the options from
                module = None
            cls = getattr(module, match.group(1), None)
            params = inspect.signature(cls).parameters if isinstance(cls, type) else {}
            takes = [k for k in _TIMM_STANDARD if k in params] or ["none of them"]
            raise TypeError(
                f"backbone {name} ({match.group(1)}) does not take {key}={timm_kwargs[key]!r}: of timm's standard "
                f"create_model arguments it takes {', '.join(takes)}; the multi-exit model's own options are "
                "exit_indices, head, head_width, num_classes, global_pool, drop_rate (dropout before every exit's "
                "classifier) and the backbone's timm arguments") from None


class MultiExitWrapper(MultiExitModel):
    """A timm backbone with exit heads after chosen ``feature_info`` points (see the module docstring).

    Args:
        backbone: a timm model name (created with ``timm.create_model(name, num_classes=0, ...)``)
            or an already built timm model (its classifier is reset to ``num_classes=0``).
        exit_indices: increasing indices into the backbone's ``feature_info`` (ViT: block indices).
            Default: every stage but a stride-2 stem point (ResNet ``layer1..4``); four evenly spaced
            points ending at the last when the backbone lists more than five (one per block).
        head: ``'linear'`` (pooling + linear) or ``'conv'`` (small conv head).
        num_classes: classes of every exit (0: exits return pooled features).
        pretrained: load the backbone's pretrained weights through timm (``pretrained_cfg_overlay=
            dict(file=...)`` among ``timm_kwargs`` names a local timm checkpoint of the backbone).
        head_width: conv head width.
        global_pool: pooling of every exit (timm's values; ``None``: the backbone's own, ``'avg'`` for
            map heads); the backbone is created or reset with it.
        **timm_kwargs: passed to ``timm.create_model`` (``img_size``, ``dynamic_img_size``, ``in_chans``,
            ``drop_path_rate``...). timm's standard arguments go to the backbone as timm passes them;
            ``drop_rate`` is also dropout before every other exit's classifier, ``bn_momentum`` / ``bn_eps``
            (where the backbone takes them) also set the conv heads' BatchNorms, and a drop rate of 0 the
            backbone has no argument for is dropped. Others the backbone refuses: a ``TypeError`` naming what it takes.

    Raises:
        SplitError (a ``TypeError``): the backbone cannot be cut at those points; the message says why
        and what to use instead.
    """

    flop_counting = "aten"  # timm_l2w.exit_flops counts what each stage runs with torch's FlopCounterMode

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
        backbone_name = backbone if isinstance(backbone, str) else None
        if isinstance(backbone, str):
            if global_pool is not None:
                timm_kwargs["global_pool"] = global_pool
            backbone = _create_backbone(backbone, pretrained, timm_kwargs)
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
        elif getattr(backbone, "num_classes", None) != 0:
            backbone.reset_classifier(0)
        self.backbone = backbone
        info = [dict(d) for d in backbone.feature_info]
        n_points = len(info)
        name = (backbone_name or (getattr(backbone, "pretrained_cfg", None) or {}).get("architecture")
                or type(backbone).__name__)
        exit_indices = _default_exits(info) if exit_indices is None else [int(i) for i in exit_indices]
        if not exit_indices or any(not 0 <= i < n_points for i in exit_indices):
            raise ValueError(
                f"exit_indices {exit_indices} out of range: {name} has {n_points} feature_info points "
                f"({', '.join(d['module'] for d in info)}), pass indices in 0..{n_points - 1}"
            )
        if any(b <= a for a, b in zip(exit_indices, exit_indices[1:])):
            raise ValueError(f"exit_indices must be strictly increasing (cheapest exit first), got {exit_indices}")

        self.exit_indices = exit_indices
        self.num_exits = len(exit_indices)
        self.num_classes = num_classes
        self.in_chans = timm_kwargs.get("in_chans", getattr(backbone, "in_chans", 3))
        self.head_type, self.head_width = head, head_width
        self._rebuild = dict(backbone=name, exit_indices=list(exit_indices), head=head, head_width=head_width,
                             **({"global_pool": global_pool} if global_pool is not None else {}),
                             **self._backbone_kwargs(backbone, backbone_name, timm_kwargs))
        param = next(backbone.parameters(), None)
        example = torch.zeros(1, *_input_size(backbone, self.in_chans),
                              device=param.device if param is not None else None)
        through_end = head == "linear" and exit_indices[-1] == n_points - 1
        try:
            self._stages = BackboneStages(backbone, [info[i] for i in exit_indices], through_end, example)
        except SplitError as err:
            if timm_kwargs.get("drop_block_rate"):  # timm's DropBlock2d branches on the map size
                raise SplitError(
                    f"{name} with drop_block_rate={timm_kwargs['drop_block_rate']!r} cannot be split into exits: "
                    f"torch.fx cannot trace timm's DropBlock ({err}); pass drop_block_rate=0 or leave it unset "
                    "(drop_rate, drop_path_rate and global_pool work on wrapped backbones)") from None
            raise SplitError(f"{name} cannot be split into exits at {exit_indices}: {err}; {_ALTERNATIVE}") from None
        fmt = getattr(backbone, "output_fmt", "NCHW")
        layouts = [_layout(shape, info[i]["num_chs"], fmt)
                   for shape, i in zip(self._stages.feature_shapes, exit_indices)]
        self.exit_layouts = [lay for lay, _ in layouts]
        self.exit_channels = [chs for _, chs in layouts]
        self.layout = self.exit_layouts[-1]
        self.num_prefix_tokens = self._prefix_tokens(backbone, info, example)
        self.global_pool = _pool_type(backbone) if global_pool is None else global_pool
        # timm's classifier dropout before every exit (the backbone's own head applies it on the last one)
        self.drop_rate = float(timm_kwargs.get("drop_rate") or 0.0)
        self.heads = nn.ModuleList(self._make_head(k) for k in range(self.num_exits))
        set_bn_args(self.heads, timm_kwargs.get("bn_momentum"), timm_kwargs.get("bn_eps"))  # the backbone took them
        self._set_feature_sizes()
        # features_only: the backbone's intermediate points (module names inside this wrapper)
        self.feature_info = [dict(d, module=f"backbone.{d['module']}") for d in info]
        # registered variants get theirs from build_model_with_cfg
        self.pretrained_cfg = self.default_cfg = self._own_cfg()
        self._model_args = dict(self._rebuild)  # timm's save_for_hf records these (model_args in config.json)

    # -- construction helpers ------------------------------------------------------------------
    @staticmethod
    def _backbone_kwargs(backbone: nn.Module, backbone_name: Optional[str],
                         timm_kwargs: Dict[str, Any]) -> Dict[str, Any]:
        """The timm arguments that rebuild the backbone (JSON values only; weights come from checkpoints)."""
        given = dict(timm_kwargs) if backbone_name else dict(getattr(backbone, "_model_args", {}) or {})
        skip = {"pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "num_classes", "global_pool", "cache_dir",
                "device", "dtype", "pretrained_model_args"}
        kept = {}
        for key, value in given.items():
            if key in skip:
                continue
            try:
                kept[key] = _json_ready(list(value) if isinstance(value, tuple) else value)
            except TypeError:
                continue
        return kept

    def _prefix_tokens(self, backbone: nn.Module, info: Sequence[Dict[str, Any]], example: Tensor) -> int:
        prefix = getattr(backbone, "num_prefix_tokens", None)
        if isinstance(prefix, int):
            return prefix
        for shape, i, lay in zip(self._stages.feature_shapes, self.exit_indices, self.exit_layouts):
            red = info[i].get("reduction")
            if lay == "nlc" and red:
                grid = -(-example.shape[-2] // red) * -(-example.shape[-1] // red)
                return max(shape[0] - grid, 0)
        return 0

    def _own_cfg(self) -> Dict[str, Any]:
        cfg = dict(getattr(self.backbone, "pretrained_cfg", None) or {})
        for key in ("url", "hf_hub_id", "file", "state_dict", "tag", "source", "license", "origin_url", "paper_ids",
                    "paper_name", "notes", "test_input_size", "test_crop_pct", "label_names", "label_descriptions"):
            cfg.pop(key, None)
        cfg["input_size"] = _input_size(self.backbone, self.in_chans)
        cfg["architecture"] = GENERIC_NAME
        cfg["num_classes"] = self.num_classes
        cfg["classifier"] = tuple(f"heads.{k}.fc" for k in range(self.num_exits))
        if isinstance(cfg.get("first_conv"), str):
            cfg["first_conv"] = f"backbone.{cfg['first_conv']}"
        return cfg

    def rebuild_kwargs(self) -> Dict[str, Any]:
        """``timm.create_model(GENERIC_NAME, **rebuild_kwargs(), num_classes=...)`` builds this model again."""
        return dict(self._rebuild)

    def checkpoint_metadata(self) -> Dict[str, str]:
        """What a checkpoint records to rebuild this model (``model``, ``model_kwargs``)."""
        arch = (self.pretrained_cfg or {}).get("architecture", GENERIC_NAME)
        if arch != GENERIC_NAME:  # a registered variant (resnet18_l2w...): its name rebuilds it
            return {"model": arch}
        return {"model": GENERIC_NAME, "model_kwargs": json.dumps(self.rebuild_kwargs())}

    def _set_feature_sizes(self) -> None:
        if self._uses_backbone_head(self.num_exits - 1):
            self.num_features = self.backbone.num_features
            self.head_hidden_size = self.heads[-1].num_features
        else:
            self.num_features, self.head_hidden_size = self.heads[-1].num_features, self.heads[-1].head_hidden_size

    def _uses_backbone_head(self, k: int) -> bool:
        return self._stages.through_end and k == self.num_exits - 1

    def _head_pool(self, k: int) -> str:
        """Pooling of the exits with heads of their own: the backbone's where that head can do it, else 'avg'."""
        pool = self.global_pool
        if self.exit_layouts[k] == "nlc" and self.head_type == "linear":  # timm's token pooling
            usable = ("avg", "max", "avgmax", "") + (("token",) if self.num_prefix_tokens else ())
            return pool if pool in usable else "avg"
        return pool if pool in ("avg", "max", "avgmax", "catavgmax", "") else "avg"

    def _backbone_head_width(self) -> Tuple[int, bool]:
        """Width of ``backbone.forward_head(features, pre_logits=True)`` and whether it is pooled (fake tensors)."""
        def head_of_zeros() -> Tensor:
            device = next(self.backbone.parameters()).device
            feats = tree_map(lambda t: torch.zeros(2, *t.shape, dtype=t.dtype, device=device)
                             if isinstance(t, TensorSpec) else t, self._stages.output_value)
            return self.backbone.forward_head(feats, pre_logits=True)

        was_training = self.backbone.training
        self.backbone.eval()
        try:
            with torch.no_grad():
                try:
                    with fake_tensors(self.backbone):
                        pooled = head_of_zeros()
                except Exception:  # noqa: BLE001 - an op without a fake kernel: run it
                    pooled = head_of_zeros()
        finally:
            self.backbone.train(was_training)
        return int(pooled.shape[-1]), pooled.ndim == 2

    def _make_head(self, k: int) -> nn.Module:
        chs, n, layout = self.exit_channels[k], self.num_classes, self.exit_layouts[k]
        if self._uses_backbone_head(k):
            dim, pooled = self._backbone_head_width()
            return LinearHead(dim, n, pooled=pooled and self.global_pool != "")
        if self.head_type == "conv":
            return ConvHead(chs, self.head_width, n, layout, self.num_prefix_tokens, self._head_pool(k))
        if layout == "nlc":
            return TokenHead(chs, n, self._head_pool(k), self.num_prefix_tokens)
        return PoolHead(chs, n, self._head_pool(k), input_fmt="NHWC" if layout == "nhwc" else "NCHW")

    # -- the multi-exit contract -----------------------------------------------------------------
    def check_input(self, x: Tensor) -> None:
        super().check_input(x)
        if is_symbolic(x):
            return
        patch_embed = getattr(self.backbone, "patch_embed", None)
        img_size = getattr(patch_embed, "img_size", None)
        strict = img_size is not None and getattr(patch_embed, "strict_img_size", False)
        if strict and tuple(x.shape[-2:]) != tuple(img_size):
            raise ValueError(
                f"input is {tuple(x.shape[-2:])}, this model expects {tuple(img_size)}: pass img_size="
                f"{x.shape[-1]} (or dynamic_img_size=True where the family has it) when creating the model, "
                "or resize the images"
            )

    def forward_block(self, index: int, state: Any) -> Any:
        """The backbone's code from exit ``index - 1``'s point to exit ``index``'s (the image for ``index=0``)."""
        return self._stages.run(self.backbone, index, state)

    def _exit_value(self, index: int, state: Any) -> Any:
        return self._stages.feature(index, state, self.backbone.training)

    def exit_reads(self, index: int, state: Any) -> List[Tensor]:
        return [t for t in tree_leaves(self._exit_value(index, state)) if isinstance(t, Tensor)]

    def forward_exit_features(self, index: int, state: Any) -> Tensor:
        x = self._exit_value(index, state)
        if self._uses_backbone_head(index):
            return x  # the backbone's forward_features output
        return self.heads[index].forward_features(x)

    def forward_exit_head(self, index: int, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self._uses_backbone_head(index):
            x = self.backbone.forward_head(x, pre_logits=True)  # with the backbone's own dropout (drop_rate)
        elif self.drop_rate > 0:
            head = self.heads[index]
            x = F.dropout(head.forward_head(x, pre_logits=True), p=self.drop_rate, training=self.training)
            return x if pre_logits else head.fc(x)
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

    def trunk_features(self, x: Tensor) -> Any:
        """The backbone's ``forward_features`` output computed by the stages (the last exit on its head)."""
        if not self._stages.through_end:
            raise RuntimeError("the last exit has a head of its own: "
                               "the stages stop before the end of forward_features")
        state: Any = x
        for k in range(self.num_exits):
            state = self.forward_block(k, state)
        return self._exit_value(self.num_exits - 1, state)

    def stage_source(self, index: int) -> str:
        """The Python code stage ``index`` runs in the current mode (generated from the traced graph)."""
        return self._stages.stage_source(index, self.backbone.training)

    def load_backbone_state_dict(self, state_dict: Dict[str, Tensor], strict: bool = True):
        """Load a plain timm state_dict into the trunk, dropping the classifier it had (``fc``, ``head``...)."""
        own = self.backbone.state_dict()
        has_cfg = hasattr(self.backbone, "pretrained_cfg")
        classifier = self.backbone.pretrained_cfg.get("classifier") if has_cfg else None
        names = (classifier,) if isinstance(classifier, str) else tuple(classifier or ())
        kept = {k: v for k, v in state_dict.items() if k in own or not any(k.startswith(n + ".") for n in names)}
        return self.backbone.load_state_dict(kept, strict=strict)

    def get_classifiers(self) -> nn.ModuleList:
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
                head.reset(num_classes, None if global_pool is None else self._head_pool(k))
        self._set_feature_sizes()
        if isinstance(self.pretrained_cfg, dict):
            self.pretrained_cfg["num_classes"] = num_classes
