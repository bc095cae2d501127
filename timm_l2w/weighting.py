"""L2W sample weighting: the weight-prediction MLP, weight normalisation and the weighted loss.

docs/method.md §2 (the weighted loss): per-sample per-exit losses ``L [B, K]``; a small MLP ``g_phi`` maps a detached
row (losses, confidences or both) to ``G in (-1, 1)^K``; weights ``W = 1 + eps * (G - mean(G))``
with the mean taken along the constraint axis; the loss is ``sum_k mean_i W[i, k] * L[i, k]``.
Everything here is pure and vectorised; the meta step that trains ``g_phi`` lives in
:mod:`timm_l2w.meta`.

Targets are class indices ``[B]`` or class probabilities ``[B, C]`` (timm's Mixup / CutMix, soft
labels). The per-sample loss is cross-entropy by default; :class:`ExitCriterion` also takes the loss
module of a timm training loop (``nn.CrossEntropyLoss``, timm's ``LabelSmoothingCrossEntropy``,
``SoftTargetCrossEntropy`` or ``BinaryCrossEntropy``) and computes the same loss per sample.

IMTA's one-for-all knowledge distillation (Li et al., ICCV 2019) composes with it
(:class:`Distillation`, :func:`training_losses`): the last exit's softened prediction teaches every
earlier exit, and the weights multiply each exit's whole training loss.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import LabelError
from .models.base import check_multi_exit_output
from .validation import Range, assert_on_device, check_choice, check_label_smoothing, check_labels, check_number

__all__ = [
    "check_eps",
    "INPUT_TYPES",
    "CONSTRAINTS",
    "WeightPredictor",
    "normalize_weights",
    "ExitCriterion",
    "check_targets",
    "exit_losses",
    "Distillation",
    "distillation_losses",
    "training_losses",
    "exit_confidences",
    "predictor_inputs",
    "sample_weights",
    "weighted_multi_exit_loss",
    "WeightedMultiExitLoss",
]

INPUT_TYPES = ("loss", "conf", "both")
CONSTRAINTS = {"row": 0, "col": 1, "mat": None}  # axis of the mean; None = all entries


def check_eps(eps: float) -> float:
    """``eps``, the weights' floor of docs/method.md eq. 4, checked (>= 0)."""
    return float(check_number(eps, "eps", Range(0, hint="0 = equal weighting; paper: 0.8 CIFAR, 0.3 ImageNet")))


