"""Tables and plots from run directories: results tables, memory reports, the environment and presets."""

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

import psutil
import torch

from fewshot_cli.errors import BadInput
from fewshot_cli.postmortem import killed
from fewshot_cli.runner.input_wait import from_steps
from fewshot_cli.runner.leaks import LeakDetector
from fewshot_cli.runner.log import read_log
from fewshot_cli.runner.loop import versions

#: metrics read from the log rather than metrics.json; they depend on the machine
LOG_METRICS = ("peak_rss_mb", "peak_cuda_allocated_mb", "episodes_per_s", "wall_s", "plan_error")
META_KEYS = ("command", "preset", "seed", "device", "data")
#: bookkeeping, not a result: left out of the default columns
NOT_RESULTS = ("test_episodes",)
PHASE_ORDER = ("train", "val", "test")


def environment() -> dict[str, Any]:
    info: dict[str, Any] = dict(versions())
    info["cpu_count"] = psutil.cpu_count()
    info["ram_bytes"] = psutil.virtual_memory().total
    info["cuda_devices"] = [{"index": i, "name": torch.cuda.get_device_name(i),
                             "memory_bytes": torch.cuda.get_device_properties(i).total_memory}
                            for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    info["mps_available"] = bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    return info


def render_presets(table: dict[str, dict[str, dict[str, Any]]]) -> str:
    out = []
    for command, presets in table.items():
        names = list(presets)
        knobs = sorted({k for values in presets.values() for k in values})
        width = max(len(n) for n in [*names, *(str(v) for values in presets.values() for v in values.values())]) + 2
        out.append(f"{command}")
        out.append("  " + f"{'knob':<24}" + "".join(f"{n:>{width}}" for n in names))
        for k in knobs:
            out.append("  " + f"{k:<24}" + "".join(f"{str(presets[n].get(k, '')):>{width}}" for n in names))
        out.append("")
    return "\n".join(out)


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


# -- runs ------------------------------------------------------------------------------------------------

def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadInput(f"{path} is not valid JSON ({what}): {err}.") from None


def load_run(run_dir: Path) -> dict[str, Any]:
    """A run's config, final metrics (None if it did not complete), status and figures from its log."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise BadInput(f"{run_dir} is not a run directory (no config.json).")
    config = _read_json(config_path, "the run's config")
    metrics_path = run_dir / "metrics.json"
    metrics = _read_json(metrics_path, "the run's final metrics") if metrics_path.is_file() else None
    events = read_log(run_dir / "log.jsonl") if (run_dir / "log.jsonl").is_file() else []
    ends = [e for e in events if e.get("event") == "run_end"]
    if metrics is not None:
        status = "completed"
    elif ends:
        status = str(ends[-1].get("status"))
        if status == "completed":  # a completed run always leaves metrics.json behind
            status = "completed but metrics.json is missing"
    else:
        status = "running or killed (no run_end)"
    return {"dir": run_dir, "config": config, "metrics": metrics, "status": status, "log": log_figures(events)}


def log_figures(events: list[dict[str, Any]]) -> dict[str, float]:
    """Peak RSS, peak CUDA allocated (MiB) and training episodes per second, from a run's own log."""
    mems = [e["mem"] for e in events if isinstance(e.get("mem"), dict)]
    figures: dict[str, float] = {}
    rss = [m["rss_mb"] for m in mems if isinstance(m.get("rss_mb"), int | float)]
    if rss:
        figures["peak_rss_mb"] = max(rss)
    cuda = [m.get("cuda_peak_mb", m.get("cuda_allocated_mb")) for m in mems]
    cuda = [v for v in cuda if isinstance(v, int | float)]
    if cuda:
        figures["peak_cuda_allocated_mb"] = max(cuda)
    checks = [e for e in events if e.get("event") == "plan_check" and isinstance(e.get("measured_mb"), int | float)]
    if checks:  # the plan's error at the run's own peak, the phase a budget has to hold
        figures["plan_error"] = max(checks, key=lambda e: e["measured_mb"])["error"]
    steps = [e for e in events if e.get("event") == "step"]
    seconds = sum(e.get("step_s", 0.0) for e in steps)
    if steps and seconds > 0:
        figures["episodes_per_s"] = len(steps) / seconds
    ends = [e for e in events if e.get("event") == "run_end" and isinstance(e.get("elapsed_s"), int | float)]
    if ends:  # a resumed run's clock goes on from where it stopped
        figures["wall_s"] = ends[-1]["elapsed_s"]
    return figures


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
    from scipy.stats import t

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
        _warn(f"{len(incomplete)} run(s) did not complete and are not averaged in: "
              + "; ".join(f"{d} ({s})" for d, s in incomplete))
    if not metrics:
        commands = sorted({str(r["config"].get("command")) for r in done})
        common = set.intersection(*(set(r["metrics"]) for r in done)) - set(NOT_RESULTS)
        metrics = sorted(m for m in common if all(_is_number(r["metrics"][m]) for r in done))
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


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_group(key: tuple, members: list[dict[str, Any]], group_by: list[str]) -> None:
    """Warn when runs averaged together differ in more than their seed: the mean would mix configurations."""
    if len(members) < 2:
        return
    names = sorted({k for r in members for k in r["config"].get("knobs", {})} | {"command", "data"})
    differ = [n for n in names if n not in group_by
              and len({json.dumps(_key_value_or_none(r, n), sort_keys=True) for r in members}) > 1]
    label = ", ".join(f"{k}={v}" for k, v in zip(group_by, key, strict=True)) or "all runs"
    if differ:
        _warn(f"the runs averaged in group ({label}) differ in {', '.join(differ)}, not only in seed; "
              f"add {'them' if len(differ) > 1 else 'it'} to --group-by to split them.")
    seeds = [r["config"].get("seed") for r in members]
    if len(set(map(str, seeds))) < len(seeds):
        _warn(f"group ({label}) holds several runs of the same seed; its confidence interval is too narrow.")


def _key_value_or_none(run: dict[str, Any], key: str) -> Any:
    try:
        return _key_value(run, key)
    except BadInput:
        return None


def _sort_key(key: tuple) -> tuple:
    return tuple((0, v, "") if _is_number(v) else (1, 0, str(v)) for v in key)


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
            if _is_number(value) and (keep is None or name in keep):
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
                     str(round(values["test_episodes"])) if _is_number(values.get("test_episodes")) else "—",
                     "—" if seconds is None else f"{seconds:.0f} s",
                     f"{log['peak_rss_mb']:.0f} MiB" if "peak_rss_mb" in log else "—"])
    lines = ["| " + " | ".join(DEMO_HEADER) + " |", "|" + "|".join("---" for _ in DEMO_HEADER) + "|"]
    lines += ["| " + " | ".join(_md(str(c)) for c in row) + " |" for row in rows]
    text = "\n".join(lines) + "\n"
    if incomplete:
        text += "\nIncomplete runs:\n\n" + "".join(incomplete)
    return text


