"""The import graph a newcomer relies on: no cycles, nothing below pruning reaches up the flow, and
modules and functions short enough to read."""
import ast
import pathlib
import sys

SOURCE = pathlib.Path(__file__).resolve().parents[1] / "src"


def _modules() -> dict[str, pathlib.Path]:
    modules = {}
    for path in SOURCE.rglob("*.py"):
        name = ".".join(path.relative_to(SOURCE).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    return modules


def _imports(path: pathlib.Path, modules) -> set[str]:
    """camphive modules ``path`` imports, at module level or inside functions (lazy imports count)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("camphive"):
            submodules = [f"{node.module}.{alias.name}" for alias in node.names
                          if f"{node.module}.{alias.name}" in modules]
            found.update(submodules or ([] if node.module == "camphive" else [node.module]))
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("camphive."))
    return {name for name in found if name in modules}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return components


def test_no_import_cycles_even_through_lazy_imports():
    modules = _modules()
    graph = {name: _imports(path, modules) for name, path in modules.items()}
    assert _cycles(graph) == []


def test_pruning_and_curvature_never_import_up_the_flow():
    modules = _modules()
    upward = ("camphive.training", "camphive.jobs", "camphive.export", "camphive.cli", "camphive.gradual")
    for name, path in modules.items():
        if name.startswith(("camphive.pruning", "camphive.curvature")):
            reached = sorted(target for target in _imports(path, modules) if target.startswith(upward))
            assert reached == [], f"{name} imports {reached}"


MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 80


def test_modules_and_functions_stay_short_enough_to_read():
    """No module under src/camphive over 400 lines, no function (its def line to its last line) over 80."""
    too_long = []
    for name, path in sorted(_modules().items()):
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"module {name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    too_long.append(f"function {name}.{node.name} (line {node.lineno}): {lines} lines")
    assert too_long == [], "split these into well-named parts:\n" + "\n".join(too_long)
