"""The import graph of src/attnlab, read with `ast` (every import, function-level ones too).

Rules (STYLE.md): no cycles among attnlab modules; the library never imports the harness; no
module imports another module's `_private` names (private *modules* such as attnlab._io and
attnlab._checks are the shared helpers and may be imported); and the library imports with
only torch and numpy installed. Imports under `if TYPE_CHECKING:` never run and are left out.
An edge goes to the module named (`from attnlab.ops import sdpa` -> attnlab.ops.sdpa when that
is a module, else attnlab.ops), not to the packages above it: importing attnlab.ops.sdpa runs
attnlab/__init__ first, and counting that would make every sibling import a "cycle".
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "attnlab"
HARNESS = ("attnlab.bench", "attnlab.train", "attnlab.tasks", "attnlab.arena", "attnlab.cli")
LIBRARY = ("attnlab.registry", "attnlab.masks", "attnlab.cache", "attnlab._checks", "attnlab.ops",
           "attnlab.mechanisms", "attnlab.models", "attnlab.probes", "attnlab.hooks")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(module: str, path: Path):
    """(target module, imported name or None, line) for every attnlab import in one file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node.test)
            for stmt in node.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _under(alias.name, ("attnlab",)):
                    yield alias.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_pkg else module.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not _under(target, ("attnlab",)):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in MODULES:          # `from attnlab.ops import sdpa`: the submodule
                    yield sub, None, node.lineno
                else:
                    yield target, alias.name, node.lineno


def _resolve(target: str) -> str:
    """The nearest existing module: `import attnlab.x.y` of a missing y counts as attnlab.x."""
    while target not in MODULES and "." in target:
        target = target.rsplit(".", 1)[0]
    return target


EDGES = {m: {} for m in MODULES}          # module -> {target: first line}
NAMES = []                                # (module, target, name, line)
for _m, _p in MODULES.items():
    for _t, _name, _line in _imports(_m, _p):
        _t = _resolve(_t)
        if _t != _m:
            EDGES[_m].setdefault(_t, _line)
        if _name is not None:
            NAMES.append((_m, _t, _name, _line))


def test_the_graph_was_read():
    """Guards the tests below against vacuously passing on an empty graph."""
    assert "attnlab.registry" in MODULES and "attnlab.mechanisms.mhsa" in MODULES
    assert "attnlab.registry" in EDGES["attnlab.mechanisms.mhsa"]


def _cycles(edges):
    """Strongly connected components with more than one module (Tarjan), each as one cycle."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(10000, sys.getrecursionlimit()))
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def _one_cycle(comp, edges):
    """A concrete path start -> ... -> start inside one component, with line numbers."""
    inside, start = set(comp), comp[0]
    prev, frontier = {start: None}, [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(edges[v]):
                if w == start:
                    path = [v]
                    while prev[path[-1]] is not None:
                        path.append(prev[path[-1]])
                    path = path[::-1] + [start]
                    return " -> ".join(f"{a} (line {edges[a][b]})" for a, b in zip(path, path[1:])) + f" -> {start}"
                if w in inside and w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return " <-> ".join(comp)


def test_cycle_finder_finds_a_cycle():
    edges = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}, "d": {"a": 4}}
    assert _cycles(edges) == [["a", "b", "c"]]
    assert _one_cycle(["a", "b", "c"], edges) == "a (line 1) -> b (line 2) -> c (line 3) -> a"


def test_no_import_cycles():
    cycles = _cycles(EDGES)
    assert not cycles, "import cycles among attnlab modules:\n" + "\n".join(
        f"  {_one_cycle(c, EDGES)}   [component: {', '.join(c)}]" for c in cycles)


def _reachable(start):
    seen, path, todo = {start}, {start: [start]}, [start]
    while todo:
        v = todo.pop()
        for w in sorted(EDGES[v]):
            if w not in seen:
                seen.add(w)
                path[w] = path[v] + [w]
                todo.append(w)
    return path


def test_library_never_imports_the_harness():
    library = [m for m in MODULES if m == "attnlab" or _under(m, LIBRARY)]
    assert "attnlab.mechanisms.mhsa" in library and "attnlab.registry" in library
    bad = []
    for m in library:
        for target, path in _reachable(m).items():
            if _under(target, HARNESS) and len(path) >= 2 and not _under(path[-2], HARNESS):
                bad.append(" -> ".join(path))
    assert not bad, "the library reaches the harness (each path ends at its first harness module):\n  " + \
        "\n  ".join(sorted(set(bad)))


def test_no_private_names_across_modules():
    bad = []
    for m, target, name, line in NAMES:
        if name.startswith("_") and not name.startswith("__") and target != m:
            bad.append(f"{MODULES[m].relative_to(SRC)}:{line}: from {target} import {name}")
    # `import attnlab.x as mod` / `from attnlab import x` then `mod._name`
    for m, path in MODULES.items():
        tree = ast.parse(path.read_text())
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.asname and _resolve(a.name) in MODULES and _under(a.name, ("attnlab",)):
                        aliases[a.asname] = _resolve(a.name)
            elif isinstance(node, ast.ImportFrom) and not node.level and _under(node.module or "", ("attnlab",)):
                for a in node.names:
                    if f"{node.module}.{a.name}" in MODULES:
                        aliases[a.asname or a.name] = f"{node.module}.{a.name}"
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")
                    and aliases[node.value.id] != m):
                bad.append(f"{path.relative_to(SRC)}:{node.lineno}: {aliases[node.value.id]}.{node.attr}")
    assert not bad, "private names used across modules:\n  " + "\n  ".join(sorted(set(bad)))


BLOCKED = ("matplotlib", "sklearn", "rich", "safetensors")
_PROBE = f"""
import importlib.abc, sys
BLOCKED = {BLOCKED!r}
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError("blocked by test_imports: " + name)
sys.meta_path.insert(0, Blocker())
for name in BLOCKED:
    try:
        __import__(name)
    except ImportError as err:
        assert "blocked by test_imports" in str(err), err
    else:
        raise SystemExit("the blocker let " + name + " through")
import torch, numpy
before = {{m.split(".")[0] for m in sys.modules}}
import attnlab, attnlab.mechanisms
attnlab.list_specs()
attnlab.create("mhsa", 32, 4)
extra = {{m.split(".")[0] for m in sys.modules}} - before - set(sys.stdlib_module_names) - {{"attnlab"}}
print("EXTRA", sorted(extra))
"""


def test_library_imports_with_only_torch_and_numpy():
    proc = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, f"import attnlab with {BLOCKED} unimportable failed:\n{proc.stderr[-3000:]}"
    extra = proc.stdout.split("EXTRA", 1)[1].strip()
    assert extra == "[]", f"import attnlab pulled in packages beyond torch and numpy: {extra}"


def test_mechanism_files_never_import_each_other():
    """One paper = one file: deleting a mechanism file breaks no other. What several share lives
    in ops/, _checks, or a private mechanisms/_<name>.py (never a registered mechanism's file)."""
    def is_mechanism_file(name: str) -> bool:
        parts = name.split(".")
        return len(parts) == 3 and parts[1] == "mechanisms" and not parts[2].startswith("_")

    files = [m for m in MODULES if is_mechanism_file(m)]
    assert "attnlab.mechanisms.mhsa" in files and len(files) > 10
    bad = [(m, t) for m in files for t in EDGES.get(m, ()) if t != m and is_mechanism_file(t)]
    assert not bad, f"mechanism files importing other mechanism files: {bad}"
