"""Tables and plots from run directories: results tables, memory reports, the environment and presets."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import psutil
import torch

from fewshot_cli.errors import BadInput
from fewshot_cli.runner.leaks import LeakDetector
from fewshot_cli.runner.log import read_log
from fewshot_cli.runner.loop import versions

#: metrics read from the log rather than metrics.json; they depend on the machine
LOG_METRICS = ("peak_rss_mb", "peak_cuda_allocated_mb", "episodes_per_s")
META_KEYS = ("command", "preset", "seed", "device")


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
        out.append(f"{command}")
        out.append("  " + f"{'knob':<24}" + "".join(f"{n:>12}" for n in names))
        for k in knobs:
            out.append("  " + f"{k:<24}" + "".join(f"{str(presets[n].get(k, '')):>12}" for n in names))
        out.append("")
    return "\n".join(out)


# -- runs ------------------------------------------------------------------------------------------------

def load_run(run_dir: Path) -> dict[str, Any]:
    """A run's config, final metrics (None if it did not complete), status and figures from its log."""
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise BadInput(f"{run_dir} is not a run directory (no config.json).")
    config = json.loads(config_path.read_text())
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else None
    events = read_log(run_dir / "log.jsonl") if (run_dir / "log.jsonl").is_file() else []
    ends = [e for e in events if e.get("event") == "run_end"]
    status = "completed" if metrics is not None else (ends[-1].get("status") if ends else "running or killed")
    return {"dir": run_dir, "config": config, "metrics": metrics, "status": status, "log": log_figures(events)}


def log_figures(events: list[dict[str, Any]]) -> dict[str, float]:
    steps = [e for e in events if e.get("event") == "step"]
    figures: dict[str, float] = {}
    rss = [e["mem"]["rss_mb"] for e in events if "mem" in e]
    if rss:
        figures["peak_rss_mb"] = max(rss)
    cuda = [e["mem"].get("cuda_peak_mb", 0) for e in events if "mem" in e]
    if any(cuda):
        figures["peak_cuda_allocated_mb"] = max(cuda)
    seconds = sum(e.get("step_s", 0.0) for e in steps)
    if steps and seconds > 0:
        figures["episodes_per_s"] = len(steps) / seconds
    return figures


def _key_value(run: dict[str, Any], key: str) -> Any:
    config = run["config"]
    if key in META_KEYS:
        return config.get(key)
    if key in config.get("knobs", {}):
        return config["knobs"][key]["value"]
    raise BadInput(f"--group-by {key}: {run['dir']} has no config key {key!r}.")


def build_table(run_dirs: list[Path], metrics: list[str], group_by: list[str]) -> dict[str, Any]:
    """Group completed runs by config keys; mean and 95% CI over the runs (seeds) of each group."""
    runs = [load_run(Path(d)) for d in run_dirs]
    done = [r for r in runs if r["metrics"] is not None]
    incomplete = sorted((str(r["dir"]), r["status"]) for r in runs if r["metrics"] is None)
    if not metrics:
        common = set.intersection(*(set(r["metrics"]) for r in done)) if done else set()
        metrics = sorted(common)
        if done and not metrics:
            raise BadInput("These runs share no metric; choose columns with --metric.")
    for r in done:
        for m in metrics:
            if m not in r["metrics"] and m not in r["log"]:
                have = ", ".join(sorted(r["metrics"]))
                raise BadInput(f"{r['dir']} has no metric {m!r} (it has {have}); these runs are not comparable.")
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in done:
        groups[tuple(_key_value(r, k) for k in group_by)].append(r)
    rows = []
    for key in sorted(groups, key=_sort_key):
        members = groups[key]
        row: dict[str, Any] = dict(zip(group_by, key, strict=True))
        row["runs"] = len(members)
        for m in metrics:
            values = [float(r["metrics"].get(m, r["log"].get(m, math.nan))) for r in members]
            mean = statistics.fmean(values)
            ci = 1.96 * statistics.pstdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
            row[m] = (mean, ci)
        rows.append(row)
    return {"keys": group_by, "metrics": metrics, "rows": rows, "incomplete": incomplete}


def _sort_key(key: tuple) -> tuple:
    return tuple((0, v, "") if isinstance(v, int | float) and not isinstance(v, bool) else (1, 0, str(v))
                 for v in key)


def summary_table(run_dirs: list[Path]) -> dict[str, Any]:
    """One row per run of any command: its primary metrics side by side (the demo's table)."""
    rows = []
    for d in run_dirs:
        r = load_run(d)
        for name, value in sorted((r["metrics"] or {}).items()):
            rows.append({"command": r["config"]["command"], "metric": name, "runs": 1, "value": (value, None)})
    return {"keys": ["command", "metric"], "metrics": ["value"], "rows": rows, "incomplete": []}


def _cell(value: Any, fmt: str) -> str:
    if isinstance(value, tuple):
        mean, ci = value
        text = _number(mean)
        return text if ci is None else (f"{text} ± {_number(ci)}" if fmt != "latex" else f"{text} $\\pm$ {_number(ci)}")
    return _number(value) if isinstance(value, float) else str(value)


def _number(value: float) -> str:
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return f"{value:.4f}"


