"""Pieces the multi-exit families share for timm's model API: exit pooling, timm's standard
``create_model`` arguments and tracing guards."""
from __future__ import annotations

import inspect
from typing import Any, Optional

import torch
from timm.layers import SelectAdaptivePool2d
from torch import Tensor, nn

__all__ = ["ExitPool", "exit_classifier", "is_symbolic", "check_timm_kwargs", "set_bn_args"]


def is_symbolic(x: Any) -> bool:
    """True while ``x`` is a torch.fx proxy or the model is being traced (input checks are skipped then)."""
    return isinstance(x, torch.fx.Proxy) or torch.jit.is_tracing()


def exit_classifier(in_features: int, num_classes: int, pooled: bool = True) -> nn.Module:
    """An exit's linear classifier, or ``Identity`` for ``num_classes=0`` (timm: pooled features out)."""
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0, got {num_classes}")
    if num_classes > 0 and not pooled:
        raise ValueError("global_pool='' leaves unpooled features, which a linear classifier cannot take: "
                         "use it with num_classes=0 (features out), or pick a pooling such as 'avg'")
    return nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()


class ExitPool(nn.Module):
    """Global pooling of an exit head (timm's ``global_pool`` values).

    ``'avg'`` is the MSDNet/RANet release's pooling: a 2x2 average pool, then the mean of what is left
    (at the native input size the map is 2x2, so this is the global average, counted as 2x2 windows).
    ``''`` keeps the unpooled map; any other timm pool type (``'max'``, ``'avgmax'``, ``'catavgmax'``)
    goes through timm's :class:`~timm.layers.SelectAdaptivePool2d`.
    """

    def __init__(self, pool_type: str = "avg"):
        super().__init__()
        self.pool_type = pool_type or ""
        if self.pool_type == "avg":
            self.pool: nn.Module = nn.AvgPool2d(2)
        else:
            try:
                self.pool = SelectAdaptivePool2d(pool_type=self.pool_type, flatten=bool(self.pool_type))
            except AssertionError:
                raise ValueError(
                    f"unknown global_pool {pool_type!r}: use 'avg' (the release's), '' (no pooling), "
                    "'max', 'avgmax' or 'catavgmax'") from None

    def feat_mult(self) -> int:
        """Pooled features per input channel (2 for ``'catavgmax'``)."""
        return 1 if self.pool_type == "avg" else self.pool.feat_mult()

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(x)
        return x.mean(dim=(2, 3)) if self.pool_type == "avg" else x


def check_timm_kwargs(cls: type, drop_rate: float = 0.0, drop_path_rate: Optional[float] = None,
                      drop_block_rate: Optional[float] = None, bn_momentum: Optional[float] = None,
                      bn_eps: Optional[float] = None, **unknown: Any) -> None:
    """Check timm's standard ``create_model`` arguments for a family that has no drop path / drop block.

    ``timm.create_model`` drops ``None`` values and timm's ``train.py`` / ``benchmark.py`` always pass
    ``drop_rate``; ``drop_path_rate`` / ``drop_block_rate`` are accepted at their neutral values (``None``, 0)
    only. Any other argument is a ``TypeError`` naming the options of ``cls``.
    """
    name = cls.__name__
    if unknown:
        options = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "kwargs")]
        raise TypeError(f"{name} got unexpected arguments {sorted(unknown)}: its options are {', '.join(options)}")
    for key, value, what in (("drop_path_rate", drop_path_rate, "drop path (stochastic depth)"),
                             ("drop_block_rate", drop_block_rate, "DropBlock")):
        if value:
            raise ValueError(
                f"{name} has no {what}: {key}={value!r} is not supported (pass 0 or leave it unset); of timm's "
                "create_model arguments it takes drop_rate (dropout before every exit's classifier), global_pool "
                "(exit pooling), bn_momentum and bn_eps (every BatchNorm)")
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate!r}")
    if bn_momentum is not None and not 0.0 <= bn_momentum <= 1.0:
        raise ValueError(f"bn_momentum must be in [0, 1] (PyTorch's convention, as timm's), got {bn_momentum!r}")
    if bn_eps is not None and not bn_eps > 0:
        raise ValueError(f"bn_eps must be > 0, got {bn_eps!r}")


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def set_bn_args(model: nn.Module, bn_momentum: Optional[float] = None, bn_eps: Optional[float] = None) -> None:
    """Set ``momentum`` / ``eps`` of every BatchNorm in ``model`` (``None`` leaves them as built)."""
    for m in model.modules():
        if isinstance(m, _BATCH_NORMS):
            if bn_momentum is not None:
                m.momentum = bn_momentum
            if bn_eps is not None:
                m.eps = bn_eps
