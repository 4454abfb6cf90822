"""The package has layers: no module imports, even inside a function, one that imports it back.

The import graph is read from the source with `ast` (nothing is imported): every `from .x import`,
`from . import x`, `from minipost.x import`, `from minipost import x` and `import minipost.x`,
at the top of a module or inside a function. The top-level files (the stage scripts and the bench
files) are checked the same way among themselves, `import bench` being an edge to bench.py.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "minipost"


def imported_names(tree: ast.AST, package: str | None) -> set[str]:
    """Dotted names a module imports anywhere in its source; a relative import is resolved into
    `package` (`from . import dist` -> "minipost.dist", `from .lora import x` -> "minipost.lora")."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package if node.level else node.module
            if node.level and node.module:
                base = f"{package}.{node.module}"
            names.add(base)
            names |= {f"{base}.{alias.name}" for alias in node.names}  # `from pkg import module`
    return names


def import_graph(files: dict[str, Path], package: str | None = None) -> dict[str, set[str]]:
    """module name -> the names of `files` it imports (only edges inside `files`)."""
    graph = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        graph[name] = {n for n in imported_names(tree, package) if n in files and n != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as [a, b, ..., a], or [] when the graph has none (depth-first search)."""
    state, stack = {}, []       # state: 1 on the current path, 2 finished

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def package_graph() -> dict[str, set[str]]:
    files = {f"{PACKAGE}.{p.stem}": p for p in (ROOT / PACKAGE).glob("*.py")
             if p.stem != "__init__"}
    return import_graph(files, PACKAGE)


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_the_package_has_no_import_cycle():
    graph = package_graph()
    assert len(graph) > 20 and graph["minipost.peft"]       # the package was read
    cycle = find_cycle(graph)
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_the_top_level_files_have_no_import_cycle():
    files = {p.stem: p for p in ROOT.glob("*.py")}
    graph = import_graph(files)
    assert {"bench", "bench_floors", "bench_trl"} <= set(graph) and graph["bench"]
    cycle = find_cycle(graph)
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_checkpoints_and_layers_know_no_peft_format():
    graph = package_graph()
    peft = {"minipost.peft", "minipost.peft_format", "minipost.lora", "minipost.adapters"}
    assert reachable(graph, "minipost.checkpoint") & peft == set()
    for layers in ("minipost.lora", "minipost.adapters"):
        assert reachable(graph, layers) <= {"minipost.lora"}, layers


def test_the_cycle_finder_finds_cycles_and_only_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"b", "c"}, "c": set()}) == ["b", "b"]
    tree = ast.parse("from . import dist\ndef f():\n    from .lora import x\n"
                     "import minipost.model\nfrom minipost import tasks\n")
    names = imported_names(tree, "minipost")
    assert {"minipost.dist", "minipost.lora", "minipost.model", "minipost.tasks"} <= names
