"""Start-up: `--version`, `--help` and a command's `--help` answer without importing torch, and help reads well."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import fewshot

from fewshot_cli.commands import load_commands
from fewshot_cli.commands.mahalanobis_config import PRESETS
from fewshot_cli.help import machine_preset

# runs the CLI's main() in a fresh interpreter, then reports which heavy modules that imported
PROBE = """
import json, sys
from fewshot_cli.cli import main
sys.argv = ["fewshot", *sys.argv[1:]]
try:
    main()
except SystemExit as exit:
    code = exit.code
print(json.dumps({"code": code, "heavy": sorted(m for m in ("torch", "numpy", "torchvision", "pycocotools",
                                                            "matplotlib") if m in sys.modules)}))
"""


def probe(*args: str) -> dict:
    result = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.parametrize("args", [["--version"], ["--help"]], ids=" ".join)
def test_version_and_help_import_no_torch(args: list[str]) -> None:
    assert probe(*args) == {"code": 0, "heavy": []}


@pytest.mark.parametrize("command", sorted(load_commands()))
def test_a_commands_help_imports_no_torch(command: str) -> None:
    assert probe(command, "--help") == {"code": 0, "heavy": []}


def test_plan_help_imports_no_torch() -> None:
    assert probe("plan", "mahalanobis-train", "--help") == {"code": 0, "heavy": []}


def test_a_commands_help_groups_options_into_panels_and_shows_the_machines_preset_values() -> None:
    result = fewshot("mahalanobis-train", "--help", env={"COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    text = result.stdout
    panels = [line.split("─ ")[1].split(" ─")[0] for line in text.splitlines() if line.startswith("╭─ ")]
    assert panels == ["Run", "Data and episodes", "Model", "Memory"]
    preset = machine_preset()
    by_option = _rows(text)
    assert f"[{preset} preset: {PRESETS[preset]['image_size']}]" in by_option["--image-size"]
    assert f"[{preset} preset: {PRESETS[preset]['backbone']}]" in by_option["--backbone"]
    assert "[default: 0]" in by_option["--seed"]  # shared options keep their default


def _rows(text: str) -> dict[str, str]:
    """Each option's help row, its wrapped lines joined."""
    rows: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("│ --"):
            option = _option(line)
            rows[option] = " ".join(line.strip("│ ").split())
        elif line.startswith("│  ") and rows:
            rows[option] += " " + " ".join(line.strip("│ ").split())
    return rows


def _option(line: str) -> str:
    """The option a help row starts with, `--[no-]amp` as `--amp`."""
    return line.split()[1].replace("[no-]", "")


def test_each_panel_holds_its_options() -> None:
    text = fewshot("mahalanobis-train", "--help", env={"COLUMNS": "200"}).stdout
    panel, where = None, {}
    for line in text.splitlines():
        if line.startswith("╭─ "):
            panel = line.split("─ ")[1].split(" ─")[0]
        elif line.startswith("│ --"):
            where[_option(line)] = panel
    assert where["--seed"] == where["--resume"] == where["--val-every"] == "Run"
    assert where["--data"] == where["--n-way"] == where["--episodes"] == "Data and episodes"
    assert where["--head"] == where["--backbone"] == "Model"
    assert where["--memory-budget"] == where["--batch-size"] == where["--checkpoint-activations"] == "Memory"
