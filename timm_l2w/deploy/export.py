"""Export a multi-exit model as an early-exit package: one ONNX graph (and, on request, one torch.export
program) per stage.

Only the multi-exit contract is used (``num_exits`` and ``forward_stage(k, state)``, the state being
any pytree of tensors whose first dimension is the batch), so every timm_l2w model and any
``MultiExitModel`` exports the same way. For stage ``k`` the state it receives is flattened with
torch's pytree (leaf order) into tensors; the stage graph takes those tensors and returns the
tensors of its new state that it computed, then exit ``k``'s logits. A state tensor a stage passes
on unchanged (RANet's image pyramid) is not a graph output: the manifest names it as the same
tensor, and the runtime keeps it. The batch size is dynamic in every graph.

``DIR`` (see docs/deploy.md): ``manifest.json`` (tensor names, shapes and order per stage, the digest of
the exported weights and the checkpoint they came from), ``policy.json`` (the exit policy), ``stage_K.onnx``
and, with ``pt2=True``, ``stage_K.pt2``. A policy calibrated on other weights (its ``weights_sha256``) is
refused. The export runs the ONNX graphs with onnxruntime on a random batch of another size and compares
every exit's logits with PyTorch before writing the manifest.

The command line is ``timm-l2w export CHECKPOINT --policy POLICY.json --output DIR`` (:mod:`timm_l2w.cli.export`).
"""
from __future__ import annotations

import io
import sys
import time
import warnings
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.utils._pytree import keystr, tree_flatten, tree_flatten_with_path, tree_unflatten

from timm_l2w_runtime.policy import WEIGHTS_KEY, check_policy, check_policy_fits, check_policy_weights, write_policy
from timm_l2w_runtime.runtime import MANIFEST_FILE, MANIFEST_FORMAT, MANIFEST_VERSION, POLICY_FILE

from ..files import weights_digest, write_json_atomic
from ..models.base import unwrap_model
from ..preprocessing import model_name
from ..version import __version__

__all__ = ["export_package"]

IMAGE_INPUT = "image"
EXAMPLE_BATCH = 2  # export traces with this batch size (dynamic: any size works afterwards)
VERIFY_BATCH = 3  # and checks the graphs at another size


class _Stage(nn.Module):
    """Stage ``index`` of ``model`` as a function of the state's tensors: ``(*new_state_tensors, logits)``."""

    def __init__(self, model: nn.Module, index: int, spec: Any, constants: Dict[int, Any], sources: Dict[int, int],
                 new_positions: Optional[List[int]]):
        super().__init__()
        self.model, self.index, self.spec = model, index, spec
        # leaf i of the state is tensors[sources[i]] (a tensor may fill several leaves) or constants[i]
        self.constants, self.sources, self.new_positions = constants, sources, new_positions

    def forward(self, *tensors: Tensor) -> Tuple[Tensor, ...]:
        leaves = [tensors[self.sources[i]] if i in self.sources else self.constants[i]
                  for i in range(self.spec.num_leaves)]
        state, logits = self.model.forward_stage(self.index, tree_unflatten(leaves, self.spec))
        if self.new_positions is None:  # last stage: the exit's logits only
            return (logits,)
        out = tree_flatten(state)[0]
        return (*[out[i] for i in self.new_positions], logits)


def _require_onnx() -> None:
    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if not _importable(m)]
    if missing:
        raise ImportError(f"exporting needs {', '.join(missing)}: pip install timm_l2w[deploy] (onnx, onnxscript; "
                          "onnxruntime comes with the runtime: pip install ./runtime from the clone)")


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


@contextmanager
def _export_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode, gradient equilibrium off (it only rescales gradients), both restored afterwards."""
    was_training, equilibrium = model.training, getattr(model, "gradient_equilibrium", False)
    model.eval()
    if equilibrium:
        model.gradient_equilibrium = False
    try:
        yield
    finally:
        model.train(was_training)
        if equilibrium:
            model.gradient_equilibrium = True


@contextmanager
def _step(progress: bool, text: str) -> Iterator[None]:
    """With ``progress``: ``TEXT ... 3.1 s`` on stderr around the work (``failed`` when it raises)."""
    if not progress:
        yield
        return
    print(f"{text} ...", end="", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        yield
    except BaseException:
        print(" failed", file=sys.stderr, flush=True)
        raise
    print(f" {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


def _tensor_info(t: Tensor, path: str) -> Dict[str, Any]:
    return {"shape": ["batch", *map(int, t.shape[1:])], "dtype": str(t.dtype).replace("torch.", ""), "path": path}


def _onnx_export(program: Any, path: Path, input_names: List[str], output_names: List[str]) -> List[str]:
    """Write ``program`` as ONNX (dynamo exporter, weights inside the file); return the graph's input names."""
    import onnx

    with warnings.catch_warnings(), redirect_stdout(io.StringIO()):  # the exporter's progress lines
        warnings.simplefilter("ignore")
        torch.onnx.export(program, f=str(path), input_names=input_names, output_names=output_names, dynamo=True,
                          external_data=False, verbose=False)
    graph = onnx.load(str(path), load_external_data=False).graph
    inputs = [i.name for i in graph.input]
    outputs = [o.name for o in graph.output]
    if outputs != output_names:
        raise RuntimeError(f"the ONNX exporter named the outputs of {path.name} {outputs}, expected {output_names}")
    return inputs


