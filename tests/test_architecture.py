"""The package's shape: the backend boundary, the written backend interface, and no import circle.

Read from the source (``ast``), not from a running interpreter, so that an import made lazily
inside a function counts as much as one at the top of a module.
"""

from __future__ import annotations

import ast
import concurrent.futures
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest
from conftest import FLAVOURS

import lstm_rewrite
from lstm_rewrite import backends, kinds

PACKAGE = Path(lstm_rewrite.__file__).parent
FRAMEWORKS = ("tensorflow", "keras", "tf_keras")
# Calls whose first argument names a module to import (or to look up before importing it).
IMPORTING_CALLS = ("import_module", "__import__", "find_spec")
# Modules that need an optional extra: imported alone only where it is installed.
OPTIONAL = {"lstm_rewrite.beam": "apache_beam"}


def _module_files() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its ``__init__.py``)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _module_files()
OUTSIDE_BACKENDS = sorted(n for n in MODULES if not n.startswith("lstm_rewrite.backends"))


def _tree(name: str) -> ast.Module:
    return ast.parse(MODULES[name].read_text(encoding="utf-8"), filename=str(MODULES[name]))


def _string(node) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _call_name(call: ast.Call) -> str | None:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None


def _is_sys_modules(node) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "modules"
            and isinstance(node.value, ast.Name) and node.value.id == "sys")


# --------------------------------------------------------------------------------------------
# The backend boundary: nothing outside lstm_rewrite/backends imports a framework.
# --------------------------------------------------------------------------------------------


def _is_framework(module: str | None) -> bool:
    return bool(module) and module.split(".")[0] in FRAMEWORKS


def framework_uses(name: str) -> list[str]:
    """Where module ``name`` imports tensorflow, keras or tf_keras, or looks one up: ``import``,
    ``from ... import``, ``importlib.import_module("...")``, ``__import__``, ``find_spec`` and
    ``sys.modules`` lookups (``.get("...")``, ``[...]``, ``"..." in sys.modules``), at any depth."""
    found = []
    for node in ast.walk(_tree(name)):
        hit = None
        if isinstance(node, ast.Import):
            hit = next((a.name for a in node.names if _is_framework(a.name)), None)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and _is_framework(node.module):
            hit = node.module
        elif isinstance(node, ast.Call) and node.args:
            first = _string(node.args[0])
            if _call_name(node) in IMPORTING_CALLS and _is_framework(first):
                hit = first
            elif (isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                  and _is_sys_modules(node.func.value) and _is_framework(first)):
                hit = f"sys.modules.get({first!r})"
        elif isinstance(node, ast.Subscript) and _is_sys_modules(node.value) and _is_framework(_string(node.slice)):
            hit = f"sys.modules[{_string(node.slice)!r}]"
        elif (isinstance(node, ast.Compare) and any(_is_sys_modules(c) for c in node.comparators)
              and _is_framework(_string(node.left))):
            hit = f"{_string(node.left)!r} in sys.modules"
        if hit is not None:
            found.append(f"line {node.lineno}: {hit}")
    return found


def test_the_scan_sees_every_form_of_import(tmp_path, monkeypatch):
    source = '''
import tensorflow as tf
def f():
    from keras import ops
    import importlib, sys
    importlib.import_module("tf_keras.layers")
    sys.modules.get("tensorflow")
    return "keras" in sys.modules, sys.modules["tensorflow"], importlib.util.find_spec("keras")
import numpy, networkx
'''
    path = tmp_path / "probe.py"
    path.write_text(source)
    monkeypatch.setitem(MODULES, "probe", path)
    assert [hit.split(": ")[1] for hit in framework_uses("probe")] == [
        "tensorflow", "keras", "tf_keras.layers", "sys.modules.get('tensorflow')", "'keras' in sys.modules",
        "sys.modules['tensorflow']", "keras"]


@pytest.mark.parametrize("module", OUTSIDE_BACKENDS)
def test_nothing_outside_backends_imports_a_framework(module):
    uses = framework_uses(module)
    assert not uses, (
        f"{module} ({MODULES[module].relative_to(PACKAGE.parent)}) imports or looks up a framework: "
        f"{'; '.join(uses)}. Only lstm_rewrite/backends/ may: ask the module's backend "
        f"(lstm_rewrite.backends.for_model(model)) instead, adding the name to backends.Backend.")


# --------------------------------------------------------------------------------------------
# The backend interface: both backends provide it, nothing beyond it, and the stages read only it.
# --------------------------------------------------------------------------------------------

# What the traced-layer section of a backend names for its own use (the classes it binds, the
# options it passes them); lstm_rewrite/layers replaces that section.
# PartsRNN is the class InnerRNN names, registered for saving under its own name.
TRACED_LAYER_SECTION = {"keras3": {"PartsRNN"}, "tfkeras": set()}


