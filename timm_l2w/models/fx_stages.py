"""A timm backbone's ``forward_features`` cut into stages at its feature points (torch.fx).

The backbone is traced with timm's FX rules (its leaf modules and autowrapped functions, the same
tracer settings as timm's ``create_feature_extractor``), once in train mode and once in eval mode.
Each chosen feature point is the output of a ``feature_info`` module in that graph. The nodes are
split by their position in the graph: stage ``k`` holds the nodes after cut ``k - 1`` up to cut ``k``
(the last stage may run on to the end of ``forward_features``), so the stages run every op of the
backbone exactly once, in the backbone's own order (in-place ops stay correct), and together they
compute ``forward_features`` bit for bit.

The state between stages is the values that cross the cut. Values that do not depend on the input
(parameters, buffers, embeddings computed from them) are not carried: each stage that reads one
recomputes it from the live module. Values that depend on the input but not on the batch (a grid
size, a mask computed from the image size) travel wrapped in :class:`Shared`, which
:func:`~timm_l2w.models.base.select_samples` leaves alone; batch-size integers (``x.shape[0]``) are re-read from
the batch at each stage; a ``[B * m, ...]`` value (TNT's pixel tokens, windows) travels as
``[B, m, ...]``. Which is which is found by running the graph on fake tensors (``FakeTensorMode``:
shapes only, no compute; a real run where an op has no fake kernel) with two batch sizes.

Each stage is Python code generated from its sub-graph (``Graph.python_code``) and called with the
backbone as ``self`` at run time, so every module, parameter and buffer is looked up on the module
tree the call goes through: the stages hold no modules or tensors of their own, ``state_dict`` keys
stay timm's, and re-bound parameters (``torch.func.functional_call``, the ``higher`` monkeypatch,
accelerate's wrappers) are what the stages use. This is why the split is done here rather than with
``torch.fx.passes.split_module``: its sub-GraphModules copy the modules they call into a new module
tree of their own (new names, new parents), so functional re-binding by the wrapper's parameter names
would not reach them. ``higher`` sets a patched module's own parameters only when that module's
``forward`` runs, which the stages skip for the backbone's containers: the runner leaves a hook that
:func:`refresh_rebound_parameters` calls before each stage.
"""
from __future__ import annotations

import inspect
import linecache
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, fx, nn
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map, tree_unflatten

from ..errors import SplitError

__all__ = ["BackboneStages", "Shared"]


class Shared:
    """A value every sample shares (no batch dimension): carried between stages as it is."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value

    def __repr__(self) -> str:
        return f"Shared({type(self.value).__name__})"


class TensorSpec:
    """Shape (batch dropped) and dtype of a traced tensor value."""

    __slots__ = ("shape", "dtype")

    def __init__(self, t: Tensor):
        self.shape, self.dtype = tuple(t.shape[1:]), t.dtype

    def __repr__(self) -> str:
        return f"TensorSpec({self.shape}, {self.dtype})"


class _BatchSized:
    """A Python value that holds the batch size (e.g. ``x.shape[:2]``): rebuilt from the batch at each stage."""

    __slots__ = ("spec", "leaves", "batch_slots")

    def __init__(self, value: Any, batch_slots: Sequence[int]):
        self.leaves, self.spec = tree_flatten(value)
        self.batch_slots = tuple(batch_slots)

    def rebuild(self, batch: int) -> Any:
        leaves = list(self.leaves)
        for i in self.batch_slots:
            leaves[i] = batch
        return tree_unflatten(leaves, self.spec)


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


def _reason(err: BaseException) -> str:
    """``Type: first line of the message`` (at most 300 characters)."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300]}" if text else type(err).__name__


def _where(err: BaseException) -> str:
    """`` at file.py:line (code)``: the innermost frame of the model's own code (not torch's)."""
    import traceback

    frames = [f for f in traceback.extract_tb(err.__traceback__)
              if f"{os.sep}torch{os.sep}" not in f.filename and f"{os.sep}torchvision{os.sep}" not in f.filename
              and not f.filename.endswith("fx_stages.py")]
    if not frames:
        return ""
    f = frames[-1]
    return f" at {os.path.basename(f.filename)}:{f.lineno}: {(f.line or '').strip()[:120]}"


def _input_independent(graph: fx.Graph) -> set:
    """Nodes no placeholder feeds (parameters, buffers and what is computed from them alone)."""
    dependent: set = set()
    for n in graph.nodes:
        if n.op == "placeholder" or any(a in dependent for a in n.all_input_nodes):
            dependent.add(n)
    return {n for n in graph.nodes if n not in dependent and n.op != "output"}


