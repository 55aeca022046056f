"""`mahalanobis-train`: episodic few-shot classification with set-to-set adaptation and a Mahalanobis head."""

from __future__ import annotations

import math
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fewshot_cli.commands.mahalanobis_config import COMMAND as COMMAND
from fewshot_cli.commands.mahalanobis_config import PRESETS as PRESETS
from fewshot_cli.commands.mahalanobis_config import MahalanobisConfig
from fewshot_cli.data.gpu_decode import Decoder, gather
from fewshot_cli.data.images import IMAGENET_MEAN, IMAGENET_STD, to_float
from fewshot_cli.data.loader import (
    Feed,
    ItemReader,
    Loaders,
    cache_share,
    episode_reads,
    image_bytes,
    loader_bytes,
    loader_notes,
    stack_images,
)
from fewshot_cli.data.splits import FewShotSplits, open_splits
from fewshot_cli.data.synthetic import SyntheticImages
from fewshot_cli.episodes import Episode, EpisodeSampler, steps_hash
from fewshot_cli.errors import BadInput
from fewshot_cli.models.adaptation import SetToSetAttention
from fewshot_cli.models.backbones import build_backbone, feature_dim, memory_format
from fewshot_cli.models.heads import build_head, prototypes
from fewshot_cli.models.weights import from_few_shot_repos, load_pretrained, param_groups
from fewshot_cli.reports.files import load_libraries
from fewshot_cli.runner.backoff import evaluation_part
from fewshot_cli.runner.metrics import RunningMean
from fewshot_cli.runner.precision import autocast, autocast_dtype, grad_scaler
from fewshot_cli.runner.task import BackoffKnob, RunContext, Task

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


