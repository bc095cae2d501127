"""How a model's images are prepared, as an exit policy records it: the model's timm name and the
preprocessing of the model (its ``pretrained_cfg``) or of an eval loader.

A floor below :mod:`timm_l2w.inference.predictor` and :mod:`timm_l2w.inference.policy`, which both use it; the
format itself (:func:`timm_l2w_runtime.policy.check_preprocess`) needs no PyTorch.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence

from torch import nn

from timm_l2w_runtime.policy import check_preprocess

from .models.base import unwrap_model

__all__ = ["model_name", "preprocess_from_model", "preprocess_from_loader"]


def model_name(model: nn.Module) -> Optional[str]:
    """The timm name a model was created as (``pretrained_cfg['architecture']``), or ``None``."""
    return (getattr(unwrap_model(model), "pretrained_cfg", None) or {}).get("architecture")


def _per_channel(values: Sequence[float], channels: int) -> List[float]:
    values = [float(v) for v in values]
    if len(values) == channels:
        return values
    if channels == 1:  # a grayscale model with RGB statistics in its cfg
        return [sum(values) / len(values)]
    return [values[0]] * channels if len(values) == 1 else values


def preprocess_from_model(model: nn.Module, input_size: Optional[Sequence[int]] = None) -> Dict[str, Any]:
    """timm's eval transform for ``model`` (its ``pretrained_cfg``): shorter side to ``size / crop_pct``,
    centre crop, normalisation; at ``input_size`` (C, H, W) when given."""
    from timm.data import resolve_data_config
    from timm.models import get_model_input_config

    net = unwrap_model(model)
    cfg = resolve_data_config({}, model=net)
    size = tuple(int(v) for v in (input_size or get_model_input_config(net)["input_size"]))
    channels = size[0]
    crop_pct = float(cfg.get("crop_pct") or 0.875)
    return check_preprocess({
        "input_size": list(size), "color": "RGB" if channels == 3 else "L", "resize": "shorter_side",
        "resize_size": math.floor(min(size[1:]) / crop_pct), "interpolation": cfg.get("interpolation", "bilinear"),
        "mean": _per_channel(cfg["mean"], channels), "std": _per_channel(cfg["std"], channels),
    })


def _flat(values: Any) -> List[float]:
    return [float(v) for v in (values.flatten().tolist() if hasattr(values, "flatten") else values)]


def _transform_steps(transform: Any) -> List[Any]:
    return list(getattr(transform, "transforms", [transform]))


def preprocess_from_loader(loader: Any, input_size: Sequence[int]) -> Dict[str, Any]:
    """How ``loader`` (from :func:`timm_l2w.data.create_eval_loaders`) prepares its images, as a policy's
    ``preprocess`` entry: the built-in sets' batch transform (``stretch``) or timm's eval transform
    (``shorter_side``). Raises ``ValueError`` for a transform it cannot describe."""
    from .data import BatchTransform

    size = [int(v) for v in input_size]
    collate = getattr(loader, "collate_fn", None)
    if isinstance(collate, BatchTransform):
        dataset = loader.dataset
        images = getattr(dataset, "images", None)
        gray = images is not None and images.shape[1] == 1
        return check_preprocess({"input_size": size, "color": "L" if gray or size[0] == 1 else "RGB",
                                 "resize": "stretch", "mean": _flat(collate.mean), "std": _flat(collate.std)})
    dataset = loader.dataset
    while not hasattr(dataset, "transform") and hasattr(dataset, "dataset"):  # Subset
        dataset = dataset.dataset
    pre: Dict[str, Any] = {"input_size": size, "color": "RGB" if size[0] == 3 else "L", "resize": "shorter_side"}
    for step in _transform_steps(getattr(dataset, "transform", None)):
        kind = type(step).__name__
        if kind == "Resize" and isinstance(step.size, (int, list, tuple)):
            side = step.size if isinstance(step.size, int) else step.size[0]
            if not isinstance(step.size, int) and len(step.size) != 1:
                raise ValueError(f"cannot describe a Resize to a fixed {tuple(step.size)} (not the shorter side) "
                                 "in a policy: set the policy's preprocess entry yourself")
            pre["resize_size"] = int(side)
            pre["interpolation"] = str(getattr(step.interpolation, "value", step.interpolation))
        elif kind == "CenterCrop":
            crop = [int(v) for v in step.size]
            if crop != size[1:]:
                raise ValueError(f"the eval transform crops {crop}, the model input is {size[1:]}: pass --img-size "
                                 "matching the data set's transform")
        elif kind == "Normalize":
            pre["mean"], pre["std"] = _flat(step.mean), _flat(step.std)
        elif kind not in ("ToTensor", "MaybeToTensor"):
            raise ValueError(f"cannot describe the eval transform step {kind} in a policy's preprocess entry "
                             "(known: Resize, CenterCrop, ToTensor, Normalize): set it yourself")
    if "mean" not in pre:
        raise ValueError("the eval loader has no Normalize step or batch transform: cannot record its preprocessing")
    return check_preprocess(pre)
