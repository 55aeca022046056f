"""`fewshot triplet-train`: stage-2 episodic training of a few-shot video localiser with a triplet metric loss,
validated in bounded memory by spatio-temporal IoU (ST-IoU) and box AP."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, get_worker_info

from fewshot_cli.commands.triplet_config import COMMAND as COMMAND
from fewshot_cli.commands.triplet_config import PRESETS as PRESETS
from fewshot_cli.commands.triplet_config import TripletConfig
from fewshot_cli.data.clips import (
    ClipSource,
    EpisodeBatch,
    FrameCache,
    frame_bytes,
    load_episode,
    make_source,
    one_thread,
)
from fewshot_cli.episodes import EpisodeSampler
from fewshot_cli.errors import BadInput
from fewshot_cli.models.detection import load_backbone_weights
from fewshot_cli.models.localiser import Localiser, best_boxes, localisation_loss
from fewshot_cli.models.weights import param_groups, sha256
from fewshot_cli.runner.backoff import evaluation_part
from fewshot_cli.runner.checkpoint import load_checkpoint
from fewshot_cli.runner.metrics import RunningMean
from fewshot_cli.runner.task import BackoffKnob, RunContext, Task

MiB = 2**20


def st_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Spatio-temporal IoU of one clip: intersections summed over frames divided by unions summed over frames.
    Boxes are T x 4 xyxy with NaN rows where absent; a frame where only one side has a box adds its area to the
    union and nothing to the intersection; frames where neither has one do not count; a clip where no frame
    counts scores 1 (both agree the object never appears)."""
    pred_present = ~np.isnan(pred).any(1)
    gt_present = ~np.isnan(gt).any(1)
    p, g = np.nan_to_num(pred), np.nan_to_num(gt)
    area_p = np.where(pred_present, (p[:, 2] - p[:, 0]) * (p[:, 3] - p[:, 1]), 0.0)
    area_g = np.where(gt_present, (g[:, 2] - g[:, 0]) * (g[:, 3] - g[:, 1]), 0.0)
    width = np.clip(np.minimum(p[:, 2], g[:, 2]) - np.maximum(p[:, 0], g[:, 0]), 0, None)
    height = np.clip(np.minimum(p[:, 3], g[:, 3]) - np.maximum(p[:, 1], g[:, 1]), 0, None)
    inter = np.where(pred_present & gt_present, width * height, 0.0)
    union = (area_p + area_g - inter).sum()
    return float(inter.sum() / union) if union > 0 else 1.0


