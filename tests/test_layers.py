"""The layers stay layers: no module-level import cycle among squeeze's modules (imports inside functions,
the lazy ones, do not count; neither do TYPE_CHECKING blocks)."""

import ast
from pathlib import Path

import squeeze

ROOT = Path(squeeze.__file__).parent


def _module_name(path: Path) -> str:
    name = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
    return name.removesuffix(".__init__")


def _top_level_imports(path: Path, modules: set[str]) -> set[str]:
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for n in ast.walk(node) if isinstance(node, (ast.If, ast.Try)) else [node]:
            if isinstance(n, ast.Import):
                found |= {a.name for a in n.names}
            elif isinstance(n, ast.ImportFrom) and n.module:
                found |= {n.module} | {f"{n.module}.{a.name}" for a in n.names}
    return found & modules


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    paths = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {m: _top_level_imports(p, set(paths)) - {m} for m, p in paths.items()}
    assert len(graph) > 80 and sum(map(len, graph.values())) > 100
    assert _cycles(graph) == []


def test_a_cycle_is_found():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


CLI_MAY_IMPORT = ("squeeze.api", "squeeze.report", "squeeze.cli")


def _cli_violations() -> list[str]:
    """Every `squeeze.*` import in squeeze/cli/ (at the top or inside functions) that is not the API, a
    report view or the CLI itself: `path:line module`."""
    found = []
    for path in sorted((ROOT / "cli").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                # `from squeeze import api` imports squeeze.api; `from squeeze.cli import x` stays in the CLI
                names = [f"squeeze.{a.name}" for a in node.names] if node.module == "squeeze" else [node.module]
            else:
                continue
            found += [f"{path.name}:{node.lineno} {n}" for n in names if n.split(".")[0] == "squeeze"
                      and not any(n == ok or n.startswith(ok + ".") for ok in CLI_MAY_IMPORT)]
    return found


def test_the_cli_reaches_the_core_only_through_the_api():
    assert _cli_violations() == []
