"""mahalanobis-train: heads against a plain float64 reference, gradients, projection, weights, on-disk folders."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SMALL, fewshot
from PIL import Image

from fewshot_cli.commands.mahalanobis import COMMAND, FewShotTransformer, MahalanobisConfig, MahalanobisTask
from fewshot_cli.errors import BadInput
from fewshot_cli.models.backbones import build_backbone
from fewshot_cli.models.heads import MahalanobisHead, build_head
from fewshot_cli.models.shrinkage import shrinkage
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
    head = MahalanobisHead(beta=0.7, covariance=covariance, estimator="simple-cnaps")
    head.process_support_set(support, labels, n_way)
    expected = reference_mahalanobis_logits(support, labels, query, n_way, 0.7)
    torch.testing.assert_close(head(query).double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def sklearn_shrunk_logits(support, labels, query, n_way, estimator, ridge, temperature=10.0):
    """LDA with shrinkage written plainly in float64: scikit-learn's estimator on the within-class rows, the ridge
    times the features' mean variance v, a dense inverse; logits -T a d_k / (v d), a the isotropic part of Q."""
    from sklearn.covariance import OAS, LedoitWolf

    s, q = support.double().numpy(), query.double().numpy()
    lab = labels.numpy()
    n, d = s.shape
    means = np.stack([s[lab == k].mean(0) for k in range(n_way)])
    within = s - means[lab]
    fitted = {"ledoit-wolf": LedoitWolf, "oas": OAS}[estimator](assume_centered=True).fit(within)
    variance = ((s - s.mean(0)) ** 2).mean() if n > 1 else (s**2).mean()
    isotropic = fitted.shrinkage_ * np.trace(within.T @ within / n) / d + ridge * variance
    precision = np.linalg.inv(fitted.covariance_ + ridge * variance * np.eye(d))
    diff = q[:, None] - means[None]  # (m, N, d)
    distance = np.einsum("mkd,de,mke->mk", diff, precision, diff)
    return torch.from_numpy(-temperature * isotropic / (variance * d) * distance)


