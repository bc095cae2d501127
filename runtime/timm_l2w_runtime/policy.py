"""The exit policy file: when a sample leaves, what the exits cost, and how images are prepared.

A policy is a small JSON document (human-readable, no pickle) that ``EarlyExitPredictor.save``
writes and both ``EarlyExitPredictor.load`` and the ONNX runtime read. Keys:

* ``format`` (``"timm_l2w.exit_policy"``) and ``version`` (1).
* ``model`` (timm name or ``null``), ``num_exits``, ``num_classes``: the model it was calibrated
  for; loading it for another model is an error.
* ``rule``: the name of an exit rule (:mod:`timm_l2w_runtime.rules`): ``"confidence"`` (leave at
  exit k when the max softmax is ``>= thresholds[k]``), ``"entropy"`` (leave when the predictive
  entropy is ``<= thresholds[k]``) or ``"patience"`` (leave once ``patience`` consecutive exits
  predict the same class). ``thresholds`` holds one number per exit (``"inf"`` / ``"-inf"`` as
  strings, since JSON has no infinity; the last is ignored: the last exit takes every sample left);
  ``patience`` is an integer or ``null``.
* ``flops``: cumulative FLOPs to each exit for one image of ``flops_input_size`` (C, H, W).
* ``budget``: what it was calibrated for (``{"q": 0.5}``, ``{"flops": 1.2e7}``,
  ``{"distribution": [...]}``, ``{"latency_ms": 2.5, "batch_size": 1}``, a risk guarantee ``{"risk":
  "disagreement", "max_risk": 0.05, "confidence": 0.9, "risk_upper_bound": ..., "heldout_risk": ..., "n": ...}``
  or ``{}``); ``expected_flops``: the mean FLOPs per image it gave on the calibration set (or ``null``).
* ``latency`` (optional): the latency table the policy was chosen with (:mod:`timm_l2w_runtime.latency`:
  ms per stage and batch size on the device it names); with it ``expected_latency_ms``, the expected
  milliseconds per image at the budget's ``batch_size`` (1 when it names none).
* ``class_names``: one name per class, or ``null``.
* ``preprocess``: how an image file becomes model input (see :func:`check_preprocess`).
* ``weights_sha256`` (optional): the digest of the weights it was calibrated on (``timm_l2w.files.weights_digest``:
  sha256 over the state_dict's tensors). ``timm-l2w export`` and the runtime refuse a policy whose digest differs
  from the weights they ship (:func:`check_policy_weights`); a policy without one (an older or hand-written file)
  is accepted with a :class:`PolicyWarning` that it cannot be checked.

This module needs no PyTorch (the standard library and the numpy rule registry), so the runtime reads policies.
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Optional, Union

from .latency import check_latency_table
from .rules import RULES

__all__ = [
    "POLICY_FORMAT", "POLICY_VERSION", "WEIGHTS_KEY", "PolicyError", "PolicyWarning",
    "check_policy", "check_preprocess", "read_policy", "write_policy", "policy_json", "check_policy_fits",
    "check_policy_weights", "print_policy_warnings", "write_text_atomic",
]

POLICY_FORMAT = "timm_l2w.exit_policy"
POLICY_VERSION = 1
RESIZE_MODES = ("stretch", "shorter_side")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
WEIGHTS_KEY = "weights_sha256"  # the policy's and the manifest's digest of the weights (a sha256, 64 hex digits)
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SHOWN_DIGITS = 12  # of a digest, in messages
PathLike = Union[str, "os.PathLike[str]"]


class PolicyError(ValueError):
    """A policy file that cannot be read, is malformed, or belongs to another model or other weights."""


class PolicyWarning(UserWarning):
    """A policy that is used although it cannot be checked against the weights (it records no digest)."""


def _number(value: Any, where: str) -> float:
    """A JSON number, or one of the strings ``'inf'``, ``'-inf'`` (what JSON cannot hold)."""
    if isinstance(value, str) and value in ("inf", "-inf", "Infinity", "-Infinity"):
        return float(value.replace("Infinity", "inf"))
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(float(value)):
        raise PolicyError(f"{where} must be a number (or 'inf' / '-inf'), got {value!r}")
    return float(value)


def _json_number(value: float) -> Any:
    return value if math.isfinite(value) else str(value)


def _positive_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PolicyError(f"{where} must be an integer >= 1, got {value!r}")
    return value


def check_preprocess(pre: Mapping[str, Any], where: str = "preprocess") -> Dict[str, Any]:
    """Validate the ``preprocess`` entry; return it with defaults filled in.

    * ``input_size``: ``[C, H, W]`` of the model input.
    * ``color``: ``"RGB"`` or ``"L"`` (grayscale, repeated to ``C`` channels when ``C > 1``).
    * ``resize``: ``"stretch"`` (scale to ``H x W`` in floating point, bilinear without
      antialiasing, as ``torch.nn.functional.interpolate(align_corners=False)``: timm_l2w's
      built-in data sets) or ``"shorter_side"`` (PIL resize of the shorter side to ``resize_size``,
      then a centre crop to ``H x W``: timm's eval transform).
    * ``interpolation`` (``shorter_side``): ``"bilinear"``, ``"bicubic"`` or ``"nearest"``.
    * ``mean`` / ``std``: per-channel normalisation of pixel values in ``[0, 1]``.
    """
    if not isinstance(pre, Mapping):
        raise PolicyError(f"{where} must be an object, got {type(pre).__name__}")
    size = pre.get("input_size")
    if not isinstance(size, (list, tuple)) or len(size) != 3:
        raise PolicyError(f"{where}.input_size must be [channels, height, width], got {size!r}")
    size = [_positive_int(v, f"{where}.input_size") for v in size]
    channels = size[0]
    color = pre.get("color", "RGB" if channels == 3 else "L")
    if color not in ("RGB", "L"):
        raise PolicyError(f"{where}.color must be 'RGB' or 'L', got {color!r}")
    if color == "RGB" and channels != 3:
        raise PolicyError(f"{where}: color 'RGB' needs 3 input channels, input_size has {channels}")
    resize = pre.get("resize", "shorter_side")
    if resize not in RESIZE_MODES:
        raise PolicyError(f"{where}.resize must be one of {RESIZE_MODES}, got {resize!r}")
    interpolation = pre.get("interpolation", "bilinear")
    if interpolation not in INTERPOLATIONS:
        raise PolicyError(f"{where}.interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    out: Dict[str, Any] = {"input_size": size, "color": color, "resize": resize, "interpolation": interpolation}
    if resize == "shorter_side":
        out["resize_size"] = _positive_int(pre.get("resize_size", min(size[1:])), f"{where}.resize_size")
    for key in ("mean", "std"):
        values = pre.get(key)
        if not isinstance(values, (list, tuple)) or len(values) != channels:
            raise PolicyError(f"{where}.{key} must hold one number per input channel ({channels}), got {values!r}")
        out[key] = [_number(v, f"{where}.{key}") for v in values]
        if not all(math.isfinite(v) for v in out[key]) or (key == "std" and min(out[key]) <= 0):
            raise PolicyError(f"{where}.{key} must be finite{' and positive' if key == 'std' else ''}, got {values!r}")
    return out


def check_policy(policy: Mapping[str, Any], source: str = "policy") -> Dict[str, Any]:
    """Validate a policy document; return it normalised (thresholds as floats, infinities included)."""
    if not isinstance(policy, Mapping):
        raise PolicyError(f"{source} is not a JSON object: it is not an exit policy written by timm_l2w")
    if policy.get("format") != POLICY_FORMAT:
        raise PolicyError(f"{source} is not a timm_l2w exit policy (format {policy.get('format')!r}, expected "
                          f"{POLICY_FORMAT!r}): write one with EarlyExitPredictor.save or timm-l2w eval --q")
    if policy.get("version") != POLICY_VERSION:
        raise PolicyError(f"{source} has policy version {policy.get('version')!r}; this timm_l2w reads version "
                          f"{POLICY_VERSION}: write it again with this version")
    num_exits = _positive_int(policy.get("num_exits"), f"{source}: num_exits")
    num_classes = _positive_int(policy.get("num_classes"), f"{source}: num_classes")
    rule = policy.get("rule")
    if not isinstance(rule, str) or rule not in RULES:
        raise PolicyError(f"{source}: rule must be one of {tuple(RULES)}, got {rule!r}")
    thresholds, patience = policy.get("thresholds"), policy.get("patience")
    if RULES[rule].parameter == "patience":
        patience = _positive_int(patience, f"{source}: patience")
        thresholds = None
    else:
        if not isinstance(thresholds, (list, tuple)) or len(thresholds) != num_exits:
            raise PolicyError(f"{source}: rule {rule!r} needs one threshold per exit ({num_exits}), got {thresholds!r}")
        thresholds = [_number(t, f"{source}: thresholds[{k}]") for k, t in enumerate(thresholds)]
        patience = None
    model = policy.get("model")
    if model is not None and not isinstance(model, str):
        raise PolicyError(f"{source}: model must be a timm model name or null, got {model!r}")
    flops = policy.get("flops")
    if flops is not None:
        if not isinstance(flops, (list, tuple)) or len(flops) != num_exits:
            raise PolicyError(f"{source}: flops must hold one cumulative value per exit ({num_exits}), got {flops!r}")
        flops = [_number(f, f"{source}: flops") for f in flops]
    names = policy.get("class_names")
    if names is not None and (not isinstance(names, (list, tuple)) or len(names) != num_classes
                              or not all(isinstance(n, str) for n in names)):
        raise PolicyError(f"{source}: class_names must be {num_classes} strings (one per class) or null")
    pre = policy.get("preprocess")
    out = dict(policy)
    out.update(model=model, num_exits=num_exits, num_classes=num_classes, rule=rule, thresholds=thresholds,
               patience=patience, flops=flops, class_names=list(names) if names is not None else None,
               preprocess=None if pre is None else check_preprocess(pre, f"{source}: preprocess"),
               budget=dict(policy.get("budget") or {}))
    for key in ("expected_flops", "expected_latency_ms"):
        if out.get(key) is not None:
            out[key] = _number(out[key], f"{source}: {key}")
    if out.get("latency") is not None:
        out["latency"] = check_latency_table(out["latency"], num_exits, f"{source}: latency", PolicyError)
    digest = out.get(WEIGHTS_KEY)
    if digest is not None and not (isinstance(digest, str) and _SHA256.fullmatch(digest)):
        raise PolicyError(f"{source}: {WEIGHTS_KEY} must be a sha256 digest (64 lowercase hex digits) or null, got "
                          f"{digest!r}: write the policy again with timm-l2w eval or EarlyExitPredictor.save")
    return out


def check_policy_weights(policy: Mapping[str, Any], digest: Optional[str], source: str = "the policy",
                         weights: str = "these weights", warn: bool = True) -> bool:
    """Raise :class:`PolicyError` when ``policy`` was calibrated on other weights than those whose
    ``weights_sha256`` is ``digest``; return whether the two could be compared.

    When either records no digest, nothing can be checked: with ``warn`` a :class:`PolicyWarning` says so.
    """
    recorded = policy.get(WEIGHTS_KEY)
    if recorded and digest and recorded != digest:
        raise PolicyError(f"{source} was calibrated on weights with sha256 {recorded[:_SHOWN_DIGITS]}..., but "
                          f"{weights} have sha256 {digest[:_SHOWN_DIGITS]}...: calibrate a policy for this checkpoint "
                          "with timm-l2w eval CHECKPOINT --q Q (or --flops-budget F), or pass the policy of this "
                          "checkpoint")
    if recorded and digest:
        return True
    if warn:
        why, fix = ((f"{source} records no {WEIGHTS_KEY} (an older or hand-written policy)",
                     "timm-l2w eval CHECKPOINT --q Q writes policies that record it") if not recorded else
                    (f"{weights} record no {WEIGHTS_KEY} (a package exported by an older timm_l2w)",
                     "export the package again to record it"))
        warnings.warn(f"{why}: whether it was calibrated on {weights} cannot be checked; {fix}",
                      PolicyWarning, stacklevel=2)
    return False


@contextmanager
def print_policy_warnings(prog: str) -> Iterator[None]:
    """Within: a :class:`PolicyWarning` is one line ``PROG: warning: MESSAGE`` on stderr (a command's output);
    other warnings show as usual."""
    shown = warnings.showwarning

    def show(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        if issubclass(category, PolicyWarning):
            print(f"{prog}: warning: {message}", file=sys.stderr, flush=True)
        else:
            shown(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():
        warnings.simplefilter("always", PolicyWarning)
        warnings.showwarning = show
        yield


def check_policy_fits(policy: Mapping[str, Any], model: Optional[str], num_exits: int, num_classes: Optional[int],
                      source: str = "the policy") -> None:
    """Raise :class:`PolicyError` when ``policy`` was written for another model than the one described."""
    saved = policy.get("model")
    if model and saved and model != saved:
        raise PolicyError(f"{source} was calibrated for {saved}, not {model}: calibrate a policy for this model "
                          "(timm-l2w eval CHECKPOINT --q Q) or use the model it belongs to")
    if policy["num_exits"] != num_exits:
        raise PolicyError(f"{source} has {policy['num_exits']} exits, this model {num_exits}"
                          f"{f' ({model})' if model else ''}: it belongs to another model; "
                          "calibrate one for this model")
    if num_classes is not None and policy["num_classes"] != num_classes:
        raise PolicyError(f"{source} is for {policy['num_classes']} classes, this model has {num_classes}: "
                          "it belongs to another model; calibrate one for this model")


def policy_json(policy: Mapping[str, Any]) -> str:
    """The policy as indented JSON text (infinite thresholds as ``"inf"`` / ``"-inf"``)."""
    doc = dict(policy)
    if doc.get("thresholds") is not None:
        doc["thresholds"] = [_json_number(float(t)) for t in doc["thresholds"]]
    return json.dumps(doc, indent=2, allow_nan=False) + "\n"


def write_text_atomic(path: PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically (temp file beside it, then rename), with the
    permissions ``open(path, 'w')`` would give (``0o666`` less the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
        umask = os.umask(0)  # reading the umask means setting it: put it straight back
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def write_policy(path: PathLike, policy: Mapping[str, Any]) -> Path:
    """Validate ``policy`` and write it to ``path`` as JSON, atomically."""
    return write_text_atomic(path, policy_json(check_policy(policy, str(path))))


def read_policy(path: PathLike) -> Dict[str, Any]:
    """Read and validate a policy file (a :class:`PolicyError` says what is wrong with it)."""
    path = Path(path)
    doc = read_json(path, PolicyError, f"policy file {path} does not exist: write one with timm-l2w eval CHECKPOINT "
                    "--q Q (or EarlyExitPredictor.save)", "write the policy again")
    return check_policy(doc, str(path))


def read_json(path: Path, error: type, missing: str, fix: str) -> Any:
    """The JSON document in ``path``; ``error(missing)`` when there is no such file, ``error`` naming
    the damage and ``fix`` when it is not readable JSON."""
    if not path.is_file():
        raise error(missing)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise error(f"{path} is not readable JSON ({err}): it is damaged; {fix}") from None

