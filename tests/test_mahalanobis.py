"""mahalanobis-train: heads against a plain float64 reference, gradients, projection, weights, on-disk folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SMALL, fewshot
from PIL import Image

from fewshot_cli.commands.mahalanobis import COMMAND, FewShotTransformer, MahalanobisConfig
from fewshot_cli.errors import BadInput
from fewshot_cli.models.backbones import build_backbone
from fewshot_cli.models.heads import MahalanobisHead, build_head
from fewshot_cli.models.weights import from_resnet, load_into, resolve


def reference_mahalanobis_logits(support, labels, query, n_way, beta):
    """Simple CNAPS written plainly in float64 with a dense inverse."""
    s, q = support.double(), query.double()
    n, d = s.shape
    task_cov = torch.cov(s.T) if n > 1 else torch.zeros(d, d, dtype=torch.float64)
    logits = []
    for k in range(n_way):
        xk = s[labels == k]
        nk = xk.shape[0]
        lam = nk / (nk + 1)
        class_cov = torch.cov(xk.T) if nk > 1 else torch.zeros(d, d, dtype=torch.float64)
        cov = lam * class_cov + (1 - lam) * task_cov + beta * torch.eye(d, dtype=torch.float64)
        diff = q - xk.mean(0)
        logits.append(-torch.einsum("md,de,me->m", diff, torch.linalg.inv(cov), diff))
    return torch.stack(logits, 1)


def _episode(n_way: int, k_shot: int, d: int, m: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_way, d, generator=g) * 2
    labels = torch.arange(n_way).repeat_interleave(k_shot)
    support = centres[labels] + torch.randn(n_way * k_shot, d, generator=g) * torch.linspace(0.3, 1.5, d)
    query = centres[torch.arange(m) % n_way] + torch.randn(m, d, generator=g)
    return support, labels, query


@pytest.mark.parametrize("covariance", ["dense", "lowrank"])
@pytest.mark.parametrize(("n_way", "k_shot", "d"), [(5, 5, 8), (5, 5, 64), (3, 1, 16), (4, 3, 40), (1, 1, 6)])
def test_mahalanobis_head_matches_the_float64_reference(covariance, n_way, k_shot, d) -> None:
    support, labels, query = _episode(n_way, k_shot, d)
    head = MahalanobisHead(beta=0.7, covariance=covariance)
    head.process_support_set(support, labels, n_way)
    expected = reference_mahalanobis_logits(support, labels, query, n_way, 0.7)
    torch.testing.assert_close(head(query).double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_one_shot_class_term_vanishes_and_no_scalar_is_added_to_every_entry() -> None:
    support, labels, query = _episode(3, 1, 5)
    head = MahalanobisHead(beta=1.0, covariance="dense")
    head.process_support_set(support, labels, 3)
    task_cov = torch.cov(support.T.double())
    expected_cov = 0.5 * task_cov + torch.eye(5, dtype=torch.float64)
    chol = head.chol[0].double()
    torch.testing.assert_close(chol @ chol.T, expected_cov, rtol=1e-5, atol=1e-5)


def test_auto_covariance_is_lowrank_when_the_dimension_exceeds_the_support() -> None:
    support, labels, _ = _episode(5, 5, 64)
    head = MahalanobisHead(covariance="auto")
    head.process_support_set(support, labels, 5)
    assert head.mode == "lowrank"
    support, labels, _ = _episode(5, 5, 8)
    head.process_support_set(support, labels, 5)
    assert head.mode == "dense"


def test_a_covariance_that_is_not_positive_definite_falls_back_and_says_so() -> None:
    fired = []
    support, labels, query = _episode(2, 2, 10)
    head = MahalanobisHead(beta=0.0, covariance="dense", on_fallback=lambda **f: fired.append(f))
    head.process_support_set(support, labels, 2)
    assert fired and fired[0]["kind"] == "jitter"
    assert torch.isfinite(head(query)).all()


@pytest.mark.parametrize("name", ["cosine", "euclidean", "mahalanobis"])
def test_gradients_flow_through_every_head(name: str) -> None:
    support, labels, query = _episode(5, 3, 32)
    support, query = (support / 10).requires_grad_(True), (query / 10).requires_grad_(True)  # unsaturated softmax
    head = build_head(name, covariance="lowrank")
    head.process_support_set(support, labels, 5)
    loss = torch.nn.functional.cross_entropy(head(query), torch.arange(12) % 5)
    loss.backward()
    assert support.grad is not None and support.grad.abs().sum() > 0 and query.grad.abs().sum() > 0


def test_the_projection_appears_only_above_reduced_dim() -> None:
    def model(**kw):
        return FewShotTransformer(MahalanobisConfig(**kw), lambda **f: None)

    assert model(image_size=32, reduced_dim=512).reduction is None  # conv4 at 32 px: 256 features
    projected = model(image_size=32, reduced_dim=128)
    assert projected.reduction is not None and projected.embedding_dim == 128
    assert model(image_size=32, reduced_dim=0).reduction is None


def test_resnet34_flatten_at_224_gives_the_seeds_25088_features() -> None:
    backbone = build_backbone("resnet34", flatten=True).eval()
    with torch.no_grad():
        assert backbone(torch.zeros(1, 3, 224, 224)).shape[1] == 512 * 7 * 7


def test_weights_load_strictly_and_a_mismatch_says_what_differs(tmp_path: Path) -> None:
    source = build_backbone("conv4")
    torch.save(source.state_dict(), tmp_path / "good.pt")
    target = build_backbone("conv4")
    load_into(target, resolve(str(tmp_path / "good.pt"), "conv4"), "backbone")
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values(),
                                                  strict=True))
    torch.save(build_backbone("conv6").state_dict(), tmp_path / "bad.pt")
    with pytest.raises(BadInput, match="unexpected"):
        load_into(build_backbone("conv4"), resolve(str(tmp_path / "bad.pt"), "conv4"), "backbone")


def test_torchvision_named_weights_load_into_the_unpooled_resnet(tmp_path: Path) -> None:
    import torchvision

    reference = torchvision.models.resnet18(weights=None)
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    backbone = build_backbone("resnet18")
    weights = resolve(str(tmp_path / "resnet18.pth"), "resnet18")
    weights.state = from_resnet(weights.state)
    load_into(backbone, weights, "backbone")
    assert torch.equal(backbone[0].weight, reference.conv1.weight)


def test_the_plan_reproduces_the_seeds_covariance_cost() -> None:
    from fewshot_cli.models.heads import covariance_bytes

    assert covariance_bytes(5, 25088, 25, "dense") / 2 / 1024**3 == pytest.approx(11.72, abs=0.01)
    assert covariance_bytes(5, 512, 25, "dense") / 2 / 1024**2 == pytest.approx(5.0, abs=0.01)
    assert covariance_bytes(5, 25088, 25, "lowrank") < 30 * 1024**2


def _image_tree(root: Path, splits: dict[str, int], per_class: int = 8) -> None:
    rng = np.random.default_rng(0)
    for split, n_classes in splits.items():
        for c in range(n_classes):
            folder = root / split / f"{split}_class{c}"
            folder.mkdir(parents=True)
            colour = rng.integers(0, 255, 3)
            for i in range(per_class):
                pixels = np.clip(colour + rng.normal(0, 20, (20, 20, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


def test_an_on_disk_train_test_folder_trains_and_is_scored(tmp_path: Path) -> None:
    _image_tree(tmp_path / "data", {"train": 6, "test": 5})
    result = fewshot("mahalanobis-train", *SMALL, "--data", tmp_path / "data", "--n-query", "3", "--out",
                     tmp_path / "runs", "--name", "disk", "--json")
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)
    assert metrics["test_episodes"] == 10 and 0.0 <= metrics["accuracy"] <= 1.0


def test_splits_that_share_a_class_are_refused(tmp_path: Path) -> None:
    _image_tree(tmp_path / "data", {"train": 6, "test": 5})
    (tmp_path / "data" / "test" / "train_class0").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "data" / "test" / "train_class0" / "x.png")
    result = fewshot("mahalanobis-train", *SMALL, "--data", tmp_path / "data", "--out", tmp_path / "runs")
    assert result.returncode == 2 and "disjoint" in result.stderr


def test_the_plan_command_reports_each_phase_as_json() -> None:
    result = fewshot("plan", "mahalanobis-train", "--preset", "cpu", "--json")
    report = json.loads(result.stdout)
    assert set(report["phases"]) == {"train", "test"}
    assert report["fits"] is True and report["phases"]["train"]["peak_bytes"] > 0
    assert COMMAND.name == report["command"]
