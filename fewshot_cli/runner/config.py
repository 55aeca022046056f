"""Typed experiment configs, presets and the record of where each knob's value came from."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from fewshot_cli.errors import BadInput

PRESETS = ("cpu", "t4", "mps", "a100", "h100")
PRESET_CHOICES = (*PRESETS, "auto")


def knob(default: Any, help: str, choices: tuple[str, ...] | None = None, minimum: float | None = None,
         cli: bool = True, panel: str | None = None, result_neutral: bool = False, metavar: str | None = None,
         built_in: Any = None) -> Any:
    """A config field with its help text, allowed choices and lower bound, read by the CLI and the validator;
    `panel` names its group in `--help` where `fewshot_cli.help.PANELS` does not, `metavar` the placeholder of
    its value there where its type's (N, X, TEXT, NAME) says too little.

    `built_in`: the value the built-in data runs with when a preset chose another for data on disk (a pretrained
    backbone where the built-in data starts from random weights).

    `result_neutral`: the knob sets how much is computed at once, never the result (an evaluation's batch), so
    `--resume` may give it another value and OOM back-off in evaluation may lower it."""
    return field(default=default, metadata={"help": help, "choices": choices, "min": minimum, "cli": cli,
                                            "panel": panel, RESULT_NEUTRAL: result_neutral, "metavar": metavar,
                                            "built_in": built_in})


#: the field metadata key marking a result-neutral knob
RESULT_NEUTRAL = "result_neutral"


def result_neutral(cls: type) -> set[str]:
    """Names of the knobs of a config class that do not change a run's result."""
    return {f.name for f in dataclasses.fields(cls) if f.metadata.get(RESULT_NEUTRAL)}


def cuda_preset(memory_bytes: int) -> str:
    """The preset of a CUDA card with this much memory."""
    gib = memory_bytes / 1024**3
    return "t4" if gib < 30 else "a100" if gib < 70 else "h100"


def _workers() -> Any:
    return knob(0, "data-loading worker processes", minimum=0)


class DeviceCheck:
    """What every command's config offers the launcher beside its knobs."""

    def check_device(self, device_type: str) -> None:
        """Bad input for a knob the run's device cannot serve, checked before anything is written (a command's
        config overrides it where it has such a knob)."""


@dataclass
class BaseConfig(DeviceCheck):
    """Knobs the runner itself reads for a training command; every training command's config extends it."""

    val_every: int = knob(0, "training steps between validations (0: none)", minimum=0)
    val_episodes: int = knob(10, "episodes (or batches) per validation", minimum=1)
    checkpoint_every: int = knob(50, "steps between checkpoints", minimum=1)
    workers: int = _workers()


@dataclass
class EvaluationConfig(DeviceCheck):
    """Knobs the runner reads for an evaluation-only command: no steps, so no validation or checkpoint knobs.
    (Not a base of BaseConfig, so a training config keeps its fields' order in --help and the log.)"""

    workers: int = _workers()


#: the knobs only a training run reads; an evaluation-only command's config must not have them
TRAINING_KNOBS = frozenset(f.name for f in dataclasses.fields(BaseConfig)) - {"workers"}


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

    def check_ranks(self, group: Any) -> None:
        """Under torchrun, every rank needs an episode of each full step: ranks share a step's episodes."""
        per_step = self.episodes_per_step
        if group is not None and per_step < group.world_size:
            raise BadInput(f"--episodes-per-step {per_step} leaves some of the {group.world_size} processes without "
                           f"an episode: ranks share each step's episodes, so use --episodes-per-step "
                           f"{group.world_size} (or a multiple of it), or start fewer processes.")

    def steps(self) -> int:
        """Optimiser steps: the training episodes in groups of `episodes_per_step` (the last may be short)."""
        return -(-self.episodes // self.episodes_per_step)

    def step_episodes(self, step: int) -> range:
        """The sampler indices of step `step`'s training episodes, both numbered from 1: episode s of one-episode
        steps is index s."""
        first = (step - 1) * self.episodes_per_step + 1
        return range(first, min(first + self.episodes_per_step, self.episodes + 1))


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


def preset_choices(presets: dict[str, dict[str, Any]]) -> tuple[str, ...]:
    """The `--preset` values a command accepts: every device preset and `auto`, then the command's own names."""
    return (*PRESET_CHOICES, *sorted(set(presets) - set(PRESET_CHOICES)))


def resolve(cls: type, presets: dict[str, dict[str, Any]], preset: str, cli_values: dict[str, Any]) -> Resolved:
    """Dataclass defaults, then the preset's values, then what the command line gave. A device preset the command
    does not define sets nothing (its knobs keep their defaults); a name that is neither is bad input."""
    if preset not in presets and preset not in PRESETS:
        raise BadInput(f"Unknown preset {preset!r}; choose one of {', '.join(preset_choices(presets))}.")
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name, value in presets.get(preset, {}).items():
        if name not in names:
            raise ValueError(f"preset {preset} sets unknown knob {name}")
        values[name], sources[name] = value, "preset"
    for name, value in cli_values.items():
        if value is not None:
            values[name], sources[name] = value, "cli"
    cfg = cls(**values)
    validate(cfg)
    return Resolved(cfg, sources, preset)


def from_record(cls: type, record: Any, where: str) -> Resolved:
    """Rebuild a resolved config from `config.json`'s knob record (for --resume and --config); a knob this command
    lacks or a value of the wrong type is bad input, told as coming from `where`."""
    if not isinstance(record, dict) or not all(isinstance(v, dict) and "value" in v for v in record.values()):
        raise BadInput(f"{where}: its knobs are not a record of {{knob: {{value, source}}}}.")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(record) - names)
    if unknown:
        raise BadInput(f"{where}: it sets {', '.join(unknown)}, which this command does not have.")
    values = {k: _typed(hints[k], v["value"], k, where) for k, v in record.items()}
    sources = {k: str(v.get("source", "default")) for k, v in record.items()}
    notes = {k: v["note"] for k, v in record.items() if "note" in v}
    cfg = cls(**values)
    validate(cfg)
    return Resolved(cfg, sources, "", notes)


def _typed(kind: Any, value: Any, name: str, where: str) -> Any:
    """`value` read back from JSON as the knob's declared type (an int where a float is declared is that float)."""
    allowed = typing.get_args(kind) or (kind,)
    if value is None and type(None) in allowed:
        return None
    for base in allowed:
        if base is bool and isinstance(value, bool):
            return value
        if base is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if base is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if base is str and isinstance(value, str):
            return value
    expected = " or ".join(getattr(b, "__name__", str(b)) for b in allowed)
    raise BadInput(f"{where}: knob {name} is {value!r}, not {expected}.")
