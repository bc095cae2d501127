"""Pieces the multi-exit families share for timm's model API: exit pooling and tracing guards."""
from __future__ import annotations

from typing import Any

import torch
from timm.layers import SelectAdaptivePool2d
from torch import Tensor, nn

__all__ = ["ExitPool", "exit_classifier", "is_symbolic"]


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
