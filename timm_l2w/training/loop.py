"""The loop of one ``timm-l2w train`` run: :func:`train`.

Every loader batch (global size ``--batch-size``, ``batch_size / world_size`` per rank) is split into
two halves and gives two updates (docs/method.md §5); ``--weighting uniform`` keeps the
same halves and schedule without the meta step, so the two runs differ only in the weighting.
``step`` counts loader batches, ``update`` counts optimizer steps (two per step).

Checkpoints go to ``OUTPUT/checkpoints/step_XXXXXXXX/``: ``model.safetensors`` and
``weight_predictor.safetensors`` (the files to share), ``state/`` (accelerate's ``save_state``:
optimizer, RNG, model), ``l2w_state.pt`` (meta optimizer, schedule), ``train_state.json`` and a
``COMPLETE`` marker. Each is written into a temporary folder and renamed into place, so a crash
never leaves a half-written checkpoint under a final name; ``--resume auto`` takes the newest
complete one.

The run's pieces are built by :class:`~timm_l2w.training.run.Run`; a signal or ``--stop-after-steps``
ends the loop with :class:`~timm_l2w.training.stops.TrainingStopped` after a checkpoint.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List

import torch
from torch import Tensor

from .checkpoints import CHECKPOINT_PREFIX, EMA_FILE, complete_checkpoints, discard, find_checkpoint
from .run import Run
from .stops import TrainingStopped, fault_point

__all__ = ["train"]


def train(args: argparse.Namespace) -> Dict[str, Any]:
    """Run the training ``args`` describe (from :func:`parse_args`); returns the log and results."""
    from tqdm.auto import tqdm

    run = Run(args)
    acc = run.accelerator
    _check_fresh_output(run.output, args)
    if acc.is_main_process:
        if args.overwrite and not args.resume:
            _clear_run(run.output)
        _check_writable(run.output)
    acc.wait_for_everyone()
    run.build()
    if acc.is_main_process:
        n = acc.num_processes
        kind = f", {acc.distributed_type.value}" if n > 1 else ""
        print(f"timm-l2w train: world size {n} ({n} process{'es' if n > 1 else ''}{kind}), device {acc.device}, "
              f"mixed precision {acc.mixed_precision}, "
              f"{torch.get_num_threads()} CPU thread(s) per process; {args.model} on {args.dataset}, batch "
              f"{args.batch_size} ({run.per_rank} per process), {run.total_steps} steps", flush=True)
        from ..data import describe_splits, held_out_too_small

        print(f"timm-l2w train: data: {describe_splits(run.splits)}", flush=True)
        small = held_out_too_small(len(run.splits.held_out), run.num_exits)
        if small:
            warnings.warn(small, UserWarning, stacklevel=2)
        if args.weighting == "l2w":
            from ..validation import negative_weights_note

            note = negative_weights_note(args.eps, args.constraint, run.num_exits, run.per_rank // 2)
            if note:
                warnings.warn(note, UserWarning, stacklevel=2)
    if args.resume:
        path = find_checkpoint(args.resume, args.output)
        run.load_checkpoint(path)
        if acc.is_main_process:
            print(f"timm-l2w train: resumed from step {run.step} ({path})", flush=True)
    results_name = f"{args.model}_{args.weighting}"
    finished = run.step >= run.total_steps  # resumed from the last checkpoint of a run that had ended
    if finished and (run.output / "model.safetensors").is_file() and (
            args.no_eval or (run.output / f"{results_name}.json").is_file()):
        if acc.is_main_process:
            print(f"timm-l2w train: the run in {run.output} is already complete (step {run.step} of "
                  f"{run.total_steps}): nothing to train, no file changed. Raise --max-steps/--epochs to train "
                  f"further, or use a fresh --output", flush=True)
        acc.wait_for_everyone()
        return {"history": run.summary.history, "step": run.step, "output": str(run.output), "complete": True,
                "model": acc.unwrap_model(run.model), "weight_net": run.l2w.weight_net if run.l2w is not None else None}
    if acc.is_main_process:
        run.checkpoints.remove_leftovers()
    if acc.is_main_process:
        run.output.mkdir(parents=True, exist_ok=True)
    if run.log_with:
        acc.init_trackers("timm_l2w", config={k: v for k, v in vars(args).items()
                                               if isinstance(v, (int, float, str, bool))})
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

    def _on_signal(signum, frame):  # noqa: ARG001
        run.stop_signal = signum

    for s in previous:  # a signal only sets a flag: the loop saves a checkpoint and stops cleanly
        signal.signal(s, _on_signal)
    show = acc.is_local_main_process and not args.no_progress and sys.stderr.isatty()  # no \r in log files
    device = acc.device
    stop = pause = False
    try:
        run.model.train()  # model(x) returns every exit only in train mode (eval mode: the last exit)
        start_epoch = run.step // run.steps_per_epoch
        for epoch in range(start_epoch, run.num_epochs):
            if finished:  # only the final model or results were missing: write them, train nothing
                break
            done = run.step - epoch * run.steps_per_epoch
            steps_here = min(run.steps_per_epoch, run.total_steps - epoch * run.steps_per_epoch)
            loader = run.train_loader
            if done:  # resumed inside an epoch (timm_l2w.accel.device_data's loader skips on its own)
                skip = getattr(loader, "skip_first_batches", None)
                loader = skip(done) if skip is not None else acc.skip_first_batches(loader, done)
            # the data order depends only on (seed, epoch); accelerate's loaders re-apply their own
            # epoch counter to the sampler when iterated, so set it on the loader being iterated
            loader.set_epoch(epoch)
            bar = tqdm(total=steps_here, initial=done, desc=f"epoch {epoch + 1}/{run.num_epochs}",
                       disable=not show, leave=False, dynamic_ncols=True)
            stats = run.summary.new_sums(device)
            t0 = shown_at = time.perf_counter()
            for x, y in loader:
                if run.mixup is not None:  # the whole loader batch, before it is split (soft targets on both halves)
                    x, y = run.mixup(x, y)
                if run.updater.graphs is not None:  # --cuda-graphs: the batch in the static buffers the graphs read
                    x, y = run.updater.graphs.stage(x, y)
                halves = run.l2w.split(x, y) if run.l2w is not None else _halves(x, y)
                for xt, yt in halves:
                    loss = run.update(xt, yt, stats)
                    run.scheduler.step_update(num_updates=run.updater.updates_done)
                run.step += 1
                if show and time.perf_counter() - shown_at > 1.0:  # reading the loss waits for the device: 1/s
                    shown_at = time.perf_counter()
                    post = {"loss": f"{float(loss):.3f}", "lr": f"{run.optimizer.param_groups[0]['lr']:.3g}"}
                    if run.l2w is not None and run.l2w.last_meta_loss is not None:
                        post["meta"] = f"{run.l2w.last_meta_loss:.3f}"
                    bar.set_postfix(post)
                bar.update(1)
                stop = _any_rank(acc, run.stop_signal is not None)
                pause = bool(args.stop_after_steps) and run.step == args.stop_after_steps < run.total_steps
                mid_epoch_ckpt = bool(args.checkpoint_every) and run.step % args.checkpoint_every == 0
                boundary = run.step % run.steps_per_epoch == 0 or run.step >= run.total_steps
                window_ends = (2 * run.step) % args.grad_accum_steps == 0  # a signal waits for the window's update
                # at a boundary the epoch ends first
                if (stop and window_ends or pause or mid_epoch_ckpt) and not boundary:
                    run.summary.add_time(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    run.summary.flush(stats, device)
                    stats = run.summary.new_sums(device)
                    _maybe_stop(run, run.save_checkpoint(), stop, pause)
                if run.step >= run.total_steps:
                    break
            bar.close()
            run.summary.add_time(time.perf_counter() - t0)
            run.summary.flush(stats, device)
            row = run.end_epoch(epoch)
            fault_point("epoch_end", run.step)
            path = run.save_checkpoint()
            if acc.is_main_process:  # the per-epoch summary stays with --no-progress
                meta = f" meta {row['meta_loss']:.4f}" if row["meta_loss"] is not None else ""
                print(f"epoch {row['epoch']}: loss {row['loss']:.4f} (sum over the {run.num_exits} exits){meta} "
                      f"last-exit acc "
                      f"{row[f'acc_{run.num_exits}']:.1f}% lr {row['lr']:.4g} ({row['time_s']:.1f}s)", flush=True)
            _maybe_stop(run, path, stop, pause)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    result: Dict[str, Any] = {"history": run.summary.history, "step": run.step, "output": str(run.output)}
    model = acc.unwrap_model(run.model)
    if acc.is_main_process:
        run.checkpoints.write_weights(run.output, run.checkpoints.metadata())  # atomic
        if not args.no_eval:
            from ..evaluation import evaluate_checkpoint

            if run.ema is not None:
                print(f"timm-l2w train: evaluating the EMA weights ({EMA_FILE})", flush=True)
            evaluated = run.ema.module if run.ema is not None else model
            result["eval"] = evaluate_checkpoint(evaluated, run.held_loader, run.test_loader, out_dir=run.output,
                                                 name=results_name, device=device,
                                                 input_size=run.splits.input_size)
    result["model"] = model
    result["model_ema"] = run.ema.module if run.ema is not None else None
    result["weight_net"] = run.l2w.weight_net if run.l2w is not None else None
    acc.wait_for_everyone()
    for tracker in acc.trackers:  # not end_training(): that also tears down the process group
        tracker.finish()
    return result


def _check_writable(folder: Path) -> None:
    """Fail before training (not after the first epoch) when ``folder`` cannot be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"--output {folder} is not writable ({err.strerror or err}): pass a folder you can "
                         f"write to, or fix its permissions") from err