class FewShotTransformer(nn.Module):
    """Backbone, the original study's projection (only above `reduced_dim`), set-to-set adaptation, and a head."""

    def __init__(self, cfg: MahalanobisConfig, on_fallback) -> None:
        super().__init__()
        self.backbone = build_backbone(cfg.backbone, cfg.flatten)
        # the input normalisation the backbone's weights were trained with (ImageNet's unless they say otherwise)
        self.register_buffer("mean", MEAN.clone(), persistent=False)
        self.register_buffer("std", STD.clone(), persistent=False)
        dim = feature_dim(self.backbone, cfg.image_size)
        self.feature_dim = dim
        self.reduction: nn.Module | None = None
        if cfg.reduced_dim and dim > cfg.reduced_dim:
            self.reduction = nn.Sequential(nn.Linear(dim, cfg.reduced_dim), nn.LayerNorm(cfg.reduced_dim), nn.ReLU())
            dim = cfg.reduced_dim
        self.embedding_dim = dim
        self.adapt = cfg.adapt
        self.adapter = SetToSetAttention(dim, cfg.variant) if cfg.adapt != "none" else None
        self.head = build_head(cfg.head, cfg.beta, cfg.covariance, on_fallback, cfg.covariance_estimator,
                               cfg.ridge, squared=cfg.distance == "squared")
        self.checkpoint_activations = cfg.checkpoint_activations
        self.layout = torch.contiguous_format  # the backbone's and its input's (`use_layout`)
        self.amp_dtype: torch.dtype | None = None  # the backbone's autocast dtype under --amp

    def use_layout(self, layout: torch.memory_format) -> None:
        """Run the backbone in `layout` (`backbones.memory_format` of the run's device)."""
        self.layout = layout
        self.backbone.to(memory_format=layout)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images B x 3 x S x S to embeddings B x embedding_dim (float32)."""
        images = ((images - self.mean) / self.std).contiguous(memory_format=self.layout)
        with autocast(images.device.type, self.amp_dtype):
            if self.checkpoint_activations and self.training:
                features = checkpoint(self.backbone, images, use_reentrant=False)
            else:
                features = self.backbone(images)
        features = features.float()  # the projection, adaptation and head (covariances, inverses) in float32
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
        cfg.check_ranks(ctx.distributed)
        if cfg.flatten and cfg.backbone not in ("resnet18", "resnet34", "resnet50"):
            raise BadInput("--flatten applies to the torchvision ResNets (resnet18, resnet34, resnet50) only.")
        load_libraries()  # for `finish`'s reports, while the address space is not yet filled by the run
        self.data = self._open_data(cfg, ctx)
        splits = tuple(s for s in ("train", "val", "test") if self.data.has_split(s))
        shape = {"n_way": cfg.n_way, "k_shot": cfg.k_shot, "n_query": cfg.n_query, "seed": ctx.seed}
        self.samplers = {s: EpisodeSampler(self.data.items_by_class(s), split=s, **shape) for s in splits}
        self.model = FewShotTransformer(cfg, lambda **f: ctx.emit("covariance_fallback", **f))
        weights = load_pretrained(self.model.backbone, cfg.weights, cfg.backbone, "backbone", ctx.emit,
                                  cfg.weights_strict, adapt=from_few_shot_repos)
        if weights is not None:
            self.loaded_weights = (weights.record,)
            if weights.mean is not None:  # the weights' own transforms() normalisation
                self.model.mean.copy_(torch.tensor(weights.mean).view(1, 3, 1, 1))
                self.model.std.copy_(torch.tensor(weights.std).view(1, 3, 1, 1))
        self.model.to(ctx.device)
        self.model.use_layout(memory_format(ctx.device))
        self.model.amp_dtype = autocast_dtype(ctx.device, cfg.amp)
        self.optimizer = torch.optim.Adam(param_groups(self.model, self.model.backbone, cfg.lr, cfg.lr_backbone,
                                                       cfg.freeze_backbone))
        self.scaler = grad_scaler(ctx.device, self.model.amp_dtype)
        self.pairs: Counter = Counter()  # (true class, predicted) -> test queries
        self.test_features: tuple[np.ndarray, list[str]] | None = None
        self.loaders = self._loaders(cfg, ctx.device)
        self.feed = Feed(self.loaders, self._schedule)

    @staticmethod
    def _open_data(cfg: MahalanobisConfig, ctx: RunContext) -> SyntheticImages | FewShotSplits:
        """The built-in data, or --data in whichever layout it holds (its test split --test-data's, if given);
        what was read goes to the log."""
        if ctx.data is None:  # the planner's trace, too: shapes come from the config, not the data
            return SyntheticImages(cfg.image_size, seed=ctx.seed)
        test_root = Path(cfg.test_data) if cfg.test_data is not None else None
        if test_root is not None and not test_root.exists():
            raise BadInput(f"--test-data {test_root} does not exist.")
        data = open_splits(Path(ctx.data), cfg.image_size, cfg.image_root, test_root)
        for note in data.notes:
            ctx.emit("data_warning", message=note)
            print(f"warning: {note}", file=sys.stderr)
        ctx.emit("dataset", data_format=data.data_format, test_data_format=data.test_format, splits=data.describe())
        return data

    def _loaders(self, cfg: MahalanobisConfig, device: torch.device) -> Loaders:
        """The loaders of the data's images: decoded in the workers (image files' pixels travel and are cached as
        uint8, made float on the device), or with --decode-device cuda and image files, JPEGs read as bytes there
        and decoded on the GPU (the cache then holds their bytes)."""
        workers, faults = self.workers, self.ctx.faults
        cache_bytes = self.cache_limit(cache_share(cfg.image_cache_mb, workers))
        if cfg.decode_device == "cuda" and isinstance(self.data, FewShotSplits):
            return Loaders(ItemReader(self.data, "encoded", cache_bytes, faults), gather, workers, device,
                           finish=Decoder(cfg.image_size, device))
        return Loaders(ItemReader(self.data, cache_bytes=cache_bytes, faults=faults), stack_images, workers, device,
                       finish=to_float)

    def total_steps(self) -> int:
        return self.cfg.steps()

    def validate_now(self, step: int) -> bool:
        return "val" in self.samplers and super().validate_now(step)

    def _train_episodes(self, step: int) -> list[Episode]:
        return [self.samplers["train"].episode(i) for i in self.cfg.step_episodes(step)]

    def _schedule(self, first: tuple[int, int]) -> Iterator[tuple[tuple[int, int], list[int]]]:
        """This rank's training episodes' images (support, then queries) from step `first`'s part on, in the
        order the steps take them."""
        for step in range(first[0], self.total_steps() + 1):
            episodes = self._train_episodes(step)
            for j in self.my_share(list(range(len(episodes)))):
                if (step, j) >= first:
                    yield (step, j), episodes[j].support_items()[0] + episodes[j].query_items()[0]

    def train_step(self, step: int) -> dict[str, float]:
        """The step's episodes (one by default); each one's queries in `accumulation` micro-steps after an OOM
        back-off; data-parallel, each rank takes its share of the episodes."""
        episodes = self._train_episodes(step)
        weight, device, n_way = 1.0 / len(episodes), self.ctx.device, self.cfg.n_way
        self.optimizer.zero_grad(set_to_none=True)
        with self.accumulate(step, parts=len(episodes)) as grads:
            for j in grads.parts():
                (support_items, support_labels), (query_items, query_labels) = (episodes[j].support_items(),
                                                                                episodes[j].query_items())
                images = self.feed.get((step, j))  # support, then queries
                n_support, n_query = len(support_items), len(query_items)
                chunks = [c.tolist() for c in np.array_split(np.arange(n_query), min(self.accumulation, n_query))]
                for chunk in grads.micro_steps(chunks):
                    support = self.ddp_or_model(images[:n_support])
                    query = self.ddp_or_model(images[n_support + chunk[0]:n_support + chunk[-1] + 1])
                    labels = torch.tensor([query_labels[i] for i in chunk], device=device)
                    logits = self.model.logits(support, torch.tensor(support_labels, device=device), query, n_way)
                    loss = F.cross_entropy(logits, labels) * len(chunk) / n_query * weight
                    grads.backward(self.scaler.scale(loss), loss=float(loss.detach()),
                                   correct=int((logits.argmax(1) == labels).sum()), queries=len(chunk))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        sums = grads.sums
        return {"loss": sums["loss"], "accuracy": sums["correct"] / sums["queries"],
                "episode_hash": steps_hash(episodes), "data_wait_s": self.loaders.take_wait()}

    def evaluate(self, phase: str, step: int) -> dict[str, float]:
        n = self.cfg.val_episodes if phase == "val" else self.cfg.test_episodes
        if phase == "test":
            self.feed.close()
            self.loaders.release("val")
        result = self._evaluate(phase, [self.samplers[phase].episode(i) for i in range(n)], step,
                                record=phase == "test")
        if phase == "test":
            self.loaders.release(phase)
            result["test_episodes"] = n
        return result

    def _class_name(self, cls: int) -> str:
        names = getattr(self.data, "class_names", None)
        return names[cls] if names is not None else self.data.class_name(cls)

    def _evaluate(self, phase: str, episodes: list[Episode], step: int = 0, record: bool = False
                  ) -> dict[str, float]:
        """Features of every image the episodes use, computed once (the backbone is fixed here) in batches of
        `batch_size` (halved on OOM, from the batch that failed), then each episode's head on them. `record`: keep
        the (true, predicted) class counts of the queries, and with --plots the features, for `finish`."""
        items = sorted({i for e in episodes for i in (*e.support_items()[0], *e.query_items()[0])})
        row = {item: r for r, item in enumerate(items)}
        parts: list[torch.Tensor] = []

        def embed_the_rest() -> None:
            rest = items[sum(len(p) for p in parts):]  # after a back-off, from the first image not yet embedded
            chunks = [rest[a:a + self.cfg.batch_size] for a in range(0, len(rest), self.cfg.batch_size)]
            # the loader's batches, each embedded in slices of batch_size (halved on OOM)
            for images in self.loaders.fixed(phase, chunks):
                done = 0
                while done < len(images):
                    parts.append(evaluation_part(self, phase, step, "batch_size", lambda a=done, x=images:
                                                 self.model(x[a:a + self.cfg.batch_size])))
                    done += len(parts[-1])

        # a batch the loader cannot allocate backs off too: the rest is loaded again in smaller batches
        evaluation_part(self, phase, step, "batch_size", embed_the_rest)
        features = torch.cat(parts)
        accuracy = RunningMean()
        for episode in episodes:
            (s_items, s_labels), (q_items, q_labels) = episode.support_items(), episode.query_items()
            support = features[torch.tensor([row[i] for i in s_items])]
            query = features[torch.tensor([row[i] for i in q_items])]
            s_labels_t = torch.tensor(s_labels, device=features.device)
            logits = self.model.logits(support, s_labels_t, query, self.cfg.n_way)
            predicted = logits.argmax(1).cpu()
            accuracy.add(float((predicted == torch.tensor(q_labels)).float().mean()))
            if record:
                names = [self._class_name(c) for c in episode.classes]
                self.pairs.update((names[t], names[p]) for t, p in zip(q_labels, predicted.tolist(), strict=True))
        if record and self.cfg.plots:
            class_of = {i: c for c, members in self.samplers[phase].items.items() for i in members.tolist()}
            self.test_features = (features.float().cpu().numpy(), [self._class_name(class_of[i]) for i in items])
        return {"accuracy": accuracy.mean, "accuracy_ci95": accuracy.ci95}

    def finish(self, metrics: dict[str, float]) -> dict[str, float]:
        """confusion.csv/.png and per_class.csv over the test queries; embedding.png with --plots."""
        # matplotlib loads only when a run writes its reports, not when the command is listed
        from fewshot_cli.reports.confusion import write_confusion
        from fewshot_cli.reports.embedding import write_embedding_plot

        if self.ctx.run_dir is None:
            return metrics
        run_dir = Path(self.ctx.run_dir)
        write_confusion(run_dir, self.pairs, sorted({name for pair in self.pairs for name in pair}))
        if self.test_features is not None:
            features, names = self.test_features
            write_embedding_plot(run_dir / "embedding.png", features, names, None, self.cfg.embedding_plot,
                                 self.ctx.seed, f"mahalanobis-train test images, {self.cfg.backbone} features")
        return metrics

    def plan_phases(self) -> dict[str, Any]:
        """A training step, and each evaluation over enough of its episodes to fill one feature batch (its largest
        activations), as many as it has: validation's own where it runs, since its few episodes may fill less."""
        cfg = self.cfg
        per_batch = math.ceil(cfg.batch_size / (cfg.n_way * (cfg.k_shot + cfg.n_query)))

        def evaluation(phase: str, count: int) -> Callable[[], Any]:
            episodes = min(count, per_batch)
            return lambda: self._evaluate(phase, [self.samplers[phase].episode(i) for i in range(episodes)])

        phases = {"train": lambda: self.train_step(1)}
        if cfg.val_every and "val" in self.samplers:
            phases["val"] = evaluation("val", cfg.val_episodes)
        return {**phases, "test": evaluation("test", cfg.test_episodes)}

    def plan_extra_bytes(self) -> dict[str, dict[str, int]]:
        """Evaluation keeps every image's features of its episodes at once; planning traces one episode only. The
        loader's image cache and prefetched batches are host memory; training validates with a loader of its own."""
        cfg = self.cfg
        items = sum(len(v) for sampler in self.samplers.values() for v in sampler.items.values())
        image = image_bytes(self.data, cfg.image_size)
        episode = cfg.n_way * (cfg.k_shot + cfg.n_query) * image
        reads = episode_reads(cfg)
        train = loader_bytes(cfg.image_cache_mb, items, image, cfg.workers, episode, 2 if cfg.val_every else 1,
                             reads["train"])
        test = loader_bytes(cfg.image_cache_mb, items, image, cfg.workers, cfg.batch_size * image,
                            reads=reads["test"])
        features = {phase: min(sum(len(v) for v in self.samplers[phase].items.values()),
                                episodes * cfg.n_way * (cfg.k_shot + cfg.n_query)) * self.model.embedding_dim * 4
                    for phase, episodes in (("val", cfg.val_episodes), ("test", cfg.test_episodes))
                    if phase in self.samplers}
        # validation runs beside training's loaders, which its own counts already
        return {"train": train, "val": {"evaluation_features": features.get("val", 0), **train},
                "test": {"evaluation_features": features["test"], **test}}

    def plan_notes(self) -> dict[str, dict[str, str]]:
        """What the image cache and prefetch lines hold: training validates with a loader of its own."""
        cfg = self.cfg
        items = sum(len(v) for sampler in self.samplers.values() for v in sampler.items.values())
        image, reads = image_bytes(self.data, cfg.image_size), episode_reads(cfg)
        train = loader_notes(cfg.image_cache_mb, items, image, cfg.workers, 2 if cfg.val_every else 1, reads["train"])
        return {"train": train, "val": train,
                "test": loader_notes(cfg.image_cache_mb, items, image, cfg.workers, reads=reads["test"])}
