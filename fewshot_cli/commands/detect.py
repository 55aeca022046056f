"""`fewshot detect-train`: episodic few-shot object detection, class prototypes matched over dense proposals."""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from fewshot_cli.commands.detect_config import _AFTER as _AFTER
from fewshot_cli.commands.detect_config import _BEFORE as _BEFORE
from fewshot_cli.commands.detect_config import COMMAND as COMMAND
from fewshot_cli.commands.detect_config import PRESETS as PRESETS
from fewshot_cli.commands.detect_config import DetectConfig
from fewshot_cli.data.coco import DetectionItem, coco_splits, synthetic_splits
from fewshot_cli.data.images import to_float
from fewshot_cli.data.loader import (
    Feed,
    ItemReader,
    Loaders,
    cache_bound,
    cache_share,
    episode_reads,
    image_bytes,
    loader_bytes,
    loader_notes,
)
from fewshot_cli.episodes import Episode, EpisodeSampler
from fewshot_cli.errors import BadInput
from fewshot_cli.models.detection import (
    BoxCounts,
    FewShotDetector,
    build_feature_backbone,
    dense_proposals,
    load_backbone_weights,
)
from fewshot_cli.models.weights import param_groups
from fewshot_cli.runner.backoff import evaluation_part
from fewshot_cli.runner.schedule import warmup_cosine
from fewshot_cli.runner.task import BackoffKnob, RunContext, Task

FLOAT = 4  # bytes per float32
NEGATIVE_TOP_K = 32  # candidates a --finetune-negatives image gives: its most prototype-like proposals
Read = dict[int, tuple[torch.Tensor, DetectionItem]]  # an episode's items: image on the device, boxes and size
COUNTS = ("positives", "hard_negatives")  # step figures that add up; the others are means


@dataclass
class Batch:
    """Images of one side of an episode with their boxes (resized pixels) and episode labels 0..N-1."""

    images: torch.Tensor
    boxes: list[torch.Tensor]
    labels: list[torch.Tensor]
    sizes: list[tuple[int, int]]  # real (width, height), for COCO coordinates
    names: list[str]


