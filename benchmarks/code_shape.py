"""The shape of a checkout's code, side by side with another's: imports inside functions, import cycles, the ten
longest functions, and the modules one mahalanobis-train training step passes through.

    python benchmarks/code_shape.py --baseline REV [--markdown PATH]

REV (a commit of this repository) is checked out into a temporary worktree and measured beside the working tree.
A step's modules: every `fewshot_cli` module with a function called from one `Task.train_step` call to the next
(the step itself and the runner's work around it: accumulation, guard, log, probes), in a real run at the cpu
preset, traced with `sys.setprofile`."""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from test_imports import PACKAGE, cycles, imports, modules  # noqa: E402 - the suite's own walker, one copy

#: run in a fresh interpreter under the checkout's PYTHONPATH: prints the step's modules as JSON
STEP_TRACER = r"""
import json, sys
seen, calls = [], {"n": 0}
def profile(frame, event, arg):
    if event != "call":
        return
    name = frame.f_globals.get("__name__", "")
    if frame.f_code.co_name == "train_step" and name.startswith("fewshot_cli.commands"):
        calls["n"] += 1
    if calls["n"] == 3 and name.startswith("fewshot_cli"):
        seen.append(name)
sys.setprofile(profile)
from fewshot_cli.cli import main
try:
    main()
except SystemExit:
    pass
sys.setprofile(None)
print("STEP_MODULES " + json.dumps(sorted(set(seen))))
"""


def longest(trees: dict[str, ast.Module], most: int = 10) -> list[tuple[str, int]]:
    sizes = []
    for name, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                sizes.append((f"{name.removeprefix(PACKAGE + '.')}.{node.name}", node.end_lineno - node.lineno + 1))
    return sorted(sizes, key=lambda s: -s[1])[:most]


def step_modules(root: Path) -> list[str]:
    with tempfile.TemporaryDirectory() as out:
        args = ["mahalanobis-train", "--preset", "cpu", "--episodes", "4", "--val-every", "100",
                "--test-episodes", "2", "--checkpoint-every", "100", "--out", out, "--name", "shape"]
        done = subprocess.run([sys.executable, "-c", STEP_TRACER, *args], capture_output=True, text=True,
                              env={"PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
                              cwd=out, timeout=600)
    line = next((x for x in done.stdout.splitlines() if x.startswith("STEP_MODULES ")), None)
    if line is None:
        raise SystemExit(f"the traced run failed in {root}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return json.loads(line.removeprefix("STEP_MODULES "))


def shape(root: Path) -> dict:
    trees = modules(root)
    known = set(trees)
    graph, everything, inner_count = {}, {}, 0
    for name, tree in trees.items():
        top, inner, count = imports(tree, name, known)
        graph[name] = top - {name}
        everything[name] = (top | inner) - {name}
        inner_count += count
    return {"imports_in_functions": inner_count, "cycles_module_level": cycles(graph),
            "cycles_with_function_imports": cycles(everything), "longest": longest(trees),
            "step_modules": step_modules(root), "modules": len(trees)}


def render(before: dict, after: dict, rev: str) -> str:
    lines = [f"| | before ({rev}) | after (working tree) |", "|---|---|---|",
             f"| modules in the package | {before['modules']} | {after['modules']} |",
             f"| imports inside functions | {before['imports_in_functions']} | {after['imports_in_functions']} |"]
    for key, label in (("cycles_module_level", "import cycles, module level"),
                       ("cycles_with_function_imports", "import cycles, counting imports inside functions")):
        def text(found: list[list[str]]) -> str:
            return f"{len(found)}" + (": " + "; ".join(" ↔ ".join(c) for c in found) if found else "")
        lines.append(f"| {label} | {text(before[key])} | {text(after[key])} |")
    lines.append(f"| modules one mahalanobis-train step passes through | {len(before['step_modules'])} | "
                 f"{len(after['step_modules'])} |")
    lines += ["", "Ten longest functions (lines):", "", "| before | lines | after | lines |", "|---|---|---|---|"]
    for (b, bn), (a, an) in zip(before["longest"], after["longest"], strict=True):
        lines.append(f"| `{b}` | {bn} | `{a}` | {an} |")
    for label, found in (("before", before), ("after", after)):
        lines += ["", f"A step's modules, {label}: " + ", ".join(m.removeprefix(PACKAGE + ".")
                                                              for m in found["step_modules"])]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="a commit to measure beside the working tree")
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "baseline"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(base), args.baseline],
                       check=True)
        try:
            before = shape(base)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], check=True)
    table = render(before, shape(ROOT), args.baseline)
    print(table)
    if args.markdown:
        args.markdown.write_text("# The code's shape\n\n`python benchmarks/code_shape.py --baseline "
                                 f"{args.baseline}`\n\n" + table)


if __name__ == "__main__":
    main()
