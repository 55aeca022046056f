"""Every run checks its plan: at the end of each phase, the plan's predicted peak against the peak measured in it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from fewshot_cli.memory.measure import MiB, freed_memory_returned, probe, return_freed_memory
from fewshot_cli.memory.terms import OUTSIDE_THE_MEASURE

#: the phases that train (a gradient, an optimizer step); the others evaluate
TRAINING_PHASES = ("pretrain", "train")


def measured(device: torch.device, mem: dict[str, float], baseline_mb: float) -> dict[str, float]:
    """One probe's figures for the check: on CUDA the caching allocator's peak reserved (and allocated beside it),
    on MPS the driver's allocated memory, on the CPU the peak resident set less the resident set before the run
    built its model."""
    if device.type == "cuda":
        return {"measured_mb": mem.get("cuda_reserved_peak_mb", mem.get("cuda_reserved_mb", 0.0)),
                "allocated_mb": mem.get("cuda_peak_mb", mem.get("cuda_allocated_mb", 0.0))}
    if device.type == "mps":
        return {"measured_mb": mem.get("mps_driver_mb", 0.0)}
    return {"measured_mb": max(0.0, mem.get("rss_peak_mb", mem["rss_mb"]) - baseline_mb)}


class PlanCheck:
    """Folds each phase's probes into its peak and, at the phase's end (the run says when), gives the `plan_check`
    event's fields."""

    def __init__(self, device: torch.device, predicted_mb: dict[str, float], baseline_mb: float) -> None:
        self.device, self.predicted_mb, self.baseline_mb = device, predicted_mb, baseline_mb
        self.peaks: dict[str, dict[str, float]] = {}
        self.seen: set[str] = set()
        self.held: dict[str, float] = {}

    def predicted(self, phase: str) -> float | None:
        """The plan's peak for the phase (validation: the test's). A CUDA or MPS allocator keeps what earlier
        phases reserved, so there a phase's measure is at least the largest plan of the phases run so far."""
        own = self._own(phase)
        if own is None or self.device.type == "cpu":
            return own
        return max([own, *(x for x in map(self._own, self.seen) if x is not None)])

    def _own(self, phase: str) -> float | None:
        return self.predicted_mb.get(phase, self.predicted_mb.get("test") if phase == "val" else None)

    def observe(self, phase: str, mem: dict[str, float]) -> None:
        self.seen.add(phase)
        peak = self.peaks.setdefault(phase, {})
        for name, value in measured(self.device, mem, self.baseline_mb).items():
            peak[name] = max(peak.get(name, 0.0), value)

    def hold(self, mem: dict[str, float]) -> None:
        """A probe taken inside an evaluation (its progress): it counts towards the evaluation's peak."""
        self.held = {k: max(v, self.held.get(k, v)) for k, v in mem.items()}

    def observe_evaluation(self, phase: str, mem: dict[str, float]) -> None:
        """An evaluation's closing probe, with those held while it ran."""
        for probe_mb in (self.held, mem):
            if probe_mb:
                self.observe(phase, probe_mb)
        self.held = {}

    def end(self, phase: str) -> dict[str, Any] | None:
        """The check of the phase now ending (None if it saw no probe or has no prediction); its peak starts over."""
        peak = self.peaks.pop(phase, None)
        predicted = self.predicted(phase)
        if not peak or predicted is None or not peak["measured_mb"]:
            return None
        if self.device.type == "cuda":  # the device's memory in use now, the context and libraries included
            free, total = torch.cuda.mem_get_info(self.device)
            peak["device_used_mb"] = (total - free) / MiB
        error = (predicted - peak["measured_mb"]) / peak["measured_mb"]  # before rounding: a peak may round to 0.0
        fields = {"phase": phase, "predicted_mb": round(predicted, 1), **{k: round(v, 1) for k, v in peak.items()}}
        if self.device.type == "cpu":  # the plan assumes freed tensors go back to the system
            fields["freed_returned"] = freed_memory_returned()
        return {**fields, "error": round(error, 4)}


def predicted_mb(report: dict[str, Any]) -> dict[str, float]:
    """Per phase, the part of a plan the run's own measure sees: the plan's lines less those outside it."""
    outside = OUTSIDE_THE_MEASURE[torch.device(report["device"]).type]
    return {phase: (entry["peak_bytes"] - sum(entry["components"].get(n, 0) for n in outside)) / MiB
            for phase, entry in report["phases"].items()}


def recorded(run_dir: Path, launched: dict[str, Any] | None) -> dict[str, Any] | None:
    """The plan a run was started with: the launcher's (`launched`), or on resume config.json's."""
    record = launched
    config_path = run_dir / "config.json"
    if record is None and config_path.is_file():
        record = json.loads(config_path.read_text()).get("plan")
    return record if record and "predicted_mb" in record else None


def start(device: torch.device) -> float:
    """At a run's start, before its model is built: make the CPU allocator behave as the plan assumes; return the
    resident set (MiB) the CPU measure starts from."""
    return_freed_memory(device)
    return probe(device)["rss_mb"]


def earlier_checks(runs_dir: Path, command: str, knobs: dict[str, Any], device: torch.device) -> list[dict[str, Any]]:
    """The plan checks of earlier runs of the same configuration (command, knob values, device kind) under
    `runs_dir`: per run its directory and each phase's error."""
    found = []
    values = {name: entry["value"] for name, entry in knobs.items()}
    for config_path in sorted(Path(runs_dir).glob("*/config.json")):
        try:
            config = json.loads(config_path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        same = (config.get("command") == command and str(config.get("device", "")).split(":")[0] == device.type
                and {k: v.get("value") for k, v in config.get("knobs", {}).items()} == values)
        log = config_path.parent / "log.jsonl"
        if not same or not log.is_file():
            continue
        checks = [e for e in map(_event, log.read_text().splitlines()) if e and e.get("event") == "plan_check"]
        if checks:
            found.append({"run": str(config_path.parent), "errors": {e["phase"]: e["error"] for e in checks}})
    return found


def _event(line: str) -> dict[str, Any] | None:
    try:
        return json.loads(line)
    except json.JSONDecodeError:  # a run killed mid-line
        return None


def render_earlier(found: list[dict[str, Any]]) -> str:
    if not found:
        return ""
    lines = [f"  plan error seen on {len(found)} earlier run(s) of this configuration:"]
    for entry in found:
        errors = ", ".join(f"{phase} {100 * error:+.1f}%" for phase, error in entry["errors"].items())
        lines.append(f"    {entry['run']}: {errors}")
    return "\n".join(lines) + "\n"
