"""Commands as plugins: found through the `fewshot.commands` entry points, one from outside the package runs end to
end, one that fails to load stops `fewshot` naming it; evaluation-only commands offer no training options."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from importlib.metadata import PathDistribution
from pathlib import Path

import pytest
import typer
from conftest import events, fewshot

import fewshot_cli.commands as commands
from fewshot_cli.commands import BUILT_IN, CommandNotLoaded, load_commands, registered
from fewshot_cli.errors import BadInput, Interrupted, RunFailed
from fewshot_cli.runner.command import Command
from fewshot_cli.runner.config import BaseConfig, EvaluationConfig

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs" / "example-command"  # the worked example of docs/internals/writing-a-command.md


def _env(site: Path) -> dict[str, str]:
    """`fewshot` with `site` on the path, as if a package were installed there."""
    return {"PYTHONPATH": os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])}


def _dist_info(site: Path, name: str, entry_points: str) -> Path:
    """A package's installed metadata, as pip writes it: METADATA and entry_points.txt."""
    info = site / f"{name.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(entry_points)
    return info


@pytest.fixture(scope="module")
def example_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example package installed by pip into a folder of its own, from its pyproject.toml."""
    root = tmp_path_factory.mktemp("example")
    shutil.copytree(EXAMPLE, root / "src")  # pip builds in the source folder: keep docs/ clean
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                           "--no-index", "--target", str(root / "site"), str(root / "src")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return root / "site"


def test_a_package_from_outside_adds_a_command_that_runs_end_to_end(example_site: Path, runs: Path) -> None:
    env = _env(example_site)
    listed = fewshot("--help", env={**env, "COLUMNS": "200"})
    assert listed.returncode == 0, listed.stderr
    assert "blobs-train" in listed.stdout and "mahalanobis-train" in listed.stdout
    result = fewshot("blobs-train", "--out", runs, "--name", "blobs", "--quiet", "--json", "--val-every", "20",
                     env=env)
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)
    assert metrics == json.loads((runs / "blobs" / "metrics.json").read_text())
    assert metrics["accuracy"] > 0.5  # three classes: chance is a third
    assert len(events(runs / "blobs", "step")) == 40
    assert [e["step"] for e in events(runs / "blobs", "eval")] == [20, 40]
    config = json.loads((runs / "blobs" / "config.json").read_text())
    assert config["command"] == "blobs-train" and config["preset"] == "cpu"


def test_an_outside_commands_own_preset_needs_no_listing_elsewhere(example_site: Path, runs: Path) -> None:
    env = _env(example_site)
    quick = fewshot("blobs-train", "--preset", "quick", "--out", runs, "--name", "quick", "--quiet", env=env)
    assert quick.returncode == 0, quick.stderr
    knobs = json.loads((runs / "quick" / "config.json").read_text())["knobs"]
    assert knobs["steps"] == {"value": 8, "source": "preset"}
    # a device preset it does not define keeps its defaults
    t4 = fewshot("blobs-train", "--preset", "t4", "--steps", "2", "--out", runs, "--name", "t4", "--quiet", env=env)
    assert t4.returncode == 0, t4.stderr
    assert json.loads((runs / "t4" / "config.json").read_text())["knobs"]["batch_size"]["source"] == "default"
    bad = fewshot("blobs-train", "--preset", "slow", "--out", runs, env=env)
    assert bad.returncode == 2
    assert bad.stderr.strip() == ("error: Unknown preset 'slow'; choose one of cpu, t4, mps, a100, h100, auto, "
                                  "quick.")
    assert not (runs / "slow").exists()


def test_an_outside_commands_help_imports_no_torch(example_site: Path) -> None:
    probe = ("import sys\nfrom fewshot_cli.cli import main\nsys.argv = ['fewshot', 'blobs-train', '--help']\n"
             "try:\n    main()\nexcept SystemExit as exit:\n    code = exit.code\n"
             "print(code, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **_env(example_site), "COLUMNS": "200"})
    assert done.returncode == 0, done.stderr
    assert "--steps" in done.stdout and "[cpu preset: 40]" in done.stdout
    assert done.stdout.splitlines()[-1] == "0 False"


@pytest.mark.parametrize(("line", "says"), [
    ("broken-train = broken_missing_module:COMMAND", "ModuleNotFoundError: No module named 'broken_missing_module'"),
    ("broken-train = fewshot_cli.commands.embed_config:EmbedConfig", "is a type, not a"),
    ("broken-train = fewshot_cli.commands.embed_config:COMMAND", "declares the name embed-classify"),
], ids=["missing module", "not a command", "another name"])
def test_a_registered_command_that_cannot_load_stops_fewshot_naming_it(tmp_path: Path, line: str, says: str
                                                                       ) -> None:
    _dist_info(tmp_path, "broken-fewshot", f"[fewshot.commands]\n{line}\n")
    for args in (["--help"], ["env"], ["mahalanobis-train", "--help"]):
        result = fewshot(*args, env=_env(tmp_path))
        assert result.returncode == 2, (args, result.stdout)
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
        assert f"'{line}'" in result.stderr and "broken-fewshot" in result.stderr and says in result.stderr
        assert result.stdout == ""


def test_two_commands_of_one_name_are_an_error(tmp_path: Path) -> None:
    _dist_info(tmp_path, "twin-fewshot", "[fewshot.commands]\nembed-classify = fewshot_cli.commands.embed_config:"
                                         "COMMAND\n")
    result = fewshot("--help", env=_env(tmp_path))
    assert result.returncode == 2
    assert "Two commands are named embed-classify" in result.stderr and "twin-fewshot" in result.stderr


def test_pyproject_registers_the_built_in_commands_as_the_fallback_lists_them() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["fewshot.commands"]
    assert list(declared.items()) == [(e.name, e.value) for e in BUILT_IN]
    assert list(load_commands()) == [e.name for e in BUILT_IN]


def test_installing_fewshot_registers_the_built_in_commands_from_pyproject(tmp_path: Path) -> None:
    """The metadata `pip install -e .` writes (setuptools' own hook, here without pip) is what the commands are
    found through; BUILT_IN is not used then."""
    src = tmp_path / "src"
    shutil.copytree(ROOT / "fewshot_cli", src / "fewshot_cli", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    hook = f"from setuptools import build_meta; build_meta.prepare_metadata_for_build_editable({str(tmp_path)!r})"
    built = subprocess.run([sys.executable, "-c", hook], cwd=src, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    listing = ("from fewshot_cli.commands import registered; "
               "print([(e.name, e.dist and e.dist.metadata['Name']) for e in registered()])")
    found = subprocess.run([sys.executable, "-c", listing], capture_output=True, text=True, timeout=120,
                           env={**os.environ, **_env(tmp_path)})
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == repr([(e.name, "fewshot") for e in BUILT_IN])


def _installed(tmp_path: Path, name: str, lines: list[str]) -> list:
    """The entry points of a package's metadata, bound to it as importlib.metadata finds them."""
    dist = PathDistribution(_dist_info(tmp_path, name, "[fewshot.commands]\n" + "\n".join(lines) + "\n"))
    return list(dist.entry_points)


def test_the_built_in_list_stands_in_only_where_the_package_registers_no_command(tmp_path: Path,
                                                                                 monkeypatch) -> None:
    plugin = _installed(tmp_path, "blobs-fewshot", ["blobs-train = blobs_command:COMMAND"])
    # metadata with no command (a source checkout, or an install older than the entry points): the built-in list
    monkeypatch.setattr(commands, "entry_points", lambda group: plugin)
    assert [e.name for e in registered()] == [*(e.name for e in BUILT_IN), "blobs-train"]
    # the package registers commands: those alone, so one it no longer registers is not brought back
    own = _installed(tmp_path, "fewshot", [f"{e.name} = {e.value}" for e in BUILT_IN[2:0:-1]])
    monkeypatch.setattr(commands, "entry_points", lambda group: [*plugin, *own])
    assert [e.name for e in registered()] == ["triplet-train", "mahalanobis-train", "blobs-train"]


def test_an_evaluation_only_command_offers_no_training_options() -> None:
    embed = fewshot("embed-classify", "--help", env={"COLUMNS": "200"})
    assert embed.returncode == 0, embed.stderr
    for option in ("--val-every", "--val-episodes", "--checkpoint-every"):
        assert option not in embed.stdout
        assert option in fewshot("mahalanobis-train", "--help", env={"COLUMNS": "200"}).stdout
    assert "--workers" in embed.stdout and "--resume" in embed.stdout
    refused = fewshot("embed-classify", "--val-every", "3")
    assert refused.returncode == 2 and "No such option" in refused.stderr


def test_a_training_command_must_extend_base_config() -> None:
    with pytest.raises(ValueError, match="does not extend BaseConfig"):
        Command(name="x", help="", config=EvaluationConfig, presets={}, task_path="x:X", primary_metric="m")


def test_an_evaluation_only_command_cannot_declare_training_knobs() -> None:
    with pytest.raises(ValueError, match="evaluation-only, yet its config has training knobs"):
        Command(name="x", help="", config=BaseConfig, presets={}, task_path="x:X", primary_metric="m",
                evaluation_only=True)


@pytest.mark.parametrize(("error", "code", "line"), [
    (BadInput("bad thing."), 2, "error: bad thing."), (RunFailed("broke."), 1, "error: broke."),
    (Interrupted(), 130, "interrupted: checkpoint written; continue with --resume RUN_DIR"),
    (CommandNotLoaded("no such."), 2, "error: no such."), (KeyError("k"), 1, "error: 'k'"),
], ids=["bad input", "run failed", "interrupted", "command not loaded", "unexpected"])
def test_exit_codes_come_from_the_error_classes(capsys, error: Exception, code: int, line: str) -> None:
    from fewshot_cli.cli import _guarded

    def fail() -> None:
        raise error

    with pytest.raises(typer.Exit) as exit:
        _guarded(False, fail)
    assert exit.value.exit_code == code == getattr(error, "exit_code", 1)
    assert capsys.readouterr().err == line + "\n"
