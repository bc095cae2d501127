"""Tracing a timm backbone's ``forward_features`` for :mod:`timm_l2w.models.fx_stages`.

timm's FX rules (its leaf modules and autowrapped functions, the tracer settings of timm's
``create_feature_extractor``) give the graph and what every module call returned; the graph is run once
per batch size to record every node's value (on fake tensors: shapes only, no compute), and a
``feature_info`` module name is resolved to the module call it stands for.
"""
from __future__ import annotations

import inspect
import os
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor, fx, nn
from torch.utils._pytree import tree_leaves

from ..errors import SplitError

__all__ = ["trace_forward_features", "fake_tensors", "record_values", "resolve_point", "error_reason",
           "error_location"]


def _tracer_kwargs() -> Dict[str, Any]:
    from timm.layers import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import _set_default_tracer_kwargs

    return _set_default_tracer_kwargs({"leaf_modules": get_notrace_modules(),
                                       "autowrap_functions": get_notrace_functions()})


def _module_output_tracer():
    from torchvision.models.feature_extraction import NodePathTracer

    class ModuleOutputTracer(NodePathTracer):
        """timm's FX tracer that also records what every module call returned (proxies)."""

        def __init__(self, **kwargs: Any):
            super().__init__(**kwargs)
            self.module_outputs: Dict[str, Any] = {}

        def call_module(self, m: nn.Module, forward: Callable, args: Any, kwargs: Any) -> Any:
            out = super().call_module(m, forward, args, kwargs)
            path = self.path_of_module(m)
            self.module_outputs.pop(path, None)  # the last call counts (and comes last in the order)
            self.module_outputs[path] = out
            return out

    return ModuleOutputTracer(**_tracer_kwargs())


def trace_forward_features(backbone: nn.Module, training: bool) -> Tuple[fx.Graph, Dict[str, Any]]:
    """``backbone.forward_features`` as an FX graph (``self`` = the backbone) and each module's traced output.

    The backbone is traced as a subclass whose ``forward`` is its ``forward_features``, so FX patches the
    functions timm marks as leaves in the backbone's own module (as when timm traces ``forward``).
    """
    cls = type(backbone)
    traced_cls = type(cls.__name__, (cls,), {"forward": cls.forward_features, "__module__": cls.__module__})
    # optional arguments (hiera's mask, return_intermediates...) keep their defaults
    params = list(inspect.signature(cls.forward_features).parameters.values())[2:]
    concrete = {p.name: p.default for p in params
                if p.default is not inspect.Parameter.empty and p.kind is p.POSITIONAL_OR_KEYWORD}
    was_training = backbone.training
    tracer = _module_output_tracer()
    backbone.train(training)
    backbone.__class__ = traced_cls
    try:
        graph = tracer.trace(backbone, concrete_args=concrete or None)
    finally:
        backbone.__class__ = cls
        backbone.train(was_training)
    _drop_specialised_arguments(graph)
    _register_traced_constants(backbone, graph)
    return graph, tracer.module_outputs


def _drop_specialised_arguments(graph: fx.Graph) -> None:
    """Remove the placeholders of arguments traced at their defaults, with the checks FX added for them."""
    extra = [n for n in graph.nodes if n.op == "placeholder"][1:]
    doomed: List[fx.Node] = []
    seen: set = set()
    stack = list(extra)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            doomed.append(n)
            stack.extend(n.users)
    if any(n.op == "output" for n in doomed):
        raise SplitError("forward_features uses its optional arguments in what it returns")
    order = {n: i for i, n in enumerate(graph.nodes)}
    for n in sorted(doomed, key=order.get, reverse=True):
        graph.erase_node(n)


def _register_traced_constants(backbone: nn.Module, graph: fx.Graph) -> None:
    """Tensors FX stored on the backbone while tracing (``_tensor_constant0``...) become non-persistent
    buffers, so they follow ``.to(device)`` and stay out of the state_dict."""
    for node in graph.nodes:
        if node.op == "get_attr" and "." not in node.target and node.target.startswith("_tensor_constant"):
            value = backbone.__dict__.get(node.target)
            if isinstance(value, Tensor):
                delattr(backbone, node.target)
                backbone.register_buffer(node.target, value, persistent=False)


