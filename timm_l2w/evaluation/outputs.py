"""The exit outputs of a data set, collected once: what every evaluation is computed from.

:func:`collect_exit_outputs` runs a multi-exit model over a loader (eval mode, inference mode) and
keeps, per sample and exit, the max softmax, the prediction, top-5 hits, the loss and the entropy
(:class:`ExitOutputs`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..exits import RULES, ExitRule, exit_confidence, exit_rule, predictive_entropy
from ..models.base import check_multi_exit_output, unwrap_model
from ..validation import check_labels

__all__ = ["ExitOutputs", "collect_exit_outputs", "batch_xy"]

_FIELDS = ("confidences", "predictions", "entropies")  # the exit rules' signals every ExitOutputs has a field for


@dataclass
class ExitOutputs:
    """Everything evaluation needs from one pass over a data set, per sample ``i`` and exit ``k``.

    ``confidences`` [N, K] float (max softmax), ``predictions`` [N, K] long, ``top5`` [N, K] bool
    (target among the 5 highest logits), ``losses`` [N, K] float (cross-entropy), ``targets`` [N] long;
    ``input_size`` (C, H, W) of the images when known (set by :func:`collect_exit_outputs`);
    ``entropies`` [N, K] float (predictive entropy, for the ``'entropy'`` exit rule) when known;
    ``signals``: the ``[N, K]`` table of every registered exit rule whose
    :attr:`~timm_l2w.exits.ExitRule.signal` is none of these fields, by signal name (filled by
    :meth:`from_logits` with :meth:`~timm_l2w.exits.ExitRule.score`; ``None`` when there is none).
    """

    confidences: Tensor
    predictions: Tensor
    top5: Tensor
    losses: Tensor
    targets: Tensor
    input_size: Optional[Tuple[int, ...]] = None
    entropies: Optional[Tensor] = None
    signals: Optional[Dict[str, Tensor]] = None

    def __post_init__(self) -> None:
        if self.input_size is not None:
            self.input_size = tuple(int(v) for v in self.input_size)
        if not isinstance(self.confidences, Tensor) or self.confidences.ndim != 2:
            raise ValueError("ExitOutputs.confidences must be a [num_samples, num_exits] tensor")
        n, k = self.confidences.shape
        if n == 0:
            raise ValueError("ExitOutputs is empty: the loader gave no samples, check the data set")
        for name in ("predictions", "top5", "losses", "entropies"):
            if getattr(self, name) is not None and tuple(getattr(self, name).shape) != (n, k):
                raise ValueError(f"ExitOutputs.{name} has shape {tuple(getattr(self, name).shape)}, expected {(n, k)}")
        for name, table in (self.signals or {}).items():
            if tuple(table.shape) != (n, k):
                raise ValueError(f"ExitOutputs.signals[{name!r}] has shape {tuple(table.shape)}, expected {(n, k)}")
        if tuple(self.targets.shape) != (n,):
            raise ValueError(f"ExitOutputs.targets has shape {tuple(self.targets.shape)}, expected {(n,)}")
        self.targets = check_labels(self.targets, batch=n, name="ExitOutputs.targets")

    @property
    def num_samples(self) -> int:
        return self.confidences.shape[0]

    @property
    def num_exits(self) -> int:
        return self.confidences.shape[1]

    @property
    def correct(self) -> Tensor:
        """[N, K] bool: top-1 prediction of exit k is right for sample i."""
        return self.predictions == self.targets[:, None]

    def signal(self, rule: str | ExitRule, name: str = "given") -> Tensor:
        """The ``[N, K]`` table the exit rule reads (:attr:`timm_l2w.exits.ExitRule.signal`); ``name``
        says which outputs they are in the error when these outputs do not carry it."""
        rule = exit_rule(rule)
        value = getattr(self, rule.signal) if rule.signal in _FIELDS else (self.signals or {}).get(rule.signal)
        if value is None:
            raise ValueError(f"the {name} outputs carry no {rule.signal} (ExitOutputs built without them): "
                             f"collect them with collect_exit_outputs or ExitOutputs.from_logits for the "
                             f"{rule.name!r} exit rule")
        return value

    @classmethod
    def from_logits(cls, logits: Sequence[Tensor], targets: Tensor) -> "ExitOutputs":
        """Build from all K exit logits ``[B, C]`` (``model.forward_exits(x)``) and ``[B]`` integer targets."""
        logits = check_multi_exit_output(logits)
        batch, num_classes = logits[0].shape[0], logits[0].shape[-1]
        targets = check_labels(targets, num_classes, batch, "targets").to(logits[0].device)
        conf, pred, top5, loss, ent = [], [], [], [], []
        extra = {rule.signal: (rule, []) for rule in RULES.values() if rule.signal not in _FIELDS}
        for out in logits:
            out = out.detach().float()
            c, p = exit_confidence(out)
            conf.append(c)
            pred.append(p)
            top = out.topk(min(5, out.shape[1]), dim=1).indices
            top5.append((top == targets[:, None]).any(dim=1))
            loss.append(F.cross_entropy(out, targets, reduction="none"))
            ent.append(predictive_entropy(out))
            for rule, values in extra.values():
                values.append(rule.score(out))
        conf, pred, top5, loss, ent = (torch.stack(v, dim=1).cpu() for v in (conf, pred, top5, loss, ent))
        signals = {name: torch.stack(values, dim=1).cpu() for name, (_, values) in extra.items()}
        return cls(conf, pred, top5, loss, targets.cpu(), entropies=ent, signals=signals or None)

    def subset(self, rows: Tensor) -> "ExitOutputs":
        """The outputs of the samples ``rows`` (indices ``[M]`` or a ``[N]`` bool mask), in that order."""
        rows = torch.as_tensor(rows)
        tables = {f: getattr(self, f) for f in ("confidences", "predictions", "top5", "losses", "targets", "entropies")}
        return type(self)(**{f: None if t is None else t[rows] for f, t in tables.items()}, input_size=self.input_size,
                          signals={n: t[rows] for n, t in self.signals.items()} if self.signals else None)

    @classmethod
    def cat(cls, parts: Sequence["ExitOutputs"]) -> "ExitOutputs":
        """Concatenate along the samples."""
        if not parts:
            raise ValueError("no ExitOutputs to concatenate: the loader gave no batches")
        fields = ("confidences", "predictions", "top5", "losses", "targets")
        sizes = {p.input_size for p in parts}
        with_entropy = all(p.entropies is not None for p in parts)
        names = set.intersection(*(set(p.signals or {}) for p in parts))
        return cls(*(torch.cat([getattr(p, f) for p in parts]) for f in fields),
                   input_size=sizes.pop() if len(sizes) == 1 else None,
                   entropies=torch.cat([p.entropies for p in parts]) if with_entropy else None,
                   signals={n: torch.cat([p.signals[n] for p in parts]) for n in sorted(names)} or None)


def batch_xy(batch: Any) -> Tuple[Tensor, Tensor]:
    """``(images, targets)`` of one loader batch (a pair, or a mapping with image / label keys)."""
    if isinstance(batch, Mapping):
        batch = (batch.get("image", batch.get("pixel_values")), batch.get("label", batch.get("target")))
    if not isinstance(batch, (list, tuple)) or len(batch) < 2:
        raise TypeError("the loader must yield (images, targets) pairs")
    return batch[0], batch[1]


def collect_exit_outputs(
    model: nn.Module, loader: Iterable, device: Optional[torch.device | str] = None, progress: bool = False
) -> ExitOutputs:
    """Run ``model`` (eval mode, inference mode) over ``loader`` once and keep every exit's outputs.

    The exits come from ``forward_exits`` of the unwrapped model (``model(x)`` in eval mode gives only
    the last exit); the model's train/eval mode is restored afterwards.
    """
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    net = unwrap_model(model)
    num_exits = getattr(net, "num_exits", None)
    forward_exits = getattr(net, "forward_exits", model)
    parts = []
    if progress:
        from tqdm.auto import tqdm

        loader = tqdm(loader, desc="evaluating", unit="batch", leave=False)
    try:
        with torch.inference_mode():
            for batch in loader:
                x, y = batch_xy(batch)
                outputs = check_multi_exit_output(forward_exits(x.to(device)), num_exits)
                part = ExitOutputs.from_logits(outputs, y.to(device))
                part.input_size = tuple(x.shape[1:])
                parts.append(part)
    finally:
        model.train(was_training)
    return ExitOutputs.cat(parts)