@pytest.mark.parametrize("estimator", ["ledoit-wolf", "oas"])
@pytest.mark.parametrize(("n_way", "k_shot", "d"), [(5, 5, 8), (5, 5, 64), (3, 1, 16), (4, 3, 40), (5, 1, 6)])
def test_shrinkage_heads_match_sklearn_in_float64_on_both_paths(estimator, n_way, k_shot, d) -> None:
    support, labels, query = _episode(n_way, k_shot, d)
    expected = sklearn_shrunk_logits(support, labels, query, n_way, estimator, ridge=0.3)
    got = {}
    for covariance in ("dense", "lowrank"):
        head = MahalanobisHead(covariance=covariance, estimator=estimator, ridge=0.3)
        head.process_support_set(support, labels, n_way)
        got[covariance] = head(query).double()
        torch.testing.assert_close(got[covariance], expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    torch.testing.assert_close(got["dense"], got["lowrank"], rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("estimator", ["simple-cnaps", "ledoit-wolf"])
def test_unequal_shots_match_the_reference_on_both_paths(estimator) -> None:
    support, labels, query = _episode(3, 4, 12)
    keep = torch.tensor([0, 1, 2, 3, 4, 5, 8, 9, 10])  # 4, 2 and 3 shots: simple-cnaps pads its class rows
    support, labels = support[keep], labels[keep]
    if estimator == "simple-cnaps":
        expected = reference_mahalanobis_logits(support, labels, query, 3, 0.5)
    else:
        expected = sklearn_shrunk_logits(support, labels, query, 3, estimator, ridge=0.5)
    for covariance in ("dense", "lowrank"):
        head = MahalanobisHead(beta=0.5, covariance=covariance, estimator=estimator, ridge=0.5)
        head.process_support_set(support, labels, 3)
        torch.testing.assert_close(head(query).double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("method", ["ledoit-wolf", "oas"])
@pytest.mark.parametrize(("n", "d"), [(20, 64), (30, 5), (2, 9)])
def test_shrinkage_intensity_is_sklearns_and_has_gradients(method, n, d) -> None:
    from sklearn.covariance import OAS, LedoitWolf

    rows = torch.randn(n, d, dtype=torch.float64) * torch.linspace(0.2, 3.0, d, dtype=torch.float64)
    fitted = {"ledoit-wolf": LedoitWolf, "oas": OAS}[method](assume_centered=True).fit(rows.numpy())
    s, mu = shrinkage(rows, method)
    assert float(s) == pytest.approx(fitted.shrinkage_, rel=1e-9)
    shrunk = (1 - s) * rows.T @ rows / n + s * mu * torch.eye(d, dtype=torch.float64)
    np.testing.assert_allclose(shrunk.numpy(), fitted.covariance_, rtol=1e-9, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: shrinkage(x, method)[0], rows[:, :4].clone().requires_grad_(True))


def test_one_shot_shrinkage_head_is_euclidean_up_to_a_positive_scale() -> None:
    support, labels, query = _episode(5, 1, 20)
    head = MahalanobisHead(estimator="ledoit-wolf", covariance="lowrank")
    head.process_support_set(support, labels, 5)
    euclidean = build_head("euclidean")
    euclidean.process_support_set(support, labels, 5)
    ratio = head(query) / euclidean(query)
    torch.testing.assert_close(ratio, ratio[0, 0].expand_as(ratio))
    assert ratio[0, 0] > 0


def test_euclidean_head_scores_minus_the_squared_distance_by_default_and_the_distance_on_request() -> None:
    support, labels, query = _episode(5, 3, 20)
    centres = torch.stack([support[labels == k].mean(0) for k in range(5)])
    distance = torch.cdist(query, centres)
    for distance_knob, expected in (("plain", -distance), ("squared", -distance.pow(2))):
        model = FewShotTransformer(MahalanobisConfig(head="euclidean", distance=distance_knob, adapt="none",
                                                     image_size=16),
                                   lambda **f: None)
        torch.testing.assert_close(model.logits(support, labels, query, 5), expected)
    assert MahalanobisConfig().distance == "squared"


@pytest.mark.parametrize("estimator", ["ledoit-wolf", "oas"])
def test_one_shot_shrinkage_model_predicts_what_euclidean_predicts_with_the_same_weights(estimator) -> None:
    torch.manual_seed(0)
    # one-shot shrinkage is the squared distance in units of the features' variance
    euclidean = FewShotTransformer(MahalanobisConfig(head="euclidean", image_size=16), lambda **f: None).eval()
    shrunk = FewShotTransformer(MahalanobisConfig(head="mahalanobis", covariance_estimator=estimator, image_size=16),
                                lambda **f: None).eval()
    shrunk.load_state_dict(euclidean.state_dict(), strict=False)  # all but the head's temperature
    images = torch.rand(25, 3, 16, 16)
    labels = torch.arange(5)
    with torch.no_grad():
        support, query = euclidean(images[:5]), euclidean(images[5:])
        expected = euclidean.logits(support, labels, query, 5)
        got = shrunk.logits(support, labels, query, 5)
    assert torch.equal(got.argmax(1), expected.argmax(1))
    ratio = got / expected
    torch.testing.assert_close(ratio, ratio[0, 0].expand_as(ratio))


def test_zero_support_scatter_keeps_gradients_finite() -> None:
    support, labels, query = _episode(5, 1, 16)
    support.requires_grad_(True)
    for estimator in ("ledoit-wolf", "oas"):
        head = MahalanobisHead(estimator=estimator, covariance="lowrank")
        head.process_support_set(support, labels, 5)
        torch.nn.functional.cross_entropy(head(query), torch.arange(12) % 5).backward()
        assert torch.isfinite(support.grad).all() and support.grad.abs().sum() > 0


def test_one_shot_class_term_vanishes_and_no_scalar_is_added_to_every_entry() -> None:
    support, labels, query = _episode(3, 1, 5)
    head = MahalanobisHead(beta=1.0, covariance="dense", estimator="simple-cnaps")
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
    head = MahalanobisHead(beta=0.0, covariance="dense", on_fallback=lambda **f: fired.append(f),
                           estimator="simple-cnaps")
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
    assert metrics["test_episodes"] == 10
    # each test class is one colour: even a few steps tell them apart far better than chance
    n_way = json.loads((tmp_path / "runs" / "disk" / "config.json").read_text())["knobs"]["n_way"]["value"]
    assert metrics["accuracy"] >= 1 / n_way + 0.5, metrics


def test_image_files_travel_as_uint8_and_reach_the_step_as_the_readers_floats(tmp_path: Path) -> None:
    from fewshot_cli.data.images import read_image
    from fewshot_cli.runner.task import RunContext

    _image_tree(tmp_path / "data", {"train": 6, "test": 5})
    cfg = MahalanobisConfig(image_size=16, n_way=2, k_shot=1, n_query=2, episodes=2, val_every=0, workers=1)
    task = MahalanobisTask(cfg, RunContext(torch.device("cpu"), 0, None, data=tmp_path / "data"))
    episode = task.samplers["train"].episode(1)
    items = [*episode.support_items()[0], *episode.query_items()[0]]
    assert task.data[items[0]][0].dtype == torch.uint8  # what the workers cache and send: a quarter of float32
    batch = task.feed.get((1, 0))
    expected = torch.stack([read_image(task.data.paths[i], 16) for i in items])
    assert batch.dtype == torch.float32 and torch.equal(batch, expected)
    extra = task.plan_extra_bytes()["train"]
    assert extra["loader_prefetch"] == 1 * 4 * len(items) * 3 * 16 * 16  # workers x prefetch x one uint8 episode
    task.feed.close()


def test_on_the_cpu_the_backbone_runs_channels_last_and_its_loss_differs_only_in_the_last_digits() -> None:
    from fewshot_cli.runner.task import RunContext

    losses = {}
    for layout in (torch.channels_last, torch.contiguous_format):
        torch.manual_seed(0)
        cfg = MahalanobisConfig(image_size=16, n_way=2, k_shot=1, n_query=2, episodes=2, val_every=0)
        task = MahalanobisTask(cfg, RunContext(torch.device("cpu"), 0, None))
        conv = next(m for m in task.model.backbone.modules() if isinstance(m, torch.nn.Conv2d))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)  # the CPU's layout, chosen by the task
        task.model.use_layout(layout)
        task.prefetch(1)
        losses[layout] = task.train_step(1)["loss"]
        task.feed.close()
    assert losses[torch.channels_last] == pytest.approx(losses[torch.contiguous_format], rel=1e-5)


def test_amp_runs_the_backbone_in_bf16_on_the_cpu_and_hands_the_head_float32_features() -> None:
    from fewshot_cli.runner.task import RunContext

    features, dtypes = {}, {}
    for amp in (True, False):
        torch.manual_seed(0)
        cfg = MahalanobisConfig(image_size=16, n_way=2, k_shot=1, n_query=2, episodes=2, val_every=0, amp=amp)
        task = MahalanobisTask(cfg, RunContext(torch.device("cpu"), 0, None))
        seen: list[tuple[str, torch.dtype]] = []
        for conv in (m for m in task.model.backbone.modules() if isinstance(m, torch.nn.Conv2d)):
            conv.register_forward_hook(lambda m, args, out, s=seen: s.append(("conv", out.dtype)))
        task.model.head.register_forward_pre_hook(lambda m, args, s=seen: s.append(("head", args[0].dtype)))
        task.model.head.register_forward_pre_hook(lambda m, args, a=amp: features.setdefault(a, args[0].detach()))
        task.prefetch(1)
        assert math.isfinite(task.train_step(1)["loss"])
        task.feed.close()
        dtypes[amp] = set(seen)
        assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32
                   for p in task.model.backbone.parameters())  # the weights and their updates stay float32
    assert dtypes[True] == {("conv", torch.bfloat16), ("head", torch.float32)}
    assert dtypes[False] == {("conv", torch.float32), ("head", torch.float32)}
    # the same weights and images: bf16's 8-bit mantissa moves the queries' features by a few parts in a thousand
    assert torch.linalg.norm(features[True] - features[False]) < 0.02 * torch.linalg.norm(features[False])


def test_fp16_loss_scaling_is_checkpointed_and_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where --amp means fp16 (a T4, MPS) the loss is scaled; the scale is part of the checkpoint, so a resumed run
    scales as the uninterrupted one would."""
    from fewshot_cli.commands import mahalanobis
    from fewshot_cli.runner.task import RunContext

    monkeypatch.setattr(mahalanobis, "autocast_dtype", lambda device, amp: torch.float16 if amp else None)
    cfg = MahalanobisConfig(image_size=16, n_way=2, k_shot=1, n_query=2, episodes=2, val_every=0, amp=True)
    task = MahalanobisTask(cfg, RunContext(torch.device("cpu"), 0, None))
    assert task.scaler.is_enabled()
    task.prefetch(1)
    task.train_step(1)
    task.feed.close()
    state = task.state_dict()
    assert state["scaler"]["scale"] == task.scaler.get_scale()
    resumed = MahalanobisTask(cfg, RunContext(torch.device("cpu"), 0, None))
    assert resumed.scaler.state_dict() != state["scaler"]  # one step moved the scale or its growth count
    resumed.load_state_dict(state)
    assert resumed.scaler.get_scale() == task.scaler.get_scale() and resumed.scaler.state_dict() == state["scaler"]


def test_splits_that_share_a_class_are_refused(tmp_path: Path) -> None:
    _image_tree(tmp_path / "data", {"train": 6, "test": 5})
    (tmp_path / "data" / "test" / "train_class0").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "data" / "test" / "train_class0" / "x.png")
    result = fewshot("mahalanobis-train", *SMALL, "--data", tmp_path / "data", "--out", tmp_path / "runs")
    assert result.returncode == 2 and "disjoint" in result.stderr


def test_the_plan_command_reports_each_phase_as_json() -> None:
    result = fewshot("plan", "mahalanobis-train", "--preset", "cpu", "--json")
    report = json.loads(result.stdout)
    assert set(report["phases"]) == {"train", "val", "test"}  # the cpu preset validates
    assert report["fits"] is True and report["phases"]["train"]["peak_bytes"] > 0
    assert COMMAND.name == report["command"]


def test_validation_is_planned_as_its_own_phase_when_its_episodes_fill_less_than_a_feature_batch() -> None:
    def plan(*options: str) -> dict:
        return json.loads(fewshot("plan", "mahalanobis-train", "--preset", "cpu", "--json", *options).stdout)

    assert set(plan("--val-every", "0")["phases"]) == {"train", "test"}
    phases = plan("--val-every", "5", "--val-episodes", "1", "--test-episodes", "50")["phases"]
    # one validation episode's activations are below the test's full feature batch
    assert phases["val"]["components"]["activations"] < phases["test"]["components"]["activations"]
