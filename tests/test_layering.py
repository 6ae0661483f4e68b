"""The package's layering, read from every module's imports with ``ast``.

Data flows spec -> derive -> plan -> backends; tensor.py is the tape and knows
no rule; rules/ holds every primitive; the transforms sit on top. Imports are
read statically, nested ones included: a lazy import is still a dependency.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Iterator

import pytest

PKG = "einsumgrad"
ROOT = Path(__file__).resolve().parent.parent / PKG
STDLIB = sys.stdlib_module_names | {"__future__"}
Graph = dict[str, dict[str, int]]  # module -> {module it imports: line of the first such import}


def modules(root: Path) -> dict[str, Path]:
    """Module name -> file for every .py under ``root``; a package's __init__ is the package."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = (root.name, *path.relative_to(root).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, mods: dict[str, Path]) -> Iterator[tuple[str, int]]:
    """(module imported, line) for every import in ``path``, however deeply nested.

    ``from P import n`` imports ``P.n`` where that is a module of the package,
    and ``P`` itself for the names that are not.
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from ((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            target = ".".join(filter(None, (base, node.module)))
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in mods]
            yield from ((sub, node.lineno) for sub in subs)
            if len(subs) < len(node.names):
                yield target, node.lineno


def import_graph(root: Path) -> tuple[dict[str, Path], Graph]:
    """The package's modules and the imports between them; no implicit edge to a parent
    package (as import-linter does), or everything would cycle through __init__."""
    mods = modules(root)
    graph: Graph = {m: {} for m in mods}
    for m, path in mods.items():
        for target, line in imports(m, path, mods):
            if target in mods:
                graph[m].setdefault(target, line)
    return mods, graph


def reachable(graph: Graph, start: str) -> set[str]:
    """The modules reached from ``start`` by one import or more."""
    seen: set[str] = set()
    todo = list(graph[start])
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(graph[m])
    return seen


def cycles(graph: Graph) -> list[list[str]]:
    """Every strongly connected component that holds a cycle, self-imports included."""
    reach = {m: reachable(graph, m) for m in graph}
    comps = {frozenset(w for w in reach[m] if m in reach[w]) for m in graph if m in reach[m]}
    return sorted(sorted(c) for c in comps)


def cycle_path(graph: Graph, comp: list[str]) -> list[str]:
    """A shortest cycle through the component's first module, which it starts and ends."""
    start = comp[0]
    paths, todo = {start: [start]}, deque([start])
    while True:  # comp holds a cycle through start, so this returns before todo runs dry
        m = todo.popleft()
        for n in sorted(graph[m]):
            if n == start:
                return [*paths[m], start]
            if n in comp and n not in paths:
                paths[n] = [*paths[m], n]
                todo.append(n)


def describe(root: Path, mods: dict[str, Path], graph: Graph, comp: list[str]) -> str:
    """The component's modules, then one cycle through them with where each import is."""
    path = cycle_path(graph, comp)
    steps = [f"  {a} -> {b}  ({mods[a].relative_to(root.parent)}:{graph[a][b]})"
             for a, b in zip(path, path[1:])]
    return "\n".join([f"import cycle among {', '.join(comp)}:", *steps])


def package_imports(name: str) -> list[tuple[str, int]]:
    """The imports of one module of the real package, read statically."""
    return sorted(imports(f"{PKG}.{name}", ROOT / f"{name}.py", modules(ROOT)), key=lambda i: i[1])


def test_no_import_cycle() -> None:
    mods, graph = import_graph(ROOT)
    found = cycles(graph)
    assert not found, "\n\n".join(describe(ROOT, mods, graph, c) for c in found)


def test_the_tape_imports_only_the_backend_layer() -> None:
    def allowed(m: str) -> bool:
        return m == f"{PKG}.backends" or m.startswith(f"{PKG}.backends.")
    bad = [f"{m} (einsumgrad/tensor.py:{line})" for m, line in package_imports("tensor")
           if (m == PKG or m.startswith(f"{PKG}.")) and not allowed(m)]
    assert not bad, "tensor.py knows no rule, yet imports:\n  " + "\n  ".join(bad)