class WeightPredictor(nn.Sequential):
    """The weight-prediction network ``g_phi``: ``Linear, ReLU, ..., Linear, Tanh``.

    It *is* an ``nn.Sequential``, so its ``state_dict`` has the plain MLP layout (``0.weight``,
    ``0.bias``, ``2.weight``, ...) and loads from / into any such MLP. Input size is ``K`` for
    ``input_type`` ``'loss'`` or ``'conf'`` and ``2K`` for ``'both'``; output ``[B, K]`` in (-1, 1).
    """

    def __init__(self, num_exits: int, input_type: str = "loss", hidden_sizes: Sequence[int] = (500,)):
        if not isinstance(num_exits, int) or num_exits < 1:
            raise ValueError(f"num_exits must be a positive int (the model's exits), got {num_exits!r}")
        check_choice(input_type, INPUT_TYPES, "input_type")
        hidden_sizes = tuple(int(h) for h in hidden_sizes)
        if any(h < 1 for h in hidden_sizes):
            raise ValueError(f"hidden_sizes must be positive, got {hidden_sizes}")
        in_features = 2 * num_exits if input_type == "both" else num_exits
        sizes = (in_features,) + hidden_sizes
        layers: List[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers += [nn.Linear(sizes[-1], num_exits), nn.Tanh()]
        super().__init__(*layers)
        self.num_exits, self.input_type, self.in_features = num_exits, input_type, in_features
        self.hidden_sizes = hidden_sizes

    def forward(self, inputs: Tensor) -> Tensor:  # type: ignore[override]
        if inputs.ndim != 2 or inputs.shape[1] != self.in_features:
            raise ValueError(
                f"weight predictor expects [batch, {self.in_features}] inputs "
                f"(input_type={self.input_type!r}, {self.num_exits} exits), got {tuple(inputs.shape)}: "
                "build the inputs with timm_l2w.weighting.predictor_inputs"
            )
        return super().forward(inputs.to(self[0].weight.dtype))

    @classmethod
    def from_state_dict(cls, state_dict: Dict[str, Tensor], input_type: str = "loss") -> "WeightPredictor":
        """Build a predictor whose sizes are read from a plain-MLP ``state_dict`` and load it.

        A common key prefix (``module.``, ``net.``, ...) in front of the layer indices is stripped.
        """
        weights = sorted((k for k in state_dict if k.endswith(".weight")), key=lambda k: int(k.split(".")[-2]))
        if not weights:
            raise ValueError("state_dict has no '<index>.weight' entries: expected a Linear/ReLU/.../Tanh MLP")
        prefix = weights[0][: weights[0].rfind(".", 0, len(weights[0]) - len(".weight")) + 1]
        clean = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        shapes = [tuple(state_dict[k].shape) for k in weights]
        num_exits = shapes[-1][0]
        model = cls(num_exits, input_type, [s[0] for s in shapes[:-1]])
        if shapes[0][1] != model.in_features:
            raise ValueError(
                f"state_dict's first layer takes {shapes[0][1]} inputs but input_type={input_type!r} with "
                f"{num_exits} exits needs {model.in_features}: pass the input_type it was trained with"
            )
        model.load_state_dict(clean)
        return model


def normalize_weights(G: Tensor, eps: float, constraint: str = "col") -> Tensor:
    """``W = 1 + eps * (G - mean(G))``, the mean over the batch (``row``), exits (``col``) or all (``mat``)."""
    eps = check_eps(eps)
    dim = CONSTRAINTS[check_choice(constraint, CONSTRAINTS, "constraint")]
    if G.ndim != 2:
        raise ValueError(f"G must be a [batch, num_exits] tensor, got shape {tuple(G.shape)}")
    mean = G.mean() if dim is None else G.mean(dim=dim, keepdim=True)
    return 1 + eps * (G - mean)


def check_targets(target: Any, num_classes: int, batch: int) -> Tensor:
    """Class indices ``[batch]`` (checked by :func:`~timm_l2w.validation.check_labels`) as int64, or class
    probabilities ``[batch, num_classes]`` (Mixup / CutMix / soft labels) as they are, after checking they
    are floating point, finite and in ``[0, 1]``."""
    if isinstance(target, Tensor) and target.ndim == 2 and target.dtype.is_floating_point:
        if tuple(target.shape) != (batch, num_classes):
            raise LabelError(f"soft targets must be [batch, num_classes] = [{batch}, {num_classes}] class "
                             f"probabilities, got shape {tuple(target.shape)}: build them for the model's "
                             f"{num_classes} classes (timm's Mixup(num_classes={num_classes}))")
        if not assert_on_device(((target >= 0) & (target <= 1)).all(),  # also false for NaN; no host sync
                                "soft targets must be probabilities in [0, 1]"):
            raise LabelError("soft targets must be probabilities in [0, 1] (no NaN/inf): pass the targets "
                             "timm's Mixup returns, or one-hot / smoothed labels")
        return target
    return check_labels(target, num_classes, batch)


_LOSS_KINDS = ("ce", "bce")


@dataclass(frozen=True)
class ExitCriterion:
    """The per-sample loss of one exit, ``[N, C]`` logits and targets -> ``[N]``.

    ``'ce'``: cross-entropy with ``label_smoothing`` (class-index or class-probability targets; with
    probabilities it is timm's ``SoftTargetCrossEntropy`` per sample). ``'bce'``: timm's
    ``BinaryCrossEntropy`` per sample (index targets one-hot encoded with ``smoothing / C`` off and
    ``1 - smoothing + smoothing / C`` on, dense targets moved towards 0.5 by ``smooth_dense``, then
    binarised above ``target_threshold``; the element-wise loss is averaged over classes, or summed with
    ``sum_classes``), so that the mean over the batch is timm's loss. :meth:`from_module` builds it from
    a timm training loop's loss module.
    """

    kind: str = "ce"
    label_smoothing: float = 0.0
    target_threshold: Optional[float] = None
    sum_classes: bool = False
    smooth_dense: bool = False
    class_weight: Optional[Tensor] = None
    pos_weight: Optional[Tensor] = None

    def __post_init__(self) -> None:
        check_choice(self.kind, _LOSS_KINDS, "loss kind")
        object.__setattr__(self, "label_smoothing", check_label_smoothing(self.label_smoothing))

    @classmethod
    def from_module(cls, module: Any, label_smoothing: float = 0.0) -> "ExitCriterion":
        """The criterion a loss module computes: ``None`` (cross-entropy with ``label_smoothing``), an
        :class:`ExitCriterion`, ``nn.CrossEntropyLoss``, or timm's ``LabelSmoothingCrossEntropy``,
        ``SoftTargetCrossEntropy`` and ``BinaryCrossEntropy``."""
        if module is None:
            return cls("ce", label_smoothing)
        if label_smoothing:
            raise ValueError(f"label_smoothing={label_smoothing} and a loss module ({type(module).__name__}) were both "
                             "given: set the smoothing in one place (the loss module's, or label_smoothing= with "
                             "criterion=None)")
        if isinstance(module, cls):
            return module
        from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

        if isinstance(module, SoftTargetCrossEntropy):
            return cls("ce")
        if isinstance(module, LabelSmoothingCrossEntropy):
            return cls("ce", module.smoothing)
        if isinstance(module, nn.CrossEntropyLoss):
            if module.weight is not None or module.ignore_index != -100:
                raise ValueError("nn.CrossEntropyLoss with class weights or an ignore_index has no per-sample form "
                                 "here: pass nn.CrossEntropyLoss(label_smoothing=...) or a timm_l2w.ExitCriterion")
            return cls("ce", module.label_smoothing)
        if isinstance(module, BinaryCrossEntropy):
            if module.reduction not in ("mean", "none"):
                raise ValueError(f"BinaryCrossEntropy(reduction={module.reduction!r}): the multi-exit loss averages "
                                 "each exit's per-sample losses over the batch; use reduction='mean'")
            return cls("bce", module.smoothing, module.target_threshold, module.sum_classes,
                       getattr(module, "smooth_dense", False), module.weight, module.pos_weight)
        raise TypeError(
            f"unsupported loss {type(module).__name__}: the multi-exit loss needs a per-sample loss; pass None "
            "(cross-entropy), nn.CrossEntropyLoss, timm.loss.LabelSmoothingCrossEntropy, SoftTargetCrossEntropy, "
            "BinaryCrossEntropy or a timm_l2w.ExitCriterion")

    def unsmoothed(self) -> "ExitCriterion":
        """The same loss without label smoothing (the meta loss scores the plain loss)."""
        return replace(self, label_smoothing=0.0) if self.label_smoothing else self

    def __call__(self, logits: Tensor, target: Tensor) -> Tensor:
        """Per-sample losses ``[N]`` of logits ``[N, C]`` for targets ``[N]`` (indices) or ``[N, C]``."""
        if self.kind == "ce":
            return F.cross_entropy(logits, target, reduction="none", label_smoothing=self.label_smoothing)
        num_classes = logits.shape[-1]
        if target.ndim == 1:
            off = self.label_smoothing / num_classes
            target = torch.full_like(logits, off).scatter_(1, target.view(-1, 1), 1.0 - self.label_smoothing + off)
        elif self.smooth_dense and self.label_smoothing:
            target = target * (1.0 - self.label_smoothing) + 0.5 * self.label_smoothing
        if self.target_threshold is not None:
            target = target.gt(self.target_threshold).to(logits.dtype)
        weight = None if self.class_weight is None else self.class_weight.to(logits)
        pos_weight = None if self.pos_weight is None else self.pos_weight.to(logits)
        loss = F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), weight, reduction="none",
                                                  pos_weight=pos_weight)
        return loss.sum(dim=-1) if self.sum_classes else loss.mean(dim=-1)


