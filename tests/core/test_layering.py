"""The package layering of the README ("What is inside") is enforced here.

Every import of one boltzflow package by another, at module level or inside a function, must go
downward in ``LAYERS``; packages on the same layer (``replica`` and ``reports``) must not import each
other; and no two modules may import each other, directly or round a loop. A new package or
top-level module must be given a layer here (and in the README's diagram).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import boltzflow

SRC = Path(boltzflow.__file__).parent

#: lowest first; a package may import only packages on lower layers
LAYERS: list[tuple[str, ...]] = [
    ("errors",),
    ("units", "io", "config", "distributed"),
    ("core",),
    ("systems",),
    ("energy",),
    ("sampling",),
    ("transforms",),
    ("flows",),
    ("losses",),
    ("training",),
    ("estimators",),
    ("replica", "reports"),
    ("recipes",),
    ("pipeline",),
    ("cli",),
    ("__main__",),
]
LEVEL = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _modules() -> dict[str, tuple[Path, bool]]:
    """``{dotted module name: (file, is_package)}`` for every module of boltzflow."""
    out = {}
    for f in SRC.rglob("*.py"):
        parts = ["boltzflow", *f.relative_to(SRC).with_suffix("").parts]
        is_pkg = f.name == "__init__.py"
        if is_pkg:
            parts = parts[:-1]
        out[".".join(parts)] = (f, is_pkg)
    return out


def _imports(mods) -> list[tuple[str, str, int]]:
    """(importing module, imported boltzflow module, line) for every import statement anywhere in a file."""

    def resolve(name: str) -> str:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name

    edges = []
    for mod, (f, is_pkg) in mods.items():
        parts = mod.split(".")
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = parts[: len(parts) - node.level + (1 if is_pkg else 0)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                targets = [resolve(f"{target}.{a.name}") for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [resolve(a.name) for a in node.names]
            else:
                continue
            edges += [(mod, t, node.lineno) for t in targets if t.startswith("boltzflow") and t != mod]
    return edges


def _package(mod: str) -> str:
    return mod.split(".")[1] if "." in mod else ""


def test_every_package_has_a_layer():
    names = {_package(m) for m in _modules()} - {""}
    assert names - {"__main__"} <= set(LEVEL), f"give these a layer in LAYERS and the README: {names - set(LEVEL)}"


def test_imports_go_downward():
    bad = []
    for src, dst, line in _imports(_modules()):
        a, b = _package(src), _package(dst)
        if not a or not b or a == b:
            continue
        if LEVEL[b] >= LEVEL[a]:
            bad.append(f"{src}:{line} imports {dst} ({a} is on layer {LEVEL[a]}, {b} on {LEVEL[b]})")
    assert not bad, "imports upward or sideways:\n" + "\n".join(bad)


def test_no_import_cycles():
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for src, dst, _ in _imports(mods):
        if not src.startswith(dst + "."):  # a module may use its own package's namespace
            graph[src].add(dst)
    # Tarjan's strongly connected components, iteratively
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    cycles.append(sorted(comp))
    assert not cycles, f"modules importing each other: {cycles}"


def test_importing_a_package_loads_nothing_above_it():
    """Every module imported in a fresh interpreter, lowest layer first: none may load a package above its own."""
    mods = _modules()
    order = [m for layer in LAYERS for name in layer if name not in ("cli", "__main__")
             for m in sorted(mods) if _package(m) == name]
    code = f"""
import importlib, sys
LEVEL = {LEVEL!r}
for mod in {order!r}:
    name = mod.split(".")[1]
    importlib.import_module(mod)
    loaded = {{m.split(".")[1] for m in sys.modules if m.startswith("boltzflow.")}}
    above = sorted(p for p in loaded if LEVEL.get(p, -1) > LEVEL[name])
    assert not above, f"importing {{mod}} loaded {{above}}"
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_cli_start_up_stays_light():
    """``boltzflow --help`` builds every verb's parser without importing torch, OpenMM or matplotlib."""
    code = ("import sys, boltzflow.cli as c; c.build_parser(); "
            "print(sorted(m for m in ('torch', 'openmm', 'matplotlib', 'pymbar') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", (r.stdout, r.stderr[-2000:])
