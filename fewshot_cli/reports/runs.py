"""Run directories read back: a run's config, final metrics, status and the figures its own log holds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fewshot_cli.errors import BadInput
from fewshot_cli.runner.log import read_log


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


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


def read_run_log(run_dir: Path) -> list[dict[str, Any]]:
    log_path = Path(run_dir) / "log.jsonl"
    if not log_path.is_file():
        raise BadInput(f"{run_dir} has no log.jsonl; it is not a run directory.")
    return read_log(log_path)


