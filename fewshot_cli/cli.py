"""The thin Typer app: parses options into knob values and `LaunchOptions`, hands them to `runner.launch`."""

from __future__ import annotations

import dataclasses
import enum
import inspect
import json
import os
import sys
import typing
from pathlib import Path
from typing import Any

import typer

import fewshot_cli
from fewshot_cli.commands import CommandNotLoaded, load_commands
from fewshot_cli.cpu_threads import passive_threads_before_torch
from fewshot_cli.errors import BadInput, Interrupted
from fewshot_cli.help import knob_panel, option_panel, panel_rank
from fewshot_cli.help_format import readable, readable_group
from fewshot_cli.memory.allocator import huge_pages_before_torch
from fewshot_cli.runner.command import Command
from fewshot_cli.runner.config import config_fields, option_name, preset_choices
from fewshot_cli.runner.launch import LaunchOptions, launch, plan_report, plan_text

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  cls=readable_group("fewshot mahalanobis-train --data ~/data/miniImageNet", "README.md"),
                  help="Few-shot learning experiments that do not run out of memory.")
plan_app = typer.Typer(no_args_is_help=True,
                       cls=readable_group("fewshot plan detect-train --preset t4", "docs/memory.md"),
                       help="Predict each phase's peak memory of a run, without running it.")
app.add_typer(plan_app, name="plan")

try:  # a command that fails to load stops every use of `fewshot` (main() says which): never a silent skip
    COMMANDS, _NOT_LOADED = load_commands(), None
except CommandNotLoaded as err:
    COMMANDS, _NOT_LOADED = {}, err


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fewshot {fewshot_cli.__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                        help="Print the version and exit.")) -> None:
    """Few-shot learning experiments that do not run out of memory."""


#: how the CLI reports, beside the run's options: (name, annotation, default, flags, placeholder, help)
REPORTING = [
    ("json_out", bool, False, ("--json",), "", "print the final metrics as one JSON object on stdout"),
    ("debug", bool, False, ("--debug",), "", "show tracebacks"),
]


def _launch_options() -> list[tuple]:
    """`LaunchOptions`' fields as options, each with the help text and placeholder its field declares."""
    hints = typing.get_type_hints(LaunchOptions)
    return [(f.name, hints[f.name], f.default, (f"--{option_name(f.name)}",), f.metadata.get("metavar") or "",
             f.metadata["help"]) for f in dataclasses.fields(LaunchOptions) if "help" in f.metadata]


def _shared() -> list[tuple]:
    """`LaunchOptions`' fields as options, with --json and --debug after --quiet in `--help`."""
    options = _launch_options()
    after_quiet = [o[0] for o in options].index("quiet") + 1
    return [*options[:after_quiet], *REPORTING, *options[after_quiet:]]


#: the options every experiment command shares; help is plain text: `--help` never reads it as markup
SHARED = _shared()
PLAN_SHARED = {"preset", "device", "data", "seed", "memory_budget", "json_out", "debug", "out"}
#: options of `fewshot plan` alone, handed to its handler (not to `LaunchOptions`)
PLAN_ONLY = [("verbose", bool, False, ("--verbose",), "", "show under each plan line where its figure comes from")]
#: what a shared option means under `fewshot plan`, where it differs
PLAN_HELP = {
    "preset": "one of {choices} (default: auto, the largest configuration that fits this device)",
    "json_out": "print the plan as one JSON object on stdout",
    "out": "where earlier runs are looked for: their plan checks of the same configuration are listed",
    "memory_budget": "e.g. 15GiB; the budget the plan is judged against (default: the device's memory)",
}


def _knob_parameters(command: Command) -> list[inspect.Parameter]:
    hints = typing.get_type_hints(command.config)
    params = []
    for f in config_fields(command.config):
        kind = hints[f.name]
        base = next((a for a in typing.get_args(kind) if a is not type(None)), kind)
        flag = f"--{option_name(f.name)}"
        if base is bool:
            flags: tuple[str, ...] = (f"{flag}/--no-{option_name(f.name)}",)
        else:
            flags = (flag,)
            if f.metadata.get("choices"):
                base = _choices(f.name, f.metadata["choices"])
        option = typer.Option(None, *flags, help=f.metadata.get("help", ""), show_default=False,
                              metavar=f.metadata.get("metavar"), rich_help_panel=knob_panel(f))
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                        annotation=base | None))
    return params


def _choices(name: str, values: tuple[str, ...]) -> type[enum.Enum]:
    """An Enum for a knob's choices, so Typer lists them in --help and rejects others (exit 2)."""
    return enum.Enum(name, {v: v for v in values}, type=str)


def _shared_parameters(command: Command, names: set[str] | None = None,
                       helps: dict[str, str] | None = None, own: list[tuple] = ()) -> list[inspect.Parameter]:
    params = []
    choices = ", ".join(preset_choices(command.presets))
    for name, kind, default, flags, placeholder, help_text in [*SHARED, *own]:
        if names is None or name in names or any(name == o[0] for o in own):
            help_text = (helps or {}).get(name, help_text)
            option = typer.Option(default, *flags, help=help_text.format(choices=choices),
                                  metavar=placeholder or None, rich_help_panel=option_panel(name))
            params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind))
    return params


