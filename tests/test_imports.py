"""The package's import graph has no cycles: every `import` / `from ... import` of a puzzle module, at module
level or inside a function (a local import still makes the two modules depend on each other), read from the
source's AST. Imports under `if TYPE_CHECKING:` never run and are left out."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "puzzle"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return test is not None and ((isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
                                 or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def imported(path: Path, modules: set[str]) -> set[str]:
    """The puzzle modules `path` imports anywhere in its body (a `from pkg import name` of a submodule counts
    as that submodule; of anything else, as the package)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                if f"{base}.{a.name}" in modules:
                    out.add(f"{base}.{a.name}")
                elif base in modules:
                    out.add(base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    out.discard(name)
    return out


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imported(p, modules) for p in paths}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def test_the_graph_sees_local_and_relative_imports():
    """The walker itself: a cycle through a function-local, relative import is found."""
    graph = {"a": {"b"}, "b": {"a"}, "c": {"a"}}
    assert cycles(graph) == [["a", "b"]]
    edges = import_graph()
    assert "puzzle.errors" in edges["puzzle.stages"]  # a module-level import
    assert "puzzle.model.blocks" in edges["puzzle.model"]  # a relative one (`from .blocks import ...`)


def test_the_package_has_no_import_cycles():
    assert cycles(import_graph()) == []


if __name__ == "__main__":  # the graph's cycles and the count of function-local imports, for a report
    graph = import_graph()
    print("cycles:", cycles(graph))
    local = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                local |= {(path, n.lineno) for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))}
    print("function-local import statements:", len(local))
