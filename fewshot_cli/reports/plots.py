"""Plots from run directories: a results table's bars, one run's memory over its steps, runs side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fewshot_cli.errors import BadInput
from fewshot_cli.reports.files import figure, save_figure
from fewshot_cli.reports.memory import series_by_phase
from fewshot_cli.reports.runs import read_run_log

#: the report commands' plots (tables, memory) are drawn a little finer than a run's own figures
DPI = 120


def plot_table(table: dict[str, Any], path: Path) -> None:
    """A bar chart of the table's first metric: the first group key along x, one bar per value of the others."""
    if not table["metrics"] or not table["rows"]:
        raise BadInput("Nothing to plot: the table has no metric or no row.")
    metric, keys, rows = table["metrics"][0], table["keys"], table["rows"]
    x_values = list(dict.fromkeys(row[keys[0]] for row in rows)) if keys else ["all"]
    series = list(dict.fromkeys(tuple(row[k] for k in keys[1:]) for row in rows))
    width = 0.8 / len(series)
    fig, ax = figure(max(4.5, 1.2 * len(x_values) * max(1, len(series) / 2) + 2), 3.8)
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
    save_figure(fig, path, DPI)


def plot_memory(run_dir: Path, path: Path) -> None:
    """One line per memory series over steps; validation and test shaded; leak warnings and OOM back-offs marked."""
    events = read_run_log(run_dir)
    phases = series_by_phase(events)
    if not phases.get("train"):
        raise BadInput(f"{run_dir}'s log has no training step with a memory record; nothing to plot.")
    fig, ax = figure(8, 4)
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
    save_figure(fig, path, DPI)


def plot_memory_runs(run_dirs: list[Path], path: Path, series: str = "rss_mb") -> None:
    """One memory series over training steps, one line per run (runs compared side by side)."""
    fig, ax = figure(8, 4)
    for run_dir in sorted(Path(d) for d in run_dirs):
        points = series_by_phase(read_run_log(run_dir)).get("train", {}).get(series)
        if not points:
            raise BadInput(f"{run_dir}'s log has no {series} on its training steps; nothing to plot.")
        ax.plot([p[0] for p in points], [p[1] for p in points], label=run_dir.name, linewidth=1.2)
    ax.legend(fontsize=8, loc="best")
    ax.set_xlabel("training step")
    ax.set_ylabel(f"{series} (MiB)")
    ax.set_title(f"{series} over training steps")
    save_figure(fig, path, DPI)