def _make(command: Command, handler, shared: set[str] | None = None, helps: dict[str, str] | None = None,
          own: list[tuple] = ()):
    """The Typer entry of `command`: its knobs, the shared options (`shared`: those named, with `helps`), and the
    handler's `own` options, which it is given by name."""
    knob_names = [f.name for f in config_fields(command.config)]

    def entry(ctx: typer.Context, **kwargs: Any) -> None:
        knobs = {name: _plain(kwargs.pop(name)) for name in knob_names}
        json_out, debug = kwargs.pop("json_out", False), kwargs.pop("debug", False)
        flags = {o[0]: kwargs.pop(o[0]) for o in own}
        # which shared options were typed, as opposed to defaulted: --resume and --config compare those
        given = {n for n in kwargs if getattr(ctx.get_parameter_source(n), "name", "") == "COMMANDLINE"}
        options = LaunchOptions(**kwargs, given=frozenset(given))
        _guarded(debug, lambda: handler(command, knobs, options, json_out, **flags))

    params = _shared_parameters(command, shared, helps, own) + _knob_parameters(command)
    params.sort(key=lambda p: panel_rank(p.default.rich_help_panel))  # stable: each panel keeps its order
    context = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)
    entry.__signature__ = inspect.Signature([context] + params)
    entry.__doc__ = command.help
    return entry


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, enum.Enum) else value


def _guarded(debug: bool, action) -> None:
    """One line on stderr and the error class's `exit_code` (fewshot_cli.errors; anything unexpected: 1);
    --debug shows the traceback instead (an interrupted run's line is its message, not a failure)."""
    try:
        action()
    except typer.Exit:
        raise
    except Exception as err:  # noqa: BLE001 - an unexpected error is still one line without --debug
        if debug and not isinstance(err, Interrupted):
            raise
        typer.echo(f"{getattr(err, 'label', 'error')}: {err}", err=True)
        raise typer.Exit(getattr(err, "exit_code", 1)) from None


def _run_command(command: Command, knobs: dict[str, Any], options: LaunchOptions, json_out: bool) -> None:
    metrics = launch(command, knobs, options)
    if metrics is None:  # a torchrun rank other than 0: rank 0 reports
        return
    if json_out:
        typer.echo(json.dumps(metrics, sort_keys=True))
    else:
        typer.echo("  ".join(f"{k}={_fmt(v)}" for k, v in sorted(metrics.items())))


def _fmt(value: Any) -> str:
    """Counts (whole numbers, floats in a task's metrics) as integers, other figures to 4 decimals."""
    if isinstance(value, float) and value.is_integer() and abs(value) > 1:
        return str(int(value))
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _plan_command(command: Command, knobs: dict[str, Any], options: LaunchOptions, json_out: bool,
                  verbose: bool = False) -> None:
    """Print the plan; one over its limit is then exit 2 with the sentence saying what would make it fit."""
    report = plan_report(command, knobs, options)
    typer.echo(json.dumps(report, sort_keys=True) if json_out else plan_text(report, verbose))
    if not report["fits"]:
        raise BadInput(report["advice"])


for _command in COMMANDS.values():
    app.command(_command.name, help=_command.help, cls=readable(_command, _command.example, _command.docs))(
        _make(_command, _run_command))
    plan_app.command(_command.name,
                     cls=readable(_command, f"fewshot plan {_command.name} --preset t4", "docs/memory.md"),
                     help=f"Predict the peak memory of each phase of this {_command.name} run, without running "
                          f"it.")(_make(_command, _plan_command, PLAN_SHARED, PLAN_HELP, PLAN_ONLY))


@app.command("env", cls=readable(example="fewshot env --json", docs="docs/runs.md"))
def env_command(json_out: bool = typer.Option(False, "--json", help="print as JSON")) -> None:
    """Devices seen, their memory, library versions."""
    from fewshot_cli.reports.environment import environment  # loads torch: only `fewshot env` pays for it

    info = environment()
    if json_out:
        typer.echo(json.dumps(info, sort_keys=True))
        return
    for key, value in info.items():
        typer.echo(f"{key}: {value}")


@app.command("presets", cls=readable(example="fewshot presets", docs="docs/memory.md"))
def presets_command(json_out: bool = typer.Option(False, "--json", help="print as JSON")) -> None:
    """Every preset and the value of each knob it sets, per command."""
    from fewshot_cli.reports.environment import render_presets  # loads torch: only `fewshot presets` pays

    table = {name: {preset: _preset_values(c, preset) for preset in c.presets} for name, c in COMMANDS.items()}
    typer.echo(json.dumps(table, sort_keys=True) if json_out else render_presets(table))


def _preset_values(command: Command, preset: str) -> dict[str, Any]:
    defaults = {f.name: f.default for f in dataclasses.fields(command.config)}
    return {**defaults, **command.presets[preset]}


class TableFormat(enum.StrEnum):
    md = "md"
    csv = "csv"
    latex = "latex"


