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

import typing
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.autograd.forward_ad as fwAD
from timm.models import checkpoint
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves, tree_map

from .layers import is_symbolic

__all__ = ["MultiExitModel", "select_samples", "unwrap_model", "check_multi_exit_output", "equilibrium_split",
           "classifier_free_parameters"]


class _GradientEquilibrium(torch.autograd.Function):
    """Identity forward, two copies out (exit path, onward path); backward ``a * g_exit + b * g_onward``.

    Forward-mode AD gets the adjoint (tangents ``a * t`` and ``b * t``), so a Jacobian-vector product
    through the model equals the inner product with the rescaled gradient (the ``'func'`` meta backend).
    The outputs are views of ``x`` (no copy), or copies when ``x`` carries a forward-mode tangent.
    """

    @staticmethod
    def forward(x: Tensor, a: float, b: float, copy: bool) -> Tuple[Tensor, Tensor]:  # type: ignore[override]
        return (x.clone(), x.clone()) if copy else (x.view_as(x), x.view_as(x))

    @staticmethod
    def setup_context(ctx: Any, inputs: Tuple[Any, ...], output: Any) -> None:
        ctx.a, ctx.b = inputs[1], inputs[2]
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx: Any, g_exit: Optional[Tensor], g_onward: Optional[Tensor]) -> Tuple[Optional[Tensor], ...]:
        if g_exit is None and g_onward is None:
            return None, None, None, None
        if g_exit is None:
            return ctx.b * g_onward, None, None, None
        if g_onward is None:
            return ctx.a * g_exit, None, None, None
        return ctx.a * g_exit + ctx.b * g_onward, None, None, None

    @staticmethod
    def jvp(ctx: Any, t: Tensor, *_: Any) -> Tuple[Tensor, Tensor]:
        return ctx.a * t, ctx.b * t


def equilibrium_split(state: Any, read: Sequence[Tensor], index: int, num_exits: int) -> Tuple[Any, Any]:
    """IMTA's gradient equilibrium (Li et al., ICCV 2019, §3.2) at stage ``index`` (0-based) of K.

    Returns ``(exit_state, onward_state)``, both equal to ``state`` in value. For every tensor of
    ``state`` in ``read`` (what exit ``index`` reads), the gradient reaching it becomes
    ``g_exit / (K - index) + g_onward * (K - index - 1) / (K - index)``: the exit's own loss counts
    ``1 / (K - k + 1)`` and the later exits together ``(K - k) / (K - k + 1)`` for 1-based k. Other
    tensors pass unchanged (the exit does not read them).
    """
    remaining = num_exits - index
    a, b = 1.0 / remaining, (remaining - 1) / remaining
    ids = {id(t) for t in read}
    pairs: Dict[int, Tuple[Tensor, Tensor]] = {}

    def split(t: Any) -> Any:
        if isinstance(t, Tensor) and id(t) in ids and id(t) not in pairs:
            pairs[id(t)] = _GradientEquilibrium.apply(t, a, b, fwAD.unpack_dual(t).tangent is not None)
        return t

    tree_map(split, state)
    exit_state = tree_map(lambda t: pairs[id(t)][0] if isinstance(t, Tensor) and id(t) in pairs else t, state)
    onward = tree_map(lambda t: pairs[id(t)][1] if isinstance(t, Tensor) and id(t) in pairs else t, state)
    return exit_state, onward


