"""A run's checkpoints: the folder layout, writing one atomically, finding and restoring one.

``OUTPUT/checkpoints/step_XXXXXXXX/`` holds ``model.safetensors`` and ``weight_predictor.safetensors``
(the files to share), ``state/`` (accelerate's ``save_state``: optimizer, RNG, model), ``l2w_state.pt``
(meta optimizer, schedule), ``train_state.json`` (the run's counters and history), ``checksums.json``
and, written last, a ``COMPLETE`` marker. Each checkpoint is written into a ``.tmp-`` folder and renamed
into place, and deleted by a rename to ``.old-`` first, so a crash never leaves a half-written or
half-deleted checkpoint under a final name.

:class:`Checkpoints` is given, once, every piece a checkpoint holds (the prepared model and optimizer,
L2W, the EMA, the data's metadata) rather than being a mixin of the run: what a checkpoint contains is
then read in one constructor call, and the counters stay with their owners. The run hands
:meth:`Checkpoints.save` its counters and applies what :meth:`Checkpoints.load` returns.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor, nn

from ..files import preprocess_record, write_json_atomic
from .stops import fault_point

CHECKPOINT_PREFIX = "step_"
EMA_FILE = "model_ema.safetensors"  # --model-ema: the averaged weights, beside model.safetensors
COMPLETE_MARKER = "COMPLETE"
# the flags a resume must share with the run it continues (another batch re-maps the epochs)
RESUME_SETTINGS = ("model", "weighting", "input_type", "hidden", "distill", "distill_temperature", "distill_alpha",
                   "gradient_equilibrium", "batch_size")


def _is_complete(path: Path) -> bool:
    return path.is_dir() and (path / COMPLETE_MARKER).is_file()


def complete_checkpoints(root: Path) -> List[Path]:
    """The complete checkpoint folders in ``root``, oldest first (none when ``root`` is no folder)."""
    return sorted(p for p in root.glob(f"{CHECKPOINT_PREFIX}*") if _is_complete(p)) if root.is_dir() else []


def find_checkpoint(resume: str, output: str | os.PathLike) -> Path:
    """The checkpoint folder ``--resume`` names: the newest complete one for ``auto``, else the path given."""
    if resume == "auto":
        root = Path(output) / "checkpoints"
        found = complete_checkpoints(root)
        if not found:
            raise FileNotFoundError(
                f"--resume auto found no complete checkpoint in {root}: train without --resume first, "
                f"or pass --resume PATH to a checkpoint folder (one holding a {COMPLETE_MARKER} file)"
            )
        return found[-1]
    path = Path(resume)
    if _is_complete(path):
        return path
    if path.is_dir():  # a checkpoints/ folder or an output folder: take its newest checkpoint
        for root in (path, path / "checkpoints"):
            found = complete_checkpoints(root)
            if found:
                return found[-1]
    raise FileNotFoundError(
        f"--resume {resume}: no complete checkpoint there (a checkpoint folder holds a {COMPLETE_MARKER} "
        f"file; half-written ones are ignored): pass a folder from {Path(output) / 'checkpoints'} or 'auto'"
    )


def discard(path: Path) -> None:
    """Delete a checkpoint folder so that a crash half-way never leaves it looking complete: rename it
    to a hidden name first (``--resume auto`` ignores those), then remove it."""
    trash = path.with_name(f".old-{path.name}-{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _is_device_error(err: BaseException) -> bool:
    """torch's errors for a storage that cannot be restored on this device (not a damaged file)."""
    text = str(err)
    return isinstance(err, RuntimeError) and any(
        words in text
        for words in ("restore data location", "deserialize object on", "torch.cuda.is_available() is False"))


def _older_checkpoint(path: Path) -> Optional[Path]:
    """The newest complete checkpoint beside ``path`` that is older than it.

    Offered when ``path`` cannot be resumed.
    """
    older = [p for p in complete_checkpoints(path.parent) if p.name < path.name]
    return older[-1] if older else None


