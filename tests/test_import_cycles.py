"""No import cycles among the project's modules (issue 17).

Static: every `import` / `from ... import` of every file, at module level or inside a function
(a function-level import only hides a cycle until the function runs), relative ones resolved;
imports under `if TYPE_CHECKING:` never execute and are left out. A cycle is named module by
module, e.g. "ltrainer.trainer.a -> ltrainer.trainer.b -> ltrainer.trainer.a". Modules are
named as installed: trainer/x.py is ltrainer.trainer.x, tools/x.py ltrainer.tools.x (setup.py).
"""
from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# folder in the repository -> its package name once installed
PACKAGES = {"trainer": "ltrainer.trainer", "data_pipelines": "ltrainer.data_pipelines",
            "configspec": "ltrainer.configspec",
            "launchers": "ltrainer.launchers", "tools": "ltrainer.tools"}

# Cycles someone is removing right now, each as the edge "importer -> imported" that breaks it,
# with its owner in a comment. Shrinking: an entry whose import is gone fails
# test_allowed_edges_still_exist; delete it then.
ALLOWED = {
}


def module_files() -> dict[str, str]:
    """{module name: path} of every project file."""
    out = {}
    for folder, package in PACKAGES.items():
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, folder)):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            rel = os.path.relpath(dirpath, os.path.join(ROOT, folder))
            prefix = package if rel == "." else package + "." + rel.replace(os.sep, ".")
            for name in filenames:
                if name.endswith(".py"):
                    mod = prefix if name == "__init__.py" else f"{prefix}.{name[:-3]}"
                    out[mod] = os.path.join(dirpath, name)
    return out


def _runtime_nodes(tree: ast.AST):
    """Every node except those under `if TYPE_CHECKING:` (or `typing.TYPE_CHECKING`)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                stack.extend(child.orelse)
                continue
            stack.append(child)


def imports_of(module: str, path: str, known: set[str]) -> set[str]:
    """The project modules that `module` imports (the most specific one each statement names)."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    is_package = path.endswith("__init__.py")
    found = set()

    def add(name: str):
        while name and name not in known:   # `import trainer.x.Y`: the module part
            name = name.rpartition(".")[0]
        if name and name != module:
            found.add(name)

    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(_installed(alias.name))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module if is_package else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = _installed(node.module)
            for alias in node.names:   # `from pkg import submodule`
                sub = f"{target}.{alias.name}"
                if sub in known:
                    add(sub)
                else:
                    add(target)
    return found


def _installed(name: str) -> str:
    head, _, rest = name.partition(".")
    if head in PACKAGES:   # a bare folder name: not importable so; test_packaging forbids it
        return f"ltrainer.{name}"
    return name


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    known = set(files)
    return {m: imports_of(m, p, known) for m, p in files.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Named cycles, [a, b, ..., a]: in each strongly connected component, the shortest one
    through each module, without repeats (so a component shows all its loops, not one)."""
    cycles, seen = [], set()
    for comp in components(graph):
        for start in sorted(comp):
            cycle = _cycle_in(graph, comp, start)
            key = frozenset(zip(cycle, cycle[1:]))
            if key not in seen:
                seen.add(key)
                cycles.append(cycle)
    return cycles


def components(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, on_stack, stack, comps = {}, {}, set(), [], []

    def strong(v):   # iterative Tarjan: the import graph is deep enough to matter
        work = [(v, iter(sorted(graph[v])))]
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        while work:
            node, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[node] = min(low[node], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == node:
                            break
                    if len(comp) > 1:
                        comps.append(set(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return comps


def _cycle_in(graph, comp: set[str], start: str) -> list[str]:
    """The shortest cycle through `start` inside its component (breadth-first)."""
    paths, seen = [[start]], {start}
    while paths:
        nxt = []
        for path in paths:
            for w in sorted(graph[path[-1]] & comp):
                if w == start:
                    return path + [start]
                if w not in seen:
                    seen.add(w)
                    nxt.append(path + [w])
        paths = nxt
    raise AssertionError(f"no cycle in {comp}")


def without_allowed(graph):
    return {m: {w for w in deps if f"{m} -> {w}" not in ALLOWED} for m, deps in graph.items()}


def test_no_import_cycles():
    cycles = find_cycles(without_allowed(import_graph()))
    assert not cycles, "import cycle(s):\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_allowed_edges_still_exist():
    graph = import_graph()
    stale = [e for e in ALLOWED if e.split(" -> ")[1] not in graph.get(e.split(" -> ")[0], ())]
    assert not stale, f"remove from ALLOWED (the import is gone): {stale}"


def test_layers():
    """The arrows of README "Layout": configspec <- data_pipelines <- trainer <- scripts."""
    below = {"configspec": (), "data_pipelines": ("configspec",),
             "trainer": ("configspec", "data_pipelines", "trainer")}
    layer = lambda name: name.split(".")[1]          # ltrainer.<folder>.…
    wrong = [f"{m} -> {d}" for m, deps in import_graph().items() for d in deps
             if layer(m) in below and layer(d) != layer(m) and layer(d) not in below[layer(m)]]
    assert not wrong, f"imports against the layers: {wrong}"


def test_the_analysis_finds_hidden_cycles(tmp_path):
    """A function-level import and a relative one close a cycle; TYPE_CHECKING ones do not."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from pkg.c import g\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                              "    from .d import x\nfrom .a import y\n")
    (pkg / "d.py").write_text("from .c import z\n")
    files = {f"pkg.{n}": str(pkg / f"{n}.py") for n in "abcd"} | {"pkg": str(pkg / "__init__.py")}
    graph = {m: imports_of(m, p, set(files)) for m, p in files.items()}
    assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]