class _Recorder(fx.Interpreter):
    """Runs a graph and keeps every node's value."""

    def __init__(self, module: nn.Module, graph: fx.Graph):
        super().__init__(module, graph=graph)
        self.values: Dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        self.values[n] = value
        return value


@contextmanager
def fake_tensors(module: nn.Module) -> Iterator[Any]:
    """``FakeTensorMode`` (shapes, no compute) around a run of ``module``, which keeps no fake tensor after:
    attributes and buffers a forward caches (ConViT's relative indices, rotary tables) are put back."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    saved = [(m, dict(vars(m)), dict(m._buffers)) for m in module.modules()]
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            yield mode
    finally:
        for m, attrs, buffers in saved:
            for key, value in list(vars(m).items()):
                if any(isinstance(t, FakeTensor) for t in tree_leaves(value)):
                    if key in attrs:
                        object.__setattr__(m, key, attrs[key])
                    else:
                        delattr(m, key)
            for key, value in list(m._buffers.items()):
                if isinstance(value, FakeTensor):
                    m._buffers[key] = buffers.get(key)


def record_values(backbone: nn.Module, graph: fx.Graph, x: Tensor, fake: bool = True) -> Dict[fx.Node, Any]:
    """Every node's value for input ``x``: on fake tensors (shapes only) when ``fake``, else computed."""
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            if not fake:
                recorder = _Recorder(backbone, graph)
                recorder.run(x)
                return recorder.values
            with fake_tensors(backbone) as mode:
                recorder = _Recorder(backbone, graph)
                recorder.run(mode.from_tensor(x))
                return recorder.values
    finally:
        backbone.train(was_training)


def error_reason(err: BaseException) -> str:
    """``Type: first line of the message`` (at most 300 characters)."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300]}" if text else type(err).__name__


def error_location(err: BaseException) -> str:
    """`` at file.py:line (code)``: the innermost frame of the model's own code (not torch's)."""
    import traceback

    frames = [f for f in traceback.extract_tb(err.__traceback__)
              if f"{os.sep}torch{os.sep}" not in f.filename and f"{os.sep}torchvision{os.sep}" not in f.filename
              and not f.filename.endswith(("fx_stages.py", "fx_trace.py"))]
    if not frames:
        return ""
    f = frames[-1]
    return f" at {os.path.basename(f.filename)}:{f.lineno}: {(f.line or '').strip()[:120]}"


def resolve_point(backbone: nn.Module, module_outputs: Dict[str, Any], name: str) -> str:
    """The traced module call a ``feature_info`` module name stands for.

    The module itself when ``forward_features`` calls it; for a container the model loops over (a
    ``ModuleList``), the last of its modules that ran. A few timm models name points that do not exist
    under that name: ``block.2`` where the model has a ``stages`` list of as many entries as
    ``feature_info`` (MViTv2), ``stage1`` for ``layer1`` (HRNet).
    """
    def ran(path: str) -> Optional[str]:
        if path in module_outputs:
            return path
        inside = [p for p in module_outputs if p.startswith(path + ".")]
        return inside[-1] if inside else None

    candidates = [name]
    head, _, rest = name.partition(".")
    if rest and not hasattr(backbone, head):
        n_points = len(getattr(backbone, "feature_info", []))
        lists = [child for child, m in backbone.named_children()
                 if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) == n_points]
        lists.sort(key=lambda child: (-len(os.path.commonprefix([child, head])), child != "stages"))
        candidates += [f"{child}.{rest}" for child in lists]  # 'block.2' -> 'blocks.2' (Twins), 'stages.2' (MViTv2)
    for a, b in (("stage", "layer"), ("layer", "stage")):
        if name.startswith(a) and name[len(a):].isdigit():
            candidates.append(b + name[len(a):])
    for candidate in candidates:
        path = ran(candidate)
        if path is not None:
            return path
    raise SplitError(f"feature_info names module '{name}', which forward_features does not run")
