"""CUDA graphs of the whole training update (``timm-l2w train --cuda-graphs``) or of the L2W hook's meta
update in your own loop (:func:`capture_meta_updates`).

An L2W update launches thousands of small kernels (virtual step, meta backward, predictor step, real
forward, backward, optimizer step); on a fast GPU the launches, not the arithmetic, set the pace. Once
the update is free of host synchronisation (:mod:`timm_l2w.meta`, :mod:`timm_l2w.accel.device_step`) it can be
recorded once per kind of update and replayed: :class:`GraphedUpdates` does that for a fixed batch shape.

A *kind* (``key``) is e.g. (half 0 or 1 of the loader batch, meta step due or not): each gets its own
graph, all in one memory pool. The loader batch is copied into static buffers (:meth:`GraphedUpdates.stage`)
so that both halves and their meta sets live at fixed addresses. The first ``warmup`` updates of a kind
run eagerly (on a side stream, as torch requires before capture), the next is captured and replayed, the
later ones are replayed. The learning rates the host keeps as numbers (timm's scheduler, L2W's cosine) are
mirrored into device tensors before every replay, which the captured optimizer kernels read.

Anything that cannot be captured (no CUDA, a host read left in the update, an optimizer without a tensor
learning rate, a batch of another shape) falls back to the eager update with one log line saying why.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..optim_step import unwrap_optimizer
from .device_step import fused_blocker

__all__ = ["GraphedUpdates", "GraphedMetaUpdates", "capture_blocker", "capture_meta_updates", "stochastic_modules"]


def stochastic_modules(model: nn.Module) -> List[str]:
    """Names of the modules that draw random numbers in train mode (dropout, drop path)."""
    names = []
    for name, module in model.named_modules():
        p = getattr(module, "p", None) if isinstance(module, nn.modules.dropout._DropoutNd) else \
            getattr(module, "drop_prob", None)
        if p:
            names.append(name or type(module).__name__)
    return names


def capture_blocker(device: torch.device, optimizers: Sequence[Any], backend: Optional[str] = None,
                    model: Optional[nn.Module] = None, **settings: Any) -> Optional[str]:
    """Why the update cannot be captured (None: it can). ``settings`` are further (name, value) pairs that
    block capture when true, e.g. ``ema=True`` -> "ema"."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"CUDA graphs need a CUDA device (training on {device})"
    for opt in optimizers:
        reason = fused_blocker(opt)
        if reason is not None:
            return reason
    blocked = [name.replace("_", " ") for name, value in settings.items() if value]
    if blocked:
        return f"not supported together with: {', '.join(blocked)}"
    if backend == "func" and model is not None and stochastic_modules(model):
        return (f"the 'func' backend replays dropout masks through the RNG state, which a graph cannot read "
                f"({', '.join(stochastic_modules(model)[:3])}): use --backend higher")
    return None


