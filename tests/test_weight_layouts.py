"""Checkpoints of the few-shot repositories researchers start from, read with `--weights`: FEAT's ResNet-12 and
Conv-4 (`dict(params=...)`, `encoder.` keys, a pre-training `fc` beside them) and CloserLookFewShot's Conv-4
(`dict(epoch=..., state=...)`, `feature.trunk.I.C/BN` keys, each saved twice). The networks below are built the way
those repositories build them (names, biases, block order), filled with random weights and BatchNorm statistics,
saved in their files' layout, and loaded into our backbones, which must then compute the same features."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import SMALL, events, fewshot
from torch import nn

from fewshot_cli.errors import BadInput
from fewshot_cli.models.backbones import build_backbone
from fewshot_cli.models.weights import from_few_shot_repos, load_into, resolve


class FeatBlock(nn.Module):
    """FEAT's ResNet-12 block: three 3x3 convolutions (no bias), each with BatchNorm, LeakyReLU(0.1); a 1x1
    `downsample` on the residual; LeakyReLU after the sum, then a 2x2 max-pool."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        for k, c in ((1, c_in), (2, c_out), (3, c_out)):
            setattr(self, f"conv{k}", nn.Conv2d(c, c_out, 3, padding=1, bias=False))
            setattr(self, f"bn{k}", nn.BatchNorm2d(c_out))
        self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        self.relu, self.maxpool = nn.LeakyReLU(0.1), nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.maxpool(self.relu(out + self.downsample(x)))


