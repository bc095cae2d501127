"""One factory for multi-exit models, and timm's registered names of the wrapped backbones.

:func:`create_multi_exit_model` builds a registered multi-exit model (``msdnet_l2w_cifar``, ``resnet18_l2w``,
...) or wraps any other timm model as ``multi_exit_l2w`` (:class:`~timm_l2w.models.wrapper.MultiExitWrapper`);
``timm-l2w train`` builds its models with it. :func:`wrapper_create_args` is the ``timm.create_model`` name
and arguments it uses.

``timm.create_model('multi_exit_l2w', backbone=NAME, exit_indices=..., head=...)`` is the
registered form of the wrapper; it records its arguments, so ``save_for_hf`` / ``local-dir:``,
:func:`timm_l2w.save_safetensors` (metadata ``model`` and ``model_kwargs``), ``timm-l2w eval FILE``
and ``timm.create_model('multi_exit_l2w', pretrained=True, pretrained_cfg_overlay=dict(file=FILE))``
rebuild it exactly. ``pretrained=True`` with ``pretrained_cfg_overlay=dict(file=...)`` pointing at
a plain timm checkpoint of the backbone loads that file into the backbone through timm.
"""
from __future__ import annotations

import json
from functools import partial
from typing import Any, Dict, List, Optional, Sequence, Tuple

import timm
from timm.models import (
    build_model_with_cfg,
    generate_default_cfgs,
    get_pretrained_cfg,
    register_model,
    resolve_pretrained_cfg,
)
from torch import nn

from .wrapper import GENERIC_NAME, MultiExitWrapper

__all__ = ["create_multi_exit_model", "wrapper_create_args", "GENERIC_NAME"]

DEFAULT_BACKBONE = "resnet18"  # create_model(GENERIC_NAME) alone, as timm's tools build every registered name


# ----------------------------------------------------------------------------- timm's registry


def _checkpoint_keys(path: str) -> List[str]:
    """State-dict keys of a checkpoint file without loading its tensors where the format allows."""
    if str(path).endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    from ..files import load_state_dict

    return list(load_state_dict(path))


def _names_wrapper_checkpoint(cfg: Dict[str, Any]) -> bool:
    """True when the resolved cfg points at a multi-exit checkpoint (hub repo, url, ``local-dir:``, or a
    file whose keys are ``backbone.*``); a file of plain timm keys is the backbone's checkpoint."""
    if cfg.get("state_dict") is not None:
        return any(str(k).startswith("backbone.") for k in cfg["state_dict"])
    if cfg.get("file") and cfg.get("source") != "local-dir":
        try:
            return any(k.startswith("backbone.") for k in _checkpoint_keys(cfg["file"]))
        except Exception:  # noqa: BLE001 - unreadable: let timm's loader report it
            return True
    return any(cfg.get(key) for key in ("url", "file", "hf_hub_id"))