@app.command("table", cls=readable(example="fewshot table runs/* --metric accuracy --group-by head,k_shot",
                                   docs="docs/runs.md"))
def table_command(
    run_dirs: list[Path] = typer.Argument(..., metavar="RUN_DIR", help="finished run directories"),
    metric: list[str] | None = typer.Option(None, "--metric", metavar="M", help="metric column (repeatable)"),
    group_by: str | None = typer.Option(None, "--group-by", metavar="KEYS", help="config keys, comma-separated"),
    fmt: TableFormat = typer.Option(TableFormat.md, "--format", metavar="FORMAT", help="md, csv or latex"),
    out: Path | None = typer.Option(None, "--out", metavar="FILE", help="write the table here instead of stdout"),
    plot: Path | None = typer.Option(None, "--plot", metavar="FILE.png",
                                     help="plot the first metric by the group key to a PNG"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
) -> None:
    """A results table from finished runs."""
    from fewshot_cli.reports.plots import plot_table  # the reports load torch and matplotlib: --help stays light
    from fewshot_cli.reports.tables import build_table, render_table

    def act() -> None:
        keys = [k.strip() for k in group_by.split(",") if k.strip()] if group_by else []
        table = build_table(run_dirs, metric or [], keys)
        text = render_table(table, fmt.value)
        if plot is not None:
            plot_table(table, plot)
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text)
        else:
            typer.echo(text, nl=False)

    _guarded(debug, act)


@app.command("memreport", cls=readable(example="fewshot memreport runs/NAME --plot mem.png",
                                       docs="docs/memory.md"))
def memreport_command(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help="a run directory"),
    plot: Path | None = typer.Option(None, "--plot", metavar="FILE.png",
                                     help="write the memory series over steps to a PNG"),
    json_out: bool = typer.Option(False, "--json", help="print as JSON"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
) -> None:
    """Memory peaks per phase, growth per phase, leak verdict."""
    from fewshot_cli.reports.memory import memreport, render_memreport  # loads torch: --help stays light
    from fewshot_cli.reports.plots import plot_memory

    def act() -> None:
        report = memreport(run_dir)
        if plot is not None:
            plot_memory(run_dir, plot)
        typer.echo(json.dumps(report, sort_keys=True) if json_out else render_memreport(report))

    _guarded(debug, act)


@app.command("export", cls=readable(example="fewshot export runs/* --tensorboard tb", docs="docs/runs.md"))
def export_command(
    run_dirs: list[Path] = typer.Argument(..., metavar="RUN_DIR", help="run directories (finished or stopped)"),
    tensorboard: Path = typer.Option(..., "--tensorboard", metavar="DIR",
                                     help="write TensorBoard curves to DIR/RUN_NAME"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
) -> None:
    """TensorBoard curves of finished runs, from their log.jsonl."""
    from fewshot_cli.runner.tensorboard import export  # tensorboard is optional: only `fewshot export` needs it

    def act() -> None:
        for folder in export(run_dirs, tensorboard):
            typer.echo(str(folder))

    _guarded(debug, act)


@app.command("demo", cls=readable(example="fewshot demo --out runs/demo", docs="README.md"))
def demo_command(
    out: Path | None = typer.Option(None, "--out", metavar="DIR",
                                    help="where the demo's run directories go (default: runs/demo-UTCSTAMP)"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
) -> None:
    """Every experiment command, briefly, on the built-in data at the cpu preset, then the combined table."""
    from fewshot_cli.reports.tables import demo_table  # loads the run log's readers: --help stays light

    def act() -> None:
        import time  # the demo alone times itself

        root = out or Path("runs") / f"demo-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
        runs, wall = [], {}
        for command in COMMANDS.values():
            name = f"{command.name}-demo"
            if (root / name).exists():
                raise BadInput(f"{root / name} already exists; remove it or pass another --out.")
            typer.echo(f"== {command.name}", err=True)
            options = LaunchOptions(device="cpu", preset="cpu", out=root, name=name, quiet=True)
            knobs = {f.name: None for f in config_fields(command.config)} | dict(command.demo)
            start = time.perf_counter()
            _run_command(command, knobs, options, json_out=False)
            runs.append(root / name)
            wall[root / name] = time.perf_counter() - start
        metrics = {c.name: (c.primary_metric, c.secondary_metric) for c in COMMANDS.values()}
        typer.echo(f"\nEvery command at the cpu preset on built-in data; the runs are in {root}.\n", err=True)
        typer.echo(demo_table(runs, metrics, wall), nl=False)
        typer.echo("\nPeak RSS is this process's, which ran the commands one after another.")

    _guarded(debug, act)


def main() -> None:
    huge_pages_before_torch()
    passive_threads_before_torch()
    if _NOT_LOADED is not None:
        typer.echo(f"error: {_NOT_LOADED}", err=True)
        sys.exit(_NOT_LOADED.exit_code)
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        app(prog_name="fewshot")
        return
    # a torchrun rank ends here with its own exit code: at interpreter exit, torch.distributed's C++ threads can
    # abort a rank (SIGABRT, "terminate called without an active exception") after its run or its error was reported
    try:
        app(prog_name="fewshot")
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else int(done.code is not None)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
