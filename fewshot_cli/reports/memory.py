"""The memory report of one run: peak and growth per phase and series, the leak verdict, how it ended."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from fewshot_cli.reports.postmortem import killed
from fewshot_cli.reports.runs import is_number, read_run_log
from fewshot_cli.runner.input_wait import from_steps
from fewshot_cli.runner.leaks import LeakDetector

PHASE_ORDER = ("pretrain", "train", "val", "test")


def series_by_phase(events: list[dict[str, Any]]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    phases: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    for e in events:
        if isinstance(e.get("mem"), dict) and ("phase" in e or e.get("event") == "step"):
            mem = dict(e["mem"])
            for rank_mem in e.get("mem_ranks") or []:  # under torchrun: the worst rank
                for k, v in rank_mem.items():
                    if is_number(v):
                        mem[k] = max(mem.get(k, v), v)
            for series, value in mem.items():
                if is_number(value):
                    phases[e.get("phase", "train")][series].append((int(e.get("step", 0)), float(value)))
    return phases


def _phase_rank(phase: str) -> tuple[int, str]:
    return (PHASE_ORDER.index(phase) if phase in PHASE_ORDER else len(PHASE_ORDER), phase)


def memreport(run_dir: Path) -> dict[str, Any]:
    """Peak and growth (after warm-up) per phase and series, and the leak verdict."""
    events = read_run_log(run_dir)
    phases = {}
    for phase, series in sorted(series_by_phase(events).items(), key=lambda item: _phase_rank(item[0])):
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
        kills = "" if k.get("oom_kills") is None else f"; its OOM kills: {k['oom_kills']}"
        lines.append(f"held to {k['limit']}, {k['limit_mb']:,.0f} MiB{kills}; last record {k['held_mb']:,.0f} MiB "
                     f"({k['share']:.0%})")
    waited = report.get("input")
    if waited:
        lines.append(waited.get("advice") or f"input wait {waited['data_wait_share']:.0%} of step time")
    return "\n".join(lines) + "\n"
