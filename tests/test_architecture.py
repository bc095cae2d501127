"""The layout rules of docs/architecture.md, checked on every import in the package.

Every ``import`` / ``from ... import`` in ``timm_l2w`` (at the top of a module and inside functions) is an
edge of the module graph. The graph must have no circle, and no edge may go from a lower layer to a
higher one. The torch-free runtime must import neither torch nor timm_l2w.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNTIME = "runtime/timm_l2w_runtime"  # the torch-free runtime, its own distribution (runtime/pyproject.toml)

# Lowest first; a module may import from its own layer and the layers below (docs/architecture.md).
LAYERS: List[Tuple[str, Tuple[str, ...]]] = [
    ("foundation", ("version", "errors", "validation", "files")),
    ("core", ("models", "weighting", "optim_step", "exits", "flops")),
    ("meta step", ("meta",)),
    ("edges", ("checkpoint", "state_checks", "data", "preprocessing")),
    ("evaluation", ("evaluation",)),
    ("inference", ("inference",)),
    ("accelerators", ("accel",)),
    ("training loop", ("training",)),
    ("applications", ("deploy", "study")),
    ("public API", ("",)),  # timm_l2w/__init__.py
    ("commands", ("cli",)),
]


def _module_name(path: Path, package_root: Path) -> str:
    parts = list(path.relative_to(package_root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules(package: str) -> Dict[str, Path]:
    """Every module of ``package`` (a folder under the repository root) by its dotted name."""
    root = ROOT / package
    return {_module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: Path, known: Set[str]) -> Iterator[Tuple[str, int]]:
    """(imported module, line) for every import in the file, anywhere in it; ``from P import name`` counts
    as an import of ``P.name`` when that is a module of the package, else of ``P``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, is_package, node)
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                yield (sub if sub in known else target), node.lineno


def import_graph(package: str) -> Dict[str, Dict[str, int]]:
    """module -> {imported module of the same package: first line}."""
    modules = package_modules(package)
    graph: Dict[str, Dict[str, int]] = {}
    for name, path in modules.items():
        edges: Dict[str, int] = {}
        for target, line in imports_of(name, path, set(modules)):
            while target and target not in modules:  # `import timm_l2w.meta.hook as x` style or a name
                target = target.rpartition(".")[0]
            if target and target != name and target.split(".")[0] == package:
                edges.setdefault(target, line)
        graph[name] = edges
    return graph


def circles(graph: Dict[str, Dict[str, int]]) -> List[List[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer_of(module: str) -> Optional[int]:
    rest = module.split(".", 1)[1] if "." in module else ""
    top = rest.split(".")[0]
    for i, (_, prefixes) in enumerate(LAYERS):
        if top in prefixes:
            return i
    return None


def longest_chain(graph: Dict[str, Dict[str, int]]) -> List[str]:
    """The longest import chain (the graph has no circle)."""
    memo: Dict[str, List[str]] = {}

    def chain(v: str) -> List[str]:
        if v not in memo:
            memo[v] = [v] + max((chain(w) for w in graph[v]), key=len, default=[])
        return memo[v]

    return max((chain(v) for v in graph), key=len)


GRAPH = import_graph("timm_l2w")


def test_every_module_has_a_layer():
    assert [m for m in GRAPH if layer_of(m) is None] == [], "add the new folder to LAYERS and docs/architecture.md"


def test_no_import_circles():
    assert circles(GRAPH) == []


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_go_down_the_layers(module):
    mine = layer_of(module)
    upward = [f"{module}:{line} imports {target} ({LAYERS[layer_of(target)][0]} layer, above {LAYERS[mine][0]})"
              for target, line in GRAPH[module].items() if layer_of(target) > mine]
    assert upward == []


def test_the_runtime_imports_neither_torch_nor_timm_l2w():
    bad = []
    for name, path in package_modules(RUNTIME).items():
        for target, line in imports_of(name, path, set()):
            if target.split(".")[0] in {"torch", "timm_l2w", "timm", "torchvision"}:
                bad.append(f"{name}:{line} imports {target}")
    assert bad == []


def test_the_checker_sees_circles_and_function_level_imports(tmp_path):
    """The checker itself: a circle made only by an import inside a function is found."""
    graph = {"p.a": {"p.b": 1}, "p.b": {"p.c": 3}, "p.c": {"p.a": 7}, "p.d": {"p.a": 2}}
    assert circles(graph) == [["p.a", "p.b", "p.c"]]
    source = "def f():\n    from .b import g\n    return g\n"
    (tmp_path / "a.py").write_text(source)
    assert list(imports_of("p.a", tmp_path / "a.py", {"p.b"})) == [("p.b", 2)]
    assert longest_chain({"p.a": {"p.b": 1}, "p.b": {"p.c": 1}, "p.c": {}}) == ["p.a", "p.b", "p.c"]


def test_no_module_imports_another_modules_private_names():
    """A name starting with ``_`` stays in its module: another module that needs it gets a public name."""
    found = []
    for package, folder in (("timm_l2w", "timm_l2w"), ("timm_l2w_runtime", RUNTIME)):
        for name, path in package_modules(folder).items():
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith(package)):
                    found += [f"{name}:{node.lineno} imports {a.name}" for a in node.names
                              if a.name.startswith("_") and not a.name.startswith("__")]
    assert found == []
