"""The exit policy's PyTorch side: how eval images are prepared, and a policy from ``timm-l2w eval``.

The file format itself (reading, writing, validation) lives in :mod:`timm_l2w_runtime.policy`, which
needs no PyTorch; this module describes the preprocessing of a model or of an eval loader in that
format and writes the policy ``timm-l2w eval --q`` / ``--flops-budget`` calibrates.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from torch import nn

from timm_l2w_runtime.policy import check_preprocess

from ..models.base import unwrap_model

__all__ = [
    "model_name", "preprocess_from_model", "preprocess_from_loader", "check_policy_request", "eval_policy_file",
    "policy_from_eval",
]


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
    from ..data import BatchTransform

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


def check_policy_request(q: Optional[float], flops_budget: Optional[float],
                         rule: str) -> Tuple[Optional[float], Optional[float]]:
    """Check that exactly one budget is given, in range, and that it fits the exit rule."""
    from ..validation import Range, check_number

    if (q is None) == (flops_budget is None):
        raise ValueError("pass exactly one of --q (the paper's exit distribution p_k ∝ q**k) and --flops-budget")
    if q is not None:
        q = check_number(q, "q", Range(0, low_open=True, hint="q < 1 front-loads, q > 1 back-loads the exits"))
        if rule == "patience":
            raise ValueError("the patience rule has no exit distribution to calibrate for q: pass --flops-budget F "
                             "(the most accurate patience within the budget) instead of --q")
    else:
        flops_budget = check_number(flops_budget, "flops_budget", Range(0, low_open=True, hint="FLOPs per image"))
    return q, flops_budget


def eval_policy_file(args: Any, model: nn.Module, result: Mapping[str, Any], test_loader: Any,
                     info: Mapping[str, Any], name: str) -> Path:
    """``timm-l2w eval --q`` / ``--flops-budget``: write ``OUTPUT/<name>_policy.json``; class names from the
    checkpoint's metadata, else the data set's; preprocessing as the eval loader prepares images."""
    from ..checkpoint import read_metadata

    saved = read_metadata(args.checkpoint).get("class_names") if args.checkpoint else None
    path = Path(args.output) / f"{name}_policy.json"
    predictor = policy_from_eval(model, result, path, q=args.q, flops_budget=args.flops_budget, rule=args.exit_rule,
                                 preprocess=preprocess_from_loader(test_loader, info["input_size"]),
                                 class_names=json.loads(saved) if saved else info.get("class_names"))
    shares = ", ".join(f"{100 * p:.0f}%" for p in predictor.calibration_fractions or [])
    print(f"exit policy ({predictor.rule}, {predictor.budget}): held-out exits {shares}")
    return path


def policy_from_eval(model: nn.Module, result: Mapping[str, Any], path: Path | str, *, q: Optional[float] = None,
                     flops_budget: Optional[float] = None, rule: str = "confidence",
                     preprocess: Optional[Mapping[str, Any]] = None,
                     class_names: Optional[Iterable[str]] = None) -> "Any":
    """Calibrate on the held-out outputs of :func:`timm_l2w.evaluate_checkpoint` (``result``) for the
    paper's exit distribution ``q`` or an expected-FLOPs budget, and save the policy to ``path``.

    Returns the :class:`timm_l2w.EarlyExitPredictor`.
    """
    from ..inference import EarlyExitPredictor

    q, flops_budget = check_policy_request(q, flops_budget, rule)
    heldout, flops = result["heldout"], result["flops"]
    if q is not None:
        predictor = EarlyExitPredictor.from_distribution(model, heldout, q, rule=rule)
        predictor.record_flops(flops, heldout.input_size)
    else:
        predictor = EarlyExitPredictor.from_flops_budget(model, heldout, flops, flops_budget, rule=rule)
    predictor.preprocess = dict(preprocess) if preprocess is not None else None
    predictor.class_names = list(class_names) if class_names is not None else None
    predictor.save(path)
    return predictor