class GraphedUpdates:
    """Capture-and-replay of one update per ``key`` for a fixed batch shape (see the module docstring).

    ``optimizers``: those whose learning rate the captured update reads (their param groups' ``lr`` is
    mirrored into a device tensor before every replay). ``log`` gets one line when graphs are used and
    one when they are not (the reason). ``capture=False`` runs the same schedule eagerly (what the CPU
    tests exercise: staging, warm-up counts, bookkeeping).
    """

    def __init__(self, optimizers: Sequence[Any], log: Callable[[str], None] = print, warmup: int = 1,
                 capture: bool = True, blocker: Optional[str] = None):
        self.optimizers = [unwrap_optimizer(o) for o in optimizers]
        self.log, self.warmup, self.capture = log, int(warmup), capture
        self.disabled: Optional[str] = None
        self.graphs: Dict[Hashable, Tuple[Any, Any]] = {}
        self.seen: Dict[Hashable, int] = {}
        self.replays = 0
        self._static: Optional[Tuple[Tensor, Tensor]] = None
        self._lrs: List[Tuple[Dict[str, Any], Tensor]] = []
        self._pool = None
        self._stream = None
        if blocker is not None:
            self.disable(blocker)

    def disable(self, reason: str) -> None:
        """Stop capturing (graphs already captured are dropped); the updates run eagerly from now on."""
        if self.disabled is None:
            self.log(f"timm-l2w train: CUDA graphs off ({reason}); the update runs eagerly")
        self.disabled = reason
        self.graphs.clear()

    # -- inputs ------------------------------------------------------------------------------
    def stage(self, x: Tensor, y: Tensor) -> Tuple[Tensor, Tensor]:
        """The loader batch in the static buffers the graphs read (a copy on the device; the batch itself
        when graphs are off). A batch of another shape or dtype turns graphs off."""
        if self.disabled is not None:
            return x, y
        if self._static is None:
            self._static = (torch.empty_like(x), torch.empty_like(y))
        sx, sy = self._static
        if (sx.shape, sx.dtype, sx.stride(), sy.shape, sy.dtype) != (x.shape, x.dtype, x.stride(), y.shape, y.dtype):
            self.disable(f"a batch of shape {tuple(x.shape)} after {tuple(sx.shape)}: graphs need one batch shape")
            return x, y
        sx.copy_(x)
        sy.copy_(y)
        return sx, sy

    # -- learning rates ----------------------------------------------------------------------
    def _device_lrs(self, device: torch.device) -> None:
        if not self._lrs:
            self._lrs = [(group, torch.tensor(float(group["lr"]), dtype=torch.float32, device=device))
                         for opt in self.optimizers for group in opt.param_groups]

    def _mirror_lrs(self) -> None:
        for group, value in self._lrs:
            value.fill_(float(group["lr"]))  # a fill kernel with the number: no host sync

    # -- the update --------------------------------------------------------------------------
    def run(self, key: Hashable, update: Callable[[bool], Any], after: Callable[[], None] = lambda: None,
            reset: Callable[[], None] = lambda: None) -> Any:
        """One update of kind ``key``. ``update(graphed)`` does the device work and returns tensors; with
        ``graphed=False`` (warm-up, graphs off) it also does the host side of the update, with ``True`` it
        leaves that to ``after()`` (counters, schedules), which runs after each capture or replay.
        ``reset()`` clears what a failed capture left (the gradients)."""
        if self.disabled is not None:
            return update(False)
        if key in self.graphs:
            graph, outputs = self.graphs[key]
            self._mirror_lrs()
            if graph is not None:
                graph.replay()
            else:  # capture=False: the replay schedule, eagerly
                outputs = update(True)
            self.replays += 1
            after()
            return outputs
        self.seen[key] = self.seen.get(key, 0) + 1
        if self.seen[key] <= self.warmup:
            return self._eager_on_side_stream(update)
        return self._capture(key, update, after, reset)

    def _eager_on_side_stream(self, update: Callable[[bool], Any]) -> Any:
        if not self.capture:
            return update(False)
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        self._stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._stream):
            outputs = update(False)
        torch.cuda.current_stream().wait_stream(self._stream)
        return outputs

    def _capture(self, key: Hashable, update: Callable[[bool], Any], after: Callable[[], None],
                 reset: Callable[[], None]) -> Any:
        device = self._static[0].device if self._static is not None else torch.device("cuda")
        self._device_lrs(device)
        if not self.capture:
            self.graphs[key] = (None, None)
            return self.run(key, update, after, reset)
        graph = torch.cuda.CUDAGraph()
        self._mirror_lrs()
        numbers = [group["lr"] for group, _ in self._lrs]
        for group, value in self._lrs:  # the captured kernels read the device copies
            group["lr"] = value
        failure: Optional[BaseException] = None
        try:
            torch.cuda.synchronize()
            with torch.cuda.graph(graph, pool=self._pool):
                outputs = update(True)
        except Exception as err:  # noqa: BLE001 - whatever stops the capture, the eager update still runs
            failure = err
        finally:
            for (group, _), number in zip(self._lrs, numbers):
                group["lr"] = number
        if failure is not None:
            reset()
            torch.cuda.synchronize()
            self.disable(f"capture of the update failed: {type(failure).__name__}: "
                         f"{str(failure).splitlines()[0][:200] if str(failure) else ''}")
            return update(False)
        if self._pool is None:
            self._pool = graph.pool()
            self.log(f"timm-l2w train: CUDA graphs on: the update is captured per kind ({key!r} first) and replayed")
        self.graphs[key] = (graph, outputs)
        graph.replay()  # the capture only recorded this update: replaying runs it
        self.replays += 1
        after()
        return outputs


class GraphedMetaUpdates:
    """The :class:`~timm_l2w.meta.L2W` hook's meta update as a CUDA graph per half of the loader batch: the
    :class:`~timm_l2w.meta.MetaUpdateRunner` that :func:`capture_meta_updates` installs. ``graphs`` is the
    :class:`GraphedUpdates` that captures and replays (its ``disabled`` says why not, when not)."""

    def __init__(self, l2w: Any, graphs: GraphedUpdates):
        self.l2w, self.graphs = l2w, graphs

    def stage(self, x: Tensor, y: Tensor) -> Tuple[Tensor, Tensor]:
        return self.graphs.stage(x, y)

    def run(self, half: int, update: Callable[[], Any]) -> bool:
        if self.graphs.disabled is not None:
            return False  # the hook's eager meta update (it may reuse the user's forward)
        self.graphs.run(half, lambda graphed: update(), reset=lambda: self.l2w.meta_optimizer.zero_grad())
        return True


def capture_meta_updates(l2w: Any) -> GraphedMetaUpdates:
    """Record ``l2w``'s meta update (the training half's forward, virtual step, meta loss, second-order
    backward, predictor step) as a CUDA graph per half of the loader batch and replay it; installed as
    ``l2w.meta_runner`` and returned. :meth:`~timm_l2w.meta.L2W.split` then copies each loader batch into
    static buffers, and the meta update takes the targets given to ``split``.

    It needs a CUDA device, torch SGD as the real optimizer and the fused Adam of the predictor (no
    gradient accumulation, no ``meta_precision='amp'``, and the ``'higher'`` backend for models with
    dropout); otherwise, or when the capture fails, a RuntimeWarning says why and the meta update runs
    eagerly. ``timm-l2w train --cuda-graphs`` captures its whole update instead (the real step too).
    """
    net = l2w.backend.model
    device = next(net.parameters()).device
    real = unwrap_optimizer(l2w.optimizer)
    blocker = capture_blocker(device, [l2w.meta_optimizer], l2w.backend.name, net,
                              gradient_accumulation=l2w.grad_accum_steps > 1,
                              meta_precision_amp=l2w.meta_precision == "amp")
    if blocker is None and type(real) is not torch.optim.SGD:
        blocker = ("the captured virtual step reads the learning rate on the device for torch SGD only, "
                   f"not {type(real).__name__}")
    graphs = GraphedUpdates([l2w.meta_optimizer, real], blocker=blocker,
                            log=lambda line: warnings.warn(line.replace("timm-l2w train", "L2W"), RuntimeWarning,
                                                           stacklevel=1))
    l2w.meta_runner = GraphedMetaUpdates(l2w, graphs)
    return l2w.meta_runner
