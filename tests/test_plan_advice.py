"""`fewshot plan` advises: a header naming the preset and the knobs that decide the peak, device and host memory
each against its own limit, lines that fit 80 columns (sources under --verbose), exit 2 naming what would fit, and
Hugging Face backbones planned offline from their known configuration."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch
from conftest import fewshot
from test_weights import SITECUSTOMIZE

from fewshot_cli.commands.detect_config import PRESETS as DETECT_PRESETS
from fewshot_cli.commands.mahalanobis import COMMAND
from fewshot_cli.memory.limits import Limit
from fewshot_cli.memory.plan import HOST_LINES, PRESET_DEVICES, TERM_NOTES, plan_run, render
from fewshot_cli.runner.config import resolve

COLUMNS = {"COLUMNS": "80"}
#: a T4 plan of mahalanobis-train over a 4 GiB budget: its train phase needs about 5.5 GiB of the card
OVER = ["plan", "mahalanobis-train", "--preset", "t4", "--memory-budget", "4GiB"]


@pytest.fixture(scope="module")
def t4_plan() -> str:
    result = fewshot("plan", "mahalanobis-train", "--preset", "t4", "--n-query", "7", env=COLUMNS)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def verbose_plan() -> str:
    result = fewshot("plan", "mahalanobis-train", "--preset", "t4", "--verbose", env=COLUMNS)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def over_budget() -> tuple[int, str, str]:
    result = fewshot(*OVER, env=COLUMNS)
    return result.returncode, result.stdout, result.stderr


def _t4_report(host: Limit | None = None) -> dict:
    resolved = resolve(COMMAND.config, COMMAND.presets, "t4", {"image_size": 32, "n_query": 4})
    resolved.preset = "t4"
    return plan_run(COMMAND, resolved, torch.device("cuda"), PRESET_DEVICES["t4"][1], "the t4 device's memory", host)


def test_the_header_names_the_command_device_preset_and_the_knobs_with_their_sources(t4_plan: str) -> None:
    lines = t4_plan.splitlines()
    assert lines[0] == "plan for mahalanobis-train on cuda, preset t4"
    header = " ".join(" ".join(lines[1:6]).split())
    for knob in ("--n-query 7 (given)", "--image-size 84 (t4)", "--backbone resnet12 (t4)", "--batch-size 64 (t4)",
                 "--amp off (default)", "--checkpoint-activations off (default)", "--image-cache-mb 256 (default)"):
        assert knob in header, knob


def test_host_lines_are_a_section_of_their_own_and_not_in_the_device_peak() -> None:
    report = _t4_report()
    assert set(report["sections"]) == {"device", "host"}
    for phase, entry in report["phases"].items():
        assert not set(entry["components"]) & set(HOST_LINES), phase
        assert entry["peak_bytes"] == sum(entry["components"].values())
        host = entry["host"]
        assert {"image_cache", "startup_baseline"} <= set(host["components"])
        assert host["peak_bytes"] == sum(host["components"].values())
    device = report["sections"]["device"]
    assert report["peak_bytes"] == device["peak_bytes"] == max(e["peak_bytes"] for e in report["phases"].values())
    assert device["budget_bytes"] == PRESET_DEVICES["t4"][1] and device["limit"] == "the t4 device's memory"
    text = render(report)
    device_part, host_part = text.split("\nhost memory")
    assert "image_cache" not in device_part and "image_cache" in host_part


def test_the_host_section_is_judged_against_the_hosts_limit() -> None:
    tight = Limit(256 * 1024**2, "cgroup", "this container's memory limit (cgroup memory.max)")
    report = _t4_report(tight)
    assert report["sections"]["device"]["fits"] and not report["sections"]["host"]["fits"]
    assert report["fits"] is False and report["sections"]["host"]["limit"] == tight.text
    flat = " ".join(render(report).split())
    assert "host memory: this container's memory limit (cgroup memory.max), 256 MiB" in flat


def test_the_image_cache_says_why_it_is_twice_the_option(t4_plan: str) -> None:
    train = t4_plan.split("host memory")[1].split("  test")[0]
    line = next(line for line in train.splitlines() if line.strip().startswith("image_cache"))
    assert "512.0 MiB" in line and "train and val caches, 2 x 256 MiB" in line


def test_every_line_fits_80_columns(t4_plan: str, verbose_plan: str, over_budget: tuple[int, str, str]) -> None:
    for text in (t4_plan, verbose_plan, over_budget[1]):
        assert max(len(line) for line in text.splitlines()) <= 80


def test_verbose_shows_each_lines_source_and_the_default_only_a_tag(t4_plan: str, verbose_plan: str) -> None:
    flat = " ".join(verbose_plan.split())
    assert f"source: {TERM_NOTES['cuda_context']}" in flat
    assert f"source: {TERM_NOTES['cuda_allocator']}" in flat
    assert "--image-cache-mb per loader" in flat
    assert "results/gpu_check.md" not in t4_plan and "measured, H100" in t4_plan


def test_a_plan_over_its_budget_is_exit_2_with_the_table_and_what_would_fit(over_budget: tuple[int, str, str]
                                                                           ) -> None:
    code, out, err = over_budget
    assert code == 2
    assert "device memory (cuda): --memory-budget, 4.00 GiB" in out and "does NOT fit" in out
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "The plan does not fit: needs" in err and "(train) of 3.60 GiB usable" in err
    assert "--preset auto would run with --n-query" in err
    assert "--amp alone fits" in err


def test_the_knobs_and_switches_a_refusal_suggests_do_fit(over_budget: tuple[int, str, str]) -> None:
    err = over_budget[2]
    auto = shlex.split(re.search(r"--preset auto would run with ([^;.]+)", err).group(1))
    assert fewshot(*OVER, *auto).returncode == 0
    for switch, verdict in re.findall(r"(--amp|--checkpoint-activations) alone (fits|does not fit)", err):
        assert fewshot(*OVER, switch).returncode == (0 if verdict == "fits" else 2), switch


def test_a_fitting_plan_is_exit_0_and_its_json_carries_both_sections() -> None:
    result = fewshot("plan", "mahalanobis-train", "--preset", "t4", "--image-size", "32", "--n-query", "4", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["fits"] and report["preset"] == "t4" and "advice" not in report
    assert report["sections"]["device"]["fits"] and report["sections"]["host"]["fits"]
    assert report["knobs"]["n_query"] == {"value": 4, "source": "cli"}
    assert "image_cache" in report["phases"]["train"]["host"]["components"]


def test_clip_is_planned_from_its_known_configuration_with_an_empty_cache_and_no_socket(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    log = tmp_path / "sockets.log"
    env = {**COLUMNS, "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "torch"),
           "FEWSHOT_TEST_SOCKETS": str(log), "PYTHONPATH": f"{site}:{Path(__file__).resolve().parents[1]}"}
    result = fewshot("plan", "embed-classify", "--preset", "t4", "--backbone", "clip", env=env)
    assert result.returncode == 0, result.stderr
    flat = " ".join(result.stdout.split())
    assert "model: planned from the known configuration of openai/clip-vit-base-patch32" in flat
    assert "random weights" in flat
    # CLIP ViT-B/32 with its text tower: 151.3 million float32 parameters
    parameters = next(line for line in result.stdout.splitlines() if line.strip().startswith("parameters"))
    assert 570 < float(parameters.split()[1].replace(",", "")) < 585
    assert not log.exists() or log.read_text() == ""
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").rglob("*.safetensors"))
    # a run still needs the weights: only planning goes without them
    run = fewshot("embed-classify", "--preset", "t4", "--backbone", "clip", "--device", "cpu", "--out",
                  tmp_path / "runs", "--quiet", env=env)
    assert run.returncode == 2 and "needs --model" in run.stderr


def test_detect_trains_cache_notes_say_what_its_plan_counts() -> None:
    """Training reads the training data's loader, validation the test data's: two caches, each what it read. The
    fine-tuning's negatives are training images: validation's go through the training cache (no workers), and the
    test's fill that cache again after training's reads are dropped."""
    report = json.loads(fewshot("plan", "detect-train", "--preset", "cpu", "--episodes", "4", "--val-every", "2",
                                "--val-episodes", "1", "--test-episodes", "3", "--json").stdout)
    knobs = {name: knob["value"] for name, knob in report["knobs"].items()}
    image = 3 * knobs["image_size"] ** 2 * 4  # the built-in data's float32 pixels
    per_episode = knobs["n_way"] * (knobs["k_shot"] + knobs["n_query"])
    negatives = DETECT_PRESETS["cpu"]["finetune_negatives"]  # its fine-tuning is on, with no loader workers
    assert negatives > 0 and DETECT_PRESETS["cpu"]["finetune_steps"] > 0 and "workers" not in DETECT_PRESETS["cpu"]
    trained, validated = 4 * per_episode + negatives, 1 * per_episode  # one validation, after step 2
    assert report["notes"]["train"]["image_cache"] == f"train cache {trained:,} images, val cache {validated:,} images"
    assert report["phases"]["train"]["components"]["image_cache"] == (trained + validated) * image
    tested = validated + 3 * per_episode
    assert report["notes"]["test"]["image_cache"] == \
        f"test cache {tested:,} images, negatives cache {3 * negatives:,} images"
    assert report["phases"]["test"]["components"]["image_cache"] == (tested + 3 * negatives) * image