def _saved_kwargs(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The wrapper arguments a checkpoint file's metadata records (``{}`` when none)."""
    from ..files import read_metadata

    file = cfg.get("file")
    meta = read_metadata(file) if file else {}
    if meta.get("model") != GENERIC_NAME or not meta.get("model_kwargs"):
        return {}
    saved = json.loads(meta["model_kwargs"])
    if str(meta.get("num_classes", "")).isdigit():
        saved.setdefault("num_classes", int(meta["num_classes"]))
    return saved


def wrapper_create_args(name: str, exit_indices: Optional[Sequence[int]] = None, head: Optional[str] = None,
                        pretrained: Any = None, weights_file: Optional[str] = None,
                        **kwargs: Any) -> Tuple[str, Dict[str, Any]]:
    """The ``timm.create_model`` name and arguments that make timm model ``name`` multi-exit.

    A registered multi-exit model stays as it is; any other timm model becomes
    ``multi_exit_l2w(backbone=name)``. ``exit_indices`` / ``head`` choose a wrapper's exits, ``pretrained``
    is ``True`` (the backbone's timm weights) or a local timm checkpoint file of the backbone, and the
    metadata of ``weights_file`` (a multi-exit checkpoint to be loaded) fills in the wrapper's settings.
    """
    module = timm.models.model_entrypoint(name).__module__
    chosen = {k: v for k, v in (("exit_indices", exit_indices), ("head", head)) if v is not None}
    plain_timm = module.startswith("timm.")  # timm's own families; models registered elsewhere have their exits
    if not plain_timm and module != __name__ and chosen:
        raise ValueError(f"exit indices and exit heads choose the exits of a wrapped timm model; {name} has its own "
                         "exits: drop --exit-indices / --exit-head, or pass a plain timm model name")
    if plain_timm:
        name, kwargs = GENERIC_NAME, {"backbone": name, **kwargs}
    kwargs.update(chosen)
    if name == GENERIC_NAME and weights_file:
        saved = _saved_kwargs({"file": str(weights_file)})
        if saved.get("backbone") == kwargs.get("backbone", saved.get("backbone")):
            for key, value in saved.items():
                if key != "num_classes":  # the data decides the classes; other classifiers start fresh
                    kwargs.setdefault(key, value)
    if pretrained:
        kwargs["pretrained"] = True
        if pretrained is not True:
            kwargs["pretrained_cfg_overlay"] = dict(file=str(pretrained))
    return name, kwargs


def create_multi_exit_model(name: str, exit_indices: Optional[Sequence[int]] = None, exit_head: Optional[str] = None,
                            pretrained: Any = None, weights_file: Optional[str] = None, **kwargs: Any) -> nn.Module:
    """A registered multi-exit model, or any other timm model wrapped as one (``multi_exit_l2w``).

    ``exit_indices`` / ``exit_head`` choose a wrapped backbone's exit points and heads; ``pretrained``:
    ``True`` (the backbone's timm weights) or a local timm checkpoint file of the backbone; ``weights_file``:
    a multi-exit checkpoint about to be loaded, whose metadata fills in how a wrapper was built.
    """
    if not timm.is_model(name):
        known = ", ".join(timm.list_models("*l2w*")) or "(none registered)"
        raise ValueError(f"unknown model '{name}': pass a timm model name (any of timm.list_models()) or a "
                         f"registered multi-exit model ({known})")
    name, kwargs = wrapper_create_args(name, exit_indices=exit_indices, head=exit_head, pretrained=pretrained,
                                       weights_file=weights_file, **kwargs)
    model = timm.create_model(name, **kwargs)
    if not isinstance(getattr(model, "num_exits", None), int):
        raise ValueError(f"model '{name}' is not multi-exit (no num_exits): use a timm_l2w model, e.g. "
                         f"msdnet_l2w_cifar, or wrap a backbone with timm_l2w.MultiExitWrapper")
    return model


def _create_multi_exit(variant: str, backbone_name: Optional[str], pretrained: bool = False,
                       **kwargs: Any) -> MultiExitWrapper:
    """timm's builder. ``pretrained=True`` loads the variant's own checkpoint when its cfg names one (a hub
    repo, a multi-exit file, ``local-dir:``), else the backbone's timm weights: its hub weights, or a plain
    timm checkpoint given as ``pretrained_cfg_overlay=dict(file=...)`` (never both: no backbone download
    when a full multi-exit checkpoint is loaded)."""
    overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
    cfg = resolve_pretrained_cfg(variant, kwargs.get("pretrained_cfg"), overlay).to_dict()
    full_checkpoint = _names_wrapper_checkpoint(cfg)
    if variant == GENERIC_NAME:
        saved = _saved_kwargs(cfg) if full_checkpoint else {}
        for key, value in saved.items():
            kwargs.setdefault(key, value)  # create_model('multi_exit_l2w', pretrained=True, overlay=dict(file=...))
        if "num_classes" in saved:  # the file's classifiers: timm keeps them when the classes agree
            overlay.setdefault("num_classes", saved["num_classes"])
        backbone_name = kwargs.pop("backbone", DEFAULT_BACKBONE)
        if not isinstance(backbone_name, str) or not timm.is_model(backbone_name):
            raise ValueError(f"{GENERIC_NAME} wraps a timm backbone: pass backbone='<timm model name>' (one of "
                             f"timm.list_models()), e.g. timm.create_model('{GENERIC_NAME}', "
                             f"backbone='efficientnet_b0', num_classes=10); got {backbone_name!r}")
    backbone_kwargs: Dict[str, Any] = {}
    if pretrained and not full_checkpoint and (overlay.get("file") or overlay.get("state_dict") is not None):
        backbone_kwargs["pretrained_cfg_overlay"] = {k: overlay[k] for k in ("file", "state_dict") if k in overlay}
        overlay = {k: v for k, v in overlay.items() if k not in ("file", "state_dict")}  # the backbone's file
    n_exits = len(kwargs["exit_indices"]) if kwargs.get("exit_indices") is not None else None
    if n_exits is not None:
        overlay.setdefault("classifier", tuple(f"heads.{k}.fc" for k in range(n_exits)))
    feature_cfg = dict(feature_cls="getter")
    if kwargs.get("exit_indices") is not None:
        feature_cfg["out_indices"] = tuple(kwargs["exit_indices"])
    model = build_model_with_cfg(
        partial(MultiExitWrapper, backbone_name, pretrained=pretrained and not full_checkpoint, **backbone_kwargs),
        variant,
        pretrained and full_checkpoint,
        pretrained_cfg_overlay=overlay,
        feature_cfg=feature_cfg,
        **kwargs,
    )
    if isinstance(model, MultiExitWrapper):
        if variant == GENERIC_NAME:  # the backbone's input settings, the source of the weights it was given
            resolved = dict(model.pretrained_cfg)
            source = {k: resolved[k] for k in ("file", "source", "hf_hub_id", "url", "tag") if resolved.get(k)}
            model.pretrained_cfg = model.default_cfg = {**model._own_cfg(), **source}
        else:
            model._model_args = {}  # the variant's name rebuilds it; create_model adds the arguments it was given
    return model


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
    f"{GENERIC_NAME}.untrained": _cfg(DEFAULT_BACKBONE),
    "resnet18_l2w.untrained": _cfg("resnet18"),
    "convnext_atto_l2w.untrained": _cfg("convnext_atto"),
    "vit_tiny_l2w.untrained": _cfg("vit_tiny_patch16_224"),
})