def _export_stage(net: nn.Module, k: int, state: Any, names: List[Optional[str]], root: Path, pt2: bool,
                  tensors: Dict[str, Dict[str, Any]]) -> Tuple[Dict[str, Any], Any, List[Optional[str]]]:
    """Export stage ``k`` given its input ``state`` (example batch) and the names of its leaves.

    Returns the manifest entry, the state after the stage and the names of its leaves.
    """
    leaves, spec = tree_flatten(state)
    constants = {i: leaf for i, leaf in enumerate(leaves) if not isinstance(leaf, Tensor)}
    inputs: List[Tensor] = []  # the state's distinct tensors, in leaf order
    input_names: List[str] = []
    sources: Dict[int, int] = {}
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, Tensor):
            if names[i] not in input_names:
                inputs.append(leaf)
                input_names.append(names[i])
            sources[i] = input_names.index(names[i])
    last = k == net.num_exits - 1
    with torch.no_grad():
        new_state, logits = net.forward_stage(k, state)
    entry: Dict[str, Any] = {"index": k, "onnx": f"stage_{k}.onnx"}
    new_positions: Optional[List[int]] = None
    out_names: List[Optional[str]] = []
    new_names: List[str] = []
    if not last:
        known = {id(t): n for t, n in zip(inputs, input_names)}
        new_positions = []
        for i, (path, leaf) in enumerate(tree_flatten_with_path(new_state)[0]):
            if not isinstance(leaf, Tensor):
                out_names.append(None)
            elif id(leaf) in known:  # passed on unchanged (or twice in the state): the same tensor
                out_names.append(known[id(leaf)])
            else:
                name = f"state{k}_{len(new_names)}"
                known[id(leaf)] = name
                new_positions.append(i)
                new_names.append(name)
                out_names.append(name)
                tensors[name] = _tensor_info(leaf, keystr(path) or "(the state is one tensor)")
        entry["state"] = list(dict.fromkeys(n for n in out_names if n is not None))  # distinct, in leaf order
    logits_name = f"logits{k}"
    tensors[logits_name] = _tensor_info(logits, f"exit {k} logits")
    stage = _Stage(net, k, spec, constants, sources, new_positions)
    batch = torch.export.Dim("batch", min=1)
    try:
        program = torch.export.export(stage, tuple(inputs), dynamic_shapes=(tuple({0: batch} for _ in inputs),),
                                      strict=False)
    except Exception as err:  # noqa: BLE001 - torch.export raises many error types
        raise RuntimeError(f"stage {k} of {type(net).__name__} could not be exported with a dynamic batch size "
                           f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}): its forward_stage "
                           "must keep the batch as the first dimension of every state tensor and not depend on it"
                           ) from err
    if pt2:
        torch.export.save(program, str(root / f"stage_{k}.pt2"))
        entry["pt2"] = f"stage_{k}.pt2"
        entry["pt2_inputs"] = list(input_names)
    graph_inputs = _onnx_export(program, root / entry["onnx"], list(input_names), new_names + [logits_name])
    entry["inputs"] = [n for n in input_names if n in graph_inputs]  # a graph drops the inputs it does not read
    entry["outputs"] = new_names + [logits_name]
    entry["logits"] = logits_name
    return entry, new_state, out_names


