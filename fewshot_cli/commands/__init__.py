"""The experiment commands: one module each for its Task, and a light `<module>_config` declaring its `COMMAND`."""

from __future__ import annotations

import importlib

from fewshot_cli.runner.command import Command

MODULES = ("detect", "triplet", "mahalanobis", "food101", "embed")


def load_commands() -> dict[str, Command]:
    """Every command's declaration, without importing torch or any model code."""
    commands: dict[str, Command] = {}
    for module in MODULES:
        try:
            mod = importlib.import_module(f"fewshot_cli.commands.{module}_config")
        except ModuleNotFoundError as err:
            if err.name == f"fewshot_cli.commands.{module}_config":
                continue  # not built yet
            raise
        commands[mod.COMMAND.name] = mod.COMMAND
    return commands