def exit_losses(outputs: Sequence[Tensor], target: Tensor, label_smoothing: float = 0.0,
                criterion: Any = None) -> Tensor:
    """Per-sample, per-exit losses ``L [B, K]``: cross-entropy with optional label smoothing, or the
    ``criterion`` (:meth:`ExitCriterion.from_module`). ``target``: class indices ``[B]`` or class
    probabilities ``[B, C]`` (Mixup / CutMix)."""
    outputs = check_multi_exit_output(outputs)
    logits = torch.stack(outputs, dim=1)  # [B, K, C]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    batch, num_exits, num_classes = logits.shape
    # any integer dtype, in range: a clear LabelError here instead of a dtype RuntimeError, an IndexError
    # or a CUDA device assert from the loss
    target = check_targets(target, num_classes, batch)
    criterion = ExitCriterion.from_module(criterion, label_smoothing)
    if target.dtype.is_floating_point:
        target = target.to(logits.dtype)
    losses = criterion(logits.reshape(batch * num_exits, num_classes), target.repeat_interleave(num_exits, dim=0))
    return losses.view(batch, num_exits)


@dataclass(frozen=True)
class Distillation:
    """IMTA's one-for-all knowledge distillation: exit k < K trains on
    ``(1 - alpha) * CE_k + alpha * T**2 * KL(softmax(z_K / T) || softmax(z_k / T))`` with the last exit's
    logits ``z_K`` detached (the teacher); the last exit keeps its plain CE. Defaults: IMTA's released
    ImageNet setting (T = 1, alpha = 0.1). The KL is summed over classes per sample (the paper's
    equation; an element-wise mean would also divide by the number of classes).
    """

    temperature: float = 1.0
    alpha: float = 0.1

    def __post_init__(self) -> None:
        check_number(self.temperature, "distillation temperature", Range(0, low_open=True, hint="IMTA: 1"))
        check_number(self.alpha, "distillation alpha", Range(0, 1, hint="0 = no distillation; IMTA: 0.1"))


