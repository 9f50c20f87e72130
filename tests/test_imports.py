"""The package's import layers, checked statically: every module under ``flowfm_fast/`` (and the
Triton kernels in ``kernels/``, installed as ``flowfm_fast.kernels``) is parsed with ``ast``, never
imported, and every import of a ``flowfm_fast`` module, at module level or inside a function, is an
edge of one graph. Two rules hold on that graph:

1. Nothing imports a higher layer (below). Imports within one layer are free, up to rule 2.
2. No cycle, counting function-local imports: a circle held together by imports inside functions
   is still a circle.

The layers, lowest first (a module belongs to the layer of its longest listed prefix):

0. leaves: ``nvtx`` (NVTX ranges), ``_malloc`` (the CPU allocator knob), ``plots`` (PNG figures),
   ``progress`` (progress bars of long phases).
   They import no ``flowfm_fast`` module at all, so anything may import them.
1. ops: the package root (``flowfm_fast/__init__``), ``ops``, ``kernels``, ``_backend``, ``_C``.
2. nn: the thin modules over the ops.
3. data: ``data`` and ``datasets`` (the CLI's data bundles, built only from ``data``).
4. integrate: the fixed-step solvers. They sit below models because ``FlowFM.sample`` calls them,
   and, as torchdiffeq's solvers, they need only the contract ``velocity(x, t, **cond)``.
5. models: encoder, velocity networks, FlowFM and its diffusion counterpart.
6. train, eval: both use models and data; neither imports the other.
7. applications: ``compare``, ``demo``, ``profiling`` (the work of ``flowfm-fast profile``).
8. cli.

A new module fails the check until it is placed in a layer here.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "flowfm_fast"

LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("leaves", ("flowfm_fast.nvtx", "flowfm_fast._malloc", "flowfm_fast.plots", "flowfm_fast.progress")),
    ("ops", ("flowfm_fast", "flowfm_fast.ops", "flowfm_fast.kernels", "flowfm_fast._backend", "flowfm_fast._C")),
    ("nn", ("flowfm_fast.nn",)),
    ("data", ("flowfm_fast.data", "flowfm_fast.datasets")),
    ("integrate", ("flowfm_fast.integrate",)),
    ("models", ("flowfm_fast.models",)),
    ("train / eval", ("flowfm_fast.train", "flowfm_fast.eval")),
    ("applications", ("flowfm_fast.compare", "flowfm_fast.demo", "flowfm_fast.profiling")),
    ("cli", ("flowfm_fast.cli",)),
)
LEAVES = 0   # the layer whose modules import nothing from the package
COMPILED = ("flowfm_fast._C",)   # modules with no Python source: known by name, never parsed


@dataclass(frozen=True)
class Edge:
    src: str        # importing module
    dst: str        # imported flowfm_fast module
    file: str       # the importing file, relative to the repository root
    line: int
    text: str       # the import statement as written
    local: bool     # inside a function, not at module level

    def where(self) -> str:
        scope = "function-local" if self.local else "module-level"
        return f"{self.file}:{self.line}: `{self.text}` ({scope})"


def package_sources(root: Path = ROOT) -> dict[str, tuple[str, str]]:
    """{module name: (file relative to root, source)} for flowfm_fast/ and kernels/ (as flowfm_fast.kernels)."""
    homes = [(root / PACKAGE, PACKAGE), (root / "kernels", f"{PACKAGE}.kernels")]
    out = {}
    for base, prefix in homes:
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"] if rel.name == "__init__" else list(rel.parts)
            name = ".".join([prefix, *parts])
            out[name] = (str(path.relative_to(root)), path.read_text(encoding="utf-8"))
    return out


def _is_package(file: str) -> bool:
    return Path(file).name == "__init__.py"


class _Collector(ast.NodeVisitor):
    def __init__(self, module: str, file: str, modules: set[str]):
        self.module, self.file, self.modules = module, file, modules
        self.package = module if _is_package(file) else module.rpartition(".")[0]
        self.depth = 0
        self.edges: list[Edge] = []

    def _scoped(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = _scoped   # a class body runs at import: module level

    def _add(self, node, dst: str):
        if dst == PACKAGE or dst.startswith(PACKAGE + "."):
            edge = Edge(self.module, dst, self.file, node.lineno, ast.unparse(node), self.depth > 0)
            if dst != self.module and edge not in self.edges:   # `from m import a, b`: one edge
                self.edges.append(edge)

    def visit_Import(self, node: ast.Import):
        for alias in node.names:
            self._add(node, alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom):
        if node.level:
            parts = self.package.split(".")
            if node.level - 1 >= len(parts):
                raise ValueError(f"{self.file}:{node.lineno}: relative import beyond the package")
            base = ".".join(parts[: len(parts) - (node.level - 1)])
            full = f"{base}.{node.module}" if node.module else base
        else:
            full = node.module or ""
        for alias in node.names:
            sub = f"{full}.{alias.name}"
            # `from pkg import name`: the submodule pkg.name when there is one, else pkg itself.
            self._add(node, sub if sub in self.modules else full)


def import_edges(sources: dict[str, tuple[str, str]]) -> list[Edge]:
    """Every import of a flowfm_fast module in ``sources`` ({module: (file, source)})."""
    modules = set(sources) | set(COMPILED)
    edges = []
    for module, (file, text) in sorted(sources.items()):
        c = _Collector(module, file, modules)
        c.visit(ast.parse(text, filename=file))
        edges += c.edges
    return edges


def layer_of(module: str) -> int | None:
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            hit = module == p if p == PACKAGE else (module == p or module.startswith(p + "."))
            if hit and len(p) > best_len:
                best, best_len = i, len(p)
    return best


def layer_violations(sources: dict[str, tuple[str, str]]) -> list[str]:
    """One line per module outside every layer and per import of a higher layer (or, from a
    leaf, of any flowfm_fast module)."""
    out = [f"{file}: module {m} is in no layer; place it in tests/test_imports.py's LAYERS"
           for m, (file, _) in sorted(sources.items()) if layer_of(m) is None]
    for e in import_edges(sources):
        lo, hi = layer_of(e.src), layer_of(e.dst)
        if lo is None:
            continue
        if hi is None:
            out.append(f"{e.where()} imports {e.dst}, which is in no layer")
        elif lo == LEAVES:
            out.append(f"{e.where()} imports {e.dst}: {e.src} is a leaf and imports no flowfm_fast module")
        elif hi > lo:
            out.append(f"{e.where()} imports {e.dst} (layer {LAYERS[hi][0]!r}) "
                       f"from layer {LAYERS[lo][0]!r}, below it")
    return out


def import_cycles(sources: dict[str, tuple[str, str]]) -> list[str]:
    """One report per cycle (strongly connected set of modules), each spelled out as a loop of
    import statements. Only parsed modules are nodes (the compiled _C is not)."""
    graph: dict[str, dict[str, Edge]] = {m: {} for m in sources}
    for e in import_edges(sources):
        if e.dst in graph:
            graph[e.src].setdefault(e.dst, e)

    # Tarjan's strongly connected components, iterative.
    index, low, on_stack, stack, comps, counter = {}, {}, set(), [], [], [0]
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    comps.append(sorted(comp))

    reports = []
    for comp in comps:
        members = set(comp)
        # A shortest loop from the component's first module back to itself, by breadth-first search.
        start, prev, frontier = comp[0], {}, [comp[0]]
        while frontier and start not in prev:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v]):
                    if w in members and w not in prev:
                        prev[w] = v
                        nxt.append(w)
            frontier = nxt
        loop, v = [], start
        while True:
            u = prev[v]
            loop.append(graph[u][v])
            v = u
            if v == start:
                break
        loop.reverse()
        steps = "\n".join(f"    {e.src} -> {e.dst}  at {e.where()}" for e in loop)
        reports.append(f"import cycle among {', '.join(comp)}:\n{steps}")
    return reports


# ---------------------------------------------------------------------------------------- the package
@pytest.fixture(scope="module")
def sources():
    return package_sources()


def test_the_parse_sees_the_package(sources):
    assert {"flowfm_fast", "flowfm_fast.nvtx", "flowfm_fast.cli", "flowfm_fast.models.flowfm",
            "flowfm_fast.kernels"} <= set(sources)
    # the edges the layering exists for are seen, function-local ones included
    edges = {(e.src, e.dst) for e in import_edges(sources)}
    assert ("flowfm_fast.models.dit1d", "flowfm_fast.nvtx") in edges
    assert ("flowfm_fast.models.flowfm", "flowfm_fast.integrate") in edges
    assert ("flowfm_fast.cli", "flowfm_fast.compare") in edges          # inside cmd_compare


def test_no_import_from_a_higher_layer(sources):
    bad = layer_violations(sources)
    assert not bad, "imports against the layer order (see this file's docstring):\n" + "\n".join(bad)


def test_no_import_cycle(sources):
    cycles = import_cycles(sources)
    assert not cycles, "\n".join(cycles)


def test_nvtx_is_a_leaf_of_torch_and_the_standard_library(sources):
    file, text = sources["flowfm_fast.nvtx"]
    roots = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            roots |= {a.name.partition(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{file}:{node.lineno}: relative import in the leaf"
            roots.add((node.module or "").partition(".")[0])
    assert roots - {"torch"} <= set(sys.stdlib_module_names), roots


def test_importing_nvtx_loads_no_other_flowfm_fast_module():
    """Run in a fresh interpreter. Importing ``flowfm_fast.nvtx`` runs the package's __init__ (which
    loads the ops), so the check is on what nvtx adds, and once more on nvtx.py loaded by itself,
    outside the package, where any import of flowfm_fast would show up in sys.modules."""
    code = textwrap.dedent(f"""
        import importlib.util, json, sys
        import flowfm_fast
        before = {{m for m in sys.modules if m.split(".")[0] == "flowfm_fast"}}
        import flowfm_fast.nvtx
        added = sorted({{m for m in sys.modules if m.split(".")[0] == "flowfm_fast"}} - before)
        for m in [m for m in sys.modules if m.split(".")[0] == "flowfm_fast"]:
            del sys.modules[m]
        spec = importlib.util.spec_from_file_location("nvtx_alone", {str(ROOT / PACKAGE / "nvtx.py")!r})
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        alone = sorted(m for m in sys.modules if m.split(".")[0] == "flowfm_fast")
        print(json.dumps({{"added": added, "alone": alone, "api": callable(mod.nvtx_range)}}))
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    import json
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report == {"added": ["flowfm_fast.nvtx"], "alone": [], "api": True}, report


