"""Every package the code imports is declared in pyproject.toml, so `pip install -e .` alone gives a working CLI."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _declared(requirements: list[str]) -> set[str]:
    return {_normal(re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0]) for r in requirements}


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _imports() -> dict[str, list[tuple[str, bool]]]:
    """Top-level module name -> (file, imported at module level) for every absolute import in the package."""
    found: dict[str, list[tuple[str, bool]]] = {}
    for path in sorted((ROOT / "fewshot_cli").rglob("*.py")):
        tree = ast.parse(path.read_text())
        top_level = {id(n) for n in _module_level(tree.body)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], []).append((str(path.relative_to(ROOT)), id(node) in top_level))
    return found


def _module_level(body: list[ast.stmt]) -> list[ast.stmt]:
    """Statements run on import: the module's own, and those inside its top-level `if` and `try` blocks."""
    out = []
    for node in body:
        out.append(node)
        if isinstance(node, ast.If | ast.Try):
            inner = [*node.body, *node.orelse, *getattr(node, "finalbody", [])]
            inner += [s for h in getattr(node, "handlers", []) for s in h.body]
            out += _module_level(inner)
    return out


def test_every_imported_package_is_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    required = _declared(project["dependencies"])
    extras = {name: _declared(reqs) for name, reqs in project["optional-dependencies"].items() if name != "test"}
    optional = set().union(*extras.values())
    distributions = importlib.metadata.packages_distributions()
    missing, eager_optional = [], []
    for module, places in _imports().items():
        if module in sys.stdlib_module_names or module == "fewshot_cli":
            continue
        dists = {_normal(d) for d in distributions.get(module, [module])}
        if dists & required:
            continue
        if dists & optional and not any(top for _, top in places):
            continue  # an extra's package, imported only where its feature runs
        (eager_optional if dists & optional else missing).append(f"{module} ({places[0][0]})")
    assert not missing, f"imported but not declared in [project] dependencies: {', '.join(missing)}"
    assert not eager_optional, f"an optional extra's package imported at module level: {', '.join(eager_optional)}"
