"""The L2W meta step and the hook that adds it to an existing training loop (docs/method.md §5).

One training step: a virtual step of the model with the weighted loss on the training half (the real
update, :mod:`.update`: the loop's accumulation and clipping, then the optimizer's own rule, kept
differentiable w.r.t. the weight predictor), the meta loss of the virtually updated model on the meta half
with the confidence-based exit assignment (:mod:`.loss`), the second-order gradient of that meta loss
w.r.t. the predictor (:mod:`.backends`: ``'higher'`` or ``'func'``), and the meta optimizer's step
(:mod:`.step`). Then the real step uses the updated predictor's weights. :class:`L2W` (:mod:`.hook`)
runs this schedule inside any loop, with the precision policy of :mod:`.precision` beside it and the
plug of :mod:`.plug` for accelerators; :class:`L2WClassificationTask` (:mod:`.task`) is the same schedule
as a timm training task, for timm's own train.py.
"""
from .backends import BACKENDS, make_backend
from .hook import BACKEND_CHOICES, L2W
from .loss import meta_loss, rng_state
from .plug import MetaUpdateRunner
from .precision import META_PRECISIONS
from .step import MetaStepResult, MissingDerivativeError, meta_step
from .task import L2WClassificationTask

__all__ = [
    "BACKENDS",
    "BACKEND_CHOICES",
    "META_PRECISIONS",
    "L2W",
    "L2WClassificationTask",
    "MetaStepResult",
    "MetaUpdateRunner",
    "MissingDerivativeError",
    "make_backend",
    "meta_loss",
    "meta_step",
    "rng_state",
]
