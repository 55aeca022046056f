"""`mahalanobis-train`: episodic few-shot classification with set-to-set adaptation and a Mahalanobis head."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fewshot_cli.data.folders import ImageFolderSplits
from fewshot_cli.data.synthetic import SyntheticImages
from fewshot_cli.episodes import Episode, EpisodeSampler, steps_hash
from fewshot_cli.errors import BadInput
from fewshot_cli.models.adaptation import VARIANTS, SetToSetAttention
from fewshot_cli.models.backbones import BACKBONES, build_backbone, feature_dim, load_weights
from fewshot_cli.models.heads import COVARIANCES, HEADS, build_head, prototypes
from fewshot_cli.runner.config import EpisodicConfig, knob
from fewshot_cli.runner.metrics import RunningMean
from fewshot_cli.runner.task import BackoffKnob, Command, RunContext, Task

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@dataclass
class MahalanobisConfig(EpisodicConfig):
    image_size: int = knob(32, "input image side in pixels", minimum=8)
    backbone: str = knob("conv4", "feature extractor", choices=BACKBONES)
    flatten: bool = knob(False, "torchvision ResNets: keep the last feature map unpooled (512x7x7 at 224 px)")
    weights: str | None = knob(None, "a local state dict for the backbone")
    head: str = knob("mahalanobis", "classification head", choices=HEADS)
    covariance: str = knob("auto", "Mahalanobis covariance: dense d x d, exact low-rank, or auto", choices=COVARIANCES)
    beta: float = knob(1.0, "Mahalanobis ridge beta in Q_k = l_k S_k + (1 - l_k) S_task + beta I", minimum=1e-8)
    reduced_dim: int = knob(512, "project features above this size to it (0: never)", minimum=0)
    adapt: str = knob("prototypes", "set-to-set transformer over", choices=("none", "prototypes", "support"))
    variant: str = knob("cosine", "the transformer's attention metric", choices=VARIANTS)
    checkpoint_activations: bool = knob(False, "recompute backbone activations in backward to save memory")
    batch_size: int = knob(128, "images per forward when computing evaluation features", minimum=1)
    lr: float = knob(1e-3, "Adam learning rate", minimum=0.0)


PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {"image_size": 32, "backbone": "conv4", "episodes": 300, "n_query": 10, "val_every": 100,
            "val_episodes": 50, "test_episodes": 600, "checkpoint_every": 100, "batch_size": 256, "workers": 0},
    "t4": {"image_size": 84, "backbone": "resnet12", "episodes": 2000, "n_query": 15, "val_every": 200,
           "val_episodes": 100, "test_episodes": 600, "checkpoint_every": 200, "batch_size": 64, "workers": 4},
    "mps": {"image_size": 84, "backbone": "resnet12", "episodes": 2000, "n_query": 15, "val_every": 200,
            "val_episodes": 100, "test_episodes": 600, "checkpoint_every": 200, "batch_size": 32, "workers": 4},
    "a100": {"image_size": 84, "backbone": "resnet12", "episodes": 4000, "n_query": 15, "val_every": 250,
             "val_episodes": 200, "test_episodes": 600, "checkpoint_every": 250, "batch_size": 256, "workers": 8},
    "h100": {"image_size": 84, "backbone": "resnet12", "episodes": 4000, "n_query": 15, "val_every": 250,
             "val_episodes": 200, "test_episodes": 600, "checkpoint_every": 250, "batch_size": 512, "workers": 8},
}


class FewShotTransformer(nn.Module):
    """Backbone, the seed's learnable projection (only above `reduced_dim`), set-to-set adaptation, and a head."""

    def __init__(self, cfg: MahalanobisConfig, on_fallback) -> None:
        super().__init__()
        self.backbone = build_backbone(cfg.backbone, cfg.flatten)
        if cfg.weights:
            load_weights(self.backbone, cfg.weights)
        dim = feature_dim(self.backbone, cfg.image_size)
        self.feature_dim = dim
        self.reduction: nn.Module | None = None
        if cfg.reduced_dim and dim > cfg.reduced_dim:
            self.reduction = nn.Sequential(nn.Linear(dim, cfg.reduced_dim), nn.LayerNorm(cfg.reduced_dim), nn.ReLU())
            dim = cfg.reduced_dim
        self.embedding_dim = dim
        self.adapt = cfg.adapt
        self.adapter = SetToSetAttention(dim, cfg.variant) if cfg.adapt != "none" else None
        self.head = build_head(cfg.head, cfg.beta, cfg.covariance, on_fallback)
        self.checkpoint_activations = cfg.checkpoint_activations

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        images = (images - MEAN.to(images.device)) / STD.to(images.device)
        if self.checkpoint_activations and self.training:
            features = checkpoint(self.backbone, images, use_reentrant=False)
        else:
            features = self.backbone(images)
        return self.reduction(features) if self.reduction is not None else features

    def logits(self, support: torch.Tensor, labels: torch.Tensor, query: torch.Tensor, n_way: int) -> torch.Tensor:
        centres = prototypes(support, labels, n_way)
        if self.adapt == "prototypes":
            centres = self.adapter(centres)
        elif self.adapt == "support":
            adapted = self.adapter(torch.cat([centres, support]))
            centres, support = adapted[:n_way], adapted[n_way:]
        self.head.process_support_set(support, labels, n_way, centres)
        return self.head(query)