def _save_tensors(tensors: Dict[str, Tensor], path: Path, metadata: Dict[str, str]) -> None:
    from ..checkpoint import save_safetensors

    save_safetensors({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, path, metadata=metadata)


def _load_ema(path: Path, module: nn.Module) -> Dict[str, Tensor]:
    """The EMA weights of checkpoint ``path`` (a clear error when a --model-ema run's file is missing)."""
    from ..errors import ResumeError
    from ..files import load_state_dict
    from ..state_checks import check_state_dict

    file = path / EMA_FILE
    if not file.is_file():
        raise ResumeError(path, f"it has no {EMA_FILE} (it was written without --model-ema)",
                          fix="resume it without --model-ema, or start a fresh --output")
    state = load_state_dict(file)
    check_state_dict(module, state)
    return state


def _kwargs_meta(args: argparse.Namespace, model: Optional[nn.Module] = None) -> Dict[str, str]:
    """``--model-kwargs`` for a checkpoint's metadata (``timm-l2w eval`` rebuilds the model from it); a wrapped
    timm backbone records its own (``model=multi_exit_l2w``, backbone, exit points, head, timm arguments)."""
    rebuild = getattr(model, "checkpoint_metadata", None)
    if callable(rebuild) and "model_kwargs" in rebuild():
        return rebuild()
    return {"model_kwargs": json.dumps(args.model_kwargs)} if args.model_kwargs else {}


def _data_meta(args: argparse.Namespace) -> Dict[str, str]:
    """What ``timm-l2w eval`` needs to evaluate a checkpoint on the data it was trained on."""
    meta = {"dataset": str(args.dataset), "input_size": str(args.input_size)}
    if args.data_dir:
        meta["data_dir"] = str(args.data_dir)
    if args.held_out is not None:
        meta["held_out"] = str(args.held_out)
    return meta


def _class_names_meta(splits: Any) -> Dict[str, str]:
    """The data set's class names (a JSON list) for a checkpoint's metadata (exit policies and exports read them)."""
    names = getattr(splits, "class_names", None)
    return {"class_names": json.dumps(list(names))} if names else {}


def _preprocess_meta(splits: Any) -> Dict[str, str]:
    """How the run's held-out / test loaders prepared ImageFolder images (timm's data config: ``crop_pct``,
    ``interpolation``, ``mean``, ``std``), so ``timm-l2w eval`` of its weights prepares them alike rather than by
    the model's own config; the built-in sets have fixed preprocessing and record none."""
    cfg = getattr(splits, "eval_config", None)
    return preprocess_record(cfg) if cfg else {}


class Checkpoints:
    """Writes and restores the checkpoints of one run in ``root`` (``OUTPUT/checkpoints``).

    ``model`` and ``optimizer`` are the accelerate-prepared ones; ``l2w`` and ``ema`` are ``None`` when the
    run has no meta step (``--weighting uniform``) or no ``--model-ema``; ``splits`` gives the class count
    and names recorded in the weights' metadata.
    """

    def __init__(self, root: Path, accelerator: Any, args: argparse.Namespace, model: nn.Module,
                 optimizer: torch.optim.Optimizer, l2w: Any, ema: Any, splits: Any, num_exits: int):
        self.root, self.accelerator, self.args = root, accelerator, args
        self.model, self.optimizer, self.l2w, self.ema = model, optimizer, l2w, ema
        self.splits, self.num_exits = splits, num_exits

    def metadata(self, **extra: str) -> Dict[str, str]:
        """``model.safetensors``' metadata: what ``timm-l2w eval`` rebuilds the model and its data from
        (``extra``, e.g. the step, after the sizes)."""
        args = self.args
        return {"model": args.model, **_kwargs_meta(args, self.accelerator.unwrap_model(self.model)),
                "num_classes": str(self.splits.num_classes), "num_exits": str(self.num_exits), **extra,
                **_class_names_meta(self.splits), **_data_meta(args), **_preprocess_meta(self.splits)}

    def write_weights(self, folder: Path, meta: Dict[str, str]) -> None:
        """The files to share, each written atomically: ``model.safetensors`` (with ``meta``),
        ``weight_predictor.safetensors`` (L2W) and the EMA weights (``--model-ema``)."""
        _save_tensors(self.accelerator.unwrap_model(self.model).state_dict(), folder / "model.safetensors", meta)
        if self.l2w is not None:
            wmeta = {"num_exits": str(self.num_exits), "input_type": self.args.input_type,
                     "hidden": str(self.args.hidden)}
            _save_tensors(self.l2w.weight_net.state_dict(), folder / "weight_predictor.safetensors", wmeta)
        if self.ema is not None:
            _save_tensors(self.ema.module.state_dict(), folder / EMA_FILE, meta)

    def save(self, step: int, counters: Dict[str, Any]) -> Path:
        """Write ``checkpoints/step_N`` atomically (temporary folder, marker, rename); prune old ones.
        ``counters`` (the run's history and counts) go into ``train_state.json`` beside the step and flags."""
        acc = self.accelerator
        name = f"{CHECKPOINT_PREFIX}{step:08d}"
        final, tmp = self.root / name, self.root / f".tmp-{name}"
        if acc.is_main_process:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp / "state"))
        if acc.is_main_process:
            self.write_weights(tmp, self.metadata(step=str(step), format="timm_l2w"))
            if self.l2w is not None:
                torch.save(self.l2w.state_dict(), tmp / "l2w_state.pt")
            write_json_atomic(tmp / "train_state.json", {"step": step, **counters, "args": vars(self.args)})
            from ..state_checks import write_checksums

            write_checksums(tmp, acc.process_index)  # a resume detects damaged files (flipped bits too)
            fault_point("checkpoint", step)  # tests: killed half-way, the .tmp- folder is ignored
            (tmp / COMPLETE_MARKER).write_text(f"{step}\n")
            if final.exists():  # same step saved before (e.g. stop right after a checkpoint)
                discard(final)
            os.replace(tmp, final)
            for old in complete_checkpoints(self.root)[: -self.args.keep_checkpoints]:
                discard(old)
        acc.wait_for_everyone()
        return final

    def load(self, path: Path) -> Dict[str, Any]:
        """Restore checkpoint ``path`` into the model, optimizer, RNG, L2W and EMA; returns its
        ``train_state.json`` (step, history, counters) for the run to apply.

        Every file it reads is checked first (readable, fits this model and optimizer, floating and finite
        weights, checksums: :func:`timm_l2w.state_checks.check_resume_checkpoint`); any failure is a
        :class:`~timm_l2w.errors.ResumeError` naming the next older complete checkpoint. Nothing here
        unpickles code: accelerate 1.15's ``load_state`` reads optimizer, scheduler and RNG files with
        ``torch.load(weights_only=True)`` (plus a numpy-array allowlist) and the model from safetensors;
        ``l2w_state.pt`` is read with ``weights_only=True``."""
        from ..errors import ResumeError
        from ..state_checks import check_resume_checkpoint

        acc = self.accelerator
        try:
            same = {k: getattr(self.args, k) for k in RESUME_SETTINGS}
            state = check_resume_checkpoint(path, acc.unwrap_model(self.model), self.optimizer, self.l2w,
                                            acc.process_index, settings=same)
        except Exception as err:  # noqa: BLE001 - whatever is wrong with a file, the answer is the same
            raise ResumeError.from_exception(path, err, _older_checkpoint(path)) from err
        try:
            acc.load_state(str(path / "state"))
            if self.l2w is not None:
                # "cpu", not acc.device: a 2-process CPU run's device is cpu:0, which torch.load cannot map
                # to; load_state_dict then copies into the predictor and optimizer on their device
                self.l2w.load_state_dict(torch.load(path / "l2w_state.pt", map_location="cpu",
                                                    weights_only=True))
        except Exception as err:  # noqa: BLE001
            if _is_device_error(err):  # the files passed every check above: they are not damaged
                raise ValueError(
                    f"checkpoint {path} is intact but its tensors cannot be placed on this process's device "
                    f"{acc.device} ({type(err).__name__}: {str(err).strip().splitlines()[0][:200]}): resume it with "
                    f"the device settings it was saved with (the same --cpu / accelerate launch flags, a machine "
                    f"with that GPU); keep the checkpoint, it is fine") from err
            raise ResumeError.from_exception(path, err, _older_checkpoint(path)) from err
        if self.ema is not None:
            self.ema.module.load_state_dict(_load_ema(path, self.ema.module))
        return state

    def remove_leftovers(self) -> None:
        """Delete what a run killed while saving or deleting a checkpoint left (``.tmp-*``, ``.old-*``)."""
        if self.root.is_dir():
            for leftover in list(self.root.glob(".tmp-*")) + list(self.root.glob(".old-*")):
                shutil.rmtree(leftover, ignore_errors=True)