def _figure(value: Any) -> str:
    return _number(value) if _is_number(value) else "—"


# -- rendering -------------------------------------------------------------------------------------------

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
    return _number(value) if _is_number(value) else str(value)


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


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # no creation date in the file, so a plot made twice from the same runs is the same bytes
    fig.savefig(path, dpi=120, metadata={"Software": None})
    _pyplot().close(fig)


def plot_table(table: dict[str, Any], path: Path) -> None:
    """A bar chart of the table's first metric: the first group key along x, one bar per value of the others."""
    plt = _pyplot()
    if not table["metrics"] or not table["rows"]:
        raise BadInput("Nothing to plot: the table has no metric or no row.")
    metric, keys, rows = table["metrics"][0], table["keys"], table["rows"]
    x_values = list(dict.fromkeys(row[keys[0]] for row in rows)) if keys else ["all"]
    series = list(dict.fromkeys(tuple(row[k] for k in keys[1:]) for row in rows))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(4.5, 1.2 * len(x_values) * max(1, len(series) / 2) + 2), 3.8))
    for i, s in enumerate(series):
        xs, means, errors = [], [], []
        for row in rows:
            if tuple(row[k] for k in keys[1:]) != s:
                continue
            xs.append(x_values.index(row[keys[0]]) if keys else 0)
            means.append(row[metric][0])
            errors.append(row[metric][1] or 0.0)
        offsets = [x - 0.4 + width * (i + 0.5) for x in xs]
        label = ", ".join(f"{k}={v}" for k, v in zip(keys[1:], s, strict=True)) or None
        ax.bar(offsets, means, width=width * 0.95, yerr=errors, capsize=3, label=label)
    ax.set_xticks(range(len(x_values)), [str(v) for v in x_values])
    ax.set_xlabel(keys[0] if keys else "")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} by {', '.join(keys) or 'run'}" + (" (bars: 95% CI over runs)" if any(
        row[metric][1] for row in rows) else ""))
    if len(series) > 1:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    _save(fig, path)