def _compile(graph: fx.Graph, name: str) -> Callable[..., Any]:
    """Python code of ``graph`` as a function ``forward(self, *inputs)``."""
    code = graph.python_code(root_module="self")
    key = f"<timm_l2w stage {name} {id(graph):x}>"
    linecache.cache[key] = (len(code.src), None, code.src.splitlines(True), key)  # readable tracebacks
    namespace = dict(code.globals)
    exec(compile(code.src, key, "exec", dont_inherit=True), namespace)  # noqa: S102 - code generated by torch.fx
    return namespace["forward"]


# how a value crossing a cut travels: as it is (batched tensors), wrapped (shared), or rebuilt (batch-sized)
_BATCHED, _SHARED, _BATCH_SIZED, _GROUPED = "batched", "shared", "batch_sized", "grouped"


def _crossing_kind(v2: Any, v3: Any) -> Tuple[str, Any]:
    """How a value that is ``v2`` for a batch of 2 and ``v3`` for a batch of 3 crosses a cut."""
    l2, s2 = tree_flatten(v2)
    l3, s3 = tree_flatten(v3)
    if s2 != s3 or len(l2) != len(l3):
        return "unsupported", None
    tensors = [isinstance(a, Tensor) for a in l2]
    if all(tensors):
        if all(a.ndim > 0 and a.shape[0] == 2 and b.shape[0] == 3 and a.shape[1:] == b.shape[1:]
               for a, b in zip(l2, l3)):
            return _BATCHED, None
        if all(a.shape == b.shape for a, b in zip(l2, l3)):
            return _SHARED, None
        if len(l2) == 1 and l2[0].ndim > 0 and l2[0].shape[0] % 2 == 0 and l2[0].shape[1:] == l3[0].shape[1:] \
                and l2[0].shape[0] // 2 * 3 == l3[0].shape[0]:
            return _GROUPED, l2[0].shape[0] // 2  # [B * m, ...] (TNT's pixel tokens): carried as [B, m, ...]
        return "unsupported", None
    if any(tensors):
        return "unsupported", None
    slots = [i for i, (a, b) in enumerate(zip(l2, l3)) if a != b]
    if not slots:
        return _SHARED, None
    if all(l2[i] == 2 and l3[i] == 3 for i in slots):
        return _BATCH_SIZED, slots
    return "unsupported", None


def _pack(kind: str, extra: Any, value: Any) -> Any:
    """A value as it travels in the state (see :func:`_crossing_kind`)."""
    if kind == _SHARED:
        return Shared(value)
    if kind == _BATCH_SIZED:
        return _BatchSized(value, extra)
    if kind == _GROUPED:
        return value.reshape(-1, extra, *value.shape[1:])
    return value


def _unpack(kind: str, value: Any, batch_size: int) -> Any:
    """What the stage code reads for a state entry (the batch may have shrunk since it was packed)."""
    if kind == _SHARED:
        return value.value
    if kind == _BATCH_SIZED:
        return value.rebuild(batch_size)
    if kind == _GROUPED:
        return value.flatten(0, 1)
    return value


@dataclass
class _Stage:
    fn: Callable[..., Any]
    in_kinds: List[Tuple[str, Any]]  # one per state entry it reads
    out_kinds: List[Tuple[str, Any]]  # one per state entry it leaves
    feature: int  # position of the exit's features in the state it leaves
    source: str


