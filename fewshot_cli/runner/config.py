"""Typed experiment configs, presets and the record of where each knob's value came from."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from fewshot_cli.errors import BadInput

PRESETS = ("cpu", "t4", "mps", "a100", "h100")
PRESET_CHOICES = (*PRESETS, "auto")


def knob(default: Any, help: str, choices: tuple[str, ...] | None = None, minimum: float | None = None,
         cli: bool = True, result_neutral: bool = False) -> Any:
    """A config field with its help text, allowed choices and lower bound, read by the CLI and the validator.

    `result_neutral`: the knob sets how much is computed at once, never the result (an evaluation's batch), so
    `--resume` may give it another value and OOM back-off in evaluation may lower it."""
    return field(default=default, metadata={"help": help, "choices": choices, "min": minimum, "cli": cli,
                                            RESULT_NEUTRAL: result_neutral})


#: the field metadata key marking a result-neutral knob
RESULT_NEUTRAL = "result_neutral"


def result_neutral(cls: type) -> set[str]:
    """Names of the knobs of a config class that do not change a run's result."""
    return {f.name for f in dataclasses.fields(cls) if f.metadata.get(RESULT_NEUTRAL)}


@dataclass
class BaseConfig:
    """Knobs the runner itself reads; every command's config extends it."""

    val_every: int = knob(0, "training steps between validations (0: none)", minimum=0)
    val_episodes: int = knob(10, "episodes (or batches) per validation", minimum=1)
    checkpoint_every: int = knob(50, "steps between checkpoints", minimum=1)
    workers: int = knob(0, "data-loading worker processes", minimum=0)


@dataclass
class EpisodicConfig(BaseConfig):
    """Knobs shared by the episodic commands."""

    episodes: int = knob(100, "training episodes", minimum=0)
    episodes_per_step: int = knob(1, "episodes per optimiser step, its effective batch (torchrun ranks share them)",
                                  minimum=1)
    test_episodes: int = knob(100, "test episodes at the end", minimum=1)
    n_way: int = knob(5, "classes per episode", minimum=1)
    k_shot: int = knob(5, "support images per class", minimum=1)
    n_query: int = knob(15, "query images per class", minimum=1)

    def steps(self) -> int:
        """Optimiser steps: the training episodes in groups of `episodes_per_step` (the last may be short)."""
        return -(-self.episodes // self.episodes_per_step)

    def step_episodes(self, step: int) -> range:
        """The training episodes of step `step` (1-based), numbered from 0."""
        first = (step - 1) * self.episodes_per_step
        return range(first, min(first + self.episodes_per_step, self.episodes))


def config_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True)]


def validate(cfg: Any) -> None:
    """Check choices and lower bounds of every knob; a bad value is a BadInput naming the option."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise BadInput(f"--{option_name(f.name)} must be one of {', '.join(choices)}, not {value!r}.")
        minimum = f.metadata.get("min")
        if minimum is not None and value is not None and value < minimum:
            raise BadInput(f"--{option_name(f.name)} must be at least {minimum}, not {value}.")


def option_name(field_name: str) -> str:
    return field_name.replace("_", "-")


@dataclass
class Resolved:
    """A config with the source of each value: `default`, `preset`, `cli` or `planner`."""

    config: Any
    sources: dict[str, str]
    preset: str
    notes: dict[str, str] = field(default_factory=dict)

    def set(self, name: str, value: Any, source: str, note: str = "") -> None:
        setattr(self.config, name, value)
        self.sources[name] = source
        if note:
            self.notes[name] = note

    def record(self) -> dict[str, dict[str, Any]]:
        out = {}
        for f in dataclasses.fields(self.config):
            entry = {"value": getattr(self.config, f.name), "source": self.sources.get(f.name, "default")}
            if f.name in self.notes:
                entry["note"] = self.notes[f.name]
            out[f.name] = entry
        return out


def resolve(cls: type, presets: dict[str, dict[str, Any]], preset: str, cli_values: dict[str, Any]) -> Resolved:
    """Dataclass defaults, then the preset's values, then what the command line gave."""
    if preset not in presets:
        raise BadInput(f"Unknown preset {preset!r}; choose one of {', '.join(PRESET_CHOICES)}.")
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name, value in presets[preset].items():
        if name not in names:
            raise ValueError(f"preset {preset} sets unknown knob {name}")
        values[name], sources[name] = value, "preset"
    for name, value in cli_values.items():
        if value is not None:
            values[name], sources[name] = value, "cli"
    cfg = cls(**values)
    validate(cfg)
    return Resolved(cfg, sources, preset)


def from_record(cls: type, record: dict[str, dict[str, Any]]) -> Resolved:
    """Rebuild a resolved config from `config.json`'s knob record (for --resume)."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v["value"] for k, v in record.items() if k in names}
    sources = {k: v["source"] for k, v in record.items() if k in names}
    notes = {k: v["note"] for k, v in record.items() if k in names and "note" in v}
    return Resolved(cls(**values), sources, "", notes)
