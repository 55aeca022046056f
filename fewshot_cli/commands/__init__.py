"""The experiment commands: one module each, each exposing `COMMAND`."""

from __future__ import annotations

import importlib

from fewshot_cli.runner.task import Command

MODULES = ("detect", "triplet", "mahalanobis", "food101", "embed")


def load_commands() -> dict[str, Command]:
    commands: dict[str, Command] = {}
    for module in MODULES:
        try:
            mod = importlib.import_module(f"fewshot_cli.commands.{module}")
        except ModuleNotFoundError as err:
            if err.name == f"fewshot_cli.commands.{module}":
                continue  # not built yet
            raise
        commands[mod.COMMAND.name] = mod.COMMAND
    return commands
