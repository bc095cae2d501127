"""One update of ``timm-l2w train``: forward, (meta step,) weighted loss, backward, optimizer step.

:class:`Updater` owns the update and what only it changes: the count of optimizer updates (the
scheduler's and the EMA's), the run of non-finite losses behind ``--max-nonfinite``, the sync-free path
(a non-finite step skipped on the device, :mod:`timm_l2w.accel.device_step`) and ``--cuda-graphs``
(:mod:`timm_l2w.accel.cuda_graphs`). It is an object given the run's pieces (model, optimizer, L2W, EMA,
criterion) rather than a mixin of the run, so that its switches and counters (``device_skip``,
``stepped``, the stop check) are its own attributes and not shared with checkpointing or the epoch
summary; the loop passes it each loader batch's step, which it reads only for messages and the test
fault hook.

Every update adds into the running sums of :meth:`timm_l2w.training.summary.EpochSummary.new_sums`
(device tensors), so that after the first update nothing is read back to the host on the sync-free path.
"""
from __future__ import annotations

import argparse
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor, nn

from ..models.base import classifier_free_parameters
from .stops import TrainingStopped, fault_point


class Updater:
    """The update of one run (``model`` and ``optimizer`` accelerate-prepared; ``l2w``, ``ema``, ``distill``
    ``None`` when unused; ``criterion`` the per-exit training loss)."""

    def __init__(self, args: argparse.Namespace, accelerator: Any, model: nn.Module, optimizer: torch.optim.Optimizer,
                 l2w: Any = None, ema: Any = None, distill: Any = None, criterion: Any = None):
        self.args, self.accelerator, self.model, self.optimizer = args, accelerator, model, optimizer
        self.l2w, self.ema, self.distill, self.criterion = l2w, ema, distill, criterion
        self.updates_done = 0  # optimizer updates so far (the scheduler's and the EMA's count)
        self.nonfinite_run: Any = 0  # a device tensor once the update runs sync-free
        self._buffer_groups: Optional[List[List[Tensor]]] = None
        self._agc_parameters: Optional[List[nn.Parameter]] = None  # under --clip-mode agc, found at the first clip
        self._build_sync_free()

    def _build_sync_free(self) -> None:
        """Sync-free updates (timm_l2w.accel.device_step): the skip of a non-finite update decided on the device,
        where the optimizer has a fused kernel and neither fp16 loss scaling, EMA nor accumulation decide on
        the host; then CUDA graphs (--cuda-graphs) where the update can be captured."""
        from ..accel.device_step import fused_blocker, use_fused

        args, acc = self.args, self.accelerator
        host = {"fp16 loss scaling": acc.scaler is not None, "model EMA": self.ema is not None,
                "gradient accumulation": args.grad_accum_steps > 1}
        reason = fused_blocker(self.optimizer) or next((name for name, on in host.items() if on), None)
        self.device_skip = reason is None
        if self.device_skip:
            use_fused(self.optimizer)
        self.stepped = False  # the device-side skip starts after one step (the optimizer state exists)
        self._stop_kind: Any = -1  # 1: the training loss, 0: the meta step reached --max-nonfinite first
        self._since_check = 0
        self.graphs = None
        if args.cuda_graphs:
            from ..accel.cuda_graphs import GraphedUpdates, capture_blocker

            optimizers = [self.optimizer] + ([self.l2w.meta_optimizer] if self.l2w is not None else [])

            def blocker_for(backend: Optional[str]) -> Optional[str]:
                return (f"the update skips non-finite steps on the host ({reason})" if reason else capture_blocker(
                    acc.device, optimizers, backend, acc.unwrap_model(self.model),
                    several_processes=acc.num_processes > 1))

            self._graph_blocker = blocker_for
            self._graph_backend = self.l2w.backend.name if self.l2w is not None else None
            log = print if acc.is_main_process else (lambda _: None)
            self.graphs = GraphedUpdates(optimizers, log=log, blocker=blocker_for(self._graph_backend))

    def resume_at(self, step: int, nonfinite_run: int) -> None:
        """Continue the counts of a checkpoint taken after ``step`` loader batches (two halves each)."""
        self.updates_done = 2 * step // self.args.grad_accum_steps
        self.nonfinite_run = nonfinite_run

    def update(self, x: Tensor, y: Tensor, stats: Dict[str, Any], step: int) -> Tensor:
        """Forward, (meta step,) weighted loss, backward, optimizer step of loader batch ``step``'s half
        ``(x, y)``; adds into ``stats`` and returns the detached loss."""
        with self.accelerator.accumulate(self.model):  # --grad-accum-steps: the step ends the window
            if self.graphs is not None and self.device_skip and self.stepped:  # --cuda-graphs: captured, replayed
                l2w = self.l2w
                meta_due = l2w is not None and l2w.meta_due
                result = self.graphs.run((x.data_ptr(), meta_due),
                                         lambda graphed: self._device_update(x, y, graphed, step),
                                         after=l2w.advance if l2w is not None else (lambda: None),
                                         reset=lambda: self._clear_grads())
            else:
                result = self._device_update(x, y, False, step)
                self._recheck_graphs()
            self._record(result, y.shape[0], stats, step)
            return result["loss"]

    def _recheck_graphs(self) -> None:
        """L2W's ``backend='auto'`` settles at its first meta step (``func`` where ``higher`` lacks a derivative),
        before any capture: what blocks capture is checked again for the backend it settled on."""
        if self.graphs is None or self.l2w is None or self.l2w.backend.name == self._graph_backend:
            return
        self._graph_backend = self.l2w.backend.name
        blocker = self._graph_blocker(self._graph_backend)
        if blocker is not None and self.graphs.disabled is None:
            self.graphs.disable(blocker)

    def _device_update(self, x: Tensor, y: Tensor, graphed: bool, step: int) -> Dict[str, Any]:
        """Forward, (meta step,) weighted loss, backward, optimizer step. The values it returns stay on the
        device; with ``device_skip`` it reads nothing back (a non-finite update is skipped there), so a CUDA
        graph can record it (``graphed``: L2W leaves its counters to the graph runner)."""
        from ..accel.device_step import restore_unless, step_unless
        from ..weighting import exit_losses, training_losses

        acc, model = self.accelerator, self.model
        if self.args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        kept = self._snapshot_buffers()  # BN running stats, restored if this update is skipped
        with acc.autocast():
            outputs = model(x)  # train mode: the tuple of every exit's logits (through DDP for gradient sync)
        if self.l2w is not None:  # a replayed graph leaves L2W's host side to the runner's after()
            loss = self.l2w.loss(outputs, y, advance=not graphed)
        else:
            loss = training_losses(outputs, y, distill=self.distill, criterion=self.criterion).mean(dim=0).sum()
        # whether L2W applied its meta update (False: non-finite meta loss or gradient, same on every rank)
        applied = self.l2w.last_meta_applied if self.l2w is not None and self.l2w.meta_step_ran else None
        fault_point("update", step)
        finite = acc.gather(torch.isfinite(loss.detach()).reshape(1)).all()  # a device bool, alike on every rank
        skipped: Any = ~finite
        if self.device_skip and self.stepped:  # decided on the device: the fused step skips, buffers go back
            acc.backward(loss)
            if acc.sync_gradients:
                self._clip_gradients()
            step_unless(self.optimizer, ~finite)
            self.optimizer.zero_grad(set_to_none=True)
            restore_unless(self._buffer_groups, kept, finite)
        elif bool(finite):
            # fp16: accelerate's GradScaler scales the loss ... (and divides it by --grad-accum-steps)
            acc.backward(loss)
            if acc.sync_gradients:
                self._clip_gradients()
            self.optimizer.step()  # ... and skips the step when the gradients overflowed (then lowers the scale);
            self.optimizer.zero_grad(set_to_none=True)  # both only at the end of an accumulation window
            if self.optimizer.step_was_skipped:
                self._restore_buffers(kept)
                skipped = 1
            else:
                self.stepped = self.stepped or acc.sync_gradients
                if self.ema is not None and acc.sync_gradients:
                    self.ema.update(acc.unwrap_model(model), step=self.updates_done + 1)
        else:  # skip this update everywhere; the model (BN statistics too) and optimizer states are untouched
            self.optimizer.zero_grad(set_to_none=True)
            self._restore_buffers(kept)
        with torch.no_grad():
            per_exit = exit_losses([o.detach() for o in outputs], y, criterion=self.criterion)
            labels = y.argmax(dim=1) if y.ndim == 2 else y  # Mixup: the dominant class
            correct = torch.stack([o.detach().argmax(dim=1).eq(labels) for o in outputs], 1).sum(0).double()
        return {"loss": loss.detach(), "finite": finite, "skipped": skipped, "loss_sum": per_exit.sum(dim=0).double(),
                "correct": correct, "meta_applied": applied,
                "meta_loss": self.l2w.last_meta_loss_tensor if applied is not None else None}

    def _record(self, result: Dict[str, Any], seen: int, stats: Dict[str, Any], step: int) -> None:
        """The host side of an update: counters, the epoch's running sums (device additions) and the stop
        after ``--max-nonfinite`` non-finite losses in a row, checked every ``max(1, max_nonfinite // 2)``
        updates when the update runs sync-free (every update otherwise)."""
        if self.accelerator.sync_gradients:
            self.updates_done += 1
        finite, applied = result["finite"], result["meta_applied"]
        stats["loss_sum"] += result["loss_sum"]
        stats["correct"] += result["correct"]
        stats["seen"] += seen
        stats["skipped"] += result["skipped"]
        bad = ~finite
        if applied is not None:
            stats["meta_skipped"] += ~applied
            stats["meta_sum"] += torch.where(applied, result["meta_loss"].double(), 0.0)
            stats["meta_count"] += applied
            bad = bad | ~applied
        limit = self.args.max_nonfinite
        self.nonfinite_run = (self.nonfinite_run + 1) * bad  # 0 after a finite update
        reached = (self.nonfinite_run == limit) & (torch.as_tensor(self._stop_kind) < 0)
        self._stop_kind = torch.where(reached, (~finite).long(), torch.as_tensor(self._stop_kind, device=bad.device))
        self._since_check += 1
        if self._since_check >= (max(1, limit // 2) if self.device_skip else 1):
            self._since_check = 0
            kind = int(self._stop_kind)
            if kind >= 0:
                latest = "the training loss" if kind == 1 else "the meta loss or meta gradient"
                raise TrainingStopped(
                    f"{limit} non-finite losses in a row (latest: {latest}) by step {step}: "
                    f"lower --lr (or --meta-lr), use --mixed-precision bf16/no, or check the data; "
                    f"raise --max-nonfinite to tolerate more", 3)

    def _clear_grads(self) -> None:
        """Drop every gradient of the model and the predictor (what a failed graph capture leaves is garbage)."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.l2w is not None:
            self.l2w.meta_optimizer.zero_grad(set_to_none=True)

    def _clip_gradients(self) -> None:
        """``--clip-grad`` on the real step, as timm's dispatch_clip_grad does it (after unscaling fp16)."""
        args, acc = self.args, self.accelerator
        if args.clip_grad is None:
            return
        if args.clip_mode == "norm":
            acc.clip_grad_norm_(self.model.parameters(), args.clip_grad)
        elif args.clip_mode == "value":
            acc.clip_grad_value_(self.model.parameters(), args.clip_grad)
        else:
            from timm.utils import adaptive_clip_grad

            acc.unscale_gradients()  # timm's train.py leaves the classifiers out under agc, as L2W's virtual step does
            if self._agc_parameters is None:
                self._agc_parameters = agc_parameters(self.model)
            adaptive_clip_grad(self._agc_parameters, args.clip_grad)

    def _snapshot_buffers(self) -> List[Tensor]:
        """The model's buffers, one flat copy per dtype (a few kernels, not one per BN layer)."""
        if self._buffer_groups is None:
            groups: Dict[torch.dtype, List[Tensor]] = {}
            for b in self.accelerator.unwrap_model(self.model).buffers():
                groups.setdefault(b.dtype, []).append(b)
            self._buffer_groups = list(groups.values())
        return [torch.cat([b.detach().reshape(-1) for b in group]) for group in self._buffer_groups]

    def _restore_buffers(self, kept: List[Tensor]) -> None:
        with torch.no_grad():
            for group, flat in zip(self._buffer_groups, kept):
                offset = 0
                for b in group:
                    b.copy_(flat[offset: offset + b.numel()].view_as(b))
                    offset += b.numel()


def agc_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The parameters ``--clip-mode agc`` clips: every one but the exits' classifiers (timm's train.py leaves
    the classifier out of adaptive clipping)."""
    kept = classifier_free_parameters(model)
    return list(model.parameters()) if kept is None else kept