@pytest.mark.parametrize("name,allowed", [("spec", set()), ("derive", {f"{PKG}.spec"})])
def test_spec_and_derive_are_pure(name: str, allowed: set[str]) -> None:
    # Nothing that runs arrays (numpy, cupy, opt_einsum, ...): the standard library only.
    bad = [f"{m} (einsumgrad/{name}.py:{line})" for m, line in package_imports(name)
           if m not in allowed and m.split(".")[0] not in STDLIB]
    assert not bad, f"{name}.py imports beyond {sorted(allowed)} and the standard library:\n  " \
                    + "\n  ".join(bad)


# The package's __init__ imports everything; a stub package module keeps it from running.
PURE = f"""
import sys, types
pkg = types.ModuleType({PKG!r}); pkg.__path__ = [{str(ROOT)!r}]; sys.modules[{PKG!r}] = pkg
import einsumgrad.derive as d
for k, want in ((1, 'ik,ij->jk'), (0, 'ik,jk->ij')):
    got = str(d.derive('ij,jk->ik').vjp(k))
    if got != want:
        sys.exit(f'vjp({{k}}) of ij,jk->ik is {{got!r}}, want {{want!r}}')
heavy = ['numpy', 'einsumgrad.tensor', 'einsumgrad.backends', 'einsumgrad.plan',
         'einsumgrad.rules']
if loaded := [m for m in heavy if m in sys.modules]:
    sys.exit(f'einsumgrad.derive pulled in {{loaded}}')
"""


def test_derive_runs_with_no_tensor_in_sight() -> None:
    done = subprocess.run([sys.executable, "-c", PURE], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_every_primitive_is_made_under_rules() -> None:
    def makes_primitive(node: ast.AST) -> bool:
        f = node.func if isinstance(node, ast.Call) else None
        return (isinstance(f, ast.Name) and f.id == "Primitive"
                or isinstance(f, ast.Attribute) and f.attr == "Primitive")
    bad = [f"{path.relative_to(ROOT.parent)}:{line}"
           for path in modules(ROOT).values() if ROOT / "rules" not in path.parents
           for line in sorted(node.lineno for node in ast.walk(ast.parse(path.read_text()))
                              if makes_primitive(node))]
    assert not bad, "Primitive(...) outside einsumgrad/rules/:\n  " + "\n  ".join(bad)


def test_graph_builder_on_a_tiny_package(tmp_path: Path) -> None:
    files = {
        "__init__.py": "import os\n",
        "a.py": "def f():\n    from .b import g\n",  # a cycle through a function-level import
        "b.py": "from . import a, missing\n",  # a module and a name: edges to pkg.a and pkg
        "s.py": "try:\n    import pkg.s\nexcept ImportError:\n    pass\n",  # a self-import
        "sub/__init__.py": "from . import leaf\n",  # the submodule, not a self-loop
        "sub/leaf.py": "if True:\n    from .. import b\n    from ..sub import x\n",
    }
    for name, text in files.items():
        (tmp_path / "pkg" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "pkg" / name).write_text(text)
    mods, graph = import_graph(tmp_path / "pkg")
    assert {m: set(to) for m, to in graph.items()} == {
        "pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a", "pkg"}, "pkg.s": {"pkg.s"},
        "pkg.sub": {"pkg.sub.leaf"}, "pkg.sub.leaf": {"pkg.b", "pkg.sub"}}
    assert cycles(graph) == [["pkg.a", "pkg.b"], ["pkg.s"], ["pkg.sub", "pkg.sub.leaf"]]
    assert describe(tmp_path / "pkg", mods, graph, ["pkg.a", "pkg.b"]).splitlines()[1:] == [
        "  pkg.a -> pkg.b  (pkg/a.py:2)", "  pkg.b -> pkg.a  (pkg/b.py:1)"]