class DetectTask(Task):
    """Train on base-class episodes; test on novel-class episodes scored by pycocotools."""

    backoff_knobs = (BackoffKnob("n_query", floor=1), BackoffKnob("proposals_top_k", 16, accumulate=False))

    def __init__(self, cfg: DetectConfig, ctx: RunContext) -> None:
        super().__init__(cfg, ctx)
        cfg.check_ranks(ctx.distributed)
        scales = _parse_scales(cfg.proposal_scales)
        if ctx.data is None:
            self.train_data, self.test_data, self.base, self.novel = synthetic_splits(cfg.image_size, ctx.seed)
        else:
            self.train_data, self.test_data, self.base, self.novel = coco_splits(
                Path(ctx.data), cfg.image_size, cfg.novel_classes)
        # the queries of one episode; an OOM back-off splits them into micro-steps of cfg.n_query per class
        self.episode_queries = cfg.n_query
        self.samplers = {
            "train": EpisodeSampler(self.train_data.items_by_class(self.base), cfg.n_way, cfg.k_shot,
                                    self.episode_queries, ctx.seed, "train"),
            # validation: seen classes on held-out images; test: the novel classes
            "val": EpisodeSampler(self.test_data.items_by_class(self.base), cfg.n_way, cfg.k_shot, cfg.n_query,
                                  ctx.seed, "val"),
            "test": EpisodeSampler(self.test_data.items_by_class(self.novel), cfg.n_way, cfg.k_shot, cfg.n_query,
                                   ctx.seed, "test"),
        }
        self.proposals = dense_proposals(cfg.image_size, cfg.proposal_step, tuple(s * cfg.image_size for s in scales),
                                         _parse_ratios(cfg.proposal_ratios)).to(ctx.device)
        backbone, stride = build_feature_backbone(cfg.backbone, cfg.embedding_dim)
        weights = load_backbone_weights(backbone, cfg.weights, cfg.backbone, ctx.emit, cfg.weights_strict)
        self.loaded_weights = (weights.record,) if weights is not None else ()
        self.model = FewShotDetector(backbone, stride, cfg.embedding_dim, cfg.head_hidden,
                                     cfg.objectness_hidden).to(ctx.device)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, backbone, cfg.lr, cfg.lr_backbone,
                                                        cfg.freeze_backbone), weight_decay=1e-4)
        # warm-up over the first 5% of the steps, then down to 5% of the rate
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(
            cfg.steps(), warmup=max(1, cfg.steps() // 20), floor=0.05))
        self.dropped_seen = BoxCounts()
        self.test_files: tuple[dict[str, Any], list[dict[str, Any]]] | None = None
        self._holding: dict[int, list[int]] | None = None  # training items by class, once negatives are drawn
        share = self.cache_limit(cache_share(cfg.image_cache_mb, self.workers))
        self.loaders = {name: Loaders(ItemReader(data, "item", share, ctx.faults), _collate, self.workers, ctx.device,
                                      received=lambda batch, data=data: _count_dropped(data, batch), finish=_floats)
                        for name, data in (("train", self.train_data), ("test", self.test_data))}
        self.feed = Feed(self.loaders["train"], self._schedule)
        self._report_dropped("data", 0)
        if cfg.eval_batch_size is None:
            cfg.eval_batch_size = cfg.n_way * cfg.n_query

    # ------------------------------------------------------------------ training

    def total_steps(self) -> int:
        return self.cfg.steps()

    def _train_episodes(self, step: int) -> list[Episode]:
        # detect samples its training episodes from index 0: one lower keeps its results as they are
        return [self.samplers["train"].episode(i - 1) for i in self.cfg.step_episodes(step)]

    def _schedule(self, first: tuple[int, int]) -> Iterator[tuple[tuple[int, int], list[int]]]:
        """This rank's training episodes' items from step `first`'s part on, in the order the steps take them."""
        for step in range(first[0], self.total_steps() + 1):
            episodes = self._train_episodes(step)
            for j in self.my_share(list(range(len(episodes)))):
                if (step, j) >= first:
                    yield (step, j), _episode_items(episodes[j])

    def train_step(self, step: int) -> dict[str, float]:
        """The step's episodes (one by default), each one's queries in micro-steps of cfg.n_query per class (an
        OOM back-off lowers it); data-parallel, each rank takes its share of the episodes."""
        episodes = self._train_episodes(step)
        weight = 1.0 / len(episodes)
        self.optimizer.zero_grad(set_to_none=True)
        with self.accumulate(step, parts=len(episodes)) as grads:
            for j in grads.parts():
                episode = episodes[j]
                read = _by_item(episode, self.feed.get((step, j)))
                support = self._support(read, episode)
                prototypes, pooled = self.model.prototypes(support.images, torch.stack(support.boxes),
                                                           torch.cat(support.labels), self.cfg.n_way)
                chunks = [chunk for chunk in self._query_chunks(episode) if chunk]
                n_queries = sum(map(len, chunks))
                for chunk in grads.micro_steps(chunks):
                    queries = self._queries(read, self.train_data, chunk, episode.classes)
                    total, terms = self._loss(prototypes, pooled, queries)
                    share = len(chunk) / n_queries * weight
                    # the losses are means over the step's episodes, the counts totals
                    grads.backward(total * share, **{name: value * (1.0 if name in COUNTS else share)
                                                     for name, value in terms.items()})
        self._optimizer_step()
        sums = grads.sums
        sums["boxes_dropped"] = self.all_sum({"n": self._report_dropped("data", step)})["n"]
        sums["lr"] = self.scheduler.get_last_lr()[0]
        sums["data_wait_s"] = self.loaders["train"].take_wait()
        return sums

    def _loss(self, prototypes: torch.Tensor, pooled: torch.Tensor, queries: Batch
              ) -> tuple[torch.Tensor, dict[str, float]]:
        features = self.ddp_or_model(queries.images)
        loss = self.model.loss(features, queries.boxes, queries.labels, prototypes, pooled, self.proposals,
                               self.cfg.proposals_top_k, self.cfg.negative_ratio)
        terms = {"loss": loss.total.detach(), "classification": loss.classification.detach(),
                 "objectness": loss.objectness.detach(), "regression": loss.regression.detach(),
                 "positives": loss.positives, "hard_negatives": loss.negatives}
        return loss.total, {name: float(value) for name, value in terms.items()}

    def _optimizer_step(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 10.0)
        self.optimizer.step()
        self.scheduler.step()

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, phase: str, step: int) -> dict[str, float]:
        cfg = self.cfg
        episodes = cfg.test_episodes if phase == "test" else cfg.val_episodes
        sampler = self.samplers["test" if phase == "test" else "val"]
        images: list[dict[str, Any]] = []
        annotations: list[dict[str, Any]] = []
        detections: list[dict[str, Any]] = []
        dropped = BoxCounts()
        if phase == "test":  # training's reads are over: its cache goes, as the plan of the test assumes
            self.feed.close()
            self.loaders["train"].drop_cache()
            self.loaders["test"].release("val")
            self.loaders["train"].release("val negatives")
        chosen = [sampler.episode(index) for index in range(episodes)]
        batches = self.loaders["test"].fixed(phase, [_episode_items(e) for e in chosen])
        negatives = self._negatives(phase, chosen)
        for index, (episode, batch) in enumerate(zip(chosen, batches, strict=True)):
            read = _by_item(episode, batch)
            support = self._support(read, episode)
            prototypes, pooled = self.model.prototypes(support.images, torch.stack(support.boxes),
                                                       torch.cat(support.labels), cfg.n_way)
            start = self.model.head_state() if cfg.finetune_steps else None
            if start is not None:  # each episode fine-tunes the trained head afresh: episodes stay independent
                prototypes = evaluation_part(self, phase, step, "eval_batch_size", partial(
                    self._finetune, read, episode, prototypes, pooled, start, next(negatives)))
            chunk = [query for part in self._query_chunks(episode) for query in part]
            while chunk:
                # each image is detected on its own, so how many are scored at once never changes a detection
                queries, found, counts = evaluation_part(self, phase, step, "eval_batch_size", partial(
                    self._detect, read, chunk, episode.classes, prototypes, pooled))
                chunk = chunk[len(found):]
                dropped.add(counts)
                for i, (boxes, scores, classes) in enumerate(found):
                    image_id = len(images) + 1
                    width, height = queries.sizes[i]
                    images.append({"id": image_id, "width": width, "height": height, "file_name": queries.names[i],
                                   "episode": index})
                    scale = torch.tensor([width / cfg.image_size, height / cfg.image_size] * 2)
                    for box, label in zip(queries.boxes[i].cpu() * scale, queries.labels[i].tolist(), strict=True):
                        annotations.append(_coco_box(box, episode.classes[label], image_id,
                                                     id=len(annotations) + 1))
                    for box, score, label in zip(boxes.cpu() * scale, scores.tolist(), classes.tolist(),
                                                 strict=True):
                        detections.append(_coco_box(box, episode.classes[label], image_id, score=score))
            if start is not None:
                self._restore(start)
        if dropped.dropped or dropped.clamped:
            self.ctx.emit("boxes_dropped", stage="predictions", phase=phase, step=step,
                          non_finite=dropped.non_finite, degenerate=dropped.degenerate, clamped=dropped.clamped)
        self._report_dropped("data", step)
        if phase == "test":
            self.loaders["test"].release(phase)
            self.loaders["train"].release(f"{phase} negatives")
        classes = self.novel if phase == "test" else self.base
        gt = {"images": images, "annotations": annotations,
              "categories": [{"id": c, "name": self.test_data.categories[c]} for c in classes]}
        map_all, map50 = coco_map(gt, detections)
        if phase == "test":
            self.test_files = (gt, detections)
            return {"map": map_all, "map50": map50, "test_episodes": float(episodes)}
        return {"map": map_all, "map50": map50}

    def _finetune(self, read: Read, episode: Episode, prototypes: torch.Tensor, pooled: torch.Tensor,
                  start: dict[str, torch.Tensor], negatives: torch.Tensor | None) -> torch.Tensor:
        """TFA's stage: from the trained head (`start`), cfg.finetune_steps full-batch AdamW steps of the training
        loss on the episode's support images (their boxes of the episode's classes; all else background) and on the
        `negatives` images (`_negatives`: background only, each its NEGATIVE_TOP_K most prototype-like proposals),
        with the backbone frozen and the prototypes (n_way x C) tuned as the cosine classifier's weights; returns
        them. The feature maps are made eval_batch_size images at a time, which changes no value."""
        cfg = self.cfg
        self._restore(start)  # after an OOM, the part starts again from the same head
        items = [(item, cls) for cls, items in zip(episode.classes, episode.support, strict=True) for item in items]
        support = self._queries(read, self.test_data, items, episode.classes)
        # evaluation runs in inference mode, whose tensors autograd cannot save: the stage makes its own copies
        with torch.inference_mode(False), torch.enable_grad():
            with torch.no_grad():
                # the backbone is frozen: the candidates, their labels and ROI features are the same every step
                rois, labels, targets = self.model.assign(
                    self._features(support.images.clone()), [b.clone() for b in support.boxes],
                    [x.clone() for x in support.labels], pooled.clone(), self.proposals, self._eval_top_k(), cfg.n_way)
                if negatives is not None and len(negatives):
                    empty = [torch.zeros((0, 4), device=negatives.device)] * len(negatives)
                    none = [torch.zeros(0, dtype=torch.long, device=negatives.device)] * len(negatives)
                    background = self.model.assign(
                        self._features(negatives.clone()), empty, none, pooled.clone(), self.proposals,
                        min(NEGATIVE_TOP_K, self._eval_top_k()), cfg.n_way)
                    rois, labels, targets = (torch.cat(pair) for pair in zip((rois, labels, targets), background,
                                                                             strict=True))
            weights = torch.nn.Parameter(prototypes.clone())
            optimizer = torch.optim.AdamW([*self.model.head_parameters(), weights], lr=cfg.finetune_lr,
                                          weight_decay=1e-4)
            for _ in range(cfg.finetune_steps):
                optimizer.zero_grad(set_to_none=True)
                loss = self.model.roi_loss(rois, labels, targets, torch.nn.functional.normalize(weights, dim=1),
                                           cfg.negative_ratio)
                loss.total.backward()
                optimizer.step()
            return torch.nn.functional.normalize(weights.detach(), dim=1)

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's feature maps of `images`, eval_batch_size at a time."""
        step = self.cfg.eval_batch_size
        return torch.cat([self.model(images[i:i + step]) for i in range(0, len(images), step)])

    def _negatives(self, phase: str, episodes: list[Episode]) -> Iterator[torch.Tensor | None]:
        """Per episode, the images of its `_negative_items` on the device (None where there are none), read by
        the training data's loader."""
        items = [self._negative_items(episode) for episode in episodes]
        if not any(items):
            yield from (None for _ in episodes)
            return
        batches = iter(self.loaders["train"].fixed(f"{phase} negatives", [chosen for chosen in items if chosen]))
        for chosen in items:
            yield next(batches)[0] if chosen else None

    def _negative_items(self, episode: Episode) -> list[int]:
        """cfg.finetune_negatives training images that hold no object of the episode's classes (so all they hold
        is background to it), drawn by the episode alone: its fine-tuning never depends on the other episodes."""
        wanted = self.cfg.finetune_negatives if self.cfg.finetune_steps else 0
        if not wanted:
            return []
        if self._holding is None:
            self._holding = self.train_data.items_by_class(sorted({*self.base, *self.novel}))
        taken = set().union(*(self._holding.get(cls, []) for cls in episode.classes))
        pool = [item for item in range(len(self.train_data)) if item not in taken]
        return random.Random(episode.hash).sample(pool, min(wanted, len(pool)))

    def _eval_top_k(self) -> int:
        """Proposals kept per image in evaluation and its fine-tuning."""
        return self.cfg.eval_top_k or self.cfg.proposals_top_k

    def _restore(self, state: dict[str, torch.Tensor]) -> None:
        """Put back the head weights `state` (from `FewShotDetector.head_state`)."""
        with torch.inference_mode(False), torch.no_grad():
            self.model.load_state_dict(state, strict=False)

    def _detect(self, read: Read, chunk: list[tuple[int, int]], classes: tuple, prototypes: torch.Tensor,
                pooled: torch.Tensor) -> tuple[Batch, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], BoxCounts]:
        """The first `eval_batch_size` query images of `chunk`, their detections and dropped boxes."""
        cfg = self.cfg
        queries = self._queries(read, self.test_data, chunk[:cfg.eval_batch_size], classes)
        found, counts = self.model.detect(queries.images, prototypes, pooled, self.proposals, self._eval_top_k(),
                                          cfg.score_threshold, cfg.nms_iou, cfg.max_detections, cfg.class_scores,
                                          cfg.soft_nms_sigma)
        return queries, found, counts

    def finish(self, metrics: dict[str, float]) -> dict[str, float]:
        """Write gt.json and detections.json and score exactly those files with pycocotools."""
        if self.ctx.run_dir is None or self.test_files is None:
            return metrics
        gt, detections = self.test_files
        gt_path, det_path = Path(self.ctx.run_dir) / "gt.json", Path(self.ctx.run_dir) / "detections.json"
        gt_path.write_text(json.dumps(gt))
        det_path.write_text(json.dumps(detections))
        map_all, map50 = coco_map_files(gt_path, det_path)
        self.ctx.emit("detection_spread", **detection_spread(gt, detections))
        return {**metrics, "map": map_all, "map50": map50}

    # ------------------------------------------------------------------ memory planning

    def plan_phases(self) -> dict[str, Callable[[], Any]]:
        """A real training step, and the test's first chunk of queries up to their ranked candidates; in both, each
        query keeps all its boxes (`_traced_boxes`)."""
        self._boxes_of = _traced_boxes  # a run never calls plan_phases: only the planner's traced copy changes
        return {"train": lambda: self.train_step(1), "test": self._traced_test}

    def _traced_test(self) -> None:
        """`evaluate`'s largest moment, the first chunk's ranked candidates: the detections that follow are picked
        by a score mask and NMS, whose outputs' shapes are the data's (meta tensors have no kernel for them, fake
        tensors raise torch's DynamicOutputShapeException), so their inputs are a declared line (`nms_inputs`)."""
        cfg, episode = self.cfg, self.samplers["test"].episode(0)
        read = _by_item(episode, next(self.loaders["test"].fixed("test", [_episode_items(episode)])))
        support = self._support(read, episode)
        prototypes, pooled = self.model.prototypes(support.images, torch.stack(support.boxes),
                                                   torch.cat(support.labels), cfg.n_way)
        start = self.model.head_state() if cfg.finetune_steps else None
        if start is not None:
            negatives = next(self._negatives("test", [episode]))
            prototypes = self._finetune(read, episode, prototypes, pooled, start, negatives)
        chunk = [query for part in self._query_chunks(episode) for query in part][:cfg.eval_batch_size]
        queries = self._queries(read, self.test_data, chunk, episode.classes)
        self.model.candidates(queries.images, prototypes, pooled, self.proposals, self._eval_top_k(),
                              cfg.class_scores)

    def plan_extra_bytes(self) -> dict[str, dict[str, int]]:
        """The dense proposal grid (made before tracing starts), its per-image pooled descriptors and, at test,
        the NMS inputs (boxes x classes) the traced chunk stops before and the previous episode's query batch,
        which evaluation keeps until the next detection returns; the loader's host memory."""
        cfg = self.cfg
        n_shapes = len(_parse_scales(cfg.proposal_scales)) * len(_parse_ratios(cfg.proposal_ratios))
        per_side = math.ceil(cfg.image_size / cfg.proposal_step)
        n_proposals = per_side * per_side * n_shapes
        images = cfg.n_way * cfg.n_query
        grid = n_proposals * 4 * FLOAT
        ranking = images * n_proposals * (cfg.embedding_dim + cfg.n_way + 1) * FLOAT
        top_k = min(self._eval_top_k(), n_proposals)
        nms = top_k * cfg.n_way * (4 + 1 + 1) * FLOAT  # one image at a time: boxes, scores, class ids
        if cfg.soft_nms_sigma:  # and the soft NMS's pairs: IoU, its float64 copy, the class test, the decay
            nms += (top_k * cfg.n_way) ** 2 * (FLOAT + 8 + 1 + 8)
        image = 3 * cfg.image_size**2 * FLOAT
        queries = min(cfg.eval_batch_size or images, images) * image if cfg.test_episodes > 1 else 0
        train, test = (self._host_lines(lines=True)[phase] for phase in ("train", "test"))
        return {"train": {"proposal_grid": grid, "proposal_ranking": ranking, **train},
                "test": {"proposal_grid": grid, "proposal_ranking": ranking, "nms_inputs": nms,
                         "previous_queries": queries, **test}}

    def plan_notes(self) -> dict[str, dict[str, str]]:
        return self._host_lines(lines=False)

    def _host_lines(self, lines: bool) -> dict[str, dict[str, Any]]:
        """Per phase, the loaders' host lines (`lines`: their bytes, else their notes). Each data's loader caches
        what it has read by then and holds prefetched batches; the training data's is read by training (its cache
        is dropped when the test begins) and by the fine-tuning's negatives, the test data's by validation and the
        test."""
        cfg = self.cfg
        reads = episode_reads(cfg)
        pixels = image_bytes(self.train_data, cfg.image_size)
        episode = cfg.n_way * (cfg.k_shot + cfg.n_query)
        trained = cfg.episodes * episode
        negatives = cfg.finetune_negatives if cfg.finetune_steps else 0
        validations = (reads["train"] - trained) // max(1, cfg.val_episodes * episode)

        def loaders(uses: list[tuple[str, Any, int, int]]) -> dict[str, Any]:
            """The lines of the loaders `uses` names: (name, data, images read, images per batch), summed."""
            if lines:
                out: dict[str, int] = {}
                for _, data, read, batch in uses:
                    for key, value in loader_bytes(cfg.image_cache_mb, len(data), pixels, cfg.workers,
                                                   batch * pixels, 1, read).items():
                        out[key] = out.get(key, 0) + value
                return out
            notes = loader_notes(cfg.image_cache_mb, len(uses[0][1]), pixels, cfg.workers, len(uses), uses[0][2])
            if len(uses) > 1:
                notes["image_cache"] = ", ".join(
                    f"{name} cache {cache_bound(cfg.image_cache_mb, len(data), pixels, read)}"
                    for name, data, read, _ in uses)
            return notes

        # validation's negatives: with no workers, read through the training data's one cache; else their own
        val_negatives = validations * cfg.val_episodes * negatives
        train = [("train", self.train_data, trained + (0 if cfg.workers else val_negatives), episode)]
        if cfg.val_every:
            train.append(("val", self.test_data, reads["train"] - trained, episode))
            if negatives and cfg.workers:
                train.append(("val negatives", self.train_data, val_negatives, negatives))
        test = [("test", self.test_data, reads["test"] - trained, episode)]
        if negatives:
            test.append(("negatives", self.train_data, cfg.test_episodes * negatives, negatives))
        return {"train": loaders(train), "test": loaders(test)}

    # ------------------------------------------------------------------ episodes

    def _query_chunks(self, episode: Episode) -> list[list[tuple[int, int]]]:
        """The episode's (item, class) queries in micro-steps of cfg.n_query per class."""
        per_class = self.cfg.n_query
        n = max(len(q) for q in episode.query)
        return [[(item, cls) for cls, items in zip(episode.classes, episode.query, strict=True)
                 for item in items[start:start + per_class]] for start in range(0, n, per_class)]

    def _support(self, read: Read, episode: Episode) -> Batch:
        """One box per support image: the largest box of the class it was drawn for (the first, in a tie)."""
        images, boxes, labels, sizes, names = [], [], [], [], []
        for label, (cls, items) in enumerate(zip(episode.classes, episode.support, strict=True)):
            for item in items:
                image, sample = read[item]
                if (sample.labels != cls).all():
                    raise BadInput(f"Support image {item} has no valid box of class {cls}.")
                box = sample.boxes
                areas = torch.where(sample.labels == cls, (box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1]), -1)
                images.append(image)
                boxes.append(box.index_select(0, areas.argmax().view(1))[0])  # picked by index, never by value
                labels.append(torch.tensor([label]))
                sizes.append((sample.width, sample.height))
                names.append(str(item))
        device = self.ctx.device
        return Batch(torch.stack(images), [b.to(device) for b in boxes], [x.to(device) for x in labels],
                     sizes, names)

    def _queries(self, read: Read, data: Any, chunk: list[tuple[int, int]], classes: tuple) -> Batch:
        """Query images with their boxes of the episode's classes (other objects count as background)."""
        index = {cls: i for i, cls in enumerate(classes)}
        images, boxes, labels, sizes, names = [], [], [], [], []
        device = self.ctx.device
        for item, _ in chunk:
            image, sample = read[item]
            mine, classes_of = self._boxes_of(sample, index)
            images.append(image)
            boxes.append(mine.to(device))
            labels.append(classes_of.to(device))
            sizes.append((sample.width, sample.height))
            names.append(data.file_name(item))
        return Batch(torch.stack(images), boxes, labels, sizes, names)

    @staticmethod
    def _boxes_of(sample: DetectionItem, index: dict[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """A query's boxes of the episode's classes and their episode labels (`index`: category -> label)."""
        mine = torch.tensor([int(c) in index for c in sample.labels.tolist()], dtype=torch.bool)
        return sample.boxes[mine], torch.tensor([index[int(c)] for c in sample.labels[mine].tolist()],
                                                dtype=torch.long)

    def _report_dropped(self, stage: str, step: int) -> int:
        """Log the data boxes dropped since the last report; returns how many."""
        total = BoxCounts()
        for data in (self.train_data, self.test_data):
            total.add(data.dropped)
        new = BoxCounts(total.non_finite - self.dropped_seen.non_finite,
                        total.degenerate - self.dropped_seen.degenerate, total.clamped - self.dropped_seen.clamped)
        self.dropped_seen = total
        if new.dropped or new.clamped:
            self.ctx.emit("boxes_dropped", stage=stage, step=step, non_finite=new.non_finite,
                          degenerate=new.degenerate, clamped=new.clamped)
        return new.dropped


def _traced_boxes(sample: DetectionItem, index: dict[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """`_boxes_of` for the planner: all the query's boxes, as label 0. Traced tensors cannot pick the boxes of the
    episode's classes: their labels' values are not there (on fake tensors `tolist()` raises torch's
    DataDependentOutputException) and a mask of them has a shape that is the data's (`nonzero` raises
    DynamicOutputShapeException). At least as many boxes as the run's, a few bytes beside the images;
    tests/test_detect.py fails once torch can follow it."""
    return sample.boxes, torch.zeros(len(sample.boxes), dtype=torch.long)


def _episode_items(episode: Episode) -> list[int]:
    """The items an episode reads, support then queries (an image may serve several of its classes)."""
    return episode.support_items()[0] + episode.query_items()[0]


def _collate(samples: list[DetectionItem]) -> tuple[torch.Tensor, list[DetectionItem]]:
    """Images stacked (one pinned copy to the device), the rest of each item as it is."""
    return torch.stack([s.image for s in samples]), [replace(s, image=torch.empty(0)) for s in samples]


def _floats(batch: tuple[torch.Tensor, list[DetectionItem]]) -> tuple[torch.Tensor, list[DetectionItem]]:
    """The batch's images as the model's float input, made on the device (image files travel as uint8)."""
    return to_float(batch[0]), batch[1]


def _count_dropped(data: Any, batch: tuple[torch.Tensor, list[DetectionItem]]) -> None:
    for sample in batch[1]:
        data.dropped.add(sample.dropped)


def _by_item(episode: Episode, batch: tuple[torch.Tensor, list[DetectionItem]]) -> Read:
    images, samples = batch
    return {item: (images[p], samples[p]) for p, item in enumerate(_episode_items(episode))}


def _parse_scales(text: str) -> tuple[float, ...]:
    try:
        scales = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        scales = ()
    if not scales or not all(0 < s <= 1 for s in scales):
        raise BadInput(f"--proposal-scales must be fractions in (0, 1], comma-separated, not {text!r}.")
    return scales


def _parse_ratios(text: str) -> tuple[float, ...]:
    try:
        ratios = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        ratios = ()
    if not ratios or not all(0.1 <= r <= 10 for r in ratios):
        raise BadInput(f"--proposal-ratios must be width / height ratios in [0.1, 10], comma-separated, not {text!r}.")
    return ratios


def _coco_box(box: torch.Tensor, category: int, image_id: int, id: int | None = None,
              score: float | None = None) -> dict[str, Any]:
    x0, y0, x1, y1 = (round(float(v), 2) for v in box)
    entry: dict[str, Any] = {"image_id": image_id, "category_id": int(category),
                             "bbox": [x0, y0, round(x1 - x0, 2), round(y1 - y0, 2)]}
    if score is None:
        entry.update(id=id, area=round((x1 - x0) * (y1 - y0), 2), iscrowd=0)
    else:
        entry["score"] = round(score, 6)
    return entry


def coco_map(gt: dict[str, Any], detections: list[dict[str, Any]]) -> tuple[float, float]:
    """(mAP@[.5:.95], mAP@.5) by pycocotools for in-memory COCO ground truth and results."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = json.loads(json.dumps(gt))  # pycocotools edits what it is given
        coco_gt.createIndex()
        return _score(coco_gt, json.loads(json.dumps(detections)))


def coco_map_files(gt_path: Path | str, detections_path: Path | str) -> tuple[float, float]:
    """(mAP@[.5:.95], mAP@.5) by pycocotools read from gt.json and detections.json."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_path))
        return _score(coco_gt, json.loads(Path(detections_path).read_text()))


def _score(coco_gt: COCO, detections: list[dict[str, Any]]) -> tuple[float, float]:
    if not detections or not coco_gt.getAnnIds():
        return 0.0, 0.0  # pycocotools cannot load an empty result list
    evaluator = COCOeval(coco_gt, coco_gt.loadRes(detections), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return max(0.0, float(evaluator.stats[0])), max(0.0, float(evaluator.stats[1]))


def detection_spread(gt: dict[str, Any], detections: list[dict[str, Any]], min_score: float = 0.3,
                     ) -> dict[str, Any]:
    """Where confident detections sit: the share of box centres per image quadrant, against the ground truth."""
    sizes = {im["id"]: (im["width"], im["height"]) for im in gt["images"]}

    def quadrants(entries: list[dict[str, Any]]) -> list[float]:
        counts = [0, 0, 0, 0]
        for e in entries:
            width, height = sizes[e["image_id"]]
            x, y, w, h = e["bbox"]
            counts[2 * int(y + h / 2 >= height / 2) + int(x + w / 2 >= width / 2)] += 1
        total = max(1, sum(counts))
        return [round(c / total, 3) for c in counts]

    confident = [d for d in detections if d["score"] >= min_score]
    return {"min_score": min_score, "detections": len(confident), "quadrants": quadrants(confident),
            "gt_quadrants": quadrants(gt["annotations"]),
            "quadrant_order": "top-left,top-right,bottom-left,bottom-right"}
