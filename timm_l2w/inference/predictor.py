"""Real early-exit inference: run a multi-exit model stage by stage and stop computing for the
samples that already left.

A sample leaves at the first exit k whose confidence (max softmax) reaches ``thresholds[k]``; the
last exit takes the rest. This is exactly :func:`timm_l2w.exits.exit_by_threshold` applied to the
confidences of every exit (``model.forward_exits``), but the later stages of a sample that left are
never computed: after every stage the state is cut down to the remaining samples with
:func:`timm_l2w.models.base.select_samples`. Every exit rule works the same way through its
:meth:`~timm_l2w.exits.ExitRule.leave` (:mod:`timm_l2w.exits.rules`): ``rule='entropy'`` leaves
when the predictive entropy is at most ``thresholds[k]``, ``rule='patience'`` when the prediction has
been the same at ``patience`` consecutive exits (the rule's memory of the earlier exits travels with
the state).

A predictor saves as an exit policy file (:meth:`EarlyExitPredictor.save`, JSON: the rule, its
thresholds or patience, the FLOPs per exit, the budget, the latency table it was chosen with, class names,
preprocessing and the digest of the weights it was calibrated on; format in
:mod:`timm_l2w_runtime.policy`) that :meth:`EarlyExitPredictor.load` and the ONNX runtime of
``timm-l2w export`` packages read back (docs/deploy.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..evaluation.metrics import budgeted_evaluation, check_flops
from ..evaluation.outputs import ExitOutputs
from ..evaluation.risk import risk_controlled_choice
from ..exits import ExitRule, check_distribution, exit_confidence, exit_distribution, exit_rule
from ..models.base import select_samples, unwrap_model
from ..validation import Range, check_number

__all__ = ["EarlyExitPrediction", "EarlyExitPredictor"]


@dataclass
class EarlyExitPrediction:
    """Per sample, in input order: predicted class, its confidence, and the 0-based exit it left at."""

    predictions: Tensor  # [N] long
    confidences: Tensor  # [N] float
    exit_index: Tensor  # [N] long

    def exit_fractions(self, num_exits: int) -> Tensor:
        """Share of the samples leaving at each exit, ``[K]`` float64."""
        return torch.bincount(self.exit_index.cpu(), minlength=num_exits).double() / max(len(self.exit_index), 1)


class EarlyExitPredictor:
    """Early-exit inference for any model meeting the multi-exit contract (``forward_stage``).

    The model is put in eval mode. ``thresholds`` holds one confidence threshold per exit
    (``+inf``: nobody leaves there; the last entry is ignored, the last exit takes every sample left).
    ``rule='entropy'``: ``thresholds`` are entropy thresholds (leave when ``H <= T_k``; ``-inf``: nobody
    leaves). ``rule='patience'``: no thresholds; leave once ``patience`` consecutive exits agree.
    """

    def __init__(self, model: nn.Module, thresholds: Tensor | Sequence[float] | None = None,
                 rule: str | ExitRule = "confidence", patience: Optional[int] = None):
        self.model = unwrap_model(model)
        if not hasattr(self.model, "forward_stage") or not hasattr(self.model, "num_exits"):
            raise TypeError(
                f"{type(self.model).__name__} does not follow the multi-exit contract "
                "(needs num_exits and forward_stage): use a timm_l2w model"
            )
        self.num_exits = int(self.model.num_exits)
        self.exit_rule = exit_rule(rule)
        self.rule = self.exit_rule.name
        # what a saved policy records besides the rule (set by the constructors below or by the caller)
        self.budget: Dict[str, Any] = {}  # what it was calibrated for: {"q": q}, {"flops": F}, {"distribution": p}
        self.calibration_fractions: Optional[List[float]] = None  # share of calibration samples per exit
        self.flops: Optional[List[float]] = None  # cumulative FLOPs per exit at flops_input_size
        self.flops_input_size: Optional[Tuple[int, ...]] = None
        self.class_names: Optional[List[str]] = None
        self.preprocess: Optional[Dict[str, Any]] = None  # see timm_l2w_runtime.policy.check_preprocess
        # the weights it was calibrated on (timm_l2w.files.weights_digest); None: the model's, when saved
        self.weights_sha256: Optional[str] = None
        self.latency: Optional[Dict[str, Any]] = None  # the latency table, see timm_l2w_runtime.latency
        self.thresholds: Optional[Tensor]  # [K] float64, for the rules with thresholds
        self.patience: Optional[int]  # for the patience rule
        self.thresholds, self.patience = self.exit_rule.check_params(thresholds, patience, self.num_exits)
        self.model.eval()

    @classmethod
    def from_distribution(
        cls, model: nn.Module, calibration: ExitOutputs, distribution: Tensor | Sequence[float] | float,
        rule: str | ExitRule = "confidence",
    ) -> "EarlyExitPredictor":
        """Thresholds calibrated on ``calibration`` (held-out outputs) for an exit distribution.

        ``distribution`` is a per-exit share ``[K]`` or a float q (``p_k ∝ q**k``, the paper's family).
        ``rule``: ``'confidence'`` or ``'entropy'`` (``'patience'`` has no thresholds: pass ``patience=``).
        """
        rule = exit_rule(rule)
        if not rule.calibrated:
            raise ValueError(f"the {rule.name!r} rule has no thresholds to calibrate: use EarlyExitPredictor(model, "
                             f"rule={rule.name!r}, patience=p) or from_flops_budget(..., rule={rule.name!r})")
        num_exits = calibration.num_exits
        if isinstance(distribution, (int, float)):
            p = exit_distribution(float(distribution), num_exits)
        else:
            p = check_distribution(distribution, num_exits)
        signal = calibration.signal(rule, "calibration")
        predictor = cls(model, rule.calibrate(signal, p[None])[0], rule=rule)
        exits = rule.exits(signal, predictor.thresholds)
        predictor.budget = ({"q": float(distribution)} if isinstance(distribution, (int, float))
                            else {"distribution": p.tolist()})
        predictor.calibration_fractions = (torch.bincount(exits, minlength=num_exits).double() / len(exits)).tolist()
        return predictor

    @classmethod
    def from_flops_budget(
        cls,
        model: nn.Module,
        calibration: ExitOutputs,
        flops: Sequence[float] | Tensor,
        budget: float,
        distributions: Tensor | Sequence[Sequence[float]] | None = None,
        rule: str | ExitRule = "confidence",
    ) -> "EarlyExitPredictor":
        """The most accurate candidate distribution (paper's 39 by default) whose expected FLOPs on
        ``calibration`` stay within ``budget`` (same unit as ``flops``). ``rule='patience'``: the most
        accurate patience ``1..K`` within the budget."""
        rule = exit_rule(rule)
        f = check_flops(flops, calibration.num_exits)
        res = budgeted_evaluation(calibration, calibration, flops, distributions, rule=rule)  # checks the image size
        fits = res.heldout_expected_flops <= float(budget)
        if not fits.any():
            raise ValueError(
                f"no exit distribution fits a budget of {budget:g} FLOPs: the cheapest candidate needs "
                f"{float(res.heldout_expected_flops.min()):g} (exit 1 alone costs {float(f[0]):g}); raise the budget"
            )
        predictor = cls._most_accurate(model, res, fits, rule)
        predictor.budget = {"flops": float(budget)}
        predictor.record_flops(f.tolist(), getattr(flops, "input_size", None) or calibration.input_size)
        return predictor

    @classmethod
    def from_latency_budget(
        cls,
        model: nn.Module,
        calibration: ExitOutputs,
        latency_table: Mapping[str, Any],
        budget_ms: float,
        batch_size: int = 1,
        distributions: Tensor | Sequence[Sequence[float]] | None = None,
        rule: str | ExitRule = "confidence",
        flops: Sequence[float] | Tensor | None = None,
    ) -> "EarlyExitPredictor":
        """The most accurate candidate (as :meth:`from_flops_budget`: the paper's 39 distributions, or
        patience ``1..K``) whose expected milliseconds per image at deployment batch ``batch_size`` stay
        within ``budget_ms``, on the device ``latency_table`` was measured on
        (:func:`timm_l2w.inference.measure_latency_table`, :meth:`timm_l2w_runtime.EarlyExitRuntime.stage_latency`;
        the model of expected latency: :mod:`timm_l2w_runtime.latency`). The policy carries the table.
        ``flops`` (default: counted at the calibration's image size) are recorded in the policy."""
        from timm_l2w_runtime.latency import check_latency_table, expected_latency_ms

        from ..flops import exit_flops

        rule = exit_rule(rule)
        table = check_latency_table(latency_table, calibration.num_exits, "latency_table")
        budget_ms = check_number(budget_ms, "budget_ms", Range(0, low_open=True, hint="milliseconds per image"))
        batch_size = check_number(batch_size, "batch_size", Range(1, integer=True, hint="images per predict call"))
        measured, seen = table.get("input_size"), calibration.input_size
        if measured is not None and seen is not None and tuple(measured) != tuple(seen):
            raise ValueError(f"the latency table was measured on {'x'.join(map(str, measured))} images but the "
                             f"calibration outputs come from {'x'.join(map(str, seen))} images: measure the table "
                             "at the size you deploy")
        if flops is None:
            flops = exit_flops(model, seen or measured)
        res = budgeted_evaluation(calibration, calibration, flops, distributions, rule=rule)
        ms = torch.as_tensor(expected_latency_ms(table, res.heldout_exit_fractions.numpy(), batch_size))
        fits = ms <= budget_ms
        if not fits.any():
            raise ValueError(
                f"no exit {'patience' if not rule.calibrated else 'distribution'} fits a budget of {budget_ms:g} ms "
                f"per image at batch {batch_size} on {table['device'].get('name', table['target'])}: the cheapest "
                f"candidate needs {float(ms.min()):.4g} ms; raise the budget (or a larger batch size)")
        predictor = cls._most_accurate(model, res, fits, rule)
        predictor.budget = {"latency_ms": float(budget_ms), "batch_size": int(batch_size)}
        predictor.latency = table
        predictor.record_flops(check_flops(flops, calibration.num_exits).tolist(),
                               getattr(flops, "input_size", None) or seen)
        return predictor

    @classmethod
    def _most_accurate(cls, model: nn.Module, res: Any, fits: Tensor, rule: ExitRule) -> "EarlyExitPredictor":
        """The predictor of the candidate of ``res`` (a budgeted evaluation on the calibration set) with the
        best held-out top-1 among those that ``fits``."""
        best = int(torch.where(fits, res.heldout_top1, torch.full_like(res.heldout_top1, -1.0)).argmax())
        return cls._candidate(model, rule, None if rule.calibrated else res.patience, res.thresholds,
                              res.heldout_exit_fractions, best)

    @classmethod
    def _candidate(cls, model: nn.Module, rule: str | ExitRule, patience: Optional[Tensor], thresholds: Any,
                   exit_fractions: Tensor, j: int) -> "EarlyExitPredictor":
        """The predictor of candidate ``j`` (its thresholds, or its patience when ``patience`` is given), with
        its calibration exit fractions."""
        if patience is None:
            predictor = cls(model, thresholds[j], rule=rule)
        else:
            predictor = cls(model, rule=rule, patience=int(patience[j]))
        predictor.calibration_fractions = exit_fractions[j].tolist()
        return predictor

    @classmethod
    def from_risk(
        cls, model: nn.Module, calibration: ExitOutputs, flops: Sequence[float] | Tensor, max_risk: float,
        confidence: float = 0.9, risk: str = "disagreement", rule: str | ExitRule = "confidence",
    ) -> "EarlyExitPredictor":
        """The cheapest candidate policy (lowest expected FLOPs) whose ``risk`` (``'disagreement'`` with the last
        exit or ``'top1-drop'`` against it) is at most ``max_risk`` with probability ``>= confidence`` over the
        draw of ``calibration``: :func:`timm_l2w.evaluation.risk.risk_controlled_choice` (docs/risk.md)."""
        choice = risk_controlled_choice(calibration, flops, max_risk, confidence, risk, rule)
        predictor = cls._candidate(model, rule, choice.patience, choice.thresholds, choice.exit_fractions,
                                   choice.chosen)
        predictor.budget = choice.budget()
        predictor.record_flops(flops, getattr(flops, "input_size", None) or calibration.input_size)
        return predictor

    @property
    def expected_latency_ms(self) -> Optional[float]:
        """Expected milliseconds per image of the calibration exit fractions at the budget's batch size (1 when
        it names none), by the latency table (:mod:`timm_l2w_runtime.latency`); ``None`` without either."""
        if self.latency is None or self.calibration_fractions is None:
            return None
        from timm_l2w_runtime.latency import expected_latency_ms

        return float(expected_latency_ms(self.latency, self.calibration_fractions,
                                         int(self.budget.get("batch_size", 1))))

    def record_flops(self, flops: Sequence[float], input_size: Optional[Sequence[int]] = None) -> None:
        """Remember the cumulative FLOPs per exit (for :meth:`save`) and the image size they were counted at."""
        self.flops = check_flops(flops, self.num_exits).tolist()
        size = input_size if input_size is not None else getattr(flops, "input_size", None)
        self.flops_input_size = tuple(int(v) for v in size) if size is not None else None

    def to_policy(self, input_size: Optional[Sequence[int]] = None) -> Dict[str, Any]:
        """The policy document :meth:`save` writes (see :mod:`timm_l2w_runtime.policy`).

        ``preprocess`` defaults to timm's eval transform of the model's ``pretrained_cfg`` (at
        ``input_size``, else the size the FLOPs were counted at); the FLOPs are counted at the
        preprocessing's input size unless recorded at that size. ``weights_sha256``: the digest of the
        model's weights now, unless set (:meth:`load` keeps the file's).
        """
        from timm_l2w_runtime.policy import POLICY_FORMAT, POLICY_VERSION, WEIGHTS_KEY, check_policy

        from ..files import weights_digest
        from ..flops import exit_flops
        from ..preprocessing import model_name, preprocess_from_model

        pre = self.preprocess or preprocess_from_model(self.model, input_size or self.flops_input_size)
        size = tuple(pre["input_size"])
        flops = self.flops
        if flops is None or (self.flops_input_size is not None and tuple(self.flops_input_size) != size):
            flops = list(exit_flops(self.model, size))
        fractions = self.calibration_fractions
        num_classes = getattr(self.model, "num_classes", None)
        latency = {} if self.latency is None else {"latency": self.latency,
                                                   "expected_latency_ms": self.expected_latency_ms}
        return check_policy({
            "format": POLICY_FORMAT, "version": POLICY_VERSION, "model": model_name(self.model),
            "num_exits": self.num_exits, "num_classes": num_classes, "rule": self.rule,
            "thresholds": None if self.thresholds is None else self.thresholds.tolist(), "patience": self.patience,
            "flops": [float(v) for v in flops], "flops_input_size": list(size), "budget": dict(self.budget),
            "expected_flops": None if fractions is None else float(sum(p * f for p, f in zip(fractions, flops))),
            "calibration_exit_fractions": fractions, "class_names": self.class_names, "preprocess": pre, **latency,
            WEIGHTS_KEY: self.weights_sha256 or weights_digest(self.model),
        }, "the policy")

    def save(self, path: Path | str, input_size: Optional[Sequence[int]] = None) -> Path:
        """Write the exit policy to ``path`` as JSON (see :meth:`to_policy`); returns the path."""
        from timm_l2w_runtime.policy import write_policy

        return write_policy(path, self.to_policy(input_size))

    @classmethod
    def load(cls, path: Path | str, model: nn.Module) -> "EarlyExitPredictor":
        """The predictor a policy file describes, for ``model``; a policy saved for another model
        (name, number of exits or classes) is a :class:`timm_l2w_runtime.PolicyError` (a ``ValueError``)."""
        from timm_l2w_runtime.policy import WEIGHTS_KEY, check_policy_fits, read_policy

        from ..preprocessing import model_name

        policy = read_policy(path)
        net = unwrap_model(model)
        check_policy_fits(policy, model_name(net), int(getattr(net, "num_exits", 0)), getattr(net, "num_classes", None),
                          source=str(path))
        predictor = cls(model, policy["thresholds"], rule=policy["rule"], patience=policy["patience"])
        predictor.budget = dict(policy["budget"])
        predictor.calibration_fractions = policy.get("calibration_exit_fractions")
        if policy["flops"] is not None:
            predictor.record_flops(policy["flops"], policy.get("flops_input_size"))
        predictor.class_names, predictor.preprocess = policy["class_names"], policy["preprocess"]
        predictor.weights_sha256 = policy.get(WEIGHTS_KEY)
        predictor.latency = policy.get("latency")
        return predictor

    @torch.inference_mode()
    def _predict_batch(self, x: Tensor) -> EarlyExitPrediction:
        n, device = x.shape[0], x.device
        predictions = torch.empty(n, dtype=torch.long, device=device)
        confidences = torch.empty(n, dtype=torch.float32, device=device)
        exit_index = torch.empty(n, dtype=torch.long, device=device)
        active = torch.arange(n, device=device)  # input positions of the samples still running
        rule = self.exit_rule
        params = self.thresholds.tolist() if self.thresholds is not None else self.patience
        memory = None  # the rule's memory of the earlier exits (patience: last prediction, agreement run length)
        state = x
        for k in range(self.num_exits):
            state, logits = self.model.forward_stage(k, state)
            conf, pred = exit_confidence(logits)
            last = k == self.num_exits - 1
            if last:
                leave = torch.ones_like(conf, dtype=torch.bool)
            else:
                leave, memory = rule.leave(k, logits, conf, pred, params, memory)
            idx = active[leave]
            predictions[idx], confidences[idx], exit_index[idx] = pred[leave], conf[leave], k
            if last:
                break
            stay = ~leave
            num_stay = int(stay.sum())
            if num_stay == 0:
                break
            if num_stay < stay.numel():
                state, active = select_samples(state, stay), active[stay]
                memory = rule.keep(memory, stay)
        return EarlyExitPrediction(predictions, confidences, exit_index)

    def predict(self, x: Tensor, batch_size: Optional[int] = None) -> EarlyExitPrediction:
        """Early-exit predictions for the image batch ``x`` ``[N, C, H, W]`` (in chunks of ``batch_size``)."""
        if hasattr(self.model, "check_input"):
            self.model.check_input(x)
        if x.shape[0] == 0:
            raise ValueError("empty batch: pass at least one image")
        if batch_size is not None:
            batch_size = check_number(batch_size, "batch_size", Range(1, integer=True, hint="images per chunk"))
        if batch_size is None or batch_size >= x.shape[0]:
            return self._predict_batch(x)
        parts = [self._predict_batch(chunk) for chunk in x.split(batch_size)]
        return EarlyExitPrediction(*(torch.cat([getattr(p, f) for p in parts])
                                     for f in ("predictions", "confidences", "exit_index")))

    __call__ = predict