class MultiExitModel(nn.Module):
    """Base class: subclasses set ``num_exits`` and implement :meth:`forward_stage`.

    :meth:`forward_exits` is the stages called in order (the staged run and it agree exactly by
    construction); :meth:`forward` returns all exits in train mode and the last one in eval mode.
    Subclasses do not override ``forward``.
    """

    num_exits: int
    grad_checkpointing: bool = False
    gradient_equilibrium: bool = False  # IMTA's gradient rescaling between stages (set_gradient_equilibrium)
    exit_heads_pruned: bool = False  # set by prune_intermediate_layers (a features_only trunk)

    def forward_stage(self, index: int, state: Any) -> Tuple[Any, Tensor]:
        """Run block ``index`` on ``state`` and its exit head; return ``(new_state, logits)``.

        Default: :meth:`forward_block`, then exit ``index``'s :meth:`forward_exit_features` and
        :meth:`forward_exit_head`. A subclass implements those three (and gets timm's
        ``forward_features`` / ``forward_head`` / grad checkpointing) or overrides this method only.
        """
        if self.exit_heads_pruned:
            raise RuntimeError(
                "this model's exit heads were pruned (a features_only trunk): use forward_intermediates, "
                "or create the model without features_only for exit logits")
        if not 0 <= index < self.num_exits:
            raise ValueError(f"stage index {index} out of range: this model has {self.num_exits} exits")
        state = self._run_block(index, state)
        exit_state = state
        if self.gradient_equilibrium and not torch.is_inference_mode_enabled():
            exit_state, state = equilibrium_split(state, self.exit_reads(index, state), index, self.num_exits)
        return state, self.forward_exit_head(index, self.forward_exit_features(index, exit_state))

    def _has_default_stage(self) -> bool:
        """True when stages are block + exit head (the block API), not a subclass's own forward_stage."""
        return type(self).forward_stage is MultiExitModel.forward_stage

    def exit_reads(self, index: int, state: Any) -> List[Tensor]:
        """The tensors of ``state`` (after block ``index``) that exit ``index``'s features read.

        Default: every tensor of the state; a model whose exits read part of a multi-tensor state
        (MSDNet's coarsest scale, RANet's last output) overrides it. Used by gradient equilibrium.
        """
        return [t for t in tree_leaves(state) if isinstance(t, Tensor)]

    def set_gradient_equilibrium(self, enable: bool = True) -> None:
        """IMTA's gradient equilibrium (:func:`equilibrium_split`) in every training forward; forward values
        are unchanged, only the gradients into the shared trunk are rescaled. Off in inference mode."""
        if enable and not self._has_default_stage():
            raise TypeError(
                f"{type(self).__name__} overrides forward_stage: gradient equilibrium needs the default stage "
                "(forward_block, forward_exit_features and forward_exit_head) to rescale between block and exit")
        self.gradient_equilibrium = bool(enable)

    def forward_block(self, index: int, state: Any) -> Any:
        """Block ``index`` alone (no exit head): the state after it."""
        raise NotImplementedError(
            f"{type(self).__name__} only implements forward_stage: timm's forward_features / forward_head "
            "need forward_block, forward_exit_features and forward_exit_head")

    def forward_exit_features(self, index: int, state: Any) -> Tensor:
        """The unpooled features exit ``index`` pools, from the state after block ``index``."""
        raise NotImplementedError(f"{type(self).__name__} does not implement forward_exit_features")

    def forward_exit_head(self, index: int, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Exit ``index``'s pooling and classifier on its features (``pre_logits``: pooled features)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement forward_exit_head")

    def _run_block(self, index: int, state: Any) -> Any:
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return checkpoint(self.forward_block, index, state)
        return self.forward_block(index, state)

    def forward_features(self, x: Tensor) -> Tensor:
        """timm API: every block, then the last exit's unpooled features (what its pooling reads).

        ``forward_head(forward_features(x))`` equals ``model(x)`` in eval mode (the last exit).
        """
        if self.exit_heads_pruned:
            raise RuntimeError("this model's exit heads were pruned (a features_only trunk): use forward_intermediates")
        self.check_input(x)
        state: Any = x
        for k in range(self.num_exits):
            state = self._run_block(k, state)
        return self.forward_exit_features(self.num_exits - 1, state)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """timm API: the last exit's pooling and classifier on :meth:`forward_features` output."""
        return self.forward_exit_head(self.num_exits - 1, x, pre_logits)

    def forward_intermediates(
            self,
            x: Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> Union[List[Tensor], Tuple[Tensor, List[Tensor]]]:
        """timm API (``features_only=True`` uses it): the ``feature_info`` maps selected by ``indices``
        (all if ``None``, the last n if an int). With ``intermediates_only`` those alone, else
        ``(forward_features(x), intermediates)``. Subclasses implement :meth:`intermediate_features`.
        """
        MultiExitModel.check_input(self, x)  # the image checks only: features need no exit head
        intermediates = self.intermediate_features(x, indices, norm=norm, stop_early=stop_early, output_fmt=output_fmt)
        if intermediates_only:
            return intermediates
        return self.forward_features(x), intermediates

    def intermediate_features(self, x: Tensor, indices: Optional[Union[int, List[int]]] = None,
                              **kwargs: Any) -> List[Tensor]:
        """The ``feature_info`` maps selected by ``indices`` (see :meth:`forward_intermediates`)."""
        raise NotImplementedError(f"{type(self).__name__} has no feature_info maps")

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of keeping its activations (timm API)."""
        self.grad_checkpointing = enable

    def check_input(self, x: Tensor) -> None:
        """Raise a clear ``ValueError`` if ``x`` cannot go through this model (override to extend).

        Skipped while tracing (torch.fx proxies, ``torch.jit.trace``): shapes are symbolic there.
        """
        if is_symbolic(x):
            return
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

        Use :meth:`forward_exits` for every exit in eval mode. In eval mode a model with the block API
        (the default :meth:`forward_stage`) runs only the blocks and the last exit's head, skipping the
        earlier exit heads; one that overrides ``forward_stage`` runs every stage and keeps the last.
        """
        if self.training or not self._has_default_stage():
            outputs = self.forward_exits(x)
            return outputs if self.training else outputs[-1]
        return self.forward_head(self.forward_features(x))

    def get_classifiers(self) -> nn.ModuleList:
        """Every exit's classifier (its final linear layer), cheapest exit first."""
        raise NotImplementedError(f"{type(self).__name__} does not list its exits' classifiers: define "
                                  "get_classifiers() returning an nn.ModuleList of them, cheapest exit first")

    def get_classifier(self) -> nn.Module:
        """timm API: the last exit's classifier, the one eval mode's ``forward`` ends with (timm's scripts scale
        its ``weight``, e.g. train.py's ``--head-init-scale``); :meth:`get_classifiers` gives every exit's."""
        classifiers = self.get_classifiers()
        return classifiers[-1] if len(classifiers) else nn.Identity()

    def reset_classifier(self, num_classes: int) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


# This module postpones annotations (strings); torch.fx copies ``forward``'s annotations into the code it
# generates, which TorchScript then cannot read, so ``forward`` carries the resolved types.
MultiExitModel.forward.__annotations__.update(typing.get_type_hints(MultiExitModel.forward))


def classifier_free_parameters(model: nn.Module) -> Optional[List[nn.Parameter]]:
    """``model``'s parameters without any exit's classifier (``get_classifiers()``): what timm's train.py clips
    under ``--clip-mode agc``, which leaves the classifier out; None for a model that does not list them."""
    classifiers = getattr(unwrap_model(model), "get_classifiers", None)
    try:
        heads = None if classifiers is None else {id(p) for c in classifiers() for p in c.parameters()}
    except NotImplementedError:  # a MultiExitModel subclass that does not list them
        heads = None
    return None if heads is None else [p for p in model.parameters() if id(p) not in heads]


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
