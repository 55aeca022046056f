"""The memory planner: fake-tensor prediction against the real run, --preset auto, refusal and --force."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import SMALL, fewshot

from fewshot_cli.commands.mahalanobis import COMMAND
from fewshot_cli.memory.limits import Limit
from fewshot_cli.memory.plan import fake_tensors, fit, plan_run, startup_baseline, trace
from fewshot_cli.runner.config import resolve

CPU = torch.device("cpu")


def _config(**knobs):
    return resolve(COMMAND.config, COMMAND.presets, "cpu", {"image_size": 32, "n_query": 6, **knobs})


def test_the_fake_prediction_matches_the_real_tracker_within_10_percent() -> None:
    config = _config().config
    predicted = trace(COMMAND, config)
    measured = trace(COMMAND, config, tensors="real")
    for phase in ("train", "test"):
        p, m = sum(predicted[phase].values()), sum(measured[phase].values())
        assert abs(p - m) <= 0.10 * m, (phase, p, m)


def test_amp_is_planned_in_its_own_dtype() -> None:
    """Under --amp the backbone's activations are bf16: the plan traces them so, fake as real, and smaller than in
    float32 in every phase."""
    full = trace(COMMAND, _config().config)
    predicted = trace(COMMAND, _config(amp=True).config)
    measured = trace(COMMAND, _config(amp=True).config, tensors="real")
    for phase in ("train", "test"):
        assert abs(sum(predicted[phase].values()) - sum(measured[phase].values())) <= 0.10 * sum(
            measured[phase].values()), phase
        assert predicted[phase]["activations"] < 0.8 * full[phase]["activations"], phase


def test_nothing_is_allocated_while_planning() -> None:
    import psutil

    rss = psutil.Process().memory_info().rss
    report = plan_run(COMMAND, _config(image_size=84, backbone="resnet12", n_query=15), CPU, None)
    assert report["peak_bytes"] > 500 * 1024**2  # a ResNet-12 episode at 84 px
    assert psutil.Process().memory_info().rss - rss < report["peak_bytes"] / 4


def test_auto_never_exceeds_the_budget_and_takes_more_of_a_larger_one() -> None:
    chosen = {}
    # a CPU budget holds the process's resident set too: here the test process's, whatever earlier tests left in
    # it, so each budget is that plus the room for the run (the planner keeps 10% of the whole budget back)
    for room_gib in (0.6, 3):
        budget = int((startup_baseline(CPU) + room_gib * 1024**3) / 0.9)
        resolved = _config(image_size=None, n_query=None)
        resolved.preset = "auto"
        fit(COMMAND, resolved, CPU, Limit(budget, "budget", "--memory-budget"))
        report = plan_run(COMMAND, resolved, CPU, budget)
        assert report["fits"] and report["peak_bytes"] <= 0.9 * budget
        assert resolved.sources["n_query"] == "planner"
        chosen[room_gib] = (resolved.config.n_query, resolved.config.image_size)
    assert chosen[3] > chosen[0.6]


def test_a_run_over_budget_is_refused_and_force_runs_it(tmp_path: Path) -> None:
    refused = fewshot("mahalanobis-train", *SMALL, "--memory-budget", "3MiB", "--out", tmp_path, "--name", "r")
    assert refused.returncode == 2 and "does not fit" in refused.stderr and "peak" in refused.stderr
    assert not (tmp_path / "r").exists()
    forced = fewshot("mahalanobis-train", *SMALL, "--memory-budget", "3MiB", "--force", "--out", tmp_path,
                     "--name", "f")
    assert forced.returncode == 0, forced.stderr
    config = json.loads((tmp_path / "f" / "config.json").read_text())
    assert config["plan"]["fits"] is False


def _without(args: list[str], *options: str) -> list[str]:
    """`args` less each of `options` and the value after it."""
    kept, skip = [], False
    for arg in args:
        if arg in options:
            skip = True
        elif skip:
            skip = False
        else:
            kept.append(arg)
    return kept


def test_preset_auto_records_what_the_planner_chose(tmp_path: Path) -> None:
    # a budget whose usable 90% is short of the plan at the presets' largest sizes, as a process like the run's
    # plans it: the planner has to shrink a knob
    args = _without(SMALL, "--preset", "--image-size", "--n-query")
    largest = {k: max(p[k] for p in COMMAND.presets.values() if k in p) for k in COMMAND.plan_knobs}
    sizes = [str(x) for k, v in largest.items() for x in (f"--{k.replace('_', '-')}", v)]
    options = [a for a in args if a != "--quiet"]
    planned = json.loads(fewshot("plan", "mahalanobis-train", *options, "--preset", "cpu", *sizes, "--json").stdout)
    budget = int(planned["peak_bytes"] * 0.97)
    result = fewshot("mahalanobis-train", *args, "--preset", "auto", "--memory-budget", str(budget),
                     "--out", tmp_path, "--name", "a")
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    largest = {k: max(p[k] for p in COMMAND.presets.values() if k in p) for k in COMMAND.plan_knobs}
    chosen = {k: config["knobs"][k]["value"] for k in COMMAND.plan_knobs}
    assert all(config["knobs"][k]["source"] == "planner" for k in COMMAND.plan_knobs)
    assert all(chosen[k] <= largest[k] for k in chosen) and chosen != largest, (chosen, largest)
    assert config["plan"]["fits"] is True


def test_the_image_cache_line_holds_what_the_run_has_read_by_then_up_to_its_bound() -> None:
    from fewshot_cli.data.loader import episode_reads, loader_bytes

    cfg = _config(episodes=4, val_every=2, val_episodes=1, test_episodes=3).config
    per_episode = cfg.n_way * (cfg.k_shot + cfg.n_query)
    # 4 training episodes and 1 validation (after step 2; none after the last step), then 3 test episodes
    assert episode_reads(cfg) == {"train": 5 * per_episode, "test": 8 * per_episode}
    image = 3 * 32 * 32 * 4
    assert loader_bytes(256, 10**6, image, 0, 0, reads=100)["image_cache"] == 100 * image
    assert loader_bytes(256, 50, image, 0, 0, reads=100)["image_cache"] == 50 * image  # no more than the data
    assert loader_bytes(1, 10**6, image, 0, 0, reads=10**5)["image_cache"] == 1024**2  # nor than its bound
    short, longer = (plan_run(COMMAND, _config(episodes=n, val_every=0, test_episodes=1), CPU, None)
                     for n in (2, 4))
    assert short["phases"]["train"]["components"]["image_cache"] == 2 * per_episode * image
    assert longer["phases"]["train"]["components"]["image_cache"] == 4 * per_episode * image


def test_a_plan_names_the_limit_it_is_held_to() -> None:
    from fewshot_cli.memory.plan import render

    text = render(plan_run(COMMAND, _config(), CPU, 2**31, "this container's memory limit (cgroup memory.max)"))
    flat = " ".join(text.split())  # the section's title wraps at 80 columns
    assert "host memory: this container's memory limit (cgroup memory.max), 2.00 GiB, 10% kept free" in flat


def test_a_commands_lazily_loaded_libraries_are_in_the_start_up_baseline() -> None:
    import subprocess
    import sys

    code = ("import sys, torch; from fewshot_cli.commands.embed import COMMAND;"
            "from fewshot_cli.memory.plan import plan_run;"
            "from fewshot_cli.runner.config import resolve;"
            "assert 'sklearn.metrics' not in sys.modules;"
            "plan_run(COMMAND, resolve(COMMAND.config, COMMAND.presets, 'cpu', {}), torch.device('cpu'), None);"
            "print('sklearn.metrics' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.stdout.strip() == "True", done.stderr[-2000:]


def test_training_is_planned_with_the_optimizer_state_every_step_after_the_first_holds() -> None:
    phases = trace(COMMAND, _config().config)
    # Adam's two moments per parameter (and its step counts) exist from the first step's update on, through every
    # later step
    state = phases["train"]["optimizer_state"]
    assert state == phases["test"]["optimizer_state"] and 0 <= state - 2 * phases["train"]["parameters"] < 4096


def _reads_and_moves() -> dict[str, object]:
    """What tracing patches while it runs (a fake tensor's value reads, a module's move), and the faults module."""
    from fewshot_cli.runner import faults

    patched = {f"Tensor.{name}": getattr(torch.Tensor, name)
               for name in ("item", "__float__", "__int__", "__bool__", "tolist")}
    return {**patched, "Module.to": torch.nn.Module.to, "faults": dict(vars(faults))}


def test_planning_leaves_no_patch_behind() -> None:
    before = _reads_and_moves()
    plan_run(COMMAND, _config(), CPU, None)
    assert _reads_and_moves() == before


def test_a_planning_that_raises_leaves_no_patch_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    def step() -> None:
        assert torch.Tensor.item is not before["Tensor.item"]  # the patches were on while the step ran
        raise RuntimeError("the step failed")

    before = _reads_and_moves()
    monkeypatch.setattr(COMMAND.task, "plan_phases", lambda self: {"train": step})
    with pytest.raises(RuntimeError, match="the step failed"):
        plan_run(COMMAND, _config(), CPU, None)
    assert _reads_and_moves() == before


def test_fake_tensors_patch_only_inside_their_block() -> None:
    before = _reads_and_moves()
    with pytest.raises(ValueError), fake_tensors():
        assert torch.zeros(3).sum().item() == 1 and torch.nn.Module.to is not before["Module.to"]
        raise ValueError
    assert _reads_and_moves() == before
