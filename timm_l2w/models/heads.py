"""The exit heads of a wrapped backbone: pooling + linear for maps and for tokens, and the small conv head.

Every head keeps its classifier in ``fc`` and offers ``forward_features`` (unpooled), ``forward_head``
(pool, ``fc``) and ``reset`` (another number of classes); :class:`~timm_l2w.models.wrapper.MultiExitWrapper`
picks one per exit.
"""
from __future__ import annotations

from typing import List, Optional

from timm.layers import SelectAdaptivePool2d, global_pool_nlc
from timm.models import register_notrace_function
from torch import Tensor, nn

from .layers import exit_classifier

__all__ = ["ExitHead", "PoolHead", "TokenHead", "ConvHead", "LinearHead", "tokens_to_grid"]


class ExitHead(nn.Module):
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


class PoolHead(ExitHead):
    """Global pooling (timm's ``SelectAdaptivePool2d``) and linear, on a [B, C, H, W] or [B, H, W, C] map."""

    def __init__(self, chs: int, num_classes: int, pool_type: str = "avg", input_fmt: str = "NCHW"):
        super().__init__()
        self.num_features, self.input_fmt = chs, input_fmt
        self.reset(num_classes, pool_type)

    def reset(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None:
            self.pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool), input_fmt=self.input_fmt)
        self.head_hidden_size = self.num_features * self.pool.feat_mult()
        self.fc = exit_classifier(self.head_hidden_size, num_classes, bool(self.pool.pool_type))


class TokenHead(ExitHead):
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


class ConvHead(PoolHead):
    """Two 3x3 stride-2 conv-BN-ReLU, global pooling, linear (tokens go to their patch grid first)."""

    def __init__(self, in_chs: int, width: int, num_classes: int, layout: str = "nchw",
                 num_prefix_tokens: int = 0, pool_type: str = "avg"):
        super().__init__(width, num_classes, pool_type)
        self.layout, self.num_prefix_tokens = layout, num_prefix_tokens
        layers: List[nn.Module] = []
        for c in (in_chs, width):
            layers += [nn.Conv2d(c, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width),
                       nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)

    def forward_features(self, x: Tensor) -> Tensor:
        if self.layout == "nlc":
            x = tokens_to_grid(x, self.num_prefix_tokens)
        elif self.layout == "nhwc":
            x = x.permute(0, 3, 1, 2)
        return self.features(x)


class LinearHead(ExitHead):
    """The classifier alone: the exit on the backbone's last point pools with the backbone's own head."""

    def __init__(self, dim: int, num_classes: int, pooled: bool = True):
        super().__init__()
        self.num_features = self.head_hidden_size = dim
        self.fc = exit_classifier(dim, num_classes, pooled)

    def pool(self, x: Tensor) -> Tensor:
        return x