class MahalanobisTask(Task):
    backoff_knobs = (BackoffKnob("n_query", floor=1),)

    def __init__(self, cfg: MahalanobisConfig, ctx: RunContext) -> None:
        super().__init__(cfg, ctx)
        if cfg.flatten and cfg.backbone not in ("resnet18", "resnet34", "resnet50"):
            raise BadInput("--flatten applies to the torchvision ResNets (resnet18, resnet34, resnet50) only.")
        if ctx.data is None:
            self.data = SyntheticImages(cfg.image_size, seed=ctx.seed)
            splits = ("train", "val", "test")
        else:
            self.data = ImageFolderSplits(ctx.data, cfg.image_size)
            splits = tuple(s for s in ("train", "val", "test") if self.data.has_split(s))
        shape = {"n_way": cfg.n_way, "k_shot": cfg.k_shot, "n_query": cfg.n_query, "seed": ctx.seed}
        self.samplers = {s: EpisodeSampler(self.data.items_by_class(s), split=s, **shape) for s in splits}
        self.model = FewShotTransformer(cfg, lambda **f: ctx.emit("covariance_fallback", **f)).to(ctx.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)

    def total_steps(self) -> int:
        return self.cfg.steps()

    def validate_now(self, step: int) -> bool:
        return "val" in self.samplers and super().validate_now(step)

    def _images(self, items: list[int]) -> torch.Tensor:
        return torch.stack([self.data[i][0] for i in items]).to(self.ctx.device)

    def train_step(self, step: int) -> dict[str, float]:
        """The step's episodes (one by default); each one's queries in `accumulation` micro-steps after an OOM
        back-off; data-parallel, each rank takes its share of the episodes."""
        sampler, indices = self.samplers["train"], self.cfg.step_episodes(step)
        episodes = [sampler.episode(i + 1) for i in indices]
        weight = 1.0 / len(episodes)

        def micro_steps(j: int) -> list[tuple[Episode, list[int]]]:
            n_query = len(episodes[j].query_items()[0])
            chunks = np.array_split(np.arange(n_query), min(self.accumulation, n_query))
            return [(episodes[j], c.tolist()) for c in chunks]

        def compute(_: int, part: tuple[Episode, list[int]]) -> tuple[torch.Tensor, dict[str, float]]:
            episode, chunk = part
            (support_items, support_labels), (query_items, query_labels) = (episode.support_items(),
                                                                            episode.query_items())
            support = self.model.embed(self._images(support_items))
            query = self.model.embed(self._images([query_items[i] for i in chunk]))
            q_labels = torch.tensor([query_labels[i] for i in chunk], device=self.ctx.device)
            logits = self.model.logits(support, torch.tensor(support_labels, device=self.ctx.device), query,
                                       self.cfg.n_way)
            loss = F.cross_entropy(logits, q_labels) * len(chunk) / len(query_items) * weight
            return loss, {"loss": float(loss.detach()), "correct": int((logits.argmax(1) == q_labels).sum()),
                          "queries": len(chunk)}

        self.optimizer.zero_grad(set_to_none=True)
        sums = self.accumulate(step, len(episodes), micro_steps, compute)
        self.optimizer.step()
        return {"loss": sums["loss"], "accuracy": sums["correct"] / sums["queries"],
                "episode_hash": steps_hash(episodes)}

    def evaluate(self, phase: str, step: int) -> dict[str, float]:
        n = self.cfg.val_episodes if phase == "val" else self.cfg.test_episodes
        result = self._evaluate(phase, [self.samplers[phase].episode(i) for i in range(n)])
        if phase == "test":
            result["test_episodes"] = n
        return result

    def _evaluate(self, phase: str, episodes: list[Episode]) -> dict[str, float]:
        """Features of every image the episodes use, computed once (the backbone is fixed here), then each
        episode's head on them."""
        items = sorted({i for e in episodes for i in (*e.support_items()[0], *e.query_items()[0])})
        row = {item: r for r, item in enumerate(items)}
        features = torch.cat([self.model.embed(self._images(items[a:a + self.cfg.batch_size]))
                              for a in range(0, len(items), self.cfg.batch_size)])
        accuracy = RunningMean()
        for episode in episodes:
            (s_items, s_labels), (q_items, q_labels) = episode.support_items(), episode.query_items()
            support = features[torch.tensor([row[i] for i in s_items])]
            query = features[torch.tensor([row[i] for i in q_items])]
            s_labels_t = torch.tensor(s_labels, device=features.device)
            logits = self.model.logits(support, s_labels_t, query, self.cfg.n_way)
            accuracy.add(float((logits.argmax(1).cpu() == torch.tensor(q_labels)).float().mean()))
        return {"accuracy": accuracy.mean, "accuracy_ci95": accuracy.ci95}

    def plan_phases(self) -> dict[str, Any]:
        """A training step, and an evaluation over enough test episodes to fill one feature batch (its largest
        activations), as many as the test has."""
        sampler, cfg = self.samplers["test"], self.cfg
        episodes = min(cfg.test_episodes, math.ceil(cfg.batch_size / (cfg.n_way * (cfg.k_shot + cfg.n_query))))
        return {"train": lambda: self.train_step(1),
                "test": lambda: self._evaluate("test", [sampler.episode(i) for i in range(episodes)])}

    def plan_extra_bytes(self) -> dict[str, dict[str, int]]:
        """Evaluation keeps every image's features of its episodes at once; planning traces one episode only."""
        cfg = self.cfg
        split_items = sum(len(v) for v in self.samplers["test"].items.values())
        images = min(split_items, cfg.test_episodes * cfg.n_way * (cfg.k_shot + cfg.n_query))
        return {"test": {"evaluation_features": images * self.model.embedding_dim * 4}}


COMMAND = Command(
    name="mahalanobis-train",
    help="Episodic few-shot classification: set-to-set adaptation and a Mahalanobis / cosine / euclidean head.",
    config=MahalanobisConfig, presets=PRESETS, task=MahalanobisTask, primary_metric="accuracy",
    plan_knobs=("n_query", "image_size"),
    demo={"episodes": 200, "test_episodes": 300, "val_every": 100, "val_episodes": 20},
)
