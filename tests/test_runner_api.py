"""The runner's own parts through their API: sampler, leak detector, log reader, sizes, presets, env."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import fewshot
from torch import nn

from fewshot_cli.episodes import EpisodeSampler
from fewshot_cli.errors import BadInput
from fewshot_cli.memory.limits import parse_size
from fewshot_cli.runner.command import Command
from fewshot_cli.runner.config import EpisodicConfig, EvaluationConfig
from fewshot_cli.runner.config import resolve as resolve_config
from fewshot_cli.runner.device import resolve_device
from fewshot_cli.runner.evaluation import EvaluationTask
from fewshot_cli.runner.leaks import LeakDetector
from fewshot_cli.runner.log import RunLog, read_log
from fewshot_cli.runner.loop import run
from fewshot_cli.runner.metrics import RunningMean
from fewshot_cli.runner.opening import RunOptions
from fewshot_cli.runner.task import RunContext

ITEMS = {c: list(range(c * 30, (c + 1) * 30)) for c in range(10)}


def test_an_episode_is_a_pure_function_of_seed_split_and_index() -> None:
    a = EpisodeSampler(ITEMS, 5, 3, 4, seed=1, split="train")
    b = EpisodeSampler(ITEMS, 5, 3, 4, seed=1, split="train")
    forward = [a.episode(i) for i in range(20)]
    backward = [b.episode(i) for i in reversed(range(20))][::-1]
    assert forward == backward
    assert a.episode(3) != EpisodeSampler(ITEMS, 5, 3, 4, seed=1, split="test").episode(3)
    assert a.episode(3).hash != a.episode(4).hash


def test_a_step_s_training_episodes_are_numbered_from_1_in_one_place() -> None:
    assert list(EpisodicConfig(episodes=5).step_episodes(3)) == [3]
    assert [list(EpisodicConfig(episodes=5, episodes_per_step=2).step_episodes(s)) for s in (1, 2, 3)] == [
        [1, 2], [3, 4], [5]]


def test_an_episode_holds_distinct_classes_and_disjoint_support_and_query() -> None:
    episode = EpisodeSampler(ITEMS, 5, 3, 4, seed=0, split="train").episode(7)
    assert len(set(episode.classes)) == 5
    for cls, support, query in zip(episode.classes, episode.support, episode.query, strict=True):
        assert len(support) == 3 and len(query) == 4 and not set(support) & set(query)
        assert all(i in ITEMS[cls] for i in support + query)


def test_the_sampler_says_up_front_what_is_missing() -> None:
    with pytest.raises(BadInput, match=r"10 classes with at least 25 images .* 12-way episodes need 12"):
        EpisodeSampler(ITEMS, 12, 5, 20, seed=0, split="train")
    small = {**ITEMS, 99: [1, 2]}
    with pytest.raises(BadInput, match="1 more have fewer"):
        EpisodeSampler(small, 11, 5, 5, seed=0, split="val")


def test_steady_growth_is_a_leak() -> None:
    detector = LeakDetector(window=30, warmup=5, min_growth_mb=32)
    verdicts = [v for s in range(60) for v in detector.observe(s, {"rss_mb": 500 + 3.0 * s})]
    assert verdicts and verdicts[0].series == "rss_mb"


def test_a_single_step_up_is_not_a_leak() -> None:
    detector = LeakDetector(window=30, warmup=5, min_growth_mb=32)
    assert not [v for s in range(90) for v in detector.observe(s, {"rss_mb": 500 + (200 if s > 40 else 0)})]


def test_noise_is_not_a_leak() -> None:
    import random

    rng = random.Random(0)
    detector = LeakDetector(window=30, warmup=5, min_growth_mb=32)
    assert not [v for s in range(200) for v in detector.observe(s, {"rss_mb": 500 + rng.uniform(-40, 40)})]


def test_a_cut_last_line_is_skipped_with_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    log = RunLog(tmp_path / "log.jsonl")
    log.write("run_start", command="x")
    log.write("step", phase="train", step=1, loss=1.0, mem={"rss_mb": 10.0})
    log.close()
    with open(tmp_path / "log.jsonl", "a") as handle:
        handle.write('{"event": "step", "pha')
    events = read_log(tmp_path / "log.jsonl")
    assert [e["event"] for e in events] == ["run_start", "step"]
    assert "skipped a cut" in capsys.readouterr().err


def test_running_mean_matches_the_batch_formula() -> None:
    values = [0.5, 0.75, 1.0, 0.25, 0.6]
    acc = RunningMean()
    for v in values:
        acc.add(v)
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5
    assert acc.mean == pytest.approx(mean) and acc.ci95 == pytest.approx(1.96 * std / len(values) ** 0.5)


@pytest.mark.parametrize(("text", "size"), [("15GiB", 15 * 1024**3), ("512MiB", 512 * 1024**2), ("16GB", 16e9)])
def test_sizes_parse(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_auto_device_picks_the_accelerator_there_is_and_cpu_without_one() -> None:
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu").type == "cpu"


def test_presets_list_every_preset_for_every_command() -> None:
    table = json.loads(fewshot("presets", "--json").stdout)
    assert "mahalanobis-train" in table
    for presets in table.values():
        assert set(presets) == {"cpu", "t4", "mps", "a100", "h100"}
        assert all("image_size" in knobs or "batch_size" in knobs for knobs in presets.values())


def test_env_reports_versions_and_devices() -> None:
    info = json.loads(fewshot("env", "--json").stdout)
    assert {"python", "torch", "torchvision", "fewshot", "cuda_devices", "ram_bytes"} <= set(info)


def test_one_jump_in_a_short_run_is_not_a_leak() -> None:
    import random

    rng = random.Random(1)
    for jump_at in range(12, 31):  # wherever an evaluation's one-off rise falls in a 40-step run
        detector = LeakDetector.for_run(40)
        series = [830 + (60 if s > jump_at else 0) + rng.uniform(-3, 3) for s in range(1, 41)]
        assert not [v for s, value in enumerate(series, 1) for v in detector.observe(s, {"rss_mb": value})], jump_at


def test_a_leak_in_a_short_run_is_still_flagged() -> None:
    detector = LeakDetector.for_run(45)
    assert [v for s in range(1, 46) for v in detector.observe(s, {"rss_mb": 800 + 8.0 * s})]


@dataclass
class _ProbeConfig(EvaluationConfig):
    pass


class InferenceProbe(EvaluationTask):
    """An evaluation-only task that reports how the runner called its `evaluate`."""

    def __init__(self, cfg: _ProbeConfig, ctx: RunContext) -> None:
        super().__init__(cfg, ctx)
        self.model = nn.Linear(2, 2)

    def evaluate(self, phase: str, step: int) -> dict[str, float]:
        made = self.model(torch.ones(1, 2))
        return {"inference_mode": float(torch.is_inference_mode_enabled()), "tensor_is_inference":
                float(made.is_inference()), "grad": float(made.requires_grad), "training": float(self.model.training)}

    def plan_phases(self) -> dict:
        return {"test": lambda: self.model(torch.ones(1, 2))}


def test_the_runner_evaluates_under_inference_mode_in_eval_mode(tmp_path: Path) -> None:
    command = Command(name="probe", help="", config=_ProbeConfig, presets={}, task_path=f"{__name__}:InferenceProbe",
                      primary_metric="inference_mode", evaluation_only=True)
    resolved = resolve_config(_ProbeConfig, {}, "cpu", {})
    metrics = run(command, resolved, RunOptions(device=torch.device("cpu"), out=tmp_path, name="p", quiet=True))
    assert metrics == {"inference_mode": 1.0, "tensor_is_inference": 1.0, "grad": 0.0, "training": 0.0}
