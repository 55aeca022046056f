"""A run's own command line again: `--resume RUN_DIR` accepts what it repeats, `--config RUN_DIR` starts it anew."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fewshot_cli.errors import BadInput
from fewshot_cli.memory.limits import parse_size
from fewshot_cli.runner.config import TRAINING_KNOBS, Resolved, from_record, option_name, result_neutral, validate

if TYPE_CHECKING:
    from fewshot_cli.runner.command import Command
    from fewshot_cli.runner.launch import LaunchOptions


def read_record(config_path: Path, where: str, command: Command) -> dict[str, Any]:
    """A run's `config.json`, checked to be one of `command`'s runs; anything else is bad input from `where`."""
    try:
        record = json.loads(config_path.read_bytes().decode("utf-8"))
    except OSError as err:
        raise BadInput(f"{where}: {config_path} cannot be read ({err.strerror or err}).") from None
    except UnicodeDecodeError:
        raise BadInput(f"{where}: {config_path} is not text, so not a run's config.json.") from None
    except json.JSONDecodeError as err:
        raise BadInput(f"{where}: {config_path} is not valid JSON ({err.msg}).") from None
    if not isinstance(record, dict) or not isinstance(record.get("knobs"), dict):
        raise BadInput(f"{where}: {config_path} is not a run's config.json (it has no knobs).")
    if record.get("command") != command.name:
        raise BadInput(f"{where}: that is a {record.get('command')} run, not a {command.name} one; use "
                       f"`fewshot {record.get('command')}`.")
    if not isinstance(record.get("seed", 0), int) or not isinstance(record.get("data") or "", str):
        raise BadInput(f"{where}: {config_path} has a malformed seed or data entry.")
    record.setdefault("seed", 0)
    return record


def resumed(command: Command, run_dir: Path, knobs: dict[str, Any], options: LaunchOptions
            ) -> tuple[Resolved, dict[str, Any], str]:
    """The recorded config of the run in `run_dir`, once every option the command line gives again is found to
    match it; and the device to continue on. `options.given` names the shared options typed on the line."""
    where = f"--resume {run_dir}"
    if options.config is not None:
        raise BadInput("--config starts a new run and --resume continues one; give one of them.")
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise BadInput(f"{where}: no config.json there; it is not a run directory.")
    record = read_record(config_path, where, command)
    resolved = from_record(command.config, _knobs(command, record), where)
    resolved.preset = record.get("preset", "")
    # only what the line types is compared: a value the preset or the planner chose was not typed the first time
    neutral = result_neutral(command.config)  # evaluation batches and the like: another value, the same result
    for name, value in knobs.items():
        if value is None:
            continue
        if name in neutral:
            resolved.set(name, value, "cli")
        else:
            _must_match(where, name, getattr(resolved.config, name), value)
    validate(resolved.config)
    _check_shared(where, run_dir, record, options)
    if command.prepare is not None:
        command.prepare({name: getattr(resolved.config, name) for name in knobs})
    return resolved, record, _device(record, options.device)


def _check_shared(where: str, run_dir: Path, record: dict[str, Any], options: LaunchOptions) -> None:
    """Shared options typed again must match the record (`--quiet`, `--json`, `--debug`, `--force`: never compared)."""
    if "seed" in options.given:
        _must_match(where, "seed", record.get("seed", 0), options.seed)
    if options.preset is not None:
        _must_match(where, "preset", record.get("preset"), options.preset)
    if options.data is not None:
        _check_data(where, record.get("data"), Path(options.data))
    if options.memory_budget is not None:
        _check_budget(where, record.get("memory_budget_bytes"), options.memory_budget)
    if "out" in options.given or options.name is not None:
        _check_place(where, run_dir, Path(options.out), options.name)


def from_config(command: Command, path: Path, knobs: dict[str, Any], options: LaunchOptions
                ) -> tuple[dict[str, Any], LaunchOptions, set[str]]:
    """Knobs and options of a new run that repeats the run recorded at `path` (a run directory or its config.json):
    its knobs, seed, preset, data and memory budget, unless the command line gives them. The options' `config` is
    then the config.json read. Also returns the names of the knobs copied from the record."""
    where = f"--config {path}"
    if options.resume is not None:
        raise BadInput("--config starts a new run and --resume continues one; give one of them.")
    config_path = path / "config.json" if path.is_dir() else path
    if not config_path.is_file():
        raise BadInput(f"{where}: no such file; give a run directory or its config.json.")
    record = read_record(config_path, where, command)
    recorded = from_record(command.config, _knobs(command, record), where)
    if options.preset is not None and options.preset != record.get("preset"):
        # a preset sets every knob the config already fixes: the knob to change is the one to give
        raise BadInput(f"{where}: that run used --preset {record.get('preset')} and --config takes all its knobs; "
                       f"drop --preset {options.preset} and give the knobs to change instead.")
    copied = {name for name, value in knobs.items() if value is None}
    new_knobs = {name: getattr(recorded.config, name) if name in copied else value for name, value in knobs.items()}
    changes: dict[str, Any] = {"preset": record.get("preset") or None, "config": config_path}
    if "seed" not in options.given:
        changes["seed"] = record.get("seed", 0)
    if options.data is None and record.get("data"):
        changes["data"] = Path(record["data"])
    if options.memory_budget is None and record.get("memory_budget_bytes"):
        changes["memory_budget"] = str(record["memory_budget_bytes"])
    return new_knobs, dataclasses.replace(options, **changes), copied


def _knobs(command: Command, record: dict[str, Any]) -> dict[str, Any]:
    """The recorded knobs; for an evaluation-only command, without the training knobs its runs recorded before it
    stopped offering them (they did nothing for it)."""
    if not command.evaluation_only:
        return record["knobs"]
    return {name: entry for name, entry in record["knobs"].items() if name not in TRAINING_KNOBS}


def _must_match(where: str, name: str, recorded: Any, given: Any) -> None:
    if recorded != given:
        flag = f"--{option_name(name)}"
        raise BadInput(f"{where}: that run has {_typed(flag, recorded)}, not {_typed(flag, given)}; drop {flag} "
                       "to continue it, or start a new run from it with --config.")


def _typed(flag: str, value: Any) -> str:
    """A value as the command line spells it."""
    if isinstance(value, bool):
        return flag if value else f"--no-{flag[2:]}"
    return f"no {flag}" if value is None else f"{flag} {value}"


def _check_data(where: str, recorded: str | None, given: Path) -> None:
    if recorded is None:
        raise BadInput(f"{where}: that run used the built-in synthetic data, not --data {given}; drop --data.")
    if Path(recorded) != given and Path(recorded).resolve() != given.resolve():
        raise BadInput(f"{where}: that run has --data {recorded}, not --data {given}; drop --data.")


def _check_budget(where: str, recorded: int | None, given: str) -> None:
    if parse_size(given) != recorded:
        shown = "no --memory-budget" if recorded is None else f"--memory-budget {recorded / 2**30:.6g}GiB"
        raise BadInput(f"{where}: that run has {shown}, not --memory-budget {given}; drop --memory-budget.")


def _check_place(where: str, run_dir: Path, out: Path, name: str | None) -> None:
    """`--out`/`--name` given again must point at the run being resumed."""
    same = (out / name).resolve() == run_dir.resolve() if name else out.resolve() == run_dir.resolve().parent
    if not same:
        shown = f"--out {out} --name {name}" if name else f"--out {out}"
        raise BadInput(f"{where}: {shown} points at {out / name if name else out}, not at the run being resumed; "
                       "drop them or make them name that run.")


def _device(record: dict[str, Any], given: str) -> str:
    """Where the run continues: its own device type unless `--device` names one. Another type is allowed (a run
    may outlive its machine) with a warning: its metrics then match an uninterrupted run only up to float noise."""
    recorded = str(record.get("device") or "cpu").split(":")[0]
    if given == "auto":
        return recorded
    if given.split(":")[0] != recorded:
        print(f"warning: the run started on {recorded} and continues on {given}; its metrics match an "
              "uninterrupted run only up to floating-point noise.", file=sys.stderr)
    return given
