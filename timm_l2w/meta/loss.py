"""The meta loss (docs/method.md §5, step 2) and the RNG replay that gives a recomputed forward the
dropout masks of the user's forward."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..exits import assign_exits_static, exit_counts
from ..models.base import check_multi_exit_output
from ..weighting import ExitCriterion, exit_confidences, exit_losses

__all__ = ["meta_loss", "rng_state", "replay_rng"]

RngState = Tuple[Tensor, Optional[Tensor]]


def meta_loss(outputs: Sequence[Tensor], target: Tensor, p: Tensor | Sequence[float], criterion: Any = None) -> Tensor:
    """Sum over exits (with at least one sample) of the mean CE of the samples assigned to that exit.

    ``target``: class indices or class probabilities (Mixup); ``criterion``: the training loss
    (:class:`~timm_l2w.weighting.ExitCriterion`, e.g. timm's BinaryCrossEntropy), scored without its
    label smoothing (CE by default).

    The assignment is :func:`timm_l2w.exits.assign_exits` on the detached confidences with the
    training distribution ``p`` (selection without gradient). Non-finite outputs (a virtual step that
    overflowed, e.g. under fp16) give a NaN meta loss, which :class:`~timm_l2w.meta.L2W` skips, instead of
    an error. No host read: the counts ``floor(n p_k)`` come from ``n`` and ``p``
    (:func:`~timm_l2w.exits.exit_counts`), the assignment has static shapes and the finiteness test selects
    the result on the device.
    """
    outputs = check_multi_exit_output(outputs)
    losses = exit_losses(outputs, target, criterion=None if criterion is None else
                         ExitCriterion.from_module(criterion).unsmoothed())
    conf = exit_confidences(outputs)
    n, num_exits = conf.shape
    finite = torch.isfinite(conf).all()
    assigned = assign_exits_static(torch.where(finite, conf, torch.zeros_like(conf)), exit_counts(n, p, num_exits))
    mask = (assigned[:, None] == torch.arange(num_exits, device=assigned.device)).to(losses.dtype)
    value = ((losses * mask).sum(dim=0) / mask.sum(dim=0).clamp(min=1)).sum()
    return torch.where(finite, value, torch.full_like(value, float("nan")))


def rng_state(device: torch.device | str | None = None) -> Optional[RngState]:
    """The CPU (and CUDA ``device``) random state, to replay the same dropout masks later."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return None  # a CUDA graph captures no RNG state (accel.cuda_graphs refuses stochastic models with 'func')
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


@contextlib.contextmanager
def replay_rng(state: Optional[RngState], device: torch.device) -> Iterator[None]:
    """Run the block with the random state ``state`` (:func:`rng_state`), the caller's state restored after."""
    if state is None or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        yield  # (a CUDA graph can neither read nor set the RNG state: accel.cuda_graphs refuses dropout with 'func')
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        yield
