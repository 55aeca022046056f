"""The package's imports: no cycle, even counting imports inside functions; the memory package imports nothing of
the parts that use it; every import inside a function says why it is there."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "fewshot_cli"


def modules(root: Path) -> dict[str, ast.Module]:
    found = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = ast.parse(path.read_text())
    return found


def _type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(tree: ast.Module, name: str, known: set[str]) -> tuple[set[str], set[str], int]:
    """A module's imports of the package: at module level, inside functions (excluding `if TYPE_CHECKING`), and the
    count of import statements inside functions (of any module)."""
    top, inner, count = set(), set(), 0

    def targets(node: ast.Import | ast.ImportFrom) -> set[str]:
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                base = ".".join(name.split(".")[:-node.level] + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        return {n for n in names if n in known}

    def walk(node: ast.AST, in_function: bool) -> None:
        nonlocal count
        for child in ast.iter_child_nodes(node):
            if _type_checking(child):
                continue
            if isinstance(child, ast.Import | ast.ImportFrom):
                (inner if in_function else top).update(targets(child))
                count += in_function
            walk(child, in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef))

    walk(tree, False)
    return top, inner, count


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
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

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _graph(with_functions: bool) -> dict[str, set[str]]:
    trees = modules(ROOT)
    graph = {}
    for name, tree in trees.items():
        top, inner, _ = imports(tree, name, set(trees))
        graph[name] = (top | inner if with_functions else top) - {name}
    return graph


def test_no_module_of_the_package_imports_itself_back_even_inside_a_function() -> None:
    assert cycles(_graph(with_functions=True)) == []


def test_cycles_finds_a_cycle_through_an_import_inside_a_function() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_memory_package_imports_nothing_of_the_runner_the_commands_or_the_cli() -> None:
    graph = _graph(with_functions=True)
    outside = {f"{name} imports {target}" for name, targets in graph.items() if name.startswith(f"{PACKAGE}.memory")
               for target in targets if not target.startswith((f"{PACKAGE}.memory", f"{PACKAGE}.errors"))}
    assert not outside, sorted(outside)


def test_every_import_inside_a_function_says_why() -> None:
    unexplained = []
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for inner in ast.walk(node):
                if isinstance(inner, ast.Import | ast.ImportFrom) and not _explained(lines, inner.lineno):
                    unexplained.append(f"{path.relative_to(ROOT)}:{inner.lineno}")
    found = ", ".join(sorted(set(unexplained)))
    assert not unexplained, f"imports inside functions with no comment saying why: {found}"


def _explained(lines: list[str], number: int) -> bool:
    """A comment on the import's line, or on the line above it (a group of imports shares the first one's)."""
    line = lines[number - 1]
    if "#" in line:
        return True
    above = number - 2
    while above >= 0 and lines[above].strip().startswith(("from ", "import ")):
        if "#" in lines[above]:
            return True
        above -= 1
    return above >= 0 and lines[above].strip().startswith("#")