def _run_files(output: Path) -> List[Path]:
    """What a run leaves in its --output that a later run would mix with its own (resume, logs, weights)."""
    names = ["checkpoints", "log.json", "log.csv", "model.safetensors", "weight_predictor.safetensors", EMA_FILE]
    return [output / n for n in names if (output / n).exists()]


def _check_fresh_output(output: Path, args: argparse.Namespace) -> None:
    """Refuse a fresh run (no --resume) into an --output that holds another run's checkpoints, unless
    --overwrite: a later --resume auto would otherwise continue the old run."""
    if args.resume or args.overwrite:
        return
    root = output / "checkpoints"
    found = complete_checkpoints(root)
    if found:
        raise ValueError(
            f"--output {output} holds another run "
            f"(checkpoints up to step {int(found[-1].name[len(CHECKPOINT_PREFIX):])}): "
            f"continue it with --resume auto, start over with --overwrite (deletes its checkpoints, logs and "
            f"weights), or pass a fresh --output")


def _clear_run(output: Path) -> None:
    """--overwrite: delete the previous run's files (:func:`_run_files`), checkpoints first."""
    for path in _run_files(output):
        if path.is_dir():
            discard(path)
        else:
            path.unlink()


def _maybe_stop(run: Run, path: Path, stop: bool, pause: bool) -> None:
    """After a checkpoint: raise :class:`TrainingStopped` for a signal or ``--stop-after-steps``."""
    if stop:
        signum = run.stop_signal or signal.SIGTERM
        raise TrainingStopped(f"stopped by {signal.Signals(signum).name} at step {run.step}; checkpoint saved to "
                              f"{path}: continue with --resume auto", 128 + int(signum))
    if pause:
        raise TrainingStopped(f"paused after step {run.step} (--stop-after-steps); checkpoint saved to {path}: "
                              f"continue with --resume auto", 0)


def _halves(x: Tensor, y: Tensor):
    half = x.shape[0] // 2
    return ((x[:half], y[:half]), (x[half:], y[half:]))


def _any_rank(acc: Any, flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any (one collective)."""
    if acc.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=acc.device)
    return bool(acc.reduce(t, reduction="sum").item() > 0)