def frame_ious(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """IoU per frame of two T x 4 box rows (0 where either is absent)."""
    both = ~np.isnan(pred).any(1) & ~np.isnan(gt).any(1)
    p, g = np.nan_to_num(pred), np.nan_to_num(gt)
    width = np.clip(np.minimum(p[:, 2], g[:, 2]) - np.maximum(p[:, 0], g[:, 0]), 0, None)
    height = np.clip(np.minimum(p[:, 3], g[:, 3]) - np.maximum(p[:, 1], g[:, 1]), 0, None)
    inter = width * height
    union = (p[:, 2] - p[:, 0]) * (p[:, 3] - p[:, 1]) + (g[:, 2] - g[:, 0]) * (g[:, 3] - g[:, 1]) - inter
    return np.where(both & (union > 0), inter / np.where(union > 0, union, 1), 0.0)


class BoxAP:
    """AP at IoU 0.5 of each frame's top box, from fixed-size score histograms: memory does not grow with the
    number of frames seen (scores within 1/bins of each other tie)."""

    def __init__(self, bins: int = 1000) -> None:
        self.bins = bins
        self.true_pos = np.zeros(bins, dtype=np.int64)
        self.false_pos = np.zeros(bins, dtype=np.int64)
        self.n_gt = 0

    def add(self, scores: np.ndarray, pred: np.ndarray, gt: np.ndarray) -> None:
        gt_present = ~np.isnan(gt).any(1)
        index = np.clip((scores * self.bins).astype(np.int64), 0, self.bins - 1)
        hit = gt_present & (frame_ious(pred, gt) >= 0.5)
        np.add.at(self.true_pos, index[hit], 1)
        np.add.at(self.false_pos, index[~hit], 1)
        self.n_gt += int(gt_present.sum())

    def value(self) -> float:
        if self.n_gt == 0:
            return 0.0
        tp = np.cumsum(self.true_pos[::-1])
        fp = np.cumsum(self.false_pos[::-1])
        recall = tp / self.n_gt
        precision = np.maximum.accumulate((tp / np.maximum(tp + fp, 1))[::-1])[::-1]
        return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def to_input(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 images to the float input the backbone expects, on the device."""
    return images.to(device, non_blocking=True).float() / 255  # [0, 1], as `detect-train` feeds its backbone


def _checkpoint_file(path: str) -> Path:
    """`--init`'s file: the path itself, or a run directory's checkpoint.pt."""
    source = Path(path)
    return source / "checkpoint.pt" if source.is_dir() else source


def load_backbone(model: Localiser, path: str, backbone: str) -> int:
    """Copy the backbone weights of a stage-1 checkpoint (`detect-train` or `triplet-train`) into `model`;
    returns how many tensors were loaded. A checkpoint without a matching backbone is a BadInput."""
    source = _checkpoint_file(path)
    if not source.is_file():
        raise BadInput(f"--init {path}: no checkpoint there (give checkpoint.pt or the run directory holding it).")
    state = load_checkpoint(source, "--init")  # tensors and plain containers only: no pickled code runs
    weights = _find_model_state(state)
    found = {key.split("backbone.", 1)[1]: value for key, value in (weights or {}).items()
             if "backbone." in key and isinstance(value, torch.Tensor)}
    target = model.backbone.state_dict()
    missing = sorted(set(target) - set(found))
    mismatched = [k for k in target if k in found and found[k].shape != target[k].shape]
    if not found or missing or mismatched:
        detail = ("it holds no backbone weights" if not found else
                  f"{len(missing)} of its {len(target)} tensors are missing (e.g. {missing[0]})" if missing else
                  f"{mismatched[0]} has shape {tuple(found[mismatched[0]].shape)}, not "
                  f"{tuple(target[mismatched[0]].shape)} (is --embedding-dim the stage-1 run's?)")
        raise BadInput(f"--init {source} has no backbone matching --backbone {backbone}: {detail}.")
    model.backbone.load_state_dict({k: found[k] for k in target})
    return len(target)


def _find_model_state(state: Any) -> Mapping[str, Any] | None:
    """The model's state dict inside a checkpoint, wherever the runner nested it."""
    if isinstance(state, Mapping):
        if any(isinstance(k, str) and "backbone." in k for k in state):
            return state
        for key in ("model", "task", "state"):
            if key in state:
                found = _find_model_state(state[key])
                if found is not None:
                    return found
        for value in state.values():
            found = _find_model_state(value)
            if found is not None:
                return found
    return None


class TrainEpisodes(Dataset):
    """The training episodes `indices`, in order, for DataLoader workers, each worker with its share of the frame
    cache."""

    def __init__(self, source: ClipSource, sampler: EpisodeSampler, indices: list[int], cfg: TripletConfig,
                 triplet_count: int, seed: int) -> None:
        self.source, self.sampler, self.indices = source, sampler, indices
        self.k_shot, self.num_aug, self.triplet_count, self.seed = cfg.k_shot, cfg.num_aug, triplet_count, seed
        self.cache_share = (cfg.frame_cache_size // (cfg.workers + 1), cfg.frame_cache_mb * MiB // (cfg.workers + 1))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, offset: int) -> EpisodeBatch:
        episode = self.sampler.episode(self.indices[offset])
        return load_episode(self.source, episode, self.seed, "train", self.k_shot, self.num_aug, self.triplet_count)


def _worker_cache(_: int) -> None:
    # each worker process owns a cache; together with the main process's they stay within the bounds
    dataset = get_worker_info().dataset
    dataset.source.cache = FrameCache(*dataset.cache_share)


def _as_is(batch: EpisodeBatch) -> EpisodeBatch:
    return batch


class TripletTask(Task):
    """Episodes of n_way classes x n_query clips; loss = (1 - r) x localisation + r x triplet."""

    backoff_knobs = (BackoffKnob("triplet_batch_size", floor=1), BackoffKnob("n_query", floor=1))
    # after an OOM back-off a micro-step may hold triplets and no clip, leaving the localisation head (head,
    # objectness, box) without a gradient in it
    find_unused_parameters = True

    def __init__(self, cfg: TripletConfig, ctx: RunContext) -> None:
        super().__init__(cfg, ctx)
        cfg.check_ranks(ctx.distributed)
        parts = self.workers + 1 if self.workers else 1
        self.cache = FrameCache(self.cache_limit(cfg.frame_cache_size // parts),
                                self.cache_limit(cfg.frame_cache_mb * MiB // parts))
        self.source = make_source(ctx.data, cfg.image_size, self.cache, cfg.clip_frames, ctx.seed)
        # support images come from each class's support set, so an episode draws only query clips per class
        self.samplers = {split: EpisodeSampler(self.source.items_by_class(split), cfg.n_way, 0, cfg.n_query,
                                               ctx.seed, split) for split in ("train", "val", "test")}
        self._check_supports()
        if cfg.triplet_ratio > 0 and cfg.n_way < 2:
            raise BadInput("The triplet loss needs a negative from another class: use --n-way 2 or more, "
                           "or --triplet-ratio 0.")
        if cfg.triplet_ratio > 1:
            raise BadInput(f"--triplet-ratio must be between 0 and 1, not {cfg.triplet_ratio}.")
        self.model = Localiser(cfg.backbone, cfg.embedding_dim)
        weights = load_backbone_weights(self.model.backbone, cfg.weights, cfg.backbone, ctx.emit,
                                        cfg.weights_strict)
        self.loaded_weights = (weights.record,) if weights is not None else ()
        if cfg.init:
            loaded = load_backbone(self.model, cfg.init, cfg.backbone)
            ctx.emit("init_backbone", path=str(cfg.init), tensors=loaded)
            source = _checkpoint_file(cfg.init)
            self.loaded_weights += ({"option": "--init", "path": str(source), "files": {str(source): sha256(source)}},)
        self.model.to(ctx.device)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, self.model.backbone, cfg.lr, cfg.lr_backbone,
                                                        cfg.freeze_backbone), weight_decay=1e-4)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=max(cfg.steps(), 1))
        self.triplet_loss = nn.TripletMarginLoss(margin=cfg.triplet_margin)
        # the episode keeps its full size after an OOM back-off; micro-steps split it instead
        self.full_triplets = cfg.triplet_batch_size if cfg.triplet_ratio > 0 else 0
        self._batches: Any = None
        self._order: list[int] = []
        self._position = 0

    def _check_supports(self) -> None:
        for split in ("train", "val", "test"):
            for cls in self.samplers[split].classes:
                if self.source.support_count(cls) < 1:
                    raise BadInput(f"Class {cls} of the {split} split has no support images.")

    def total_steps(self) -> int:
        return self.cfg.steps()

    def _step_indices(self, step: int) -> list[int]:
        """Sampler indices of the step's training episodes."""
        return list(self.cfg.step_episodes(step))

    def _train_batch(self, step: int, index: int) -> EpisodeBatch:
        cfg = self.cfg
        if self.workers == 0:
            return load_episode(self.source, self.samplers["train"].episode(index), self.ctx.seed, "train",
                                cfg.k_shot, cfg.num_aug, self.full_triplets)
        if self._batches is None or self._order[self._position] != index:  # first step, a retry, or a resume
            # this rank's episodes from this step to the end, as the steps take them
            self._order = [i for s in range(step, self.total_steps() + 1) for i in self.my_share(self._step_indices(s))]
            self._position = 0
            dataset = TrainEpisodes(self.source, self.samplers["train"], self._order, cfg, self.full_triplets,
                                    self.ctx.seed)
            self._batches = iter(DataLoader(dataset, batch_size=None, num_workers=self.workers,
                                            collate_fn=_as_is, worker_init_fn=_worker_cache,
                                            pin_memory=self.ctx.device.type == "cuda"))
        batch = next(self._batches)
        self._position += 1
        if self._position == len(self._order):
            self._batches = None  # let the workers go
        return batch

    def _threads(self) -> AbstractContextManager:
        # this model's tensors are small: on CPU, intra-op threads mostly synchronise (a cpu-preset step took
        # 6.8 s on two busy cores with 2 threads, 0.85 s with 1); other devices are left alone
        return one_thread() if self.ctx.device.type == "cpu" else nullcontext()

    def train_step(self, step: int) -> dict[str, float]:
        with self._threads():
            return self._train_step(step)

    def _train_step(self, step: int) -> dict[str, float]:
        """The step's episodes (one by default); after an OOM back-off, each in `accumulation` micro-steps of
        contiguous runs of clips and triplets (slices, so shapes never depend on the data); data-parallel, each
        rank takes its share of the episodes."""
        ratio, indices = self.cfg.triplet_ratio, self._step_indices(step)
        cache: dict[str, float] = {}
        self.optimizer.zero_grad(set_to_none=True)
        with self.accumulate(step, parts=len(indices)) as grads:
            for j in grads.parts():
                batch = self._train_batch(step, indices[j])
                cache.update(batch.cache)
                support = to_input(batch.support, self.ctx.device)
                chunks = zip(np.array_split(np.arange(len(batch.clip_frames)), self.accumulation),
                             np.array_split(np.arange(len(batch.triplets)), self.accumulation), strict=True)
                chunks = [(c, t) for c, t in chunks if len(c) or (len(t) and ratio > 0)]
                for clips, triplets in grads.micro_steps(chunks):
                    loss, figures = self._loss(batch, support, clips, triplets, 1.0 / len(indices))
                    grads.backward(loss, **figures)
        self.optimizer.step()
        self.scheduler.step()
        loc_total, triplet_total = grads.sums["loc"], grads.sums["triplet"]
        figures = {"loss": (1 - ratio) * loc_total + ratio * triplet_total, "loc_loss": loc_total,
                   "triplet_loss": triplet_total, "lr": self.scheduler.get_last_lr()[0]}
        figures.update(cache)  # this rank's frame cache
        return figures

    def _loss(self, batch: EpisodeBatch, support: torch.Tensor, clips: np.ndarray, triplets: np.ndarray,
              weight: float) -> tuple[torch.Tensor, dict[str, float]]:
        """A micro-step's loss, (1 - r) x localisation on the clips `clips` + r x triplet on the triplets
        `triplets`, each weighted by its share of the episode and the episode by `weight`; and those two terms."""
        device, ratio = self.ctx.device, self.cfg.triplet_ratio
        starts = np.concatenate([[0], np.cumsum(batch.clip_frames)])
        n_clips, n_triplets = len(batch.clip_frames), len(batch.triplets)
        loss = torch.zeros((), device=device)
        figures = {"loc": 0.0, "triplet": 0.0}
        first, last = (int(starts[clips[0]]), int(starts[clips[-1] + 1])) if len(clips) else (0, 0)
        frames = to_input(batch.frames[first:last], device) if len(clips) else None
        images = (to_input(batch.triplets[int(triplets[0]): int(triplets[-1]) + 1], device)
                  if len(triplets) and ratio > 0 else None)
        # the support's prototypes again per micro-step: each backward frees its graph
        located, embeddings = self.ddp_or_model(support, frames, batch.frame_label[first:last].to(device), images)
        if located is not None:
            logits, boxes = located
            loc = localisation_loss(logits, boxes, batch.boxes[first:last].to(device), self.model.stride)
            loss = loss + (1 - ratio) * loc * len(clips) / n_clips * weight
            figures["loc"] = loc.item() * len(clips) / n_clips * weight
        if embeddings is not None:
            trip = self.triplet_loss(embeddings[:, 0], embeddings[:, 1], embeddings[:, 2])
            loss = loss + ratio * trip * len(triplets) / n_triplets * weight
            figures["triplet"] = trip.item() * len(triplets) / n_triplets * weight
        return loss, figures

    def evaluate(self, phase: str, step: int) -> dict[str, float]:
        with self._threads():
            return self._evaluate(phase, step)

    def _evaluate(self, phase: str, step: int) -> dict[str, float]:
        cfg, device = self.cfg, self.ctx.device
        episodes = cfg.val_episodes if phase == "val" else cfg.test_episodes
        sampler = self.samplers["val" if phase == "val" else "test"]
        # running sums and fixed-size histograms only: nothing here outlives this call
        clip_st_iou, centre_st_iou, frame_st_iou, box_ap = RunningMean(), RunningMean(), RunningMean(), BoxAP()
        size = cfg.image_size
        for index in range(episodes):
            batch = load_episode(self.source, sampler.episode(index), self.ctx.seed, phase, cfg.k_shot)
            prototypes = self.model.prototypes(to_input(batch.support, device))
            first = 0
            for length in batch.clip_frames:
                frames = slice(first, first + length)
                first += length
                pred, scores = self._clip_boxes(batch, prototypes, frames, phase, step)
                gt = batch.boxes[frames].numpy()
                box_ap.add(scores, pred, gt)
                clip_st_iou.add(st_iou(np.where((scores >= cfg.score_threshold)[:, None], pred, np.nan), gt))
                if phase == "test":
                    centre, whole = baseline_boxes(gt, size)
                    centre_st_iou.add(st_iou(centre, gt))
                    frame_st_iou.add(st_iou(whole, gt))
        metrics = {"st_iou": clip_st_iou.mean, "st_iou_ci95": clip_st_iou.ci95, "box_ap50": box_ap.value()}
        metrics.update(self.cache.stats())
        if phase == "test":
            metrics.update(test_episodes=float(episodes), st_iou_centre_box=centre_st_iou.mean,
                           st_iou_whole_frame=frame_st_iou.mean)
        return metrics

    def _clip_boxes(self, batch: EpisodeBatch, prototypes: torch.Tensor, frames: slice, phase: str, step: int
                    ) -> tuple[np.ndarray, np.ndarray]:
        """Each frame's best box (T x 4) and its score (T) for one clip, `eval_frames` frames at a time (each
        frame is scored on its own, so the count never changes a box)."""
        device, pred, scores = self.ctx.device, [], []

        def part(start: int) -> tuple[np.ndarray, np.ndarray]:
            chosen = slice(start, min(start + self.cfg.eval_frames, frames.stop))
            logits, boxes = self.model.localise(to_input(batch.frames[chosen], device),
                                                prototypes[batch.frame_label[chosen].to(device)])
            best, score = best_boxes(logits, boxes, self.cfg.image_size)
            return best.cpu().numpy(), score.cpu().numpy()

        start = frames.start
        while start < frames.stop:
            best, score = evaluation_part(self, phase, step, "eval_frames", lambda s=start: part(s))
            pred.append(best)
            scores.append(score)
            start += len(score)
        return np.concatenate(pred), np.concatenate(scores)

    def finish(self, metrics: dict[str, float]) -> dict[str, float]:
        self._batches = None
        return metrics

    def plan_extra_bytes(self) -> dict[str, dict[str, int]]:
        """The frame cache at its bound and the prefetched episodes, which tracing the step does not see."""
        cfg = self.cfg
        cache = min(cfg.frame_cache_size * frame_bytes(cfg.image_size), cfg.frame_cache_mb * MiB)
        frames = cfg.n_way * cfg.n_query * cfg.clip_frames
        images = cfg.n_way * cfg.k_shot * (1 + cfg.num_aug) + 3 * cfg.triplet_batch_size
        episode = (frames + images) * frame_bytes(cfg.image_size)
        prefetched = cfg.workers * 2 * episode  # DataLoader's default prefetch_factor is 2 per worker
        train = {"frame_cache": cache, "episode_uint8": episode}
        if prefetched:
            train["prefetched_episodes"] = prefetched
        return {"train": train}

    def plan_notes(self) -> dict[str, dict[str, str]]:
        cfg = self.cfg
        return {"train": {"frame_cache": f"{cfg.frame_cache_size} frames or {cfg.frame_cache_mb} MiB at most",
                          "episode_uint8": "the episode being trained on",
                          "prefetched_episodes": f"{cfg.workers} workers x 2 episodes"}}


def baseline_boxes(gt: np.ndarray, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Trivial per-frame predictions for a clip: a centred box of the clip's mean true box size (an oracle size,
    so the strongest centred box), and the whole frame; both in every frame."""
    present = ~np.isnan(gt).any(1)
    if present.any():
        width = float(np.mean(gt[present, 2] - gt[present, 0]))
        height = float(np.mean(gt[present, 3] - gt[present, 1]))
    else:
        width = height = image_size / 2
    c = image_size / 2
    centre = np.tile([c - width / 2, c - height / 2, c + width / 2, c + height / 2], (len(gt), 1))
    whole = np.tile([0.0, 0.0, float(image_size), float(image_size)], (len(gt), 1))
    return centre.astype(np.float32), whole.astype(np.float32)