class _ModePlan:
    """The stages of one graph (train or eval mode)."""

    def __init__(self, graph: fx.Graph, cuts: Sequence[fx.Node], through_end: bool,
                 values2: Dict[fx.Node, Any], values3: Dict[fx.Node, Any], describe: Callable[[fx.Node], str]):
        nodes = list(graph.nodes)
        position = {n: i for i, n in enumerate(nodes)}
        output = next(n for n in reversed(nodes) if n.op == "output")
        cut_pos = [position[c] for c in cuts]
        if any(b <= a for a, b in zip(cut_pos, cut_pos[1:])):
            raise SplitError("the chosen feature points do not run one after another in forward_features: choose "
                             "exit_indices in the order the model computes them (one entry per module where "
                             "feature_info lists a module once per branch)")
        constant = _input_independent(graph)
        last = len(cuts) - 1
        end_pos = position[output] if through_end else cut_pos[-1]

        def stage_of(n: fx.Node) -> Optional[int]:
            p = position[n]
            if n.op == "placeholder":
                return -1
            if p > end_pos or n in constant:
                return None
            for k, cp in enumerate(cut_pos):
                if p <= cp:
                    return k
            return last

        stage = {n: stage_of(n) for n in nodes}
        if through_end:
            stage[output] = last
        members: List[List[fx.Node]] = [[] for _ in cuts]
        for n in nodes:
            if stage[n] is not None and stage[n] >= 0 and n.op != "output":
                members[stage[n]].append(n)
        # values made at stage <= k that a later stage reads (the output counts as the last stage's reader)
        crossing: List[List[fx.Node]] = []
        for k in range(len(cuts)):
            carried = [n for n in nodes if stage[n] is not None and stage[n] <= k
                       and any(stage.get(u) is not None and stage[u] > k for u in n.users)]
            crossing.append(carried)
        self.stages: List[_Stage] = []
        for k in range(len(cuts)):
            inputs = [n for n in nodes if n.op == "placeholder"] if k == 0 else crossing[k - 1]
            if k == last and through_end:
                outs: List[Any] = [output.args[0]]
                feature = 0
            else:
                outs = list(crossing[k]) if k < last else []
                if cuts[k] not in outs:
                    outs.append(cuts[k])
                feature = outs.index(cuts[k])
            in_kinds = [self._kind(n, values2, values3, describe) for n in inputs]
            out_kinds = [self._kind(n, values2, values3, describe) if isinstance(n, fx.Node) else (_BATCHED, None)
                         for n in outs]
            if k == last and through_end:
                out_kinds = [(_BATCHED, None)]
            g = self._stage_graph(inputs, members[k], outs, constant)
            self.stages.append(_Stage(_compile(g, str(k)), in_kinds, out_kinds, feature, g.python_code("self").src))

    @staticmethod
    def _kind(n: fx.Node, values2: Dict[fx.Node, Any], values3: Dict[fx.Node, Any],
              describe: Callable[[fx.Node], str]) -> Tuple[str, Any]:
        kind = _crossing_kind(values2[n], values3[n])
        if kind[0] == "unsupported":
            raise SplitError(f"the value of {describe(n)} crosses a stage boundary, and its batch dimension is "
                             "not its first one (samples cannot be dropped from it between stages)")
        return kind

    @staticmethod
    def _stage_graph(inputs: Sequence[fx.Node], members: Sequence[fx.Node], outs: Sequence[Any],
                     constant: set) -> fx.Graph:
        g = fx.Graph()
        env: Dict[fx.Node, fx.Node] = {}
        for i, n in enumerate(inputs):
            env[n] = g.placeholder(f"state_{i}")

        def get(n: fx.Node) -> fx.Node:
            if n not in env:
                if n not in constant:
                    raise SplitError(f"internal: {n.name} is needed before it is computed")
                env[n] = g.node_copy(n, get)  # parameters and what depends on them alone: recomputed here
            return env[n]

        for n in members:
            env[n] = g.node_copy(n, get)
        g.output(tuple(fx.node.map_arg(o, get) for o in outs))
        return g


def _resolve_point(backbone: nn.Module, module_outputs: Dict[str, Any], name: str) -> str:
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


REBOUND_HOOK = "_refresh_rebound_parameters"


def refresh_rebound_parameters(module: nn.Module) -> None:
    """Before a stage runs on ``module``: a parameter-rebinding runner that sets a module's parameters only
    when that module's ``forward`` runs (the ``'higher'`` meta backend's monkeypatch,
    :mod:`timm_l2w.meta.backends`) leaves a function under :data:`REBOUND_HOOK` in the patched modules'
    ``__dict__``, which is called with ``module`` to set its whole subtree's parameters. No-op otherwise."""
    hook = module.__dict__.get(REBOUND_HOOK)
    if hook is not None:
        hook(module)


