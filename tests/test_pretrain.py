"""mahalanobis-train's --pretrain-epochs: a classifier over the training classes before the episodes, as the
runner's first steps (checkpointed, resumed, planned and backed off like the episodes)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from conftest import SMALL, events, fewshot
from test_cli_runs import _start, _wait_for_step
from test_distributed import same_model, torchrun

from fewshot_cli.commands.mahalanobis import MahalanobisConfig, MahalanobisTask
from fewshot_cli.errors import BadInput
from fewshot_cli.runner.checkpoint import load_checkpoint
from fewshot_cli.runner.task import RunContext

#: a short run on the built-in data: 3,840 training images in batches of 512 make 8 pre-training steps per epoch
PRETRAIN = [*SMALL, "--episodes", "4", "--pretrain-epochs", "1", "--pretrain-batch-size", "512"]
STEPS = 8


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three runs: without pre-training, with it, and with it under simulated OOMs of its batch."""
    runs = tmp_path_factory.mktemp("pretrain") / "runs"
    for name, args, env in (("plain", [*SMALL, "--episodes", "4"], None), ("pre", PRETRAIN, None),
                            ("oom", PRETRAIN, {"FEWSHOT_SIMULATE_OOM": "pretrain:pretrain_batch_size>128"})):
        done = fewshot("mahalanobis-train", *args, "--out", runs, "--name", name, env=env)
        assert done.returncode == 0, done.stderr
    return runs


def test_pretraining_takes_the_first_steps_and_the_episodes_start_from_its_backbone(made: Path) -> None:
    plain, pre = events(made / "plain", "step"), events(made / "pre", "step")
    assert [s["phase"] for s in pre] == ["pretrain"] * STEPS + ["train"] * 4
    assert [s["step"] for s in pre] == list(range(1, STEPS + 5))
    assert [s["images"] for s in pre[:STEPS]] == [512.0] * (STEPS - 1) + [3840 - 7 * 512]
    assert pre[STEPS - 1]["loss"] < pre[0]["loss"]  # the classifier learns
    # the same episodes as the run without pre-training, met by another backbone
    assert [s["episode_hash"] for s in pre[STEPS:]] == [s["episode_hash"] for s in plain]
    assert pre[STEPS]["loss"] != pytest.approx(plain[0]["loss"], rel=1e-3)
    metrics = json.loads((made / "pre" / "metrics.json").read_text())
    assert metrics["pretrain_steps"] == STEPS and "pretrain_steps" not in json.loads(
        (made / "plain" / "metrics.json").read_text())
    knobs = json.loads((made / "pre" / "config.json").read_text())["knobs"]
    assert knobs["pretrain_epochs"] == {"value": 1, "source": "cli"}
    assert [e["phase"] for e in events(made / "pre", "eval")] == ["val", "test"]  # validation counts episodes
    assert events(made / "pre", "eval")[0]["step"] == STEPS + 3


def test_the_plan_has_a_pretrain_phase_and_the_run_checks_it(made: Path) -> None:
    plan = json.loads((made / "pre" / "config.json").read_text())["plan"]["predicted_mb"]
    assert list(plan)[0] == "pretrain" and plan["pretrain"] > 0
    assert "pretrain" not in json.loads((made / "plain" / "config.json").read_text())["plan"]["predicted_mb"]
    checks = {e["phase"]: e for e in events(made / "pre", "plan_check")}
    assert set(checks) == {"pretrain", "train", "val", "test"}
    assert checks["pretrain"]["predicted_mb"] == pytest.approx(plan["pretrain"], abs=0.05)


def test_an_oom_in_pretraining_backs_off_its_batch_and_does_the_same_work(made: Path) -> None:
    backoffs = events(made / "oom", "oom_backoff")
    assert [(b["phase"], b["step"], b["knob"], b["from"], b["to"], b["grad_accumulation"]) for b in backoffs] == [
        ("pretrain", 1, "pretrain_batch_size", 512, 256, 2), ("pretrain", 1, "pretrain_batch_size", 256, 128, 4)]
    oom, pre = events(made / "oom", "step"), events(made / "pre", "step")
    assert [(s["phase"], s.get("images"), s.get("episode_hash")) for s in oom] == [
        (s["phase"], s.get("images"), s.get("episode_hash")) for s in pre]
    # the same batches in 4 micro-batches: only BatchNorm's statistics (per micro-batch) differ
    assert [s["loss"] for s in oom] == pytest.approx([s["loss"] for s in pre], rel=0.05, abs=0.05)
    state = load_checkpoint(made / "oom" / "checkpoint.pt")
    assert state["knobs"] == {"pretrain_batch_size": 128}
    assert state["accumulations"] == {"pretrain_batch_size": 4} and state["accumulation"] == 1  # episodes unsplit