def _defined_public_names(flavour: str) -> set[str]:
    """The public names a backend module binds at its top level, other than by importing them."""
    names = set()
    for node in _tree(f"lstm_rewrite.backends.{flavour}").body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names |= {t.id for t in ast.walk(target) if isinstance(t, ast.Name)}
    return {n for n in names if not n.startswith("_")}


def test_the_interface_is_written_down():
    """Every name of backends.Backend has a one-line docstring (an attribute: the string after it)."""
    (protocol,) = [n for n in _tree("lstm_rewrite.backends").body if isinstance(n, ast.ClassDef) and n.name == "Backend"]
    documented, body = set(), protocol.body
    for node, after in zip(body, body[1:] + [None]):
        if isinstance(node, ast.FunctionDef) and ast.get_docstring(node):
            documented.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and _string(after.value):
            documented.add(node.target.id)
    names = set(backends.interface_names())
    assert names == documented, f"undocumented: {sorted(names - documented)}; unknown: {sorted(documented - names)}"
    assert {"compiled_predict", "is_dataset", "dataset_batches", "gpu_visible", "graph_nodes", "LSTM",
            "TracedRNN", "ops", "to_numpy", "load_model_file"} <= names


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_backends_provide_the_interface(flavour):
    module = backends.get(flavour)
    missing = [n for n in backends.interface_names() if not hasattr(module, n)]
    assert not missing, f"lstm_rewrite.backends.{flavour} lacks {missing} of backends.Backend"
    assert isinstance(module, backends.Backend)


@pytest.mark.parametrize("flavour", ("keras3", "tfkeras"))
def test_backends_define_nothing_public_beyond_the_interface(flavour):
    extra = _defined_public_names(flavour) - set(backends.interface_names()) - TRACED_LAYER_SECTION[flavour]
    assert not extra, (
        f"lstm_rewrite.backends.{flavour} defines public names outside backends.Backend: {sorted(extra)}. "
        f"Add each to the interface (both backends, with a docstring) or make it private.")


def _backend_expression(node) -> bool:
    """Whether ``node`` evaluates to a backend module: ``backends.for_model(...)``,
    ``backends.get(...)``, ``self.backend``, ``import_module("lstm_rewrite.backends.<flavour>")``."""
    if isinstance(node, ast.Attribute) and node.attr == "backend" and isinstance(node.value, ast.Name):
        return node.value.id == "self"
    if isinstance(node, ast.Call):
        name = _call_name(node)
        if name in ("for_model", "_backend_of") or (name == "get" and isinstance(node.func, ast.Attribute)
                                                     and isinstance(node.func.value, ast.Name)
                                                     and node.func.value.id == "backends"):
            return True
        if name == "import_module" and node.args:
            return (_string(node.args[0]) or "").startswith("lstm_rewrite.backends.")
    return False


def backend_names_read(name: str) -> dict[str, int]:
    """The names module ``name`` reads from a backend module -> first line: attributes of a
    backend expression, of a variable ``backend`` bound to one (a parameter, or assigned one), and
    ``getattr(backend, "NAME")``."""
    read: dict[str, int] = {}

    def scan(scope, local_backend: bool):
        for node in ast.walk(scope):
            target = None
            if isinstance(node, ast.Attribute):
                target, attr = node.value, node.attr
            elif isinstance(node, ast.Call) and _call_name(node) == "getattr" and len(node.args) >= 2:
                target, attr = node.args[0], _string(node.args[1])
            if target is None or attr is None:
                continue
            is_local = isinstance(target, ast.Name) and target.id == "backend" and local_backend
            if is_local or _backend_expression(target):
                read.setdefault(attr, node.lineno)

    for scope in ast.walk(_tree(name)):
        if not isinstance(scope, (ast.FunctionDef, ast.Lambda)):
            continue
        # A local `backend` is a backend module unless the function binds the name to something else.
        bound = [n.value for n in ast.walk(scope) if isinstance(n, ast.Assign)
                 for t in n.targets if isinstance(t, ast.Name) and t.id == "backend"]
        scan(scope, all(_backend_expression(v) for v in bound))
    return read


def test_the_backend_reads_are_found(tmp_path, monkeypatch):
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from . import backends\n"
        "def f(model, backend):\n    return backend.LSTM, getattr(backend, 'GRU'), backends.for_model(model).to_numpy\n"
        "def g(keras):\n    backend = keras.backend\n    return backend.backend()\n"
        "class C:\n    def h(self):\n        return self.backend.flatten\n")
    monkeypatch.setitem(MODULES, "lstm_rewrite.probe", probe)
    assert set(backend_names_read("lstm_rewrite.probe")) == {"LSTM", "GRU", "to_numpy", "flatten"}


def test_the_stages_read_only_interface_names():
    names = set(backends.interface_names())
    unknown = {f"{m} line {line}: {attr}" for m in MODULES if not m.startswith("lstm_rewrite.backends")
               for attr, line in backend_names_read(m).items() if attr not in names}
    assert not unknown, f"read from a backend but not in backends.Backend: {sorted(unknown)}"