def _verify(net: nn.Module, root: Path, manifest: Mapping[str, Any], input_size: Sequence[int],
            tolerance: float = 1e-3) -> float:
    """Run the ONNX stages on a random batch (another size than the traced one) and compare every
    exit's logits with PyTorch; return the largest difference relative to the logits' scale."""
    import numpy as np
    import onnxruntime as ort

    x = torch.randn(VERIFY_BATCH, *input_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = net.forward_exits(x)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    state: Dict[str, Any] = {IMAGE_INPUT: x.numpy()}
    worst = 0.0
    for k, stage in enumerate(manifest["stages"]):
        session = ort.InferenceSession(str(root / stage["onnx"]), sess_options=options,
                                       providers=["CPUExecutionProvider"])
        outputs = dict(zip(stage["outputs"], session.run(stage["outputs"], {n: state[n] for n in stage["inputs"]})))
        ref = expected[k].float().numpy()
        diff = float(np.abs(outputs[stage["logits"]] - ref).max() / max(1.0, float(np.abs(ref).max())))
        if not diff <= tolerance:
            raise RuntimeError(f"the ONNX graph of stage {k} differs from PyTorch by {diff:.3g} (relative) "
                               f"on a batch of {VERIFY_BATCH}: the export is wrong; "
                               "please report it with the model name")
        worst = max(worst, diff)
        state = {n: outputs[n] if n in outputs else state[n] for n in stage.get("state", [])}
    return worst


def export_package(model: nn.Module, output: Union[str, Path], policy: Union[Mapping[str, Any], Any],
                   input_size: Optional[Sequence[int]] = None, pt2: bool = False, verify: bool = True,
                   checkpoint: Optional[Union[str, Path]] = None, progress: bool = False) -> Path:
    """Write the early-exit package of ``model`` to the folder ``output``; returns its path.

    ``policy``: an :class:`timm_l2w.EarlyExitPredictor` (saved with
    :meth:`~timm_l2w.EarlyExitPredictor.to_policy` at ``input_size``) or a policy document; its
    ``preprocess.input_size`` (C, H, W) is the exported input size (the graphs take that size only). A policy
    whose ``weights_sha256`` is not the digest of ``model``'s weights (:func:`timm_l2w.files.weights_digest`)
    is a :class:`timm_l2w_runtime.PolicyError`; one without a digest is exported with a
    :class:`timm_l2w_runtime.PolicyWarning` (it cannot be checked).
    ``pt2``: also write torch.export programs. ``verify``: compare the ONNX graphs with PyTorch (onnxruntime).
    ``checkpoint``: the weights file ``model`` was loaded from (its name is recorded in the manifest).
    ``progress``: one line per stage on stderr (``exporting stage 2/5 (ONNX) ... 3.1 s``).
    """
    _require_onnx()
    net = unwrap_model(model)
    if not hasattr(net, "forward_stage") or not hasattr(net, "num_exits"):
        raise TypeError(f"{type(net).__name__} does not follow the multi-exit contract (needs num_exits and "
                        "forward_stage): use a timm_l2w model")
    doc = check_policy(policy.to_policy(input_size) if hasattr(policy, "to_policy") else policy, "the policy")
    check_policy_fits(doc, model_name(net), int(net.num_exits), getattr(net, "num_classes", None))
    digest = weights_digest(net)
    weights = f"the weights of {Path(checkpoint).name}" if checkpoint else "the weights exported"
    check_policy_weights(doc, digest, weights=weights)
    size = (doc["preprocess"] or {}).get("input_size") or doc.get("flops_input_size")
    if not size:
        raise ValueError("the policy records no input size (preprocess.input_size or flops_input_size): save it with "
                         "EarlyExitPredictor.save, which records both")
    size = tuple(int(v) for v in size)
    if input_size is not None and tuple(int(v) for v in input_size) != size:
        raise ValueError(f"input_size {tuple(input_size)} differs from the policy's {size}: "
                         "calibrate the policy at the size you export (its FLOPs and preprocessing depend on it)")
    root = Path(output)
    root.mkdir(parents=True, exist_ok=True)
    (root / MANIFEST_FILE).unlink(missing_ok=True)  # a failed export leaves no manifest, not a stale one
    for stale in [*root.glob("stage_*.onnx"), *root.glob("stage_*.pt2")]:  # nor stages of an earlier export
        stale.unlink()
    x = torch.randn(EXAMPLE_BATCH, *size, generator=torch.Generator().manual_seed(0))
    if hasattr(net, "check_input"):
        net.check_input(x)
    tensors: Dict[str, Dict[str, Any]] = {IMAGE_INPUT: _tensor_info(x, "the image batch")}
    stages = []
    with _export_mode(net):
        state: Any = x
        names: List[Optional[str]] = [IMAGE_INPUT]
        for k in range(net.num_exits):
            with _step(progress, f"exporting stage {k + 1}/{net.num_exits} ({'ONNX + .pt2' if pt2 else 'ONNX'})"):
                entry, state, names = _export_stage(net, k, state, names, root, pt2, tensors)
            stages.append(entry)
        num_classes = int(tensors[f"logits{net.num_exits - 1}"]["shape"][1])
        manifest = {
            "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "model": model_name(net),
            "num_exits": int(net.num_exits), "num_classes": num_classes, "input_size": list(size),
            "input": IMAGE_INPUT, "policy": POLICY_FILE, "tensors": tensors, "stages": stages,
            WEIGHTS_KEY: digest, "checkpoint": Path(checkpoint).name if checkpoint else None,
            "exporter": {"torch": torch.__version__, "timm_l2w": __version__},
        }
        if verify:
            with _step(progress, f"checking the {net.num_exits} ONNX graphs against PyTorch (onnxruntime)"):
                manifest["verified_max_relative_difference"] = _verify(net, root, manifest, size)
    write_policy(root / POLICY_FILE, doc)
    write_json_atomic(root / MANIFEST_FILE, manifest)
    return root
