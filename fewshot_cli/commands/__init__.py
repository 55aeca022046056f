"""The experiment commands, found through the entry-point group `fewshot.commands`: each entry names a command and
points at its light `Command` declaration (no torch), e.g. `mahalanobis-train =
"fewshot_cli.commands.mahalanobis_config:COMMAND"`. The five built-in ones are registered so in pyproject.toml, and
another installed package adds a command with one module and one line in its own pyproject.toml."""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points

from fewshot_cli.runner.command import Command

GROUP = "fewshot.commands"
DISTRIBUTION = "fewshot"

#: the built-in commands as pyproject.toml registers them (a test holds the two equal), in the order `fewshot demo`
#: runs them. Read only where this package's own metadata registers no command at all: a source checkout run
#: through PYTHONPATH with no install, or an install made before the commands were entry points.
BUILT_IN = (
    EntryPoint("detect-train", "fewshot_cli.commands.detect_config:COMMAND", GROUP),
    EntryPoint("triplet-train", "fewshot_cli.commands.triplet_config:COMMAND", GROUP),
    EntryPoint("mahalanobis-train", "fewshot_cli.commands.mahalanobis_config:COMMAND", GROUP),
    EntryPoint("classify-food101", "fewshot_cli.commands.food101_config:COMMAND", GROUP),
    EntryPoint("embed-classify", "fewshot_cli.commands.embed_config:COMMAND", GROUP),
)


class CommandNotLoaded(Exception):
    """A registered command that cannot be loaded: bad input to `fewshot` as a whole (exit 2, one sentence)."""

    exit_code = 2


def load_commands() -> dict[str, Command]:
    """Every registered command's declaration, built-in ones first in their order, then the others by name. Every
    registered entry point is loaded (each imports only its light `*_config` module, so `--help` needs no torch);
    one that fails, or that is not a `Command` of its own name, raises CommandNotLoaded naming it."""
    commands: dict[str, Command] = {}
    sources: dict[str, str] = {}
    for entry in registered():
        command = _load(entry)
        where = _where(entry)
        if command.name in commands:
            raise CommandNotLoaded(f"Two commands are named {command.name}: {sources[command.name]} and {where}; "
                                   "uninstall one of them.")
        commands[command.name], sources[command.name] = command, where
    return commands


def registered() -> list[EntryPoint]:
    """The group's entry points: this package's own first (BUILT_IN where its metadata registers none), in
    BUILT_IN's order, then other packages' by name."""
    found = list(entry_points(group=GROUP))
    own = [e for e in found if _distribution_name(e) == DISTRIBUTION] or list(BUILT_IN)
    others = sorted((e for e in found if _distribution_name(e) != DISTRIBUTION), key=lambda e: e.name)
    order = {e.name: i for i, e in enumerate(BUILT_IN)}
    return sorted(own, key=lambda e: (order.get(e.name, len(order)), e.name)) + others


def _load(entry: EntryPoint) -> Command:
    try:
        command = entry.load()
    except Exception as err:  # noqa: BLE001 - whatever the module raises, the answer names the entry point
        cause = str(err).splitlines()[0] if str(err) else ""
        raise CommandNotLoaded(f"The command {_where(entry)} cannot be loaded: {type(err).__name__}"
                               f"{': ' + cause if cause else ''}.") from None
    if not isinstance(command, Command):
        raise CommandNotLoaded(f"The command {_where(entry)} is a {type(command).__name__}, not a "
                               "fewshot_cli.runner.command.Command.")
    if command.name != entry.name:
        raise CommandNotLoaded(f"The command {_where(entry)} declares the name {command.name}; the entry point's "
                               "name and the Command's must be the same.")
    return command


def _where(entry: EntryPoint) -> str:
    """An entry point as its pyproject.toml line reads, and the package that registers it."""
    return f"'{entry.name} = {entry.value}' (group {GROUP}, package {_distribution_name(entry) or DISTRIBUTION})"


def _distribution_name(entry: EntryPoint) -> str | None:
    """The registering package's name (None for BUILT_IN's, which no metadata holds)."""
    dist = getattr(entry, "dist", None)
    return dist.metadata["Name"].lower() if dist is not None else None
