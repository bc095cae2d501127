"""The epoch summary of ``timm-l2w train``: running sums over an epoch, one row per epoch (``log.json``,
``log.csv``, the accelerate trackers) and the history of those rows.

Two kinds of sums: each process adds every update into device tensors (:meth:`EpochSummary.new_sums`,
no host reads on the hot path); :meth:`EpochSummary.flush` sums them over the processes into
``epoch_stats`` (host numbers, saved in checkpoints, so an epoch interrupted and resumed reports the
same row). :class:`EpochSummary` is an object of its own, not a mixin of the run, because this is all
it touches: the history and ``epoch_stats`` are its attributes, and what the row needs from the run
(step, updates, learning rate) comes in as arguments.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import torch

from ..files import csv_text, write_json_atomic, write_text_atomic


class EpochSummary:
    """The running sums of the current epoch (``epoch_stats``) and the rows of the finished ones (``history``)."""

    def __init__(self, num_exits: int, accelerator: Any, output: Path):
        self.num_exits, self.accelerator, self.output = num_exits, accelerator, output
        self.history: List[Dict[str, Any]] = []
        self.epoch_stats = self._zero()

    def _zero(self) -> Dict[str, Any]:
        k = self.num_exits
        return {"loss_sum": [0.0] * k, "correct": [0] * k, "seen": 0, "meta_sum": 0.0, "meta_count": 0,
                "skipped": 0, "meta_skipped": 0, "time": 0.0}

    def new_sums(self, device: torch.device) -> Dict[str, Any]:
        """Fresh per-process running sums, which each update adds into (device tensors once added to)."""
        k = self.num_exits
        return {"loss_sum": torch.zeros(k, dtype=torch.float64, device=device),
                "correct": torch.zeros(k, dtype=torch.float64, device=device),
                "seen": 0, "meta_sum": 0.0, "meta_count": 0, "skipped": 0, "meta_skipped": 0}

    def flush(self, sums: Dict[str, Any], device: torch.device) -> None:
        """Add this process's running ``sums`` into ``epoch_stats`` (all ranks summed)."""
        acc = self.accelerator
        k = self.num_exits
        local = torch.cat([sums["loss_sum"].to(device), sums["correct"].to(device),
                           torch.tensor([float(sums["seen"]), sums["meta_sum"], float(sums["meta_count"]),
                                         float(sums["skipped"]), float(sums["meta_skipped"])],
                                        dtype=torch.float64, device=device)])
        total = acc.reduce(local, reduction="sum").cpu()
        es = self.epoch_stats
        es["loss_sum"] = [a + float(b) for a, b in zip(es["loss_sum"], total[:k])]
        es["correct"] = [a + int(b) for a, b in zip(es["correct"], total[k:2 * k])]
        es["seen"] += int(total[2 * k])
        es["meta_sum"] += float(total[2 * k + 1])
        es["meta_count"] += int(total[2 * k + 2])
        # every rank skips the same updates (decided together): count each once
        es["skipped"] = es["skipped"] + int(total[2 * k + 3]) // acc.num_processes
        es["meta_skipped"] = es.get("meta_skipped", 0) + int(total[2 * k + 4]) // acc.num_processes

    def add_time(self, seconds: float) -> None:
        """Training time of the current epoch (wall clock between the loader's batches and the flushes)."""
        self.epoch_stats["time"] += seconds

    def end_epoch(self, epoch: int, step: int, updates: int, lr: float) -> Dict[str, Any]:
        """Close epoch ``epoch`` (0-based) after loader batch ``step`` and ``updates`` optimizer updates:
        its row goes into the history, ``log.json`` / ``log.csv`` and the trackers; returns the row."""
        es = self.epoch_stats
        seen = max(es["seen"], 1)
        row: Dict[str, Any] = {"epoch": epoch + 1, "step": step, "updates": updates, "lr": lr,
                               "loss": sum(es["loss_sum"]) / seen,
                               "meta_loss": es["meta_sum"] / es["meta_count"] if es["meta_count"] else None,
                               "skipped_updates": es["skipped"], "skipped_meta_updates": es.get("meta_skipped", 0),
                               "time_s": round(es["time"], 3)}
        for k in range(self.num_exits):
            row[f"loss_{k + 1}"] = es["loss_sum"][k] / seen
            row[f"acc_{k + 1}"] = 100.0 * es["correct"][k] / seen
        self.history.append(row)
        self.epoch_stats = self._zero()
        if self.accelerator.is_main_process:
            self.output.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.output / "log.json", self.history)
            write_text_atomic(self.output / "log.csv", csv_text(self.history))
        self.accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=step)
        return row

    def state(self) -> Dict[str, Any]:
        """What a checkpoint keeps (``train_state.json``): the current epoch's sums and the history."""
        return {"epoch_stats": self.epoch_stats, "history": self.history}

    def restore(self, state: Dict[str, Any]) -> None:
        """Continue from a checkpoint's :meth:`state`."""
        self.history = list(state["history"])
        self.epoch_stats = state["epoch_stats"]