@register_model
def multi_exit_l2w(pretrained: bool = False, **kwargs: Any) -> MultiExitWrapper:
    """Any timm backbone as a multi-exit model: ``backbone='<timm name>'`` (default ``resnet18``),
    ``exit_indices``, ``head``, ``head_width``, ``global_pool`` and the backbone's timm arguments."""
    return _create_multi_exit(GENERIC_NAME, None, pretrained, **kwargs)


@register_model
def resnet18_l2w(pretrained: bool = False, **kwargs: Any) -> MultiExitWrapper:
    """ResNet-18 with exits after layer1..layer4 (pretrained=True loads timm's ResNet-18 weights)."""
    return _create_multi_exit("resnet18_l2w", "resnet18", pretrained, **dict(dict(exit_indices=(1, 2, 3, 4)), **kwargs))


@register_model
def convnext_atto_l2w(pretrained: bool = False, **kwargs: Any) -> MultiExitWrapper:
    """ConvNeXt-Atto with an exit after each of its four stages."""
    return _create_multi_exit("convnext_atto_l2w", "convnext_atto", pretrained,
                              **dict(dict(exit_indices=(0, 1, 2, 3)), **kwargs))


@register_model
def vit_tiny_l2w(pretrained: bool = False, **kwargs: Any) -> MultiExitWrapper:
    """ViT-Tiny/16 with exits after blocks 3, 6, 9 and 12."""
    return _create_multi_exit("vit_tiny_l2w", "vit_tiny_patch16_224", pretrained,
                              **dict(dict(exit_indices=(2, 5, 8, 11)), **kwargs))
