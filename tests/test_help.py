"""`--help` at 80 columns: every option named whole, every bracket kept, no Python types, an example and a page."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from fewshot_cli.cli import COMMANDS, app
from fewshot_cli.commands.mahalanobis_config import PRESETS
from fewshot_cli.help import machine_preset
from fewshot_cli.help_format import help_cell, option_cell

ROOT = Path(__file__).resolve().parents[1]
UTILITIES = ["env", "presets", "table", "memreport", "export", "demo"]
EVERY = ([[name] for name in COMMANDS] + [["plan", name] for name in COMMANDS] + [[name] for name in UTILITIES]
         + [[], ["plan"]])


def _help(*args: str) -> str:
    result = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "80", "TERMINAL_WIDTH": None})
    assert result.exit_code == 0, result.output
    return result.output


def _command(path: list[str]):
    """The click command `fewshot PATH...` runs, and the experiment command whose knobs it shows."""
    command = typer.main.get_command(app)
    for word in path:
        command = command.commands[word] if hasattr(command, "commands") else None
    return command, COMMANDS.get(path[-1]) if path else None


def _flat(text: str) -> str:
    """The help as one line of words: box lines gone, each wrapped cell joined again."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


@pytest.mark.parametrize("path", EVERY, ids=lambda p: " ".join(p) or "fewshot")
def test_help_fits_80_columns_and_cuts_no_option_name(path: list[str]) -> None:
    text = _help(*path)
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= 80
    command, _ = _command(path)
    lines = text.splitlines()
    for param in command.params:
        cell = option_cell(param)
        assert any(cell in line for line in lines), f"{cell} is not whole in the help of {path}"


@pytest.mark.parametrize("path", EVERY, ids=lambda p: " ".join(p) or "fewshot")
def test_help_keeps_every_options_text_with_its_brackets(path: list[str]) -> None:
    flat = _flat(_help(*path))
    command, knobs = _command(path)
    for param in command.params:
        row = " ".join(f"{option_cell(param)} {help_cell(param, knobs, machine_preset())}".split())
        assert row in flat, f"{row!r} is not whole in the help of {path}"


def test_help_shows_the_tensorboard_extra_whole() -> None:
    assert "(needs fewshot[tensorboard])" in _flat(_help("mahalanobis-train"))


@pytest.mark.parametrize("path", EVERY, ids=lambda p: " ".join(p) or "fewshot")
def test_help_shows_no_python_type_and_no_value_after_a_flag(path: list[str]) -> None:
    text = _help(*path)
    for leak in ("<bool>", "<int>", "<str>", "<path>", "list[", "{", "`"):
        assert leak not in text, f"{leak} in the help of {path}"


def test_a_flag_and_its_negation_share_one_name() -> None:
    flat = _flat(_help("mahalanobis-train"))
    assert "--[no-]weights-strict" in flat and "--[no-]checkpoint-activations" in flat
    assert " --no-weights-strict " not in flat.replace("; --no-weights-strict loads", "")


def test_help_shows_the_values_of_the_preset_given() -> None:
    flat = _flat(_help("mahalanobis-train", "--preset", "t4"))
    assert f"[t4 preset: {PRESETS['t4']['image_size']}]" in flat
    assert "[t4 preset: resnet12]" in flat
    assert f"[{machine_preset()} preset: {PRESETS[machine_preset()]['image_size']}]" in _flat(
        _help("mahalanobis-train"))


@pytest.mark.parametrize("name", list(COMMANDS))
def test_each_command_ends_its_help_with_an_example_and_its_page(name: str) -> None:
    flat = _flat(_help(name))
    assert f"Example: fewshot {name} " in flat
    page = re.search(r"Docs: (\S+)", flat).group(1)
    assert page == f"docs/commands/{name}.md" and (ROOT / page).is_file()


def test_plan_help_says_what_plan_prints_and_where_it_looks() -> None:
    flat = _flat(_help("plan", "mahalanobis-train"))
    assert "--json print the plan as one JSON object on stdout" in flat
    assert "--out DIR where earlier runs are looked for" in flat
    assert "Predict the peak memory of each phase of this mahalanobis-train run" in flat