class BackboneStages:
    """``backbone.forward_features`` as stages ending at ``points`` (see the module docstring).

    Args:
        backbone: the timm model (its ``forward_features`` is traced in both modes).
        points: ``feature_info`` entries (``module``, ``num_chs``, ``reduction``), in forward order; stage
            ``k`` ends at the output of ``points[k]['module']`` (the tensor that fits the entry's width and
            reduction when the module returns several).
        through_end: the last stage runs on to the end of ``forward_features`` (its output is the state).
        example_input: a batch of 1 at the size the shapes are recorded at (fake tensors: not computed).
    """

    def __init__(self, backbone: nn.Module, points: Sequence[Dict[str, Any]], through_end: bool,
                 example_input: Tensor):
        self.points = [dict(p) for p in points]
        self.through_end = through_end
        self.plans: Dict[bool, _ModePlan] = {}
        self.feature_shapes: List[Tuple[int, ...]] = []
        for training in (False, True):
            try:
                graph, module_outputs = trace_forward_features(backbone, training)
            except SplitError:
                raise
            except Exception as err:  # noqa: BLE001 - FX fails in many ways; the reason is in the message
                raise SplitError(f"torch.fx cannot trace its forward_features ({_reason(err)}{_where(err)})") from None
            values2, values3 = (self._record(backbone, graph, example_input, b) for b in (2, 3))
            cuts = [self._cut_node(backbone, module_outputs, p, values2, example_input.shape[-2:]) for p in self.points]
            if not training:
                self.feature_shapes = [tuple(values2[c].shape[1:]) for c in cuts]
                out = next(n for n in reversed(graph.nodes) if n.op == "output").args[0]
                out_value = fx.node.map_arg(out, lambda n, values=values2: values[n])
                self.output_value = tree_map(lambda t: TensorSpec(t) if isinstance(t, Tensor) else t, out_value)
            self.plans[training] = _ModePlan(graph, cuts, through_end, values2, values3, self._describe)

    def __deepcopy__(self, memo: Dict[int, Any]) -> "BackboneStages":
        return self  # holds no modules or tensors: the stages run on the module tree they are given

    @staticmethod
    def _record(backbone: nn.Module, graph: fx.Graph, example: Tensor, batch: int) -> Dict[fx.Node, Any]:
        x = example.expand(batch, *example.shape[1:]).contiguous()
        try:
            return record_values(backbone, graph, x)
        except Exception:  # noqa: BLE001 - data-dependent ops (torch.equal, nonzero) have no fake kernel
            try:
                return record_values(backbone, graph, x, fake=False)
            except Exception as err:  # noqa: BLE001
                raise SplitError(f"its traced forward_features does not run on a {tuple(x.shape)} batch "
                                 f"({_reason(err)})") from None

    @staticmethod
    def _describe(n: fx.Node) -> str:
        return f"node '{n.name}' ({n.op} {n.target})"

    @staticmethod
    def _cut_node(backbone: nn.Module, module_outputs: Dict[str, Any], point: Dict[str, Any],
                  values: Dict[fx.Node, Any], image_hw: Sequence[int]) -> fx.Node:
        name = point["module"]
        path = _resolve_point(backbone, module_outputs, name)
        proxies = [p for p in tree_leaves(module_outputs[path]) if isinstance(p, fx.Proxy)]
        tensors = [p.node for p in proxies if isinstance(values.get(p.node), Tensor) and values[p.node].ndim >= 3]
        if not tensors:
            raise SplitError(f"module '{name}' (a feature_info point) returns no feature map or tokens")
        side = -(-int(image_hw[0]) // int(point.get("reduction") or 1))

        def fit(n: fx.Node) -> Tuple[bool, int]:  # several outputs (HRNet branches, CoaT scales): match the entry
            shape = tuple(values[n].shape[1:])
            grid = int(round((shape[0] - 1) ** 0.5)) if len(shape) == 2 and shape[0] > 1 else None
            sides = {shape[0], shape[1], shape[2]} if len(shape) == 3 else {grid, int(round(shape[0] ** 0.5))}
            return values[n].shape[0] == 2, int(point.get("num_chs") in (shape[0], shape[-1])) + int(side in sides)

        return max(tensors, key=fit) if len(tensors) > 1 else tensors[0]

    @property
    def num_stages(self) -> int:
        return len(self.points)

    def stage_source(self, index: int, training: bool = False) -> str:
        """The generated code of stage ``index`` (for reading and debugging)."""
        return self.plans[training].stages[index].source

    def run(self, backbone: nn.Module, index: int, state: Any) -> Tuple[Any, ...]:
        """Stage ``index`` on ``state`` (the image for stage 0), with ``backbone`` as the module tree."""
        stage = self.plans[bool(backbone.training)].stages[index]
        inputs = (state,) if index == 0 else tuple(state)
        batch = next(t for (kind, _), t in zip(stage.in_kinds, inputs) if kind in (_BATCHED, _GROUPED))
        batch_size = tree_leaves(batch)[0].shape[0]
        args = [_unpack(kind, v, batch_size) for (kind, _), v in zip(stage.in_kinds, inputs)]
        refresh_rebound_parameters(backbone)  # e.g. the 'higher' meta backend's fast weights, on every module
        outs = stage.fn(backbone, *args)
        return tuple(_pack(kind, extra, v) for (kind, extra), v in zip(stage.out_kinds, outs))

    def feature(self, index: int, state: Tuple[Any, ...], training: bool = False) -> Any:
        """The features exit ``index`` reads from the state stage ``index`` left."""
        return state[self.plans[training].stages[index].feature]
