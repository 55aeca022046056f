"""README.md and docs/: every relative link leads somewhere, every `fewshot ...` line names real options."""

from __future__ import annotations

import dataclasses
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import typer

from fewshot_cli.cli import COMMANDS, app

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
#: commands a page shows from the worked example in docs/example-command/, which this install does not register
EXAMPLE_COMMANDS = set(tomllib.loads((ROOT / "docs/example-command/pyproject.toml").read_text())
                       ["project"]["entry-points"]["fewshot.commands"])
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```")


def _page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def _prose_and_code(page: Path) -> tuple[list[str], list[list[str]]]:
    """A page's lines outside fenced blocks, and each shell block's lines (python and toml blocks left out)."""
    prose, blocks, block = [], [], None
    for line in page.read_text().splitlines():
        if FENCE.match(line):
            if block is None:
                info = line[3:].strip()
                block = [] if info in ("", "bash", "sh", "console", "shell") else ["skip"]
            else:
                if block[:1] != ["skip"]:
                    blocks.append(block)
                block = None
        elif block is not None:
            block.append(line)
        else:
            prose.append(line)
    return prose, blocks


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    prose, _ = _prose_and_code(page)
    return {slug(line.lstrip("#")) for line in prose if re.match(r"^#{1,6} ", line)}


def _links() -> list[tuple[Path, str]]:
    found = []
    for page in PAGES:
        prose, _ = _prose_and_code(page)
        for line in prose:
            for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):
                if not re.match(r"^[a-z]+:", target):
                    found.append((page, target))
    return found


@pytest.mark.parametrize(("page", "target"), _links(), ids=lambda x: _page_id(x) if isinstance(x, Path) else x)
def test_every_relative_link_leads_to_a_file_and_heading_that_exist(page: Path, target: str) -> None:
    path, _, anchor = target.partition("#")
    where = (page.parent / path).resolve() if path else page
    assert where.exists(), f"{_page_id(page)} links to {target}, which does not exist"
    if anchor:
        assert where.suffix == ".md" and anchor in _anchors(where), f"{_page_id(page)}: no heading #{anchor} in {path}"


def _command_lines(blocks_only: bool = False) -> list[tuple[Path, list[str]]]:
    """Every invocation of fewshot a page shows, as the words after `fewshot` (or `-m fewshot_cli`): in its shell
    blocks, and (unless `blocks_only`) in its inline code, where a command is often only named."""
    found = []
    for page in PAGES:
        prose, blocks = _prose_and_code(page)
        for line in [] if blocks_only else prose:
            for span in re.findall(r"`([^`]*)`", line):
                words = span.split()
                if words[:1] == ["fewshot"] and len(words) > 1:
                    found.append((page, words[1:]))
        for block in blocks:
            text = re.sub(r"\\\n\s*", " ", "\n".join(block))
            for line in text.splitlines():
                line = line.removeprefix("$ ")
                if not {"fewshot", "fewshot_cli"} & set(line.split()):
                    continue
                words = shlex.split(line, comments=True)
                for part in " ".join(words).replace("&&", ";").replace("||", ";").split(";"):
                    tokens = part.split()
                    for head in ("fewshot", "fewshot_cli"):
                        if head in tokens:
                            found.append((page, tokens[tokens.index(head) + 1:]))
                            break
    return found


def _options(command) -> set[str]:
    names = {"--help"}
    for param in command.params:
        names.update(getattr(param, "opts", ()), getattr(param, "secondary_opts", ()))
    return names


def _targets(words: list[str]) -> tuple[list, list[str]]:
    """The click commands the words name (every experiment command for the placeholder COMMAND), and the words
    left for them."""
    root = typer.main.get_command(app)
    group, rest = root, list(words)
    if rest[:1] == ["plan"]:
        group, rest = root.commands["plan"], rest[1:]
    if not rest or rest[0].startswith("-"):
        return [group], rest
    name = rest[0]
    if name in ("COMMAND", "..."):  # a placeholder: any experiment command
        return [group.commands[c] for c in COMMANDS], rest[1:]
    assert name in group.commands, f"no command {name!r} under {group.name}"
    return [group.commands[name]], rest[1:]


@pytest.mark.parametrize(("page", "words"), _command_lines(), ids=lambda x: _page_id(x) if isinstance(x, Path)
                         else " ".join(x)[:60])
def test_every_command_line_shown_names_options_its_command_has(page: Path, words: list[str]) -> None:
    if set(words) & EXAMPLE_COMMANDS:
        return
    commands, rest = _targets(words)
    for word in rest:
        option = word.strip("[]").split("=")[0].removesuffix("...")
        if option.startswith("--"):
            assert any(option in _options(c) for c in commands), \
                f"{_page_id(page)}: `fewshot {' '.join(words)}` names {option}, which {commands[0].name} lacks"


@pytest.mark.parametrize(("page", "words"), [(p, w) for p, w in _command_lines(blocks_only=True)
                                             if not set(w) & ({"COMMAND", "..."} | EXAMPLE_COMMANDS)],
                         ids=lambda x: _page_id(x) if isinstance(x, Path) else " ".join(x)[:60])
def test_every_concrete_command_line_parses_with_its_values(page: Path, words: list[str]) -> None:
    (command,), rest = _targets(words)
    args = [w for w in rest if w != "--help"]
    try:
        command.make_context(command.name, args)
    except Exception as err:  # noqa: BLE001 - click's usage errors; the message says what is wrong
        pytest.fail(f"{_page_id(page)}: `fewshot {' '.join(words)}` does not parse: {err}")


def test_the_readme_is_a_landing_page_of_at_most_10_kb() -> None:
    text = (ROOT / "README.md").read_text()
    assert len(text.encode()) <= 10 * 1024
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert headings[0] == "## Documents" and "## Two commands" in headings


def test_every_command_has_its_page() -> None:
    for name in COMMANDS:
        assert (ROOT / "docs/commands" / f"{name}.md").is_file(), name
        assert COMMANDS[name].docs == f"docs/commands/{name}.md"


def _shown(value) -> str:
    return "none" if value is None else "on" if value is True else "off" if value is False else str(value)


@pytest.mark.parametrize("name", list(COMMANDS))
def test_a_command_pages_preset_table_gives_the_presets_values(name: str) -> None:
    """Rows of a `| knob | cpu | t4 | ...` table on a command's page say what `fewshot presets` would."""
    command = COMMANDS[name]
    defaults = {f.name: f.default for f in dataclasses.fields(command.config)}
    lines = (ROOT / "docs/commands" / f"{name}.md").read_text().splitlines()
    header = next((i for i, line in enumerate(lines) if line.startswith("| knob | cpu |")), None)
    if header is None:
        return
    presets = [c.strip() for c in lines[header].strip("|").split("|")][1:]
    for line in lines[header + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        knob = cells[0].strip("`").removeprefix("--").replace("-", "_")
        expected = [_shown(command.presets.get(p, {}).get(knob, defaults[knob])) for p in presets]
        assert cells[1:] == expected, f"docs/commands/{name}.md: {cells[0]} is {expected} at {presets}"


def _section(page: str, heading: str) -> str:
    text = (ROOT / page).read_text()
    start = text.index(heading)
    end = text.find("\n#", start + len(heading))
    return text[start:end if end != -1 else len(text)]


def test_the_device_lines_planning_md_names_are_the_planners() -> None:
    import torch

    from fewshot_cli.memory import terms

    named = set(re.findall(r"`([a-z]+(?:_[a-z0-9]+)+)`", _section("docs/internals/planning.md",
                                                                  "## The device's own lines")))
    made = {name for device in ("cuda", "mps", "cpu")
            for name in terms.device_terms(torch.device(device), {}, baseline=1)}
    assert named == made


def test_the_host_lines_planning_md_lists_are_the_planners() -> None:
    from fewshot_cli.memory import terms

    text = (ROOT / "docs/internals/planning.md").read_text()
    listed = re.search(r"`terms\.HOST_LINES` \(([^)]*)\)", text).group(1)
    assert set(re.findall(r"`([a-z_0-9]+)`", listed)) == set(terms.HOST_LINES)


def test_the_training_step_writing_a_command_shows_is_mahalanobis_trains() -> None:
    """Each line of the page's step, but for elisions and comments, is a line of the command's `train_step`."""
    import inspect

    from fewshot_cli.commands.mahalanobis import MahalanobisTask

    block = _section("docs/internals/writing-a-command.md", "## A training step").split("```python\n", 1)[1]
    source = {line.strip() for line in inspect.getsource(MahalanobisTask.train_step).splitlines()}
    shown = [line.split("  #")[0].strip() for line in block.split("```", 1)[0].splitlines()]
    missing = [line for line in shown if line and "..." not in line and line not in source]
    assert not missing