# -- memory ------------------------------------------------------------------------------------------------

def _series_by_phase(events: list[dict[str, Any]]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    phases: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    for e in events:
        if isinstance(e.get("mem"), dict) and ("phase" in e or e.get("event") == "step"):
            mem = dict(e["mem"])
            for rank_mem in e.get("mem_ranks") or []:  # under torchrun: the worst rank
                for k, v in rank_mem.items():
                    if _is_number(v):
                        mem[k] = max(mem.get(k, v), v)
            for series, value in mem.items():
                if _is_number(value):
                    phases[e.get("phase", "train")][series].append((int(e.get("step", 0)), float(value)))
    return phases


def _phase_rank(phase: str) -> tuple[int, str]:
    return (PHASE_ORDER.index(phase) if phase in PHASE_ORDER else len(PHASE_ORDER), phase)


def _read_run_log(run_dir: Path) -> list[dict[str, Any]]:
    log_path = Path(run_dir) / "log.jsonl"
    if not log_path.is_file():
        raise BadInput(f"{run_dir} has no log.jsonl; it is not a run directory.")
    return read_log(log_path)


def memreport(run_dir: Path) -> dict[str, Any]:
    """Peak and growth (after warm-up) per phase and series, and the leak verdict."""
    events = _read_run_log(run_dir)
    phases = {}
    for phase, series in sorted(_series_by_phase(events).items(), key=lambda item: _phase_rank(item[0])):
        peak = {s: max(v for _, v in points) for s, points in sorted(series.items())}
        growth = {}
        for s, points in sorted(series.items()):
            if s.endswith("_peak_mb"):
                continue  # a peak since the last probe has no level to grow
            skip = len(points) // 10 if len(points) >= 10 else 0  # the first tenth is warm-up
            growth[s] = round(points[-1][1] - points[skip][1], 2)
        phases[phase] = {"peak_mb": peak, "growth_mb": growth}
    leaks = [{k: e[k] for k in ("series", "growth_mb", "window_steps", "step") if k in e}
             for e in events if e.get("event") == "leak_warning"]
    if not leaks:  # the log may predate a warning (a killed run): look again at the whole series
        steps = [e for e in events if e.get("event") == "step" and isinstance(e.get("mem"), dict)]
        detector = LeakDetector.for_run(len(steps))
        for e in steps:
            leaks += [{"series": v.series, "growth_mb": v.growth_mb, "window_steps": v.window_steps,
                       "step": v.at_step} for v in detector.observe(e.get("step", 0), e["mem"])]
    report: dict[str, Any] = {"phases": phases, "leak": bool(leaks), "leaks": leaks}
    waits = from_steps(e for e in events if e.get("event") == "step")
    if waits.step_s > 0:  # steps that timed their input
        verdict = waits.verdict(_workers(events))
        report["input"] = {"data_wait_share": round(waits.share, 4), "input_bound": verdict is not None,
                           **({"advice": verdict["advice"]} if verdict else {})}
    config_path = Path(run_dir) / "config.json"
    ended = killed(events, json.loads(config_path.read_text()) if config_path.is_file() else {}, leaks)
    return {**report, "killed": ended} if ended else report


def _workers(events: list[dict[str, Any]]) -> int:
    start = next((e for e in events if e.get("event") == "run_start"), {})
    workers = start.get("config", {}).get("workers", {})
    return int(workers.get("value", 0) if isinstance(workers, dict) else workers or 0)


def render_memreport(report: dict[str, Any]) -> str:
    lines = []
    for phase, entry in report["phases"].items():
        lines.append(f"{phase}")
        for series, peak in entry["peak_mb"].items():
            growth = entry["growth_mb"].get(series)
            grown = f"  growth {growth:+,.1f} MiB" if growth is not None else ""
            lines.append(f"  {series:<22} peak {peak:>10,.1f} MiB{grown}")
    if not report["phases"]:
        lines.append("no memory records in the log")
    verdict = "LEAK: " + "; ".join(f"{x['series']} grew {x['growth_mb']:.1f} MiB over {x['window_steps']} steps"
                                   for x in report["leaks"]) if report["leak"] else "no leak"
    lines.append(verdict)
    if report.get("killed"):
        k = report["killed"]
        lines.append(f"KILLED after step {k['last_step']} (no run_end; last event {k['last_event']}): "
                     f"likely cause: {k['likely_cause']}")
    waited = report.get("input")
    if waited:
        lines.append(waited.get("advice") or f"input wait {waited['data_wait_share']:.0%} of step time")
    return "\n".join(lines) + "\n"


def plot_memory(run_dir: Path, path: Path) -> None:
    """One line per memory series over steps; validation and test shaded; leak warnings and OOM back-offs marked."""
    plt = _pyplot()
    events = _read_run_log(run_dir)
    phases = _series_by_phase(events)
    if not phases.get("train"):
        raise BadInput(f"{run_dir}'s log has no training step with a memory record; nothing to plot.")
    fig, ax = plt.subplots(figsize=(8, 4))
    for series, points in sorted(phases["train"].items()):
        ax.plot([p[0] for p in points], [p[1] for p in points], label=series, linewidth=1.2,
                marker="." if len(points) < 60 else None)
    for phase, colour in (("val", "#ffd166"), ("test", "#06d6a0")):
        for step in sorted({p[0] for pts in phases.get(phase, {}).values() for p in pts}):
            ax.axvspan(step - 0.5, step + 0.5, color=colour, alpha=0.35, label=f"{phase} evaluation")
        for series, points in sorted(phases.get(phase, {}).items()):
            ax.scatter([p[0] for p in points], [p[1] for p in points], marker="x", color="black", zorder=3,
                       label=f"{series} at the end of an evaluation")
    for e in events:
        if e.get("event") == "leak_warning":
            ax.axvline(e.get("step", 0), color="red", linestyle="--", label=f"leak warning ({e.get('series')})")
        elif e.get("event") == "oom_backoff":
            ax.axvline(e.get("step", 0), color="purple", linestyle=":", label="OOM back-off")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ax.legend(unique.values(), unique.keys(), fontsize=8, loc="best")
    ax.set_xlabel("training step")
    ax.set_ylabel("MiB")
    ax.set_title(f"memory over steps: {Path(run_dir).name}")
    fig.tight_layout()
    _save(fig, path)


def plot_memory_runs(run_dirs: list[Path], path: Path, series: str = "rss_mb") -> None:
    """One memory series over training steps, one line per run (runs compared side by side)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    for run_dir in sorted(Path(d) for d in run_dirs):
        points = _series_by_phase(_read_run_log(run_dir)).get("train", {}).get(series)
        if not points:
            raise BadInput(f"{run_dir}'s log has no {series} on its training steps; nothing to plot.")
        ax.plot([p[0] for p in points], [p[1] for p in points], label=run_dir.name, linewidth=1.2)
    ax.legend(fontsize=8, loc="best")
    ax.set_xlabel("training step")
    ax.set_ylabel(f"{series} (MiB)")
    ax.set_title(f"{series} over training steps")
    fig.tight_layout()
    _save(fig, path)
