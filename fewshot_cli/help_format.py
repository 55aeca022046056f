"""`--help` as a reader wants it at 80 columns: one option column that is never cut, help text as plain text."""

from __future__ import annotations

import os
from typing import Any

from typer.core import TyperCommand, TyperGroup

from fewshot_cli.help import RUN, knob_value, machine_preset, panel_rank
from fewshot_cli.runner.command import Command
from fewshot_cli.runner.config import config_fields

#: the `ctx.meta` key holding the `--preset` typed before `--help` (its knob values are the ones shown)
HELP_PRESET = "fewshot.help_preset"
#: the placeholder an option's value is shown with, by its type, where the option names none
METAVARS = {"int": "N", "integer": "N", "float": "X", "Path": "PATH", "path": "PATH", "choice": "NAME"}


def _is_argument(param: Any) -> bool:
    return param.param_type_name == "argument"


def _type_name(param: Any) -> str:
    """`int`, `float`, `Path`, `choice`...: from Typer's type descriptor, or click's type where Typer has none."""
    if _choices(param):
        return "choice"
    descriptor = getattr(param, "type_descriptor", None)
    if descriptor is not None:
        return getattr(descriptor.annotation, "__name__", "")
    return getattr(getattr(param, "type", None), "name", "")


def option_cell(param: Any) -> str:
    """An option's names as one cell: `--amp` and `--no-amp` as `--[no-]amp`, a value as its placeholder."""
    if _is_argument(param):
        name = param.metavar or (param.name or "").upper()
        return name if param.nargs == 1 or name.endswith("...") else f"{name}..."
    names = list(param.opts)
    for other in param.secondary_opts:
        plain = other.replace("--no-", "--", 1)
        if plain in names:
            names[names.index(plain)] = other.replace("--no-", "--[no-]", 1)
        else:
            names.append(other)
    cell = ", ".join(names)
    if getattr(param, "is_flag", False) or getattr(param, "count", False):
        return cell
    return f"{cell} {param.metavar or METAVARS.get(_type_name(param), 'TEXT')}"


def _choices(param: Any) -> list[str]:
    """The values an option accepts, where it lists them (Typer's descriptor, else click's Choice)."""
    descriptor = getattr(param, "type_descriptor", None)
    if descriptor is not None:
        choices = descriptor.choices if descriptor.is_choice else None
    else:
        choices = getattr(getattr(param, "type", None), "choices", None)
    return [str(getattr(c, "value", c)) for c in choices or ()]