def distillation_losses(outputs: Sequence[Tensor], temperature: float = 1.0) -> Tensor:
    """``T**2 * KL(softmax(z_K / T).detach() || softmax(z_k / T))`` per sample and exit, ``[B, K]``
    (the last column is 0: the last exit is the teacher)."""
    outputs = check_multi_exit_output(outputs)
    logits = torch.stack(outputs, dim=1)  # [B, K, C]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    t = float(temperature)
    teacher = F.log_softmax(logits[:, -1:].detach() / t, dim=-1)  # [B, 1, C]
    student = F.log_softmax(logits / t, dim=-1)
    kl = (teacher.exp() * (teacher - student)).sum(dim=-1) * t * t
    return torch.cat([kl[:, :-1], torch.zeros_like(kl[:, -1:])], dim=1)


def training_losses(
    outputs: Sequence[Tensor], target: Tensor, label_smoothing: float = 0.0, distill: Optional[Distillation] = None,
    ce: Optional[Tensor] = None, criterion: Any = None,
) -> Tensor:
    """Each exit's per-sample training loss ``[B, K]``: the CE (:func:`exit_losses` with ``criterion``, or
    ``ce`` when already computed), or with ``distill`` the mix ``(1 - alpha) CE + alpha T**2 KL`` on every
    exit but the last."""
    if ce is None:
        ce = exit_losses(outputs, target, label_smoothing, criterion)
    if distill is None or distill.alpha == 0:
        return ce
    kd = distillation_losses(outputs, distill.temperature).to(ce.dtype)
    mix = torch.full((ce.shape[1],), 1.0 - distill.alpha, dtype=ce.dtype, device=ce.device)
    mix[-1] = 1.0
    return ce * mix + kd * distill.alpha


def exit_confidences(outputs: Sequence[Tensor]) -> Tensor:
    """Max softmax probability of every sample at every exit, ``[B, K]`` (detached)."""
    outputs = check_multi_exit_output(outputs)
    logits = torch.stack([o.detach() for o in outputs], dim=1)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return logits.softmax(dim=-1).amax(dim=-1)


