"""Per-sample early exit with numpy and onnxruntime: run an exported package stage by stage.

A package (``timm-l2w export``) holds one ONNX graph per stage, ``manifest.json`` naming the
tensors each graph takes and gives, and ``policy.json`` (the exit rule). Stage ``k`` reads the state
left by stage ``k - 1`` (the image batch for ``k = 0``) and returns its new state tensors and exit
``k``'s logits. After every stage the samples whose exit rule fires take that exit; the state is cut
down to the remaining samples (the rows of every state tensor) before the next stage runs, so no
later stage is computed for a sample that left. The decisions are the policy's exit rule
(:mod:`timm_l2w_runtime.rules`, the numpy twin of ``timm_l2w.exits.rules``), those of
``timm_l2w.EarlyExitPredictor``: max softmax ``>= thresholds[k]`` (``'confidence'``), predictive
entropy ``<= thresholds[k]`` (``'entropy'``), or the same prediction at ``patience`` consecutive
exits (``'patience'``); the last exit takes every sample left.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .images import find_images, preprocess_each, preprocess_files
from .latency import (
    CLOCKS,
    StageClock,
    TimingRule,
    check_timing_settings,
    latency_table,
    measure_stages,
    processor_name,
)
from .policy import WEIGHTS_KEY, check_policy_fits, check_policy_weights, read_json, read_policy
from .rules import exit_confidence, exit_rule

__all__ = [
    "MANIFEST_FORMAT", "MANIFEST_VERSION", "MANIFEST_FILE", "POLICY_FILE", "PackageError",
    "RuntimePrediction", "FilePredictions", "EarlyExitRuntime", "read_manifest", "select_rows",
]

MANIFEST_FORMAT = "timm_l2w.early_exit_package"
MANIFEST_VERSION = 1
MANIFEST_FILE = "manifest.json"
POLICY_FILE = "policy.json"
PathLike = Union[str, "os.PathLike[str]"]


class PackageError(ValueError):
    """An exported package that is incomplete, damaged, or does not fit its policy."""


def select_rows(state: Mapping[str, np.ndarray], keep: np.ndarray) -> Dict[str, np.ndarray]:
    """Rows ``keep`` (batch positions) of every state tensor, as new C-contiguous arrays."""
    return {name: t.take(keep, axis=0) for name, t in state.items()}


@dataclass
class RuntimePrediction:
    """Per sample, in input order: predicted class, its confidence, and the 0-based exit it left at."""

    predictions: np.ndarray  # [N] int64
    confidences: np.ndarray  # [N] float32
    exit_index: np.ndarray  # [N] int64

    def exit_fractions(self, num_exits: int) -> np.ndarray:
        """Share of the samples leaving at each exit, ``[K]`` float64."""
        return np.bincount(self.exit_index, minlength=num_exits) / max(len(self.exit_index), 1)


def concatenate(parts: Sequence[RuntimePrediction]) -> RuntimePrediction:
    """One prediction of ``parts`` in order (an empty one for no parts)."""
    if not parts:
        return RuntimePrediction(np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.int64))
    return RuntimePrediction(*(np.concatenate([getattr(p, f) for p in parts])
                               for f in ("predictions", "confidences", "exit_index")))


@dataclass
class FilePredictions:
    """Every file asked for, in order, and the predictions of those that could be read.

    ``result`` row ``j`` is the prediction of ``files[read[j]]``; ``errors[i]`` says why ``files[i]`` was not
    predicted (it does not exist, is not an image, is damaged, has no known value range, ...).
    """

    files: List[Path]
    result: RuntimePrediction
    read: List[int]
    errors: Dict[int, str]


def read_manifest(package: PathLike) -> Dict[str, Any]:
    """Read and check ``DIR/manifest.json``: every stage file present, every tensor name resolvable."""
    root = Path(package)
    path = root / MANIFEST_FILE
    if not root.is_dir():
        raise PackageError(f"package folder {root} does not exist: pass the --output folder of timm-l2w export")
    manifest = read_json(path, PackageError, f"{root} holds no {MANIFEST_FILE}: it is not a package written by "
                         "timm-l2w export (or the export did not finish); export it again", "export the package again")
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise PackageError(f"{path} is not a timm_l2w early-exit manifest: export the package with timm-l2w export")
    if manifest.get("version") != MANIFEST_VERSION:
        raise PackageError(f"{path} has manifest version {manifest.get('version')!r}, this runtime reads "
                           f"{MANIFEST_VERSION}: export the package again with this timm_l2w")
    stages = manifest.get("stages")
    if not isinstance(stages, list) or len(stages) != manifest.get("num_exits"):
        raise PackageError(f"{path} lists {len(stages) if isinstance(stages, list) else 'no'} stages for "
                           f"{manifest.get('num_exits')} exits: the package is damaged; export it again")
    available = {manifest["input"]}
    for k, stage in enumerate(stages):
        file = root / stage["onnx"]
        if not file.is_file():
            raise PackageError(f"stage {k} is missing: {file} does not exist (the package is incomplete); copy the "
                               "whole folder or export it again")
        unknown = [n for n in stage["inputs"] if n not in available]
        if unknown:
            raise PackageError(f"{path}: stage {k} reads {unknown}, which no earlier stage produces: the manifest is "
                               "damaged; export the package again")
        produced = set(stage["outputs"])
        state = stage.get("state", [])
        lost = [n for n in state if n not in produced and n not in available]
        if lost or stage["logits"] not in produced:
            raise PackageError(f"{path}: stage {k}'s state or logits name unknown tensors: the manifest is damaged; "
                               "export the package again")
        available = set(state)
    return manifest


class _TimedSession:
    """An onnxruntime session standing in for a stage in a timed call: marks the stage's start on a
    :class:`StageClock` and, after stage 0, first copies the rows of the state it reads (as the loop does
    when samples left) and runs on the copy."""

    def __init__(self, session: Any, stage_clock: StageClock, index: int):
        self.session, self.stage_clock, self.index = session, stage_clock, index

    def run(self, outputs: Sequence[str], feeds: Mapping[str, np.ndarray]) -> List[np.ndarray]:
        start = self.stage_clock.mark()
        if self.index > 0:
            rows = np.arange(len(next(iter(feeds.values()))))
            feeds, _ = select_rows(feeds, rows), rows[rows]
            self.stage_clock.gathered(self.index, start)
        return self.session.run(outputs, feeds)


def _onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise ImportError("the early-exit runtime needs onnxruntime: install the torch-free runtime with its "
                          "dependencies (numpy, onnxruntime, pillow): pip install ./runtime from a clone of timm_l2w "
                          "(or pip install onnxruntime)") from None
    return onnxruntime


class EarlyExitRuntime:
    """Load a package folder and run per-sample early exit on image batches.

    ``policy``: another policy file for the same model (default: the package's ``policy.json``); one calibrated
    on other weights than the package's (``weights_sha256`` of policy and manifest) is a :class:`PolicyError`,
    one that records no digest is used with a :class:`PolicyWarning` (the package's own was checked at export).
    ``threads``: onnxruntime intra-op threads (default: onnxruntime's choice).
    ``providers``: onnxruntime execution providers (default: ``['CPUExecutionProvider']``).
    """

    def __init__(self, package: PathLike, policy: Optional[PathLike] = None, threads: Optional[int] = None,
                 providers: Optional[Sequence[Any]] = None):
        self.root = Path(package)
        self.manifest = read_manifest(self.root)
        policy_path = Path(policy) if policy is not None else self.root / self.manifest.get("policy", POLICY_FILE)
        self.policy = read_policy(policy_path)  # a PolicyError says what is wrong with it
        check_policy_fits(self.policy, self.manifest.get("model"), self.manifest["num_exits"],
                          self.manifest["num_classes"], source=str(policy_path))
        source = self.manifest.get("checkpoint")
        check_policy_weights(self.policy, self.manifest.get(WEIGHTS_KEY), source=str(policy_path),
                             weights=f"the weights of {self.root}" + (f" (exported from {source})" if source else ""),
                             warn=policy is not None)
        ort = _onnxruntime()
        options = ort.SessionOptions()
        self.threads = threads
        if threads is not None:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        providers = list(providers) if providers is not None else ["CPUExecutionProvider"]
        self.sessions: List[Any] = []
        self._plan: List[Tuple[Any, List[str], List[str], int, List[Tuple[str, Optional[int]]]]] = []
        self.exit_rule = exit_rule(self.policy["rule"])
        self._params = self.policy[self.exit_rule.parameter]  # the thresholds or the patience
        for k, stage in enumerate(self.manifest["stages"]):
            try:
                session = ort.InferenceSession(str(self.root / stage["onnx"]), sess_options=options,
                                               providers=providers)
            except Exception as err:  # noqa: BLE001 - InvalidProtobuf, Fail, ...: whatever a damaged graph raises
                raise PackageError(f"stage {k} ({self.root / stage['onnx']}) is not a loadable ONNX graph "
                                   f"({type(err).__name__}: {err}): the file is damaged; "
                                   "export the package again") from None
            names = {i.name for i in session.get_inputs()}
            if names != set(stage["inputs"]) or not set(stage["outputs"]) <= {o.name for o in session.get_outputs()}:
                raise PackageError(f"stage {k} ({stage['onnx']}) does not have the inputs/outputs its manifest lists: "
                                   "the files come from different exports; export the package again")
            self.sessions.append(session)
            position = {name: i for i, name in enumerate(stage["outputs"])}
            # per stage: session, input names, output names, where the logits are, the state after it
            # (each tensor's position among the outputs, or None when passed on unchanged)
            self._plan.append((session, stage["inputs"], stage["outputs"], position[stage["logits"]],
                               [(name, position.get(name)) for name in stage.get("state", [])]))
        self.num_exits = int(self.manifest["num_exits"])
        self.num_classes = int(self.manifest["num_classes"])
        self.input_size = tuple(int(v) for v in self.manifest["input_size"])
        self.class_names: Optional[List[str]] = self.policy.get("class_names")

    def _predict_batch(self, x: np.ndarray) -> RuntimePrediction:
        n = x.shape[0]
        predictions = np.empty(n, dtype=np.int64)
        confidences = np.empty(n, dtype=np.float32)
        exit_index = np.empty(n, dtype=np.int64)
        active = np.arange(n)  # input positions of the samples still running
        state: Dict[str, np.ndarray] = {self.manifest["input"]: x}
        rule, memory = self.exit_rule, None  # the rule's memory of the earlier exits (patience: prediction, run)
        last = self.num_exits - 1  # its threshold is ignored: it takes every sample left
        for k, (session, inputs, outputs, logits_at, carry) in enumerate(self._plan):
            produced = session.run(outputs, {name: state[name] for name in inputs})
            logits = produced[logits_at]
            conf, pred = exit_confidence(logits)
            leave, memory = rule.leave(k, logits, conf, pred, self._params, memory)
            if k == last or leave.all():  # the last exit takes every sample left
                predictions[active], confidences[active], exit_index[active] = pred, conf, k
                break
            # the state after stage k: tensors it produced, and those it passed on unchanged
            state = {name: produced[i] if i is not None else state[name] for name, i in carry}
            if leave.any():
                idx = active[leave]
                predictions[idx], confidences[idx], exit_index[idx] = pred[leave], conf[leave], k
                keep = np.flatnonzero(~leave)
                state = select_rows(state, keep)  # drop the samples that left
                active = active[keep]
                memory = rule.keep(memory, keep)
        return RuntimePrediction(predictions, confidences, exit_index)

    def stage_latency(self, batch_sizes: Sequence[int] = (1, 8, 64), repeats: int = 10, warmup: int = 3,
                      clock: str = "wall", rounds: int = 3) -> Dict[str, Any]:
        """Time every stage of this package with onnxruntime at each batch size: the latency table
        (:mod:`timm_l2w_runtime.latency`) that ``timm-l2w eval --latency-table`` and
        ``EarlyExitPredictor.from_latency_budget`` choose a policy with.

        The timed calls are this runtime's own :meth:`predict` on random images, with the policy's exit rule
        deciding at every exit but nobody leaving (every stage sees the whole batch), or everybody at one
        exit (:func:`timm_l2w_runtime.latency.measure_stages`); per stage and batch size the slowest of
        ``rounds`` rounds' medians of ``repeats`` calls. ``clock``: ``'wall'`` or ``'process'`` (CPU
        time of this process: steadier on a shared machine with one thread).
        """
        sizes = check_timing_settings(repeats, warmup, clock, batch_sizes, rounds)
        stage_clock = StageClock(CLOCKS[clock])
        rng = np.random.default_rng(0)
        plan, rule = self._plan, self.exit_rule
        self._plan = [(_TimedSession(session, stage_clock, k), *rest) for k, (session, *rest) in enumerate(plan)]
        self.exit_rule = timing_rule = TimingRule(rule)
        try:
            timings = measure_stages(self.predict,
                                     lambda b: rng.standard_normal((b, *self.input_size), dtype=np.float32),
                                     stage_clock, timing_rule, sizes, self.num_exits, repeats, warmup, rounds)
        finally:
            self._plan, self.exit_rule = plan, rule
        ort = _onnxruntime()
        device = {"name": processor_name(), "provider": self.sessions[0].get_providers()[0],
                  "threads": self.threads if self.threads is not None else "default", "onnxruntime": ort.__version__}
        return latency_table("onnxruntime", device, self.manifest.get("model"), self.num_exits, self.input_size,
                             self.exit_rule.name, timings, repeats, warmup, clock)

    def check_input(self, x: Any) -> np.ndarray:
        """``x`` as a C-contiguous float32 ``[N, C, H, W]`` batch of this package's input size (else a ValueError)."""
        x = np.asarray(x)
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_size or x.shape[0] == 0:
            raise ValueError(f"expected a non-empty image batch [N, {', '.join(map(str, self.input_size))}], got shape "
                             f"{tuple(x.shape)}: prepare images with EarlyExitRuntime.preprocess")
        if not np.issubdtype(x.dtype, np.floating) or not np.isfinite(x).all():
            raise ValueError(f"expected finite floating point images, got dtype {x.dtype}")
        return np.ascontiguousarray(x, dtype=np.float32)

    def predict(self, x: Any, batch_size: Optional[int] = None) -> RuntimePrediction:
        """Early-exit predictions for the normalised batch ``x`` ``[N, C, H, W]`` (in chunks of ``batch_size``)."""
        x = self.check_input(x)
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer))
                                       or batch_size < 1):
            raise ValueError(f"batch_size must be an integer >= 1 (images per chunk), got {batch_size!r}")
        if batch_size is None or batch_size >= len(x):
            return self._predict_batch(x)
        return concatenate([self._predict_batch(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])

    __call__ = predict

    def _preprocessing(self) -> Mapping[str, Any]:
        """The policy's ``preprocess`` entry, checked against the package."""
        pre = self.policy.get("preprocess")
        if pre is None:
            raise PackageError("the policy has no 'preprocess' entry, so image files cannot be prepared: pass "
                               "normalised arrays to predict(), or export with a policy that records it")
        if tuple(pre["input_size"]) != self.input_size:
            raise PackageError(f"the policy prepares {pre['input_size']} images but the package takes "
                               f"{list(self.input_size)}: use a policy calibrated at the package's input size")
        return pre

    def preprocess(self, paths: Sequence[PathLike]) -> np.ndarray:
        """Image files to the normalised ``[N, C, H, W]`` batch the model expects (the policy's ``preprocess``)."""
        return preprocess_files(list(paths), self._preprocessing())

    def predict_files(self, paths: Sequence[PathLike], batch_size: int = 64) -> Tuple[List[Path], RuntimePrediction]:
        """Image files (folders are searched for images) to ``(files, predictions)``.

        ``batch_size`` images at a time; the first file that cannot be read raises (:meth:`predict_each_file`
        predicts the others and reports it).
        """
        files = find_images(paths)
        parts = [self.predict(self.preprocess(files[i:i + batch_size])) for i in range(0, len(files), batch_size)]
        return files, concatenate(parts)

    def predict_each_file(self, paths: Sequence[PathLike], batch_size: int = 64) -> FilePredictions:
        """Image files (folders are searched for images) to predictions of every file that can be read, and
        the reason for each that cannot (a missing path, a folder without images, a damaged file): one bad
        file does not stop the others. ``batch_size`` files at a time."""
        pre = self._preprocessing()
        files: List[Path] = []
        errors: Dict[int, str] = {}
        for item in paths:
            try:
                files += find_images([item])
            except (ValueError, OSError) as err:
                errors[len(files)] = str(err)
                files.append(Path(item))
        todo = [i for i in range(len(files)) if i not in errors]
        read: List[int] = []
        parts: List[RuntimePrediction] = []
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            ok, x, failed = preprocess_each([files[i] for i in chunk], pre)
            errors.update({chunk[j]: message for j, message in failed.items()})
            if ok:
                read += [chunk[j] for j in ok]
                parts.append(self.predict(x))
        return FilePredictions(files, concatenate(parts), read, dict(sorted(errors.items())))

    def label(self, prediction: int) -> str:
        """The class name of ``prediction`` (its number when the policy has no class names)."""
        return self.class_names[prediction] if self.class_names else str(prediction)

    def expected_flops(self, result: RuntimePrediction) -> Optional[float]:
        """Mean FLOPs per image of ``result`` (the policy's per-exit FLOPs), or ``None`` when not recorded."""
        flops = self.policy.get("flops")
        return None if flops is None else float(np.mean(np.asarray(flops)[result.exit_index]))