def render_table(table: dict[str, Any], fmt: str) -> str:
    header = [*table["keys"], "runs", *table["metrics"]]
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        columns = [*table["keys"], "runs"]
        for m in table["metrics"]:
            columns += [m, f"{m}_ci95"]
        writer.writerow(columns)
        for row in table["rows"]:
            cells = [row[k] for k in table["keys"]] + [row["runs"]]
            for m in table["metrics"]:
                mean, ci = row[m]
                cells += [_number(mean), "" if ci is None else _number(ci)]
            writer.writerow(cells)
        return buffer.getvalue()
    body = [[_cell(row[h], fmt) for h in header] for row in table["rows"]]
    if fmt == "latex":
        esc = [[_latex(c) for c in row] for row in [header, *body]]
        lines = [f"\\begin{{tabular}}{{{'l' * len(table['keys'])}{'r' * (len(header) - len(table['keys']))}}}",
                 "\\hline", " & ".join(esc[0]) + " \\\\", "\\hline"]
        lines += [" & ".join(row) + " \\\\" for row in esc[1:]]
        lines += ["\\hline", "\\end{tabular}"]
        text = "\n".join(lines) + "\n"
    else:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        text = "\n".join(lines) + "\n"
    if table["incomplete"]:
        text += "\nIncomplete runs (not averaged in):\n" + "".join(f"- {d}: {s}\n" for d, s in table["incomplete"])
    return text


def _latex(text: str) -> str:
    if "$\\pm$" in text:
        return text
    for a, b in (("\\", "\\textbackslash{}"), ("&", "\\&"), ("%", "\\%"), ("_", "\\_"), ("#", "\\#")):
        text = text.replace(a, b)
    return text


def plot_table(table: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not table["metrics"]:
        raise BadInput("Nothing to plot: the table has no metric.")
    metric = table["metrics"][0]
    labels = [", ".join(str(row[k]) for k in table["keys"]) or "all" for row in table["rows"]]
    means = [row[metric][0] for row in table["rows"]]
    errors = [row[metric][1] or 0.0 for row in table["rows"]]
    fig, ax = plt.subplots(figsize=(max(4, 0.8 * len(labels) + 2), 3.5))
    ax.bar(range(len(labels)), means, yerr=errors, capsize=4, color="#4c72b0")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_ylabel(metric)
    ax.set_xlabel(", ".join(table["keys"]))
    ax.set_title(f"{metric} by {', '.join(table['keys']) or 'run'}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- memory ------------------------------------------------------------------------------------------------

def _series_by_phase(events: list[dict[str, Any]]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    phases: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    for e in events:
        if e.get("event") in ("step", "eval") and "mem" in e:
            for series, value in e["mem"].items():
                phases[e.get("phase", "train")][series].append((int(e.get("step", 0)), float(value)))
    return phases


def memreport(run_dir: Path) -> dict[str, Any]:
    """Peak and growth (after warm-up) per phase and series, and the leak verdict."""
    log_path = run_dir / "log.jsonl"
    if not log_path.is_file():
        raise BadInput(f"{run_dir} has no log.jsonl; it is not a run directory.")
    events = read_log(log_path)
    phases = {}
    for phase, series in sorted(_series_by_phase(events).items()):
        peak = {s: max(v for _, v in points) for s, points in sorted(series.items())}
        growth = {}
        for s, points in sorted(series.items()):
            if s.endswith("_peak_mb"):
                continue
            skip = len(points) // 10 if len(points) >= 10 else 0
            growth[s] = round(points[-1][1] - points[skip][1], 2)
        phases[phase] = {"peak_mb": peak, "growth_mb": growth}
    leaks = [{k: e[k] for k in ("series", "growth_mb", "window_steps", "step") if k in e}
             for e in events if e.get("event") == "leak_warning"]
    if not leaks:  # the log may predate a warning (a killed run): look again at the whole series
        steps = [e for e in events if e.get("event") == "step" and "mem" in e]
        detector = LeakDetector.for_run(len(steps))
        for e in steps:
            leaks += [{"series": v.series, "growth_mb": v.growth_mb, "window_steps": v.window_steps,
                       "step": v.at_step} for v in detector.observe(e["step"], e["mem"])]
    return {"phases": phases, "leak": bool(leaks), "leaks": leaks}


def render_memreport(report: dict[str, Any]) -> str:
    lines = []
    for phase, entry in report["phases"].items():
        lines.append(f"{phase}")
        for series, peak in entry["peak_mb"].items():
            growth = entry["growth_mb"].get(series)
            grown = f"  growth {growth:+,.1f} MiB" if growth is not None else ""
            lines.append(f"  {series:<22} peak {peak:>10,.1f} MiB{grown}")
    verdict = "LEAK: " + "; ".join(f"{x['series']} grew {x['growth_mb']:.1f} MiB over {x['window_steps']} steps"
                                   for x in report["leaks"]) if report["leak"] else "no leak"
    lines.append(verdict)
    return "\n".join(lines) + "\n"


def plot_memory(run_dir: Path, path: Path) -> None:
    """One line per memory series over steps; validation and test shaded; leak warnings marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    events = read_log(run_dir / "log.jsonl")
    phases = _series_by_phase(events)
    fig, ax = plt.subplots(figsize=(8, 4))
    for series, points in sorted(phases.get("train", {}).items()):
        ax.plot([p[0] for p in points], [p[1] for p in points], label=series, linewidth=1.2)
    for phase, colour in (("val", "#ffd166"), ("test", "#06d6a0")):
        for step in sorted({p[0] for pts in phases.get(phase, {}).values() for p in pts}):
            ax.axvspan(step - 0.5, step + 0.5, color=colour, alpha=0.35, label=f"{phase} evaluation")
    for e in events:
        if e.get("event") == "leak_warning":
            ax.axvline(e.get("step", 0), color="red", linestyle="--", label=f"leak warning ({e['series']})")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ax.legend(unique.values(), unique.keys(), fontsize=8, loc="best")
    ax.set_xlabel("step")
    ax.set_ylabel("MiB")
    ax.set_title(f"memory over steps: {run_dir.name}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