# --------------------------------------------------------------------- the checker can fail
def _fake(files: dict[str, str]) -> dict[str, tuple[str, str]]:
    """A fake package: {path under flowfm_fast/: source} -> the checker's input."""
    out = {}
    for path, text in files.items():
        rel = Path(path).with_suffix("")
        parts = list(rel.parts[:-1]) if rel.name == "__init__" else list(rel.parts)
        out[".".join([PACKAGE, *parts])] = (f"{PACKAGE}/{path}", textwrap.dedent(text))
    return out


def test_checker_reports_an_upward_import():
    fake = _fake({
        "__init__.py": "",
        "data/__init__.py": "from .windows import WindowSet\n",
        "data/windows.py": """\
            import numpy as np

            def f():
                from ..models.flowfm import FlowFM   # data -> models: upward
                return FlowFM
        """,
        "models/__init__.py": "from .flowfm import FlowFM\n",
        "models/flowfm.py": "from ..data import WindowSet\nfrom ..nvtx import nvtx_wrap\nFlowFM = object\n",
        "nvtx.py": "import torch\n",
    })
    bad = layer_violations(fake)
    assert len(bad) == 1, bad
    assert "flowfm_fast/data/windows.py:4" in bad[0] and "from ..models.flowfm import FlowFM" in bad[0]
    assert "function-local" in bad[0] and "'models'" in bad[0] and "'data'" in bad[0]
    # ... and the same function-local import closes a cycle data.windows -> models.flowfm -> data -> data.windows
    cycles = import_cycles(fake)
    assert len(cycles) == 1 and "flowfm_fast/data/windows.py:4" in cycles[0], cycles


def test_checker_reports_a_leaf_importing_the_package_and_an_unplaced_module():
    fake = _fake({
        "__init__.py": "",
        "nvtx.py": "import torch\nfrom . import ops\n",
        "ops/__init__.py": "",
        "newthing.py": "import flowfm_fast.ops\n",
    })
    bad = layer_violations(fake)
    assert any("flowfm_fast/nvtx.py:2" in b and "is a leaf" in b for b in bad), bad
    assert any("flowfm_fast.newthing is in no layer" in b for b in bad), bad


def test_checker_reports_a_cycle_within_one_layer():
    fake = _fake({
        "__init__.py": "",
        "ops/__init__.py": "from ._registry import select\n",
        "ops/_registry.py": "from .. import _backend\nselect = None\n",
        "_backend.py": "def summary():\n    from .ops import _registry\n    return _registry\n",
    })
    assert not layer_violations(fake)
    cycles = import_cycles(fake)
    assert len(cycles) == 1, cycles
    assert "flowfm_fast._backend, flowfm_fast.ops._registry" in cycles[0]
    assert "flowfm_fast/_backend.py:2" in cycles[0] and "flowfm_fast/ops/_registry.py:1" in cycles[0]