class FeatResNet12(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        widths = (3, 64, 160, 320, 640)
        for i in range(1, 5):
            setattr(self, f"layer{i}", nn.Sequential(FeatBlock(widths[i - 1], widths[i])))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        return x.mean((2, 3))  # FEAT's AvgPool2d(5) over the 5x5 map of an 84-pixel image


def feat_conv4() -> nn.Sequential:
    """FEAT's ConvNet: four blocks of a biased 3x3 convolution, BatchNorm, ReLU, 2x2 max-pool."""
    return nn.Sequential(*(nn.Sequential(nn.Conv2d(3 if i == 0 else 64, 64, 3, padding=1), nn.BatchNorm2d(64),
                                         nn.ReLU(), nn.MaxPool2d(2)) for i in range(4)), nn.Flatten())


class CloserLookBlock(nn.Module):
    """CloserLookFewShot's ConvBlock: `C` (biased) and `BN` as attributes and again inside `trunk`."""

    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.C, self.BN = nn.Conv2d(c_in, 64, 3, padding=1), nn.BatchNorm2d(64)
        self.trunk = nn.Sequential(self.C, self.BN, nn.ReLU(), nn.MaxPool2d(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)


class CloserLookBaseline(nn.Module):
    """Baseline++ as CloserLookFewShot trains it: `feature` (its Conv-4) and a `classifier` over the base classes."""

    def __init__(self) -> None:
        super().__init__()
        self.feature = nn.Module()
        self.feature.trunk = nn.Sequential(*(CloserLookBlock(3 if i == 0 else 64) for i in range(4)), nn.Flatten())
        self.classifier = nn.Linear(1600, 64, bias=False)


def _randomise(module: nn.Module) -> nn.Module:
    """Random weights, biases and BatchNorm statistics, so that every tensor's place in the mapping matters."""
    torch.manual_seed(0)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
        elif isinstance(m, nn.Conv2d) and m.bias is not None:
            nn.init.uniform_(m.bias, -0.3, 0.3)
    return module


def _same_features(theirs: nn.Module, ours: nn.Module, size: int) -> None:
    images = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for train in (False, True):  # training mode: the batch's statistics absorb the biases moved into the mean
            theirs.train(train)
            ours.train(train)
            torch.testing.assert_close(ours(images), theirs(images), rtol=1e-4, atol=1e-4)


def test_feats_resnet12_checkpoint_loads_into_our_resnet12(tmp_path: Path) -> None:
    feat = _randomise(FeatResNet12())
    state = {f"encoder.{k}": v for k, v in feat.state_dict().items()}
    state |= {"fc.weight": torch.randn(64, 640), "fc.bias": torch.randn(64)}  # FEAT's pre-training classifier
    torch.save({"params": state}, tmp_path / "Res12-pre.pth")
    ours = build_backbone("resnet12")
    weights = resolve(str(tmp_path / "Res12-pre.pth"), "resnet12")
    weights.state = from_few_shot_repos(weights.state)
    assert load_into(ours, weights, "backbone").left_at_init == []
    _same_features(feat, ours, 84)


def test_feats_conv4_checkpoint_loads_with_its_biases_in_the_running_means(tmp_path: Path) -> None:
    feat = _randomise(feat_conv4())
    torch.save({"params": feat.state_dict()}, tmp_path / "con-pre.pth")
    ours = build_backbone("conv4")
    weights = resolve(str(tmp_path / "con-pre.pth"), "conv4")
    weights.state = from_few_shot_repos(weights.state)
    assert not any(k.endswith("0.bias") for k in weights.state)
    assert load_into(ours, weights, "backbone").left_at_init == []
    _same_features(feat, ours, 32)


def test_closer_looks_conv4_checkpoint_loads_without_its_copies_and_classifier(tmp_path: Path) -> None:
    baseline = _randomise(CloserLookBaseline())
    assert any(".trunk.0.trunk.0." in k for k in baseline.state_dict())  # each tensor saved twice, as theirs are
    torch.save({"epoch": 399, "state": baseline.state_dict()}, tmp_path / "399.tar")
    ours = build_backbone("conv4")
    weights = resolve(str(tmp_path / "399.tar"), "conv4")
    weights.state = from_few_shot_repos(weights.state)
    assert load_into(ours, weights, "backbone").left_at_init == []
    _same_features(baseline.feature.trunk, ours, 32)


def test_a_torchvision_resnet_is_not_taken_for_feats() -> None:
    import torchvision

    state = torchvision.models.resnet18(weights=None).state_dict()
    mapped = from_few_shot_repos(state)
    assert "4.0.conv1.weight" in mapped and "fc.weight" not in mapped  # torchvision's names, as from_resnet maps them


def test_feats_resnet12_into_conv4_names_the_keys_that_do_not_fit(tmp_path: Path) -> None:
    torch.save({"params": {f"encoder.{k}": v for k, v in FeatResNet12().state_dict().items()}}, tmp_path / "r12.pth")
    weights = resolve(str(tmp_path / "r12.pth"), "conv4")
    weights.state = from_few_shot_repos(weights.state)
    with pytest.raises(BadInput, match=r"does not fit the backbone: \d+ missing \(0\.0\.weight"):
        load_into(build_backbone("conv4"), weights, "backbone")


def test_mahalanobis_train_runs_from_feats_resnet12(tmp_path: Path) -> None:
    torch.save({"params": {f"encoder.{k}": v for k, v in _randomise(FeatResNet12()).state_dict().items()}},
               tmp_path / "Res12-pre.pth")
    args = ["mahalanobis-train", *SMALL, "--episodes", "2", "--val-every", "2", "--test-episodes", "2", "--out",
            tmp_path / "runs", "--weights", tmp_path / "Res12-pre.pth"]
    done = fewshot(*args, "--name", "feat", "--backbone", "resnet12")
    assert done.returncode == 0, done.stderr
    loaded = events(tmp_path / "runs" / "feat", "weights_loaded")[0]
    assert loaded["left_at_init_count"] == 0 and loaded["path"] == str(tmp_path / "Res12-pre.pth")
    config = json.loads((tmp_path / "runs" / "feat" / "config.json").read_text())
    assert str(tmp_path / "Res12-pre.pth") in json.dumps(config)
    wrong = fewshot(*args, "--name", "wrong", "--backbone", "conv4")
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr
    assert "does not fit the backbone" in wrong.stderr and "0.0.weight" in wrong.stderr
    assert not (tmp_path / "runs" / "wrong").exists()
