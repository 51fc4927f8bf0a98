"""The package's layers: every import of every vsd module (function-level ones included) goes
down or sideways, never up, and no two modules import each other, directly or round a loop.

Layers, bottom to top:

    core                                     contracts + engine: nothing else of vsd
    plugins, representations, renderers      implementations: core, and each other
    datatools                                making datasets: the above
    apps                                     applications: the above
    api (and the package root vsd)           the Python API: the above
    cli                                      the command line: anything

A module may import modules of its own layer or below; within a layer, imports must not form
a cycle (and across layers they cannot). The deprecated ``base.py`` paths of the plugin
packages re-export from core, which is downward.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "vsd"
NOT_PACKAGE = {"tests", "benchmarks", "examples", "docs", "pretrained", "build", "dist"}

LAYERS = {
    "core": 0,
    "plugins": 1,
    "representations": 1,
    "renderers": 1,
    "datatools": 2,
    "apps": 3,
    "api": 4,
    "cli": 5,
}
ROOT_LAYER = LAYERS["api"]  # vsd/__init__.py: vsd.load


def package_modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted name -> file of every module of the package (``vsd.x.__init__`` named ``vsd.x``)."""
    mods = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] in NOT_PACKAGE or any(p.startswith(".") or p.endswith(".egg-info") for p in rel.parts):
            continue
        parts = [PACKAGE, *rel.with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """The vsd modules ``name`` imports anywhere in its file, with line numbers: ``import a.b``
    and ``from a import b`` (b a submodule or a name in a), absolute or relative."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []

    def add(target: str, line: int) -> None:
        # the longest prefix that is a vsd module (``vsd.core.cameras.Cameras`` -> ``vsd.core.cameras``)
        parts = target.split(".")
        while parts and ".".join(parts) not in modules:
            parts.pop()
        if parts:
            found.append((".".join(parts), line))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if not (source == PACKAGE or source.startswith(PACKAGE + ".")):
                continue
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                add(sub if sub in modules else source, node.lineno)
    return [(t, line) for t, line in found if t != name]


def layer_of(name: str) -> int:
    parts = name.split(".")
    if len(parts) == 1:
        return ROOT_LAYER
    return LAYERS[parts[1]]


def import_graph(root: Path = ROOT) -> dict[str, list[tuple[str, int]]]:
    modules = package_modules(root)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def upward_imports(graph) -> list[str]:
    bad = []
    for name, targets in sorted(graph.items()):
        for target, line in targets:
            if layer_of(target) > layer_of(name):
                top = name.split(".")[1] if "." in name else name
                bad.append(f"{name} (line {line}) imports {target}: the {top} layer may not import "
                           f"{target.split('.')[1] if '.' in target else target}")
    return bad


def cycles(graph) -> list[list[str]]:
    """Every strongly connected component of more than one module, as an example loop."""
    index, low, stack, on, comps = {}, {}, [], set(), []
    edges = {n: sorted({t for t, _ in ts if t in graph}) for n, ts in graph.items()}

    def visit(v):  # Tarjan, iterative
        work = [(v, iter(edges[v]))]
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        while work:
            node, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(edges[w])))
                    break
                if w in on:
                    low[node] = min(low[node], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == node:
                            break
                    if len(comp) > 1:
                        comps.append(comp)

    for v in sorted(edges):
        if v not in index:
            visit(v)
    loops = []
    for comp in comps:  # one loop through the component, for the message
        members = set(comp)
        start = min(comp)
        path, seen = [start], {start}
        while True:
            nxt = next(t for t in edges[path[-1]] if t in members)
            if nxt in seen:
                loops.append(path[path.index(nxt):] + [nxt])
                break
            path.append(nxt)
            seen.add(nxt)
    return loops


def _describe(loop, graph) -> str:
    steps = []
    for a, b in zip(loop, loop[1:]):
        line = next(line for t, line in graph[a] if t == b)
        steps.append(f"{a} (line {line}) imports {b}")
    return "; ".join(steps)


def test_every_module_is_in_a_layer():
    unknown = [n for n in package_modules() if "." in n and n.split(".")[1] not in LAYERS]
    assert not unknown, f"modules outside the known layers (add them to LAYERS in tests/test_layout.py): {unknown}"


def test_the_scan_sees_the_package():
    graph = import_graph()
    assert {"vsd.core.engine", "vsd.core.contracts", "vsd.apps.pipeline", "vsd.cli.main", "vsd.api"} <= set(graph)
    assert any(t == "vsd.core.contracts" for t, _ in graph["vsd.core.engine"])
    # function-level (lazy) imports count
    assert any(t == "vsd.apps.sampling" for t, _ in graph["vsd.api"])


def test_no_upward_import():
    bad = upward_imports(import_graph())
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_no_import_cycle():
    graph = import_graph()
    loops = cycles(graph)
    assert not loops, "import cycles:\n" + "\n".join(_describe(loop, graph) for loop in loops)


def test_core_imports_nothing_else_of_vsd():
    graph = import_graph()
    bad = [f"{n} (line {line}) imports {t}" for n, ts in graph.items() if n.startswith("vsd.core")
           for t, line in ts if not t.startswith("vsd.core")]
    assert not bad, "core must import only core:\n" + "\n".join(bad)


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return tmp_path


def test_the_checks_fail_on_an_upward_import_and_a_cycle(tmp_path):
    root = _tree(tmp_path, {
        "__init__.py": "",
        "api.py": "",
        "core/__init__.py": "",
        "core/engine.py": "def f():\n    from ..apps.report import x\n",
        "core/a.py": "from . import b\n",
        "core/b.py": "from .a import thing\n",
        "plugins/__init__.py": "",
        "plugins/p.py": "import vsd.cli.main\n",
        "apps/__init__.py": "",
        "apps/report.py": "from ..cli.main import app\n",
        "cli/__init__.py": "",
        "cli/main.py": "from ..apps.report import x\n",
    })
    graph = import_graph(root)
    bad = "\n".join(upward_imports(graph))
    assert "vsd.core.engine (line 2) imports vsd.apps.report" in bad
    assert "vsd.plugins.p (line 1) imports vsd.cli.main" in bad
    assert "vsd.apps.report (line 1) imports vsd.cli.main" in bad
    loops = [set(loop) for loop in cycles(graph)]
    assert {"vsd.core.a", "vsd.core.b"} in loops
    assert {"vsd.apps.report", "vsd.cli.main"} in loops
    with pytest.raises(AssertionError, match="vsd.core.engine"):
        assert not upward_imports(graph), "\n".join(upward_imports(graph))


OLD_PATHS = {
    "vsd.plugins.encoders.base": ["Encoder"],
    "vsd.plugins.aggregators.base": ["Aggregator"],
    "vsd.plugins.datasets.base": ["SPLITS", "SPLIT_SEEDS", "SceneInfo", "ViewsetDataset"],
    "vsd.representations.base": ["Field", "Mesh", "Representation"],
    "vsd.renderers.base": ["Renderer", "RenderOutput"],
}


@pytest.mark.parametrize("old", sorted(OLD_PATHS))
def test_old_contract_paths_still_import_with_a_deprecation_warning(old, monkeypatch):
    import importlib
    import sys

    import vsd.core.contracts as contracts

    monkeypatch.delitem(sys.modules, old, raising=False)
    with pytest.warns(DeprecationWarning, match=r"moved to vsd\.core\.contracts\..*this path will be removed in the next release"):
        mod = importlib.import_module(old)
    for name in OLD_PATHS[old]:
        assert getattr(mod, name) is getattr(contracts, name), f"{old}.{name}"


def test_a_plugin_written_against_the_old_paths_registers(monkeypatch):
    import sys
    import types
    import warnings

    from vsd.core.registry import Registry

    for old in OLD_PATHS:
        monkeypatch.delitem(sys.modules, old, raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from vsd.core.hookspecs import hookimpl
        from vsd.representations.base import Field, Representation

    class OldStyle(Representation):
        def forward(self, volume):
            return Field()

    plugin = types.SimpleNamespace(vsd_representations=hookimpl(lambda: {"old-style": OldStyle}))
    reg = Registry.load(autoload=False, extra=[(plugin, "old-style-plugin")])
    assert not reg.failures
    assert reg.get("representation", "old-style").cls is OldStyle
