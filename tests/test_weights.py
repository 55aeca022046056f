"""Pretrained weights without a network: torchvision names through a temporary TORCH_HOME, Hugging Face ids through
a temporary HF cache, files of every kind, mismatches, and files that would run code when unpickled."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import SMALL, events, fewshot

from fewshot_cli.errors import BadInput
from fewshot_cli.models.backbones import build_backbone
from fewshot_cli.models.weights import (
    cache_path,
    download,
    load_into,
    read_state_dict,
    resolve,
    sha256,
    torchvision_weights,
)

CLIP_ID = "openai/clip-vit-base-patch32"

# imported by every Python process the tests start: any connection or name lookup to the outside is recorded and
# refused, so a test sees both that nothing was attempted and that the command never waited on a network
SITECUSTOMIZE = '''
import os, socket
_connect = socket.socket.connect

def _record(what):
    with open(os.environ["FEWSHOT_TEST_SOCKETS"], "a") as handle:
        handle.write(repr(what) + "\\n")

def _blocked_connect(self, address, *args, **kwargs):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _record(address)
        raise OSError(101, "Network is unreachable (blocked by the test)")
    return _connect(self, address, *args, **kwargs)

def _blocked_lookup(host, *args, **kwargs):
    _record(host)
    raise socket.gaierror(-2, "Name or service not known (blocked by the test)")

socket.socket.connect = _blocked_connect
socket.getaddrinfo = _blocked_lookup
'''


@pytest.fixture
def offline(tmp_path: Path):
    """An environment for `fewshot`: TORCH_HOME and HF_HOME in tmp_path, every outside socket refused and logged."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    log = tmp_path / "sockets.log"
    env = {"TORCH_HOME": str(tmp_path / "torch"), "HF_HOME": str(tmp_path / "hf"), "FEWSHOT_TEST_SOCKETS": str(log),
           "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    env.pop("HF_HUB_OFFLINE", None)
    return env, log


def _attempts(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def _place_torchvision(torch_home: Path, arch: str, name: str = "DEFAULT") -> tuple[Path, dict]:
    """A randomly initialised `arch` saved where torchvision looks for `arch`'s `name` weights."""
    weights = torchvision_weights(name, arch)
    path = torch_home / "hub" / "checkpoints" / Path(weights.url).name
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(1)
    state = torchvision.models.get_model(arch, weights=None).state_dict()
    torch.save(state, path)
    return path, state


def _place_clip(hf_home: Path, repo: str = CLIP_ID) -> Path:
    """A tiny random CLIP saved in the hub cache layout: models--org--name/{refs/main, snapshots/REV/...}."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    text = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
            "vocab_size": 64, "max_position_embeddings": 16, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8}
    revision = "0123456789abcdef0123456789abcdef01234567"
    folder = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / revision
    torch.manual_seed(2)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(snapshot)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(snapshot)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(revision)
    return snapshot


# ---------------------------------------------------------------- torchvision names through the hub cache


def test_default_resolves_to_the_file_torchvision_caches(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    path, state = _place_torchvision(tmp_path / "torch", "resnet18")
    assert cache_path(torchvision_weights("DEFAULT", "resnet18")) == path
    weights = resolve("DEFAULT", "resnet18")
    assert weights.record["name"] == "ResNet18_Weights.IMAGENET1K_V1"
    assert weights.record["files"] == {str(path): sha256(path)}
    assert weights.mean == (0.485, 0.456, 0.406) and weights.std == (0.229, 0.224, 0.225)  # its transforms()
    assert all(torch.equal(weights.state[k], v) for k, v in state.items())


def test_default_loads_into_the_backbone_in_a_run(tmp_path, monkeypatch) -> None:
    from fewshot_cli.commands.mahalanobis import MahalanobisConfig, MahalanobisTask
    from fewshot_cli.runner.task import RunContext

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    _, state = _place_torchvision(tmp_path / "torch", "resnet18")
    seen: list = []
    cfg = MahalanobisConfig(backbone="resnet18", weights="DEFAULT", image_size=16, lr_backbone=1e-5)
    task = MahalanobisTask(cfg, RunContext(torch.device("cpu"), 0, None, emit=lambda e, **f: seen.append((e, f))))
    assert torch.equal(task.model.backbone[0].weight, state["conv1.weight"])
    assert torch.equal(task.model.backbone[7][1].bn2.running_var, state["layer4.1.bn2.running_var"])
    assert task.loaded_weights[0]["name"] == "ResNet18_Weights.IMAGENET1K_V1"
    assert [f["left_at_init"] for e, f in seen if e == "weights_loaded"] == [[]]  # fc is the ImageNet head, unused
    assert sorted(g["lr"] for g in task.optimizer.param_groups) == [1e-5, 1e-3]


def test_cli_default_loads_the_cached_file_records_its_sha256_and_opens_no_socket(tmp_path, offline) -> None:
    env, log = offline
    path, state = _place_torchvision(tmp_path / "torch", "mobilenet_v3_large")
    runs = tmp_path / "runs"
    result = fewshot("classify-food101", "--preset", "cpu", "--model", "mobilenet_v3_large", "--weights", "DEFAULT",
                     "--epochs", "1", "--batch-size", "4", "--image-size", "32", "--synthetic-classes", "3",
                     "--dev-samples", "4", "--out", runs, "--name", "r", "--quiet", env=env)
    assert result.returncode == 0, result.stderr
    assert _attempts(log) == []
    config = json.loads((runs / "r" / "config.json").read_text())
    assert config["weights"] == [{"option": "--weights", "name": "MobileNet_V3_Large_Weights.IMAGENET1K_V2",
                                  "url": torchvision_weights("DEFAULT", "mobilenet_v3_large").url,
                                  "files": {str(path): sha256(path)}}]
    loaded = events(runs / "r", "weights_loaded")[0]
    assert loaded["left_at_init"] == ["classifier.3.bias", "classifier.3.weight"]  # the new 3-class layer
    # the best model is written as model.pt and as model.safetensors, the same tensors
    as_pt, as_st = read_state_dict(runs / "r" / "model.pt"), read_state_dict(runs / "r" / "model.safetensors")
    assert as_pt.keys() == as_st.keys() and all(torch.equal(as_pt[k], as_st[k]) for k in as_pt)
    assert as_pt["features.0.0.weight"].shape == state["features.0.0.weight"].shape


def test_missing_torchvision_weights_exit_2_naming_the_cache_path_within_seconds(tmp_path, offline) -> None:
    env, log = offline
    runs = tmp_path / "runs"
    started = time.monotonic()
    result = fewshot("mahalanobis-train", *SMALL, "--backbone", "resnet18", "--weights", "DEFAULT", "--out", runs,
                     env=env)
    assert time.monotonic() - started < 30  # the python start-up and imports; no network wait
    assert result.returncode == 2, result.stderr
    expected = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert str(expected) in result.stderr and "Traceback" not in result.stderr
    assert "get_weight('ResNet18_Weights.IMAGENET1K_V1')" in result.stderr
    assert not list(runs.glob("*/log.jsonl"))


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_server_that_never_answers_fails_the_download_at_its_timeout(tmp_path, scheme) -> None:
    # a real listening socket: the kernel accepts the connection, and nothing ever reads the request or replies
    with socket.create_server(("127.0.0.1", 0)) as silent:
        # a download that would wait for ever is cut off at 5 s by a reset, so the test fails instead of hanging
        cut_off = threading.Timer(5.0, silent.close)
        cut_off.start()
        url = f"{scheme}://127.0.0.1:{silent.getsockname()[1]}/resnet18-f37072fd.pth"
        path = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
        started = time.monotonic()
        with pytest.raises(BadInput) as refused:
            download(url, path, "--weights DEFAULT", timeout_s=0.5)
        waited = time.monotonic() - started
        cut_off.cancel()
    assert 0.5 <= waited < 5  # gave up because of the timeout: not at once, and not hanging
    message = str(refused.value)
    assert message == (f"--weights DEFAULT: {url} sent nothing for 0.5 s, so downloading it to {path} was given up; "
                       "copy the file there by hand.")
    assert list(path.parent.iterdir()) == []  # no partial file left where the cache is read


def test_weights_names_are_checked_against_the_architecture() -> None:
    with pytest.raises(BadInput, match="IMAGENET1K_V1"):
        resolve("IMAGENET1K_V9", "resnet18")
    with pytest.raises(BadInput, match="conv4 has no torchvision weights"):
        resolve("DEFAULT", "conv4")
    assert resolve("none", "resnet18") is None and resolve(None, "conv4") is None


# ---------------------------------------------------------------- Hugging Face ids through the HF cache


def test_clip_id_loads_the_cached_snapshot_and_records_every_file(tmp_path, monkeypatch) -> None:
    from huggingface_hub import constants
    from transformers import CLIPModel

    from fewshot_cli.models.embedders import build_embedder

    snapshot = _place_clip(tmp_path / "hf")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    model = build_embedder("clip", model="DEFAULT")
    reference = CLIPModel.from_pretrained(snapshot).state_dict()
    assert all(torch.equal(model.net.state_dict()[k], v) for k, v in reference.items())
    assert model.loaded["id"] == CLIP_ID
    assert model.loaded["files"]["model.safetensors"] == sha256(snapshot / "model.safetensors")
    assert set(model.loaded["files"]) == {p.name for p in snapshot.iterdir()}


def test_cli_clip_id_runs_offline_from_the_cache(tmp_path, offline) -> None:
    env, log = offline
    snapshot = _place_clip(tmp_path / "hf")
    runs = tmp_path / "runs"
    result = fewshot("embed-classify", "--preset", "cpu", "--backbone", "clip", "--model", CLIP_ID,
                     "--image-size", "16", "--categories", "1", "--n-way", "2", "--k-shot", "2", "--n-query", "2",
                     "--out", runs, "--name", "r", "--quiet", env=env)
    assert result.returncode == 0, result.stderr
    assert _attempts(log) == []
    record = json.loads((runs / "r" / "config.json").read_text())["weights"][0]
    assert record["id"] == CLIP_ID and record["directory"] == str(snapshot)
    assert record["files"]["model.safetensors"] == sha256(snapshot / "model.safetensors")


@pytest.mark.parametrize("hub_offline", ["1", None])
def test_missing_hf_model_exits_2_naming_the_cache_folder(tmp_path, offline, hub_offline) -> None:
    env, log = offline
    if hub_offline:
        env["HF_HUB_OFFLINE"] = hub_offline
    started = time.monotonic()
    result = fewshot("embed-classify", "--preset", "cpu", "--backbone", "dinov2", "--model", "DEFAULT",
                     "--out", tmp_path / "runs", "--quiet", env=env)
    assert time.monotonic() - started < 30
    assert result.returncode == 2, result.stderr
    folder = tmp_path / "hf" / "hub" / "models--facebook--dinov2-base"
    assert str(folder) in result.stderr and "hf download facebook/dinov2-base" in result.stderr
    assert "Traceback" not in result.stderr
    assert (_attempts(log) == []) == bool(hub_offline)  # offline: not even a look; else one quick try


# ---------------------------------------------------------------- files and mismatches


def test_files_of_every_kind_give_the_same_state_dict(tmp_path) -> None:
    from safetensors.torch import save_file

    state = build_backbone("conv4").state_dict()
    torch.save(state, tmp_path / "bare.pth")
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "lightning.ckpt")
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "model.pt")
    torch.save({"step": 1, "task": {"model": state, "optimizer": {"state": {}, "param_groups": []}}},
               tmp_path / "checkpoint.pt")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "w.safetensors")
    for name in ("bare.pth", "lightning.ckpt", "model.pt", "checkpoint.pt", "w.safetensors"):
        loaded = resolve(str(tmp_path / name), "conv4")
        assert loaded.state.keys() == state.keys() and all(torch.equal(loaded.state[k], state[k]) for k in state)
        assert loaded.record["files"] == {str(tmp_path / name): sha256(tmp_path / name)}


def test_a_state_dict_of_another_architecture_names_the_first_keys(tmp_path) -> None:
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(BadInput, match=r"does not fit the backbone: .*missing \(0\.0\.weight"):
        load_into(build_backbone("conv4"), resolve(str(tmp_path / "r18.pth"), "conv4"), "backbone")


def test_not_strict_loads_what_fits_and_lists_the_rest(tmp_path) -> None:
    source = build_backbone("conv6")
    torch.save(source.state_dict(), tmp_path / "conv6.pt")
    target = build_backbone("conv4")
    with pytest.raises(BadInput, match="unexpected"):
        load_into(target, resolve(str(tmp_path / "conv6.pt"), "conv4"), "backbone")
    loaded = load_into(target, resolve(str(tmp_path / "conv6.pt"), "conv4"), "backbone", strict=False)
    assert loaded.left_at_init == [] and torch.equal(target[0][0].weight, source[0][0].weight)


def test_a_classifier_of_another_size_is_bad_input_unless_it_is_the_new_head(tmp_path) -> None:
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(BadInput, match=r"of another shape \(fc.weight is \(10, 512\), needs \(1000, 512\)\)"):
        load_into(torchvision.models.resnet18(), resolve(str(tmp_path / "r18.pth"), "resnet18"), "network")
    loaded = load_into(torchvision.models.resnet18(), resolve(str(tmp_path / "r18.pth"), "resnet18"), "network",
                       head=("fc",))
    assert loaded.left_at_init == ["fc.bias", "fc.weight"]


# ---------------------------------------------------------------- presets


def test_gpu_presets_load_pretrained_weights_only_with_real_data(tmp_path) -> None:
    from fewshot_cli.commands.detect_config import COMMAND as DETECT
    from fewshot_cli.commands.embed_config import COMMAND as EMBED
    from fewshot_cli.commands.mahalanobis_config import COMMAND as MAHALANOBIS
    from fewshot_cli.models.pretrained import settle
    from fewshot_cli.runner.config import resolve as resolve_config

    def settled(command, preset: str, data, **knobs):
        resolved = resolve_config(command.config, command.presets, preset, knobs)
        settle(resolved, data)
        return resolved.config

    assert settled(DETECT, "t4", tmp_path).weights == "DEFAULT"
    assert settled(DETECT, "t4", None).weights is None  # the built-in data
    assert settled(DETECT, "cpu", tmp_path).weights is None
    assert settled(DETECT, "t4", None, weights="DEFAULT").weights == "DEFAULT"  # asked for: kept
    assert settled(MAHALANOBIS, "a100", tmp_path).weights is None  # resnet12: no torchvision weights
    assert settled(MAHALANOBIS, "a100", tmp_path, backbone="resnet34").weights == "DEFAULT"
    assert settled(EMBED, "h100", tmp_path, backbone="clip").model == "DEFAULT"
    assert settled(EMBED, "h100", tmp_path).model is None  # resnet50 takes no model
    assert (settled(EMBED, "t4", tmp_path).backbone, settled(EMBED, "t4", tmp_path).weights) == ("resnet50", "DEFAULT")
    assert (settled(EMBED, "t4", None).backbone, settled(EMBED, "t4", None).weights) == ("small", None)
    assert settled(EMBED, "t4", None, backbone="resnet50").backbone == "resnet50"  # asked for: kept
    assert settled(EMBED, "cpu", tmp_path).backbone == "small"
    with pytest.raises(BadInput, match="--freeze-backbone needs --weights"):
        settled(DETECT, "cpu", tmp_path, freeze_backbone=True)


# ---------------------------------------------------------------- no file we read runs code


class _Payload:
    """Unpickling this creates the file `marker`: what a hostile checkpoint could do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _hostile(path: Path, marker: Path) -> Path:
    torch.save({"model": {"weight": torch.zeros(1)}, "payload": _Payload(marker)}, path)
    return path


@pytest.mark.parametrize(("command", "args"), [
    ("mahalanobis-train", [*SMALL, "--weights", "{file}"]),
    ("classify-food101", ["--preset", "cpu", "--weights", "{file}", "--synthetic-classes", "3", "--quiet"]),
    ("detect-train", ["--preset", "cpu", "--weights", "{file}", "--quiet"]),
    ("triplet-train", ["--preset", "cpu", "--weights", "{file}", "--quiet"]),
    ("triplet-train", ["--preset", "cpu", "--init", "{file}", "--quiet"]),
    ("embed-classify", ["--preset", "cpu", "--backbone", "resnet50", "--weights", "{file}", "--quiet"]),
])
def test_a_pickle_that_would_run_code_is_refused_by_every_option(tmp_path, offline, command, args) -> None:
    env, _ = offline
    marker = tmp_path / "pwned"
    file = _hostile(tmp_path / "evil.pt", marker)
    runs = tmp_path / "runs"
    result = fewshot(command, *[a.replace("{file}", str(file)) for a in args], "--out", runs, env=env)
    assert result.returncode == 2, result.stderr
    assert "will not be unpickled" in result.stderr and "Traceback" not in result.stderr
    assert not marker.exists()
    assert not list(runs.glob("*/log.jsonl"))


def test_resume_refuses_a_checkpoint_that_would_run_code(tmp_path, offline) -> None:
    env, _ = offline
    runs = tmp_path / "runs"
    first = fewshot("mahalanobis-train", *SMALL, "--out", runs, "--name", "r", env=env)
    assert first.returncode == 0, first.stderr
    (runs / "r" / "metrics.json").unlink()
    marker = tmp_path / "pwned"
    _hostile(runs / "r" / "checkpoint.pt", marker)
    result = fewshot("mahalanobis-train", "--resume", runs / "r", "--quiet", env=env)
    assert result.returncode == 2, result.stderr
    assert "will not be unpickled" in result.stderr and "Traceback" not in result.stderr
    assert not marker.exists()


def test_the_payload_does_run_when_unpickled_unsafely(tmp_path) -> None:
    """The refusals above mean something: the same file, loaded the unsafe way, creates its file."""
    marker = tmp_path / "pwned"
    _hostile(tmp_path / "evil.pt", marker)
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


def test_checkpoints_the_runner_writes_load_with_weights_only(tmp_path, offline) -> None:
    env, _ = offline
    runs = tmp_path / "runs"
    result = fewshot("classify-food101", "--preset", "cpu", "--epochs", "1", "--batch-size", "4", "--image-size",
                     "32", "--synthetic-classes", "3", "--dev-samples", "4", "--out", runs, "--name", "r", "--quiet",
                     env=env)
    assert result.returncode == 0, result.stderr
    state = torch.load(runs / "r" / "checkpoint.pt", weights_only=True)
    assert "optimizer" in state["task"] and "scaler" in state["task"]


def test_a_frozen_backbone_keeps_its_weights_and_statistics_through_a_step(tmp_path) -> None:
    from fewshot_cli.commands.mahalanobis import MahalanobisConfig, MahalanobisTask
    from fewshot_cli.runner.task import RunContext

    torch.save(build_backbone("conv4").state_dict(), tmp_path / "conv4.pt")
    cfg = MahalanobisConfig(weights=str(tmp_path / "conv4.pt"), freeze_backbone=True, image_size=16, n_query=2,
                            adapt="prototypes")
    task = MahalanobisTask(cfg, RunContext(torch.device("cpu"), 0, None))
    before = {k: v.clone() for k, v in task.model.backbone.state_dict().items()}
    task.model.train()
    task.train_step(1)
    after = task.model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BatchNorm running statistics
    assert not task.model.backbone.training and task.model.adapter.training


def test_any_automodel_image_encoder_loads_from_a_directory(tmp_path) -> None:
    from test_embed import _tiny_dinov2
    from transformers import AutoModel

    from fewshot_cli.models.embedders import build_embedder

    directory = _tiny_dinov2(tmp_path / "encoder")
    model = build_embedder("hf", model=str(directory))
    reference = AutoModel.from_pretrained(directory).state_dict()
    assert all(torch.equal(model.net.state_dict()[k], v) for k, v in reference.items())
    assert model.loaded["path"] == str(directory) and "model.safetensors" in model.loaded["files"]
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 16)
    with pytest.raises(BadInput, match="--backbone hf needs --model"):
        build_embedder("hf", model="DEFAULT")


def test_resnet50_default_serves_the_detector_trunk_and_the_embedder(tmp_path, monkeypatch) -> None:
    from PIL import Image

    from fewshot_cli.models.detection import build_feature_backbone as detection_backbone
    from fewshot_cli.models.detection import load_backbone_weights
    from fewshot_cli.models.embedders import build_embedder

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    _, state = _place_torchvision(tmp_path / "torch", "resnet50")
    seen: list = []
    trunk, _ = detection_backbone("resnet50", 16)
    initial = trunk.project.weight.clone()
    load_backbone_weights(trunk, "DEFAULT", "resnet50", lambda e, **f: seen.append(f))
    assert torch.equal(trunk.body[6][5].conv3.weight, state["layer3.5.conv3.weight"])  # up to layer3
    assert torch.equal(trunk.project.weight, initial)  # the new projection keeps its initial values
    assert seen[0]["left_at_init"] == ["project.bias", "project.weight"]
    assert seen[0]["name"] == "ResNet50_Weights.IMAGENET1K_V2"

    embedder = build_embedder("resnet50", weights="DEFAULT")
    assert torch.equal(embedder.net.layer4[2].conv3.weight, state["layer4.2.conv3.weight"])
    pixels = embedder.preprocess(Image.new("RGB", (300, 260), (124, 116, 104)))
    assert pixels.shape == (3, 224, 224) and pixels.abs().max() < 0.01  # its transforms(): crop 224, ImageNet stats


def test_embed_options_for_the_other_kind_of_backbone_are_bad_input(tmp_path) -> None:
    from fewshot_cli.commands.embed_config import COMMAND as EMBED
    from fewshot_cli.models.pretrained import settle
    from fewshot_cli.runner.config import resolve as resolve_config

    for knobs, needle in (({"backbone": "resnet50", "model": CLIP_ID}, "--model is for"),
                          ({"backbone": "clip", "weights": "DEFAULT"}, "with --model ID_OR_DIR")):
        with pytest.raises(BadInput, match=needle):
            settle(resolve_config(EMBED.config, EMBED.presets, "t4", knobs), tmp_path)
