"""No two modules of the project import each other, directly or through a chain.

A cycle works only while every module in it happens to touch the others' names late enough, so it
breaks on an innocent reordering; hiding one import inside a function keeps the cycle, and hides it.
The graph is read from the source with ``ast``, function-level imports included.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("specjax", "pallas_kernels", "training", "serving", "agent")


def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the project's packages."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> dict[str, int]:
    """The project modules that module ``name`` imports anywhere in its file -> the first line doing so.

    ``import a.b`` imports ``a.b``; ``from a import b`` imports the submodule ``a.b`` when there is one,
    else the package ``a`` for its name ``b``. Relative imports are resolved against ``name``'s package.
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def longest_module(dotted: str) -> str | None:
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [longest_module(alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [longest_module(f"{base}.{alias.name}") for alias in node.names]
        else:
            continue
        for target in targets:
            if target is not None and target != name:
                found.setdefault(target, node.lineno)
    return found


def strongly_connected_components(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative (no recursion limit on long chains)."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    components.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(graph[child])))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return components


def shortest_cycle(graph: dict[str, dict[str, int]], start: str, members: set[str]) -> list[str]:
    """The shortest import chain from ``start`` back to itself, within ``members``."""
    previous = {start: None}
    frontier = [start]
    while frontier:
        next_frontier = []
        for node in frontier:
            for child in graph[node]:
                if child == start:
                    chain = [node]
                    while previous[chain[-1]] is not None:
                        chain.append(previous[chain[-1]])
                    return chain[::-1] + [start]
                if child in members and child not in previous:
                    previous[child] = node
                    next_frontier.append(child)
        frontier = next_frontier
    raise AssertionError(f"{start} is on no cycle")


def describe(graph: dict[str, dict[str, int]], component: list[str]) -> str:
    """The shortest cycle through each module of ``component``, each cycle once, with the import lines."""
    cycles = {}
    for start in component:
        chain = shortest_cycle(graph, start, set(component))
        cycles.setdefault(frozenset(zip(chain, chain[1:])), chain)
    return "\n".join(" -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(chain, chain[1:])) + f" -> {chain[-1]}"
                     for chain in cycles.values())


def test_no_import_cycles():
    modules = project_modules()
    assert "specjax.attention" in modules and "pallas_kernels.tree_attention" in modules
    graph = {name: imported_modules(name, path, modules) for name, path in modules.items()}
    cycles = [component for component in strongly_connected_components(graph) if len(component) > 1]
    assert not cycles, "import cycles between project modules:\n" + "\n".join(describe(graph, c) for c in cycles)


def test_the_graph_sees_lazy_relative_and_submodule_imports(tmp_path):
    """The cases a cycle hides behind: a function-level import, a relative one, ``from pkg import module``."""
    (tmp_path / "pkg").mkdir()
    files = {"pkg/__init__.py": "from . import a\n",
             "pkg/a.py": "def f():\n    from pkg import b\n",
             "pkg/b.py": "from .a import f\nimport pkg.c\n",
             "pkg/c.py": "X = 1\n"}
    for relative, text in files.items():
        (tmp_path / relative).write_text(text)
    modules = {"pkg": tmp_path / "pkg/__init__.py", **{f"pkg.{m}": tmp_path / f"pkg/{m}.py" for m in "abc"}}
    graph = {name: imported_modules(name, path, modules) for name, path in modules.items()}
    assert graph == {"pkg": {"pkg.a": 1}, "pkg.a": {"pkg.b": 2}, "pkg.b": {"pkg.a": 1, "pkg.c": 2}, "pkg.c": {}}
    assert sorted(map(sorted, strongly_connected_components(graph))) == [["pkg"], ["pkg.a", "pkg.b"], ["pkg.c"]]
    assert describe(graph, ["pkg.a", "pkg.b"]) == "pkg.a (line 2) -> pkg.b (line 1) -> pkg.a"
