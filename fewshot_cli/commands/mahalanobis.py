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


class _Classifying(nn.Module):
    """The model's features under pre-training's classifier: its modules are the ones pre-training trains (the
    backbone, the projection where there is one, the classifier), so that DistributedDataParallel, wrapping it,
    finds a gradient for each."""

    def __init__(self, model: FewShotTransformer, classifier: nn.Linear) -> None:
        super().__init__()
        self.backbone, self.reduction, self.classifier = model.backbone, model.reduction, classifier
        object.__setattr__(self, "features", model)  # called, not registered: its adaptation and head stay out

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images))


class Pretraining:
    """The pre-training phase of --pretrain-epochs: the first `steps` runner steps train the backbone (and the
    projection, where there is one) with a linear classifier over the training split's classes, on batches of
    `batch` images; the episodes then start from that backbone, the classifier dropped. Step s's batch is a pure
    function of (seed, s): epoch (s - 1) // per_epoch's permutation of the training images, cut in batches."""

    def __init__(self, model: FewShotTransformer, labels_by_class: dict[int, Any], cfg: MahalanobisConfig, seed: int,
                 device: torch.device) -> None:
        classes = sorted(labels_by_class)
        self.items = [int(i) for c in classes for i in labels_by_class[c]]
        self.labels = np.array([k for k, c in enumerate(classes) for _ in labels_by_class[c]], dtype=np.int64)
        self.seed, self.batch = seed, cfg.pretrain_batch_size  # the batch as configured: back-off splits it
        self.per_epoch = -(-len(self.items) // self.batch)
        self.steps = cfg.pretrain_epochs * self.per_epoch
        self.classifier = nn.Linear(model.embedding_dim, len(classes)).to(device)
        self.optimizer = torch.optim.Adam([*(p for n, p in model.named_parameters() if not n.startswith(
            ("adapter.", "head."))), *self.classifier.parameters()],
            lr=cfg.lr if cfg.pretrain_lr is None else cfg.pretrain_lr)
        #: micro-batches per part: doubled by each back-off of --pretrain-batch-size
        self.accumulation = 1
        #: a batch's parts, as many as a step's episodes: BatchNorm normalises each on its own, in any number of ranks
        self.parts = cfg.episodes_per_step
        #: what DistributedDataParallel wraps in this phase: the parameters it trains, the adaptation left out
        self.module = _Classifying(model, self.classifier)

    def batch_rows(self, step: int) -> np.ndarray:
        """Step `step`'s rows of `items` and `labels` (the last batch of an epoch may be short)."""
        epoch, index = divmod(step - 1, self.per_epoch)
        order = np.random.default_rng(np.random.SeedSequence([self.seed, 31, epoch])).permutation(len(self.items))
        return order[index * self.batch:(index + 1) * self.batch]

    def shares(self, step: int) -> list[np.ndarray]:
        """Step `step`'s batch in `parts` shares, the step's parts (torchrun's ranks take them as they take
        episodes; a share may be empty at an epoch's short end)."""
        return np.array_split(self.batch_rows(step), self.parts)

    def state_dict(self) -> dict[str, Any]:
        return {"classifier": self.classifier.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.classifier.load_state_dict(state["classifier"])
        self.optimizer.load_state_dict(state["optimizer"])


class MahalanobisTask(Task):
    #: n_query backs off the episodes; pretrain_batch_size the pre-training's batches (`backoff_knobs_at`)
    backoff_knobs = (BackoffKnob("n_query", floor=1), BackoffKnob("pretrain_batch_size", floor=1))

    def __init__(self, cfg: MahalanobisConfig, ctx: RunContext) -> None:
        super().__init__(cfg, ctx)
        cfg.check_ranks(ctx.distributed)
        cfg.check_pretraining()
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
        self.pretraining: Pretraining | None = None
        if cfg.pretrain_epochs:
            self.pretraining = Pretraining(self.model, self.data.items_by_class("train"), cfg, ctx.seed, ctx.device)
        #: the runner steps pre-training takes before the first episode (0 without --pretrain-epochs)
        self.pretrain_steps = self.pretraining.steps if self.pretraining is not None else 0
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
        """Pre-training's steps, then the episodes' optimiser steps."""
        return self.pretrain_steps + self.cfg.steps()

    def step_phase(self, step: int) -> str:
        return "pretrain" if step <= self.pretrain_steps else "train"

    def backoff_knobs_at(self, step: int) -> tuple[BackoffKnob, ...]:
        return self.backoff_knobs[1:] if step <= self.pretrain_steps else self.backoff_knobs[:1]

    def accumulation_of(self, name: str) -> int:
        if name == "pretrain_batch_size":
            return self.pretraining.accumulation if self.pretraining is not None else 1
        return self.accumulation

    def set_knob(self, name: str, value: int, accumulation: int) -> None:
        """Pre-training's batch knob sets its own micro-batches; the episodes' `accumulation` stays as it is."""
        if name != "pretrain_batch_size":
            return super().set_knob(name, value, accumulation)
        self.cfg.pretrain_batch_size = value
        if self.pretraining is not None:
            self.pretraining.accumulation = accumulation

    def wrap_data_parallel(self) -> None:
        """Under torchrun, each phase's first step wraps what that phase trains (`_data_parallel`)."""
        self._wrapped: str | None = None

    def _data_parallel(self, phase: str) -> None:
        """Under torchrun, DistributedDataParallel over what `phase` trains: pre-training's classifier over the
        features, then the whole model. The wrapper of the phase before is undone first, so that its gradient hooks
        on the backbone's parameters go with it."""
        group = self.ctx.distributed
        if group is None or getattr(self, "_wrapped", None) == phase:
            return
        if self._ddp is not None:
            self._ddp._remove_autograd_hooks()
            self._ddp = None
        module = self.pretraining.module if phase == "pretrain" else self.model
        self._ddp = group.wrap(module, self.sync_batchnorm, self.find_unused_parameters)
        self._wrapped = phase

    def validate_now(self, step: int) -> bool:
        """Every --val-every episodic steps (none during pre-training), not after the last."""
        every, episodic = self.cfg.val_every, step - self.pretrain_steps
        return ("val" in self.samplers and bool(every) and episodic > 0 and episodic % every == 0
                and step < self.total_steps())

    def _train_episodes(self, step: int) -> list[Episode]:
        """Runner step `step`'s training episodes: episodic step `step` less pre-training's steps."""
        return [self.samplers["train"].episode(i) for i in self.cfg.step_episodes(step - self.pretrain_steps)]

    def _schedule(self, first: tuple[int, int]) -> Iterator[tuple[tuple[int, int], list[int]]]:
        """This rank's training images from step `first`'s part on, in the order the steps take them: pre-training's
        batches, then each episode's support and queries."""
        for step in range(first[0], self.total_steps() + 1):
            if step <= self.pretrain_steps:
                shares = self.pretraining.shares(step)
                for j in self.my_share(list(range(len(shares)))):
                    if (step, j) >= first and len(shares[j]):
                        yield (step, j), [self.pretraining.items[r] for r in shares[j]]
                continue
            episodes = self._train_episodes(step)
            for j in self.my_share(list(range(len(episodes)))):
                if (step, j) >= first:
                    yield (step, j), episodes[j].support_items()[0] + episodes[j].query_items()[0]

    def _pretrain_step(self, step: int) -> dict[str, float]:
        """One batch of pre-training: the model's features, the linear classifier, cross-entropy over the training
        split's classes; after an OOM back-off the same batch in `accumulation` micro-batches."""
        pre = self.pretraining
        self._data_parallel("pretrain")
        shares = pre.shares(step)
        total = sum(len(share) for share in shares)
        pre.optimizer.zero_grad(set_to_none=True)
        with self.accumulate(step, parts=len(shares)) as grads:
            for j in grads.parts():
                rows = shares[j]
                images = self.feed.get((step, j)) if len(rows) else None
                labels = torch.from_numpy(pre.labels[rows]).to(self.ctx.device)
                chunks = [c for c in np.array_split(np.arange(len(rows)), max(1, min(pre.accumulation, len(rows))))
                          if len(c)]  # none where the share is empty (an epoch's short last batch, many parts)
                for chunk in grads.micro_steps(chunks):
                    a, b = int(chunk[0]), int(chunk[-1]) + 1
                    logits = (self._ddp or pre.module)(images[a:b])  # as `ddp_or_model`, this phase's module
                    loss = F.cross_entropy(logits, labels[a:b], reduction="sum") / total
                    grads.backward(self.scaler.scale(loss), loss=float(loss.detach()),
                                   correct=int((logits.argmax(1) == labels[a:b]).sum()), images=b - a)
        self.scaler.step(pre.optimizer)
        self.scaler.update()
        sums = grads.sums
        return {"loss": sums["loss"], "accuracy": sums["correct"] / sums["images"], "images": sums["images"],
                "data_wait_s": self.loaders.take_wait()}

    def train_step(self, step: int) -> dict[str, float]:
        """Pre-training's batch for its steps; then the step's episodes (one by default), each one's queries in
        `accumulation` micro-steps after an OOM back-off; data-parallel, each rank takes its share of the
        episodes."""
        if step <= self.pretrain_steps:
            return self._pretrain_step(step)
        if self.pretraining is not None and self.pretraining.optimizer.state:  # the classifier is done with
            self.pretraining.optimizer.state.clear()
            self.pretraining.classifier.zero_grad(set_to_none=True)
        self._data_parallel("train")
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

    def state_dict(self) -> dict[str, Any]:
        """The model's, optimizer's and scaler's states, and pre-training's classifier and optimizer."""
        state = super().state_dict()
        if self.pretraining is not None:
            state["pretraining"] = self.pretraining.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if self.pretraining is not None and "pretraining" in state:
            self.pretraining.load_state_dict(state["pretraining"])

    def finish(self, metrics: dict[str, float]) -> dict[str, float]:
        """confusion.csv/.png and per_class.csv over the test queries; embedding.png with --plots. A pre-trained
        run's metrics say how many steps pre-training took."""
        if self.pretrain_steps:
            metrics = {**metrics, "pretrain_steps": self.pretrain_steps}
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

        first = self.pretrain_steps + 1  # the first episodic step
        phases = {"pretrain": lambda: self.train_step(1)} if self.pretrain_steps else {}
        phases["train"] = lambda: self.train_step(first)
        if cfg.val_every and "val" in self.samplers:
            phases["val"] = evaluation("val", cfg.val_episodes)
        return {**phases, "test": evaluation("test", cfg.test_episodes)}

    def plan_tracked(self, phase: str) -> tuple[Any, ...]:
        """Pre-training holds its classifier and its optimizer's state; the episodes the model's optimizer's."""
        if phase == "pretrain" and self.pretraining is not None:
            return (self.model, self.pretraining.classifier, self.pretraining.optimizer)
        return super().plan_tracked(phase)

    def plan_extra_bytes(self) -> dict[str, dict[str, int]]:
        """Evaluation keeps every image's features of its episodes at once; planning traces one episode only. The
        loader's image cache and prefetched batches are host memory; training validates with a loader of its own."""
        cfg = self.cfg
        items = sum(len(v) for sampler in self.samplers.values() for v in sampler.items.values())
        image = image_bytes(self.data, cfg.image_size)
        episode = cfg.n_way * (cfg.k_shot + cfg.n_query) * image
        reads = self._reads()
        train = loader_bytes(cfg.image_cache_mb, items, image, cfg.workers, episode, 2 if cfg.val_every else 1,
                             reads["train"])
        test = loader_bytes(cfg.image_cache_mb, items, image, cfg.workers, cfg.batch_size * image,
                            reads=reads["test"])
        features = {phase: min(sum(len(v) for v in self.samplers[phase].items.values()),
                                episodes * cfg.n_way * (cfg.k_shot + cfg.n_query)) * self.model.embedding_dim * 4
                    for phase, episodes in (("val", cfg.val_episodes), ("test", cfg.test_episodes))
                    if phase in self.samplers}
        # validation runs beside training's loaders, which its own counts already
        phases = {"train": train, "val": {"evaluation_features": features.get("val", 0), **train},
                  "test": {"evaluation_features": features["test"], **test}}
        if self.pretraining is not None:  # one loader, batches of --pretrain-batch-size images
            phases["pretrain"] = loader_bytes(cfg.image_cache_mb, items, image, cfg.workers,
                                              self.pretraining.batch * image, reads=reads["pretrain"])
        return phases

    def _reads(self) -> dict[str, int]:
        """Images the run reads by the end of pre-training, of training and of its test (`episode_reads`, with
        pre-training's before them)."""
        pretrain = self.pretraining.steps * self.pretraining.batch if self.pretraining is not None else 0
        return {"pretrain": pretrain, **{k: v + pretrain for k, v in episode_reads(self.cfg).items()}}

    def plan_notes(self) -> dict[str, dict[str, str]]:
        """What the image cache and prefetch lines hold: training validates with a loader of its own."""
        cfg = self.cfg
        items = sum(len(v) for sampler in self.samplers.values() for v in sampler.items.values())
        image, reads = image_bytes(self.data, cfg.image_size), self._reads()
        train = loader_notes(cfg.image_cache_mb, items, image, cfg.workers, 2 if cfg.val_every else 1, reads["train"])
        notes = {"train": train, "val": train,
                 "test": loader_notes(cfg.image_cache_mb, items, image, cfg.workers, reads=reads["test"])}
        if self.pretraining is not None:
            notes["pretrain"] = loader_notes(cfg.image_cache_mb, items, image, cfg.workers, reads=reads["pretrain"])
        return notes