def test_a_run_stopped_in_pretraining_resumes_to_the_uninterrupted_result(made: Path) -> None:
    cut = made / "cut"
    proc = _start(["mahalanobis-train", *PRETRAIN, "--pretrain-batch-size", "256", "--out", made, "--name", "cut"])
    _wait_for_step(cut, 2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    stopped_at = events(cut, "checkpoint")[-1]["step"]
    assert stopped_at < 15  # inside pre-training (3,840 images in batches of 256)
    assert "pretraining" in load_checkpoint(cut / "checkpoint.pt")["task"]
    resumed = fewshot("mahalanobis-train", "--resume", cut, "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    whole = fewshot("mahalanobis-train", *PRETRAIN, "--pretrain-batch-size", "256", "--out", made, "--name", "whole")
    assert whole.returncode == 0, whole.stderr
    assert (cut / "metrics.json").read_text() == (made / "whole" / "metrics.json").read_text()
    steps = {s["step"]: s["loss"] for s in events(cut, "step")}
    assert steps == {s["step"]: s["loss"] for s in events(made / "whole", "step")}


def test_two_ranks_pretrain_and_train_as_one_process_does(tmp_path: Path) -> None:
    """Each rank takes its parts of a batch (--episodes-per-step of them), as it takes a step's episodes: the losses,
    the metrics and the model are one process's, through pre-training and the episodes after it."""
    args = ["mahalanobis-train", "--preset", "cpu", "--image-size", "16", "--n-query", "4", "--test-episodes", "5",
            "--episodes", "4", "--episodes-per-step", "2", "--val-every", "0", "--quiet", "--pretrain-epochs", "1",
            "--pretrain-batch-size", "1024", "--out", tmp_path]
    two = torchrun(*args, "--name", "two")
    assert two.returncode == 0, two.stderr[-3000:]
    one = fewshot(*args, "--name", "one")
    assert one.returncode == 0, one.stderr
    steps = [[(s["phase"], s["loss"]) for s in events(tmp_path / n, "step")] for n in ("one", "two")]
    assert steps[0] == steps[1] and [p for p, _ in steps[0]] == ["pretrain"] * 4 + ["train"] * 2
    assert (tmp_path / "one" / "metrics.json").read_text() == (tmp_path / "two" / "metrics.json").read_text()
    assert same_model(tmp_path / "one", tmp_path / "two")


def test_pretraining_starts_from_loaded_weights_and_trains_the_backbone_alone(tmp_path: Path) -> None:
    from fewshot_cli.models.backbones import build_backbone  # the backbone whose weights the file holds

    torch.manual_seed(5)
    saved = build_backbone("conv4").state_dict()
    torch.save(saved, tmp_path / "conv4.pt")
    cfg = MahalanobisConfig(image_size=16, episodes=1, n_query=2, pretrain_epochs=1, pretrain_batch_size=1024,
                            weights=str(tmp_path / "conv4.pt"))
    task = MahalanobisTask(cfg, RunContext(torch.device("cpu"), 0, None))
    loaded = {k: v.clone() for k, v in task.model.backbone.state_dict().items()}
    assert all(torch.equal(loaded[k], v) for k, v in saved.items())
    adapter = {k: v.clone() for k, v in task.model.adapter.state_dict().items()}
    assert task.total_steps() == task.pretrain_steps + 1 == 5
    task.train_step(1)
    task.feed.close()
    moved = task.model.backbone.state_dict()
    assert any(not torch.equal(loaded[k], moved[k]) for k in loaded if k.endswith("weight"))
    assert all(torch.equal(adapter[k], v) for k, v in task.model.adapter.state_dict().items())


@pytest.mark.parametrize(("args", "words"), [
    (["--pretrain-epochs", "-1"], "--pretrain-epochs must be at least 0"),
    (["--pretrain-epochs", "1", "--pretrain-batch-size", "0"], "--pretrain-batch-size must be at least 1"),
])
def test_a_bad_pretraining_value_is_exit_2(tmp_path: Path, args: list[str], words: str) -> None:
    result = fewshot("mahalanobis-train", *SMALL, *args, "--out", tmp_path / "runs", "--name", "bad")
    assert result.returncode == 2, result.stderr
    assert words in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "runs" / "bad").exists()


def test_pretraining_a_frozen_backbone_is_bad_input() -> None:
    with pytest.raises(BadInput, match="--pretrain-epochs trains the backbone, which --freeze-backbone keeps fixed"):
        MahalanobisConfig(pretrain_epochs=1, freeze_backbone=True, weights="w.pt").check_pretraining()
    MahalanobisConfig(pretrain_epochs=0, freeze_backbone=True, weights="w.pt").check_pretraining()
