"""The multi-exit contract every backbone in timm_l2w meets.

A multi-exit model is an ``nn.Module`` with ``num_exits`` = K exits, cheapest first. Its output
follows timm's precedent for models with several heads (the distilled DeiT):

* ``model.forward_exits(x)`` returns a ``tuple`` of the K exit logits ``[B, num_classes]`` in any
  mode. Code that needs every exit (evaluation, the L2W hook, early-exit thresholds) uses it.
* ``model(x)`` in **train** mode returns the same tuple, so a training loop (through DDP or
  accelerate) gets every exit for the multi-exit loss.
* ``model(x)`` in **eval** mode returns only the **last** exit's logits ``[B, num_classes]``, so
  timm's inference, validation and export tools see an ordinary classifier.

It also runs *stage by stage*: stage k consumes the state left by stage k-1 (the input image for
k = 0), runs block k and returns the new state together with the logits of exit k. The state is any
nest (tensor, list, tuple, dict) of tensors whose first dimension is the batch, so early-exit
inference can drop samples from it with :func:`select_samples`. ``forward_exits`` is defined as the
stages called in order, so the staged run and ``forward_exits`` agree exactly by construction.
"""
from __future__ import annotations

from typing import Any, List, Tuple, Union

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

__all__ = ["MultiExitModel", "select_samples", "unwrap_model", "check_multi_exit_output"]


class MultiExitModel(nn.Module):
    """Base class: subclasses set ``num_exits`` and implement :meth:`forward_stage`.

    :meth:`forward_exits` is the stages called in order (the staged run and it agree exactly by
    construction); :meth:`forward` returns all exits in train mode and the last one in eval mode.
    Subclasses do not override ``forward``.
    """

    num_exits: int

    def forward_stage(self, index: int, state: Any) -> Tuple[Any, Tensor]:
        """Run block ``index`` on ``state`` and its exit head; return ``(new_state, logits)``."""
        raise NotImplementedError

    def check_input(self, x: Tensor) -> None:
        """Raise a clear ``ValueError`` if ``x`` cannot go through this model (override to extend)."""
        in_chans = getattr(self, "in_chans", None)
        if not isinstance(x, Tensor) or x.ndim != 4:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"expected an image batch of shape [B, C, H, W], got {shape}")
        if in_chans is not None and x.shape[1] != in_chans:
            raise ValueError(
                f"input has {x.shape[1]} channel(s), model expects {in_chans}: "
                f"pass in_chans={x.shape[1]} to create_model or convert the images"
            )

    def forward_exits(self, x: Tensor) -> Tuple[Tensor, ...]:
        """All K exit logits ``[B, num_classes]``, cheapest first, in train and eval mode alike."""
        self.check_input(x)
        state: Any = x
        outputs = []
        for k in range(self.num_exits):
            state, logits = self.forward_stage(k, state)
            outputs.append(logits)
        return tuple(outputs)

    def forward(self, x: Tensor) -> Union[Tuple[Tensor, ...], Tensor]:
        """Train mode: the tuple of all K exit logits. Eval mode: the last exit's logits only.

        Use :meth:`forward_exits` for every exit in eval mode.
        """
        outputs = self.forward_exits(x)
        return outputs if self.training else outputs[-1]

    def reset_classifier(self, num_classes: int) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


def select_samples(state: Any, index: Tensor) -> Any:
    """Keep only the samples ``index`` (bool mask or int indices) of every tensor in ``state``."""
    return tree_map(lambda t: t[index] if isinstance(t, Tensor) else t, state)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP / DataParallel / FSDP / DeepSpeed / torch.compile wrappers (accelerate's unwrapping)."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model, keep_torch_compile=False)


def check_multi_exit_output(outputs: Any, num_exits: int | None = None) -> List[Tensor]:
    """Validate that ``outputs`` holds every exit's logits (a tuple or list); return it as a list."""
    if isinstance(outputs, Tensor):
        raise TypeError(
            f"expected the logits of every exit (a tuple of [batch, num_classes] tensors), got one "
            f"tensor of shape {tuple(outputs.shape)}: a multi-exit model in eval mode returns only its "
            "last exit from model(x). Use model.forward_exits(x) for all exits in eval mode, or call "
            "model(x) in train mode (model.train())"
        )
    if not isinstance(outputs, (list, tuple)):
        raise TypeError(
            f"a multi-exit model must return a tuple of exit logits, got {type(outputs).__name__}: "
            "use a timm_l2w model or wrap a timm backbone with timm_l2w.MultiExitWrapper"
        )
    if len(outputs) == 0 or not all(isinstance(o, Tensor) and o.ndim == 2 for o in outputs):
        raise TypeError("every exit output must be a [batch, num_classes] tensor of logits")
    if num_exits is not None and len(outputs) != num_exits:
        raise ValueError(f"model returned {len(outputs)} exits, expected {num_exits}")
    return list(outputs)