def _shown(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def help_cell(param: Any, command: Command | None, preset: str) -> str:
    """An option's help, its choices, and the value a run would give it: a knob's at `preset`, else the default."""
    text = (getattr(param, "help", None) or "").strip()
    choices = _choices(param)
    if choices and not all(c in text for c in choices):
        text = f"{text} (one of {', '.join(choices)})" if text else ", ".join(choices)
    knobs = {f.name: f for f in config_fields(command.config)} if command is not None else {}
    if param.name in knobs:
        return f"{text} [{preset} preset: {_shown(knob_value(knobs[param.name], command, preset))}]"
    default = param.default
    if not _is_argument(param) and not param.is_flag and default not in (None, (), []) \
            and param.show_default is not False and not callable(default):
        return f"{text} [default: {_shown(default)}]"
    return text


def _preset_in(args: list[str]) -> str | None:
    """The value of a `--preset` among the command line's words, if any."""
    for i, word in enumerate(args):
        if word == "--preset" and i + 1 < len(args):
            return args[i + 1]
        if word.startswith("--preset="):
            return word.partition("=")[2]
    return None


def _help_preset(ctx: Any, command: Command | None) -> str:
    given = ctx.meta.get(HELP_PRESET)
    if command is not None and given in command.presets:
        return given
    return machine_preset()


def _console() -> Any:
    # rich is imported only when help is shown: `fewshot --version` and a run never need it
    from rich.console import Console

    width = os.environ.get("TERMINAL_WIDTH")
    return Console(width=int(width) if width and width.isdigit() else None, highlight=False, soft_wrap=False)


def render(obj: Any, ctx: Any, command: Command | None, epilog: str) -> None:
    """Print `obj`'s help: usage, description, one panel per option group, subcommands, then `epilog`."""
    from rich.padding import Padding  # rich: loaded when help is printed, not at start-up
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    console = _console()
    console.print(Padding(Text(usage(obj, ctx)), (1, 1, 0, 1)))
    if obj.help:
        console.print(Padding(Text(obj.help.split("\n\n")[0].replace("\n", " ").strip()), (1, 1, 0, 1)))
    preset = _help_preset(ctx, command)
    if command is not None:
        whose = "this machine's" if preset == machine_preset() else "the one given"
        console.print(Padding(Text(f"[{preset} preset: ...] is what a run at the {preset} preset ({whose}) gives "
                                   f"each knob; add --preset NAME to see another preset's."), (1, 1, 0, 1)))
    console.print()
    panels: dict[str, list[tuple[str, str]]] = {}
    for param in obj.get_params(ctx):
        if getattr(param, "hidden", False):
            continue
        fallback = RUN if command is not None else "Options"
        panel = "Arguments" if _is_argument(param) else getattr(param, "rich_help_panel", None) or fallback
        panels.setdefault(panel, []).append((option_cell(param), help_cell(param, command, preset)))
    order = sorted(panels, key=lambda p: (p != "Arguments", panel_rank(p)))
    if hasattr(obj, "list_commands"):
        rows = []
        for name in obj.list_commands(ctx):
            sub = obj.get_command(ctx, name)
            if sub is not None and not sub.hidden:
                rows.append((name, (sub.help or "").split("\n\n")[0].replace("\n", " ").strip()))
        panels["Commands"] = rows
        order.append("Commands")
    widest = max((len(cell) for rows in panels.values() for cell, _ in rows), default=0)
    for panel in order:
        table = Table(show_header=False, box=None, expand=True, padding=(0, 2, 0, 0), pad_edge=False)
        table.add_column(no_wrap=True, style="bold cyan", min_width=widest)  # one column edge in every panel
        table.add_column(ratio=1, overflow="fold")
        for cell, text in panels[panel]:
            table.add_row(Text(cell), Text(text))
        console.print(Panel(table, title=panel, title_align="left", border_style="dim"))
    if epilog:
        console.print(Padding(Text(epilog), 1))


def usage(obj: Any, ctx: Any) -> str:
    """`Usage: fewshot table [OPTIONS] RUN_DIR...`: arguments by their placeholders, as the panels show them."""
    words = [f"Usage: {ctx.command_path}", "[OPTIONS]"]
    words += [option_cell(p) for p in obj.get_params(ctx) if _is_argument(p) and not getattr(p, "hidden", False)]
    if hasattr(obj, "list_commands"):
        words.append("COMMAND [ARGS]...")
    return " ".join(words)


def _epilog(example: str, docs: str) -> str:
    lines = ([f"Example: {example}"] if example else []) + ([f"Docs: {docs}"] if docs else [])
    return "\n".join(lines)


class ReadableCommand(TyperCommand):
    """A command whose `--help` is `render`'s; `knobs` is the experiment command whose preset values it shows."""

    knobs: Command | None = None
    example: str = ""
    docs: str = ""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        ctx.meta[HELP_PRESET] = _preset_in(args)  # --help is eager: it runs before --preset is processed
        return super().parse_args(ctx, args)

    def format_help(self, ctx: Any, formatter: Any) -> None:
        render(self, ctx, self.knobs, _epilog(self.example, self.docs))


class ReadableGroup(TyperGroup):
    """A group (`fewshot`, `fewshot plan`) whose `--help` is `render`'s."""

    example: str = ""
    docs: str = ""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        render(self, ctx, None, _epilog(self.example, self.docs))


def readable(knobs: Command | None = None, example: str = "", docs: str = "") -> type[ReadableCommand]:
    """A `ReadableCommand` class for one command, to give Typer as `cls`."""
    return type("ReadableCommand", (ReadableCommand,), {"knobs": knobs, "example": example, "docs": docs})


def readable_group(example: str = "", docs: str = "") -> type[ReadableGroup]:
    """A `ReadableGroup` class with its own example and docs page."""
    return type("ReadableGroup", (ReadableGroup,), {"example": example, "docs": docs})