def predictor_inputs(losses: Tensor, outputs: Optional[Sequence[Tensor]] = None, input_type: str = "loss") -> Tensor:
    """Detached predictor input: the loss row, the confidence row, or both concatenated."""
    check_choice(input_type, INPUT_TYPES, "input_type")
    if input_type == "loss":
        return losses.detach()
    if outputs is None:
        raise ValueError(f"input_type={input_type!r} needs the exit logits: pass outputs=")
    conf = exit_confidences(outputs).to(losses.dtype)
    return conf if input_type == "conf" else torch.cat([losses.detach(), conf], dim=1)


def sample_weights(
    weight_net: Optional[WeightPredictor],
    losses: Tensor,
    outputs: Optional[Sequence[Tensor]] = None,
    eps: float = 0.8,
    constraint: str = "col",
) -> Tensor:
    """Weights ``W [B, K]`` from the predictor; differentiable w.r.t. its parameters.

    With ``weight_net=None`` or ``eps=0`` the weights are all ones (equal weighting).
    """
    eps = check_eps(eps)
    check_choice(constraint, CONSTRAINTS, "constraint")
    if weight_net is None or eps == 0:
        return torch.ones_like(losses.detach())
    if weight_net.num_exits != losses.shape[1]:
        raise ValueError(
            f"weight predictor has {weight_net.num_exits} exits but the model returned {losses.shape[1]}: "
            f"build WeightPredictor(num_exits={losses.shape[1]})"
        )
    G = weight_net(predictor_inputs(losses, outputs, weight_net.input_type))
    return normalize_weights(G, eps, constraint).to(losses.dtype)


def weighted_multi_exit_loss(
    outputs: Sequence[Tensor],
    target: Tensor,
    weight_net: Optional[WeightPredictor] = None,
    eps: float = 0.8,
    constraint: str = "col",
    label_smoothing: float = 0.0,
    distill: Optional[Distillation] = None,
    criterion: Any = None,
) -> Tuple[Tensor, Tensor]:
    """``sum_k mean_i W[i, k] * L[i, k]`` with weights from the predictor (no gradient into it).

    Returns ``(loss, W)``. ``weight_net=None`` or ``eps=0`` is exactly the equal-weight baseline
    ``sum_k mean_i CE`` (with Mixup targets and ``criterion=SoftTargetCrossEntropy()``: timm's loss summed
    over the exits). With ``distill``, ``L`` is :func:`training_losses` (CE mixed with the distillation
    term); the predictor still reads the CE losses.
    """
    ce = exit_losses(outputs, target, label_smoothing, criterion)
    losses = training_losses(outputs, target, label_smoothing, distill, ce=ce)
    with torch.no_grad():
        weights = sample_weights(weight_net, ce, outputs, eps, constraint)
    if weight_net is None or eps == 0:
        return losses.mean(dim=0).sum(), weights
    return (weights * losses).mean(dim=0).sum(), weights


class WeightedMultiExitLoss(nn.Module):
    """Module form of :func:`weighted_multi_exit_loss`; keeps the last weights in ``last_weights``."""

    def __init__(
        self,
        weight_net: Optional[WeightPredictor] = None,
        eps: float = 0.8,
        constraint: str = "col",
        label_smoothing: float = 0.0,
        distill: Optional[Distillation] = None,
        criterion: Any = None,
    ):
        super().__init__()
        self.weight_net = weight_net
        self.distill = distill
        self.eps = check_eps(eps)
        self.constraint = check_choice(constraint, CONSTRAINTS, "constraint")
        self.label_smoothing = check_label_smoothing(label_smoothing)
        self.criterion = ExitCriterion.from_module(criterion, self.label_smoothing)  # carries the smoothing
        self.last_weights: Optional[Tensor] = None

    def forward(self, outputs: Sequence[Tensor], target: Tensor) -> Tensor:  # type: ignore[override]
        loss, self.last_weights = weighted_multi_exit_loss(
            outputs, target, self.weight_net, self.eps, self.constraint, distill=self.distill, criterion=self.criterion
        )
        return loss