def test_the_registry_names_interface_classes():
    names = set(backends.interface_names())
    for kind in kinds.all_kinds():
        for field in ("layer", "cell", "traced_cell"):
            value = getattr(kind, field)
            assert value is None or value in names, f"kinds {kind.name!r}.{field} = {value!r}"


# --------------------------------------------------------------------------------------------
# No import circle: the graph of the package's own imports is acyclic, and each module imports
# alone, in a fresh interpreter, in a topological order of that graph.
# --------------------------------------------------------------------------------------------


def _imported(name: str, node) -> list[str]:
    """The package modules one import statement (or import_module call) of module ``name`` loads."""
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    if isinstance(node, ast.ImportFrom):
        if node.level:
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            base = f"{base}.{node.module}" if node.module else base
        else:
            base = node.module or ""
        # `from pkg import sub` loads pkg.sub; `from pkg import name` needs pkg itself to define name.
        subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
        needs_base = len(subs) < len(node.names) or not subs
        return subs + ([base] if needs_base and base in MODULES else [])
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in MODULES]
    if isinstance(node, ast.Call) and _call_name(node) == "import_module" and node.args:
        target = _string(node.args[0])
        return [target] if target in MODULES else []
    return []


def import_graph() -> nx.DiGraph:
    """Modules -> the package modules they import (an edge u -> v: u imports v), counting every
    import: at the top, inside functions, under ``if TYPE_CHECKING:``, through ``import_module``."""
    graph = nx.DiGraph()
    graph.add_nodes_from(MODULES)
    for name in MODULES:
        for node in ast.walk(_tree(name)):
            for target in _imported(name, node):
                if target != name:
                    graph.add_edge(name, target, line=node.lineno)
    return graph


def test_the_import_graph_reads_every_form(tmp_path, monkeypatch):
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from typing import TYPE_CHECKING\nfrom . import errors\nfrom .kinds import quantities\n"
        "if TYPE_CHECKING:\n    from .rewrite.record import RewriteRecord\n"
        "def f():\n    from .backends import flavour_of\n    import importlib\n"
        "    importlib.import_module('lstm_rewrite.naming')\n")
    monkeypatch.setitem(MODULES, "lstm_rewrite.probe", probe)
    imported = {t for node in ast.walk(_tree("lstm_rewrite.probe")) for t in _imported("lstm_rewrite.probe", node)}
    assert imported == {"lstm_rewrite.errors", "lstm_rewrite.kinds.quantities", "lstm_rewrite.rewrite.record",
                        "lstm_rewrite.backends", "lstm_rewrite.naming"}


def _describe_cycles(graph: nx.DiGraph) -> list[str]:
    lines = []
    for component in nx.strongly_connected_components(graph):
        if len(component) < 2:
            continue
        cycle = nx.find_cycle(graph.subgraph(component))
        lines.append(f"among {sorted(component)}, e.g. "
                     + " -> ".join(f"{u} (line {graph.edges[u, v]['line']})" for u, v in cycle)
                     + f" -> {cycle[0][0]}")
    return sorted(lines)


def test_the_import_graph_is_acyclic():
    cycles = _describe_cycles(import_graph())
    assert not cycles, "import circles (module (line of its import) -> ...):\n" + "\n".join(cycles)


def import_order(graph: nx.DiGraph) -> list[str]:
    """The modules with every module after those it imports; circles (which the test above
    refuses) are kept together, so the order exists even while one remains."""
    condensed = nx.condensation(graph)
    order = []
    for component in reversed(list(nx.topological_sort(condensed))):
        order += sorted(condensed.nodes[component]["members"])
    return order


def _import_alone(name: str) -> tuple[str, int, str]:
    """Import ``name`` in a fresh interpreter: (name, exit status, last line of its stderr)."""
    path = os.pathsep.join(p for p in (str(PACKAGE.parent), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONPATH=path, TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run([sys.executable, "-c", f"import {name}"], env=env, capture_output=True, text=True,
                          timeout=300)
    lines = done.stderr.strip().splitlines()
    return name, done.returncode, lines[-1] if lines else ""


def test_every_module_imports_alone_in_a_fresh_interpreter():
    graph = import_graph()
    order = [n for n in import_order(graph)
             if n not in OPTIONAL or importlib.util.find_spec(OPTIONAL[n]) is not None]
    position = {n: k for k, n in enumerate(order)}
    assert all(position[u] > position[v] for u, v in graph.edges
               if u in position and v in position and not nx.has_path(graph, v, u))
    # One interpreter per module, a few at a time: most need a second, the TensorFlow ones a few.
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(2, min(8, os.cpu_count() or 2))) as pool:
        results = list(pool.map(_import_alone, order))
    failed = [f"{name}: {last}" for name, code, last in results if code != 0]
    assert not failed, "modules that fail to import alone (in import order):\n" + "\n".join(failed)
