"""Results tables from run directories: grouped means with confidence intervals, the demo's table, and their
markdown, CSV and LaTeX renderings."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from fewshot_cli.errors import BadInput
from fewshot_cli.reports.runs import is_number, load_run

#: metrics read from the log rather than metrics.json; they depend on the machine
LOG_METRICS = ("peak_rss_mb", "peak_cuda_allocated_mb", "episodes_per_s", "wall_s", "plan_error")
META_KEYS = ("command", "preset", "seed", "device", "data", "data_format", "test_data_format")
#: bookkeeping, not a result: left out of the default columns
NOT_RESULTS = ("test_episodes",)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _hashable(value: Any) -> Any:
    return json.dumps(value, sort_keys=True) if isinstance(value, list | dict) else value


def _key_value(run: dict[str, Any], key: str) -> Any:
    config = run["config"]
    if key in META_KEYS:
        return _hashable(config.get(key))
    if key in config.get("knobs", {}):
        return _hashable(config["knobs"][key]["value"])
    known = ", ".join(sorted([*META_KEYS, *config.get("knobs", {})]))
    raise BadInput(f"--group-by {key}: {run['dir']} has no config key {key!r} (it has {known}).")


def _metric_value(run: dict[str, Any], name: str) -> float | int:
    value = run["metrics"][name] if name in run["metrics"] else run["log"].get(name)
    if value is None:
        if name == "peak_cuda_allocated_mb":
            raise BadInput(f"{run['dir']} has no CUDA memory records (it ran on {run['config'].get('device')}); "
                           f"leave out --metric {name}.")
        have = ", ".join(sorted([*run["metrics"], *run["log"]]))
        raise BadInput(f"{run['dir']} has no metric {name!r} (it has {have}); these runs are not comparable.")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadInput(f"{run['dir']}: metric {name!r} is {value!r}, not a number; it cannot go in a table.")
    return value


def _ci95(values: list[float]) -> float | None:
    """Half-width of the 95% confidence interval of the mean over runs (Student t, n-1 degrees of freedom)."""
    if len(values) < 2:
        return None
    from scipy.stats import t  # scipy: loaded only for a table with intervals

    return float(t.ppf(0.975, len(values) - 1)) * statistics.stdev(values) / math.sqrt(len(values))


def build_table(run_dirs: list[Path], metrics: list[str], group_by: list[str]) -> dict[str, Any]:
    """Group completed runs by config keys; mean and 95% CI over the runs (seeds) of each group.

    The result depends only on the set of runs: runs are read in path order, a directory given twice counts once,
    rows are sorted by their key and the mean is an exactly rounded sum.
    """
    unique = {Path(d).resolve(): Path(d) for d in run_dirs}
    runs = [load_run(unique[p]) for p in sorted(unique)]
    done = [r for r in runs if r["metrics"] is not None]
    incomplete = sorted((str(r["dir"]), r["status"]) for r in runs if r["metrics"] is None)
    if not done:
        listed = "; ".join(f"{d}: {s}" for d, s in incomplete)
        raise BadInput(f"None of the {len(runs)} runs completed, so there is nothing to tabulate ({listed}).")
    if incomplete:
        warn(f"{len(incomplete)} run(s) did not complete and are not averaged in: "
              + "; ".join(f"{d} ({s})" for d, s in incomplete))
    if not metrics:
        commands = sorted({str(r["config"].get("command")) for r in done})
        common = set.intersection(*(set(r["metrics"]) for r in done)) - set(NOT_RESULTS)
        metrics = sorted(m for m in common if all(is_number(r["metrics"][m]) for r in done))
        if not metrics:
            raise BadInput(f"These runs ({', '.join(commands)}) share no metric; choose columns with --metric.")
    metrics = list(dict.fromkeys(metrics))
    for m in metrics:
        if not any(m in r["metrics"] or m in r["log"] for r in done):
            have = sorted({name for r in done for name in [*r["metrics"], *r["log"]]})
            raise BadInput(f"No run has a metric {m!r}; they have {', '.join(have)}.")
    values = {id(r): {m: _metric_value(r, m) for m in metrics} for r in done}  # every run checked before any row
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in done:
        groups[tuple(_key_value(r, k) for k in group_by)].append(r)
    rows = []
    for key in sorted(groups, key=_sort_key):
        members = groups[key]
        _check_group(key, members, group_by)
        row: dict[str, Any] = dict(zip(group_by, key, strict=True))
        row["runs"] = len(members)
        for m in metrics:
            column = [values[id(r)][m] for r in members]
            mean: float | int = math.fsum(column) / len(column)
            if all(isinstance(v, int) for v in column) and float(mean).is_integer():
                mean = int(mean)
            row[m] = (mean, _ci95([float(v) for v in column]))
        rows.append(row)
    machine = [m for m in metrics if m in LOG_METRICS]
    return {"keys": list(group_by), "metrics": metrics, "rows": rows, "incomplete": incomplete,
            "machine_dependent": machine}


def _check_group(key: tuple, members: list[dict[str, Any]], group_by: list[str]) -> None:
    """Warn when runs averaged together differ in more than their seed: the mean would mix configurations."""
    if len(members) < 2:
        return
    names = sorted({k for r in members for k in r["config"].get("knobs", {})} | {"command", "data"})
    differ = [n for n in names if n not in group_by
              and len({json.dumps(_key_value_or_none(r, n), sort_keys=True) for r in members}) > 1]
    label = ", ".join(f"{k}={v}" for k, v in zip(group_by, key, strict=True)) or "all runs"
    if differ:
        warn(f"the runs averaged in group ({label}) differ in {', '.join(differ)}, not only in seed; "
              f"add {'them' if len(differ) > 1 else 'it'} to --group-by to split them.")
    seeds = [r["config"].get("seed") for r in members]
    if len(set(map(str, seeds))) < len(seeds):
        warn(f"group ({label}) holds several runs of the same seed; its confidence interval is too narrow.")


def _key_value_or_none(run: dict[str, Any], key: str) -> Any:
    try:
        return _key_value(run, key)
    except BadInput:
        return None


def _sort_key(key: tuple) -> tuple:
    return tuple((0, v, "") if is_number(v) else (1, 0, str(v)) for v in key)


def summary_table(run_dirs: list[Path], primary: dict[str, str] | None = None) -> dict[str, Any]:
    """One row per (command, metric) of any runs: their final metrics side by side (the demo's table); with
    `primary` ({command: metric}), only that metric, its confidence interval and the test episodes."""
    rows, incomplete = [], []
    for d in run_dirs:
        r = load_run(Path(d))
        if r["metrics"] is None:
            incomplete.append((str(r["dir"]), r["status"]))
            continue
        command = r["config"].get("command")
        keep = None if primary is None or command not in primary else {
            primary[command], f"{primary[command]}_ci95", "test_episodes"}
        for name, value in r["metrics"].items():
            if is_number(value) and (keep is None or name in keep):
                rows.append({"command": r["config"].get("command"), "metric": name, "runs": 1,
                             "value": (value, None)})
    rows.sort(key=lambda row: (str(row["command"]), row["metric"]))
    return {"keys": ["command", "metric"], "metrics": ["value"], "rows": rows, "incomplete": sorted(incomplete),
            "machine_dependent": []}


DEMO_HEADER = ("command", "metric", "value", "± 95%", "second metric", "test episodes", "wall time", "peak RSS")


def demo_table(run_dirs: list[Path], metrics: dict[str, tuple[str, str | None]],
               wall_s: dict[Path, float] | None = None) -> str:
    """The demo's last word, in markdown: one row per run, its command's primary metric with the half-width of
    its 95% interval (over the test episodes; `—` where the command reports none), its secondary metric, its
    test episodes, wall time and peak RSS. `metrics` maps a command to its (primary, secondary) metric; `wall_s`
    gives a run's seconds as its caller timed them (building its data and model included), else its log's."""
    wall_s = wall_s or {}
    rows, incomplete = [], []
    for d in run_dirs:
        run = load_run(Path(d))
        if run["metrics"] is None:
            incomplete.append(f"- {run['dir']}: {run['status']}\n")
            continue
        command, values, log = run["config"].get("command"), run["metrics"], run["log"]
        primary, secondary = metrics.get(command, (None, None))
        ci = values.get(f"{primary}_ci95")
        seconds = wall_s.get(Path(d), log.get("wall_s"))
        rows.append([command, primary or "—", _figure(values.get(primary)), _figure(ci),
                     f"{secondary} {_figure(values.get(secondary))}" if secondary in values else "—",
                     str(round(values["test_episodes"])) if is_number(values.get("test_episodes")) else "—",
                     "—" if seconds is None else f"{seconds:.0f} s",
                     f"{log['peak_rss_mb']:.0f} MiB" if "peak_rss_mb" in log else "—"])
    lines = ["| " + " | ".join(DEMO_HEADER) + " |", "|" + "|".join("---" for _ in DEMO_HEADER) + "|"]
    lines += ["| " + " | ".join(_md(str(c)) for c in row) + " |" for row in rows]
    text = "\n".join(lines) + "\n"
    if incomplete:
        text += "\nIncomplete runs:\n\n" + "".join(incomplete)
    return text


def _figure(value: Any) -> str:
    return _number(value) if is_number(value) else "—"


def _number(value: float | int) -> str:
    """A figure for a person to read: integers as they are, else 4 decimals (1 from 100 up)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    value = float(value)
    if math.isnan(value) or math.isinf(value):
        return str(value)
    return f"{value:.1f}" if abs(value) >= 100 else f"{value:.4f}"


def _cell(value: Any, fmt: str) -> str:
    if isinstance(value, tuple):
        mean, ci = value
        if ci is None:
            return _number(mean)
        return f"{_number(mean)} $\\pm$ {_number(ci)}" if fmt == "latex" else f"{_number(mean)} ± {_number(ci)}"
    return _number(value) if is_number(value) else str(value)


def _csv_number(value: float | int) -> str:
    return str(value) if isinstance(value, int) else f"{float(value):.6g}"


def render_table(table: dict[str, Any], fmt: str) -> str:
    """The table as markdown, CSV (one column per mean and per CI) or a LaTeX tabular."""
    header = [*table["keys"], "runs", *table["metrics"]]
    machine = table.get("machine_dependent") or []
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        columns = [*table["keys"], "runs"]
        for m in table["metrics"]:
            columns += [m, f"{m}_ci95_over_runs"]
        writer.writerow(columns)
        for row in table["rows"]:
            cells = [row[k] for k in table["keys"]] + [row["runs"]]
            for m in table["metrics"]:
                mean, ci = row[m]
                cells += [_csv_number(mean), "" if ci is None else _csv_number(ci)]
            writer.writerow(cells)
        return buffer.getvalue()
    body = [[_cell(row[h], fmt) for h in header] for row in table["rows"]]
    several = any(row["runs"] > 1 for row in table["rows"])
    if fmt == "latex":
        esc = [[_latex(c) for c in header], *[[_latex(c, math_ok=True) for c in row] for row in body]]
        lines = [f"\\begin{{tabular}}{{{'l' * len(table['keys'])}{'r' * (len(header) - len(table['keys']))}}}",
                 "\\hline", " & ".join(esc[0]) + " \\\\", "\\hline"]
        lines += [" & ".join(row) + " \\\\" for row in esc[1:]]
        lines += ["\\hline", "\\end{tabular}"]
        if several:
            lines.append("% mean $\\pm$ half-width of the 95% confidence interval over runs (Student t)")
        if machine:
            lines.append(f"% machine-dependent columns: {', '.join(machine)}")
        lines += [f"% incomplete run, not averaged in: {d} ({s})" for d, s in table["incomplete"]]
        return "\n".join(lines) + "\n"
    lines = ["| " + " | ".join(_md(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_md(c) for c in row) + " |" for row in body]
    text = "\n".join(lines) + "\n"
    notes = []
    if several:
        notes.append("mean ± half-width of the 95% confidence interval over the runs of a row (Student t).")
    if machine:
        notes.append(f"Machine-dependent columns (measured on the machine that ran them): {', '.join(machine)}.")
    if notes:
        text += "\n" + "\n".join(notes) + "\n"
    if table["incomplete"]:
        text += "\nIncomplete runs (not averaged in):\n\n" + "".join(f"- {d}: {s}\n" for d, s in table["incomplete"])
    return text


def _md(text: str) -> str:
    return text.replace("|", "\\|")


_LATEX_SPECIALS = {"\\": "\\textbackslash{}", "&": "\\&", "%": "\\%", "$": "\\$", "#": "\\#", "_": "\\_",
                   "{": "\\{", "}": "\\}", "~": "\\textasciitilde{}", "^": "\\textasciicircum{}"}


def _latex(text: str, math_ok: bool = False) -> str:
    if math_ok and " $\\pm$ " in text:  # our own mean $\pm$ ci cell: numbers around a math-mode sign
        return " $\\pm$ ".join(_latex(part) for part in text.split(" $\\pm$ "))
    return "".join(_LATEX_SPECIALS.get(ch, ch) for ch in text)
