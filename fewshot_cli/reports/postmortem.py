"""A run whose log ends without `run_end` (the OOM killer, `kill -9`): where it stopped and the likely cause."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import psutil

MiB = 2**20
#: the share of the machine's memory from which the OOM killer is the likely cause
NEAR_FULL = 0.8


def killed(events: list[dict[str, Any]], config: dict[str, Any], leaks: list[dict[str, Any]]) -> dict[str, Any] | None:
    """None when the log has a `run_end` or its process is still running here; else the last step, the last memory
    figures against the limit the run was held to (`memory_limit` of config.json: a container's, the machine's) or,
    for a run that did not record one, the machine's total memory; the cgroup's oom-kill count where it can still
    be read; and the likely cause in one sentence."""
    if not events or any(e.get("event") == "run_end" for e in events) or _still_running(events):
        return None
    steps = [e["step"] for e in events if e.get("event") == "step"]
    last_mem = next((e for e in reversed(events) if isinstance(e.get("mem"), dict)), None)
    limit = config.get("memory_limit") or {}
    recorded = limit.get("bytes") or config.get("machine_memory_bytes")
    total_mb = (recorded or psutil.virtual_memory().total) / MiB
    mem = dict(last_mem["mem"]) if last_mem else {}
    # this process and its workers, pages shared between them counted once where the run measured that
    held = mem.get("total_pss_mb") or mem.get("rss_mb", 0.0) + mem.get("workers_pss_mb", 0.0)
    report = {"last_step": steps[-1] if steps else 0, "last_event": events[-1].get("event"),
              "last_phase": last_mem.get("phase", "train") if last_mem else None, "mem": mem,
              "held_mb": round(held, 1), "machine_memory_mb": round(total_mb, 1),
              "machine_memory_recorded": bool(recorded), "share": round(held / total_mb, 3) if total_mb else None,
              "limit": limit.get("text", "the machine's memory"), "limit_mb": round(total_mb, 1),
              "oom_kills": oom_kills(limit.get("where"))}
    report["likely_cause"] = _cause(report, leaks)
    return report


def _still_running(events: list[dict[str, Any]]) -> bool:
    """Whether the process that wrote the last `run_start` is alive on this machine."""
    start = next((e for e in reversed(events) if e.get("event") == "run_start"), {})
    pid = start.get("pid")
    if not isinstance(pid, int) or start.get("host") != platform.node():
        return False
    try:
        return psutil.Process(pid).create_time() <= float(start.get("time", 0)) + 1  # not a later process's pid
    except psutil.Error:
        return False


def oom_kills(cgroup_dir: str | None) -> int | None:
    """The OOM kills a cgroup's kernel counters show (v1 memory.oom_control, v2 memory.events), where it still
    exists and says."""
    if not cgroup_dir:
        return None
    for name in ("memory.oom_control", "memory.events"):
        try:
            for line in (Path(cgroup_dir) / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            continue
    return None


def _cause(report: dict[str, Any], leaks: list[dict[str, Any]]) -> str:
    share = report["share"] or 0.0
    where = f"{report['held_mb']:,.0f} MiB of {report['limit']}, {report['limit_mb']:,.0f} MiB"
    if report.get("oom_kills"):
        return (f"the kernel's OOM killer: {report['limit']} counts {report['oom_kills']} OOM kill(s); the run held "
                f"{where} ({share:.0%}) at its last record")
    if share >= NEAR_FULL:
        return (f"the kernel's OOM killer, most likely: the run held {where} ({share:.0%}) at its last record; "
                f"lower its memory (a smaller batch, fewer --workers) or give it a --memory-budget")
    if leaks:
        series = ", ".join(sorted({x["series"] for x in leaks}))
        return (f"the kernel's OOM killer after a leak, most likely: {series} kept growing and held {where} "
                f"({share:.0%}) at its last record")
    return (f"killed from outside (kill -9, a scheduler's limit, a closed session) or by a peak after the last "
            f"record: it held only {where} ({share:.0%}) at its last record")
