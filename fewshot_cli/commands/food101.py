"""`fewshot classify-food101`: supervised Food-101 classification that fits an Apple-silicon memory budget."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from fewshot_cli.commands.food101_config import COMMAND as COMMAND
from fewshot_cli.commands.food101_config import PRESETS as PRESETS
from fewshot_cli.commands.food101_config import Food101Config, apply_mps_env
from fewshot_cli.data.food101 import (
    EvalSamples,
    FoodImages,
    StepBatches,
    TrainSamples,
    check_files,
    check_layout,
    eval_transform,
    food101_split,
    stratified_subset,
    synthetic_split,
    train_transform,
)
from fewshot_cli.errors import BadInput
from fewshot_cli.memory.measure import empty_cache
from fewshot_cli.models.classifiers import build_classifier, head_first_groups
from fewshot_cli.runner.backoff import evaluation_part
from fewshot_cli.runner.checkpoint import atomic_write_bytes, atomic_write_file
from fewshot_cli.runner.precision import autocast, autocast_dtype, grad_scaler
from fewshot_cli.runner.schedule import warmup_cosine
from fewshot_cli.runner.task import BackoffKnob, RunContext, Task

PREFETCH_FACTOR = 2


class Food101Task(Task):
    """Train a torchvision classifier on Food-101's train split; top-1 / top-5 on its test split every epoch."""

    backoff_knobs = (BackoffKnob("batch_size", floor=1),)
    sync_batchnorm = True  # data-parallel on CUDA: BatchNorm over the whole batch, as in one process

    def __init__(self, cfg: Food101Config, ctx: RunContext) -> None:
        super().__init__(cfg, ctx)
        apply_mps_env(cfg)  # a no-op when the CLI already did it before torch touched MPS
        self.device = ctx.device
        self.train_split, self.test_split = self._splits(cfg, ctx)
        self.train_indices = self._choose(self.train_split, cfg.dev_samples, "train")
        self.test_indices = self._choose(self.test_split, math.ceil(cfg.dev_samples / 3), "test")
        check_files(self.train_split, self.train_indices, "train")
        check_files(self.test_split, self.test_indices, "test")
        self.classes = self.train_split.classes
        # the effective batch survives OOM back-off: cfg.batch_size becomes the micro-batch
        self.effective_batch = cfg.batch_size
        if cfg.eval_batch_size is None:
            cfg.eval_batch_size = cfg.batch_size
        group = ctx.distributed
        if group is not None and self.effective_batch % group.world_size:
            raise BadInput(f"--batch-size {self.effective_batch} does not split evenly over the {group.world_size} "
                           f"processes that share each batch; make it a multiple of {group.world_size}.")
        self.steps_per_epoch = max(1, len(self.train_indices) // self.effective_batch)
        # images in each step's batch (over all ranks): fewer than a batch only when the split is
        self.batch_images = min(self.effective_batch, len(self.train_indices))

        # preprocessing keeps its own resize and augmentation at --image-size (training needs them); its
        # normalisation is ImageNet's mean/std, the one every torchvision classification weight's transforms() uses
        self.model, weights = build_classifier(cfg.model, len(self.classes), cfg.weights, cfg.freeze_backbone,
                                               ctx.emit, cfg.weights_strict)
        self.model.to(self.device)
        self.loaded_weights = (weights.record,) if weights is not None else ()
        if self.device.type == "cuda":
            self.model.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.AdamW(head_first_groups(self.model, cfg.lr, cfg.lr_backbone),
                                           weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(
            self.total_steps(), warmup=max(1, round(0.05 * self.total_steps()))))
        self.amp_dtype = autocast_dtype(self.device, cfg.amp)
        self.scaler = grad_scaler(self.device, self.amp_dtype)
        self.cache_every = cfg.empty_cache_every if cfg.empty_cache_every is not None else (
            10 if self.device.type == "mps" else 0)
        self.best_top1 = -1.0
        self.pairs: Counter = Counter()  # (true, predicted) class index -> test images, at the last test
        self._loader: Iterator | None = None
        self._next_step = 0
        self._last: tuple[int, torch.Tensor, torch.Tensor] | None = None
        ctx.emit("dataset", source=str(ctx.data) if ctx.data else "built-in", classes=len(self.classes),
                 train_images=len(self.train_indices), test_images=len(self.test_indices),
                 steps_per_epoch=self.steps_per_epoch)

    @staticmethod
    def _splits(cfg: Food101Config, ctx: RunContext) -> tuple[FoodImages, FoodImages]:
        if ctx.data is None:
            return tuple(synthetic_split(cfg.synthetic_classes, cfg.image_size, ctx.seed, split)
                         for split in ("train", "test"))
        root = Path(ctx.data)
        check_layout(root)
        return food101_split(root, "train"), food101_split(root, "test")

    def _choose(self, split: FoodImages, per_class: int, name: str) -> list[int]:
        if not per_class:
            return list(range(len(split)))
        return stratified_subset(split.labels, per_class, self.ctx.seed, name)

    def total_steps(self) -> int:
        return self.cfg.epochs * self.steps_per_epoch

    def validate_now(self, step: int) -> bool:
        if step >= self.total_steps():
            return False  # the final test evaluation scores the last epoch
        if self.cfg.val_every:
            return step % self.cfg.val_every == 0
        return step % self.steps_per_epoch == 0

    def _batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Step `step`'s batch; a resumed or retried step starts a fresh loader at that step."""
        if self._last is not None and self._last[0] == step:
            return self._last[1], self._last[2]  # an OOM retry of the same step
        if self._loader is None or self._next_step != step:
            group = self.ctx.distributed
            batches = StepBatches(self.train_indices, self.effective_batch, self.ctx.seed, step,
                                  max(step, self.total_steps()), *((group.rank, group.world_size) if group else ()))
            self._loader = iter(self._data_loader(TrainSamples(self.train_split, train_transform(
                self.cfg.image_size)), batch_sampler=batches))
        images, labels = next(self._loader)
        self._next_step = step + 1
        self._last = (step, images, labels)
        return images, labels

    def _data_loader(self, dataset: torch.utils.data.Dataset, **kwargs: Any) -> DataLoader:
        workers = self.workers
        # its own generator: starting a loader must not draw from the global stream the runner seeds per step
        return DataLoader(dataset, num_workers=workers, pin_memory=self.device.type == "cuda",
                          prefetch_factor=PREFETCH_FACTOR if workers else None,
                          generator=torch.Generator().manual_seed(self.ctx.seed), **kwargs)

    def _to_device(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def _optimise(self, step: int, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """One optimiser step on a batch, as micro-batches of cfg.batch_size when back-off has shrunk it.
        Data-parallel, `images` are this rank's share of the batch (one part of the step per rank)."""
        group = self.ctx.distributed
        self.optimizer.zero_grad(set_to_none=True)
        with self.accumulate(step, parts=group.world_size if group is not None else 1) as grads:
            for _ in grads.parts():  # this rank's share of the batch, the part it loaded
                micro_batches = list(zip(images.split(self.cfg.batch_size), labels.split(self.cfg.batch_size),
                                         strict=True))
                for x, y in grads.micro_steps(micro_batches):
                    x, y = self._to_device(x), y.to(self.device, non_blocking=True)
                    with autocast(self.device.type, self.amp_dtype):
                        logits = self.ddp_or_model(x)
                        loss = F.cross_entropy(logits, y)
                    share = len(y) / self.batch_images  # so the accumulated gradient is the whole batch's mean
                    grads.backward(self.scaler.scale(loss * share), loss=float(loss.detach().float() * share),
                                   correct=int((logits.detach().argmax(1) == y).sum()))
        self.scaler.step(self.optimizer)  # DistributedDataParallel summed the gradients: every rank steps alike
        self.scaler.update()
        self.scheduler.step()
        return grads.sums

    def train_step(self, step: int) -> dict[str, float]:
        images, labels = self._batch(step)
        out = self._optimise(step, images, labels)
        if self.cache_every and step % self.cache_every == 0:
            empty_cache(self.device)
        return {"loss": out["loss"], "train_top1": out["correct"] / self.batch_images,
                "lr": self.optimizer.param_groups[0]["lr"]}

    def _score(self, images: torch.Tensor, labels: torch.Tensor, pairs: Counter | None = None
               ) -> tuple[int, int, int]:
        """(top-1 hits, top-5 hits, images) of one evaluation batch; counts (true, predicted) into `pairs` when
        given."""
        y = labels.to(self.device)
        with autocast(self.device.type, self.amp_dtype):
            logits = self.model(self._to_device(images))
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == y[:, None]
        if pairs is not None:
            pairs.update(zip(y.tolist(), top[:, 0].tolist(), strict=True))
        return int(hits[:, 0].sum()), int(hits.any(dim=1).sum()), len(y)

    def _score_from(self, images: torch.Tensor, labels: torch.Tensor, start: int, pairs: Counter | None = None
                    ) -> tuple[int, int, int]:
        end = start + self.cfg.eval_batch_size
        return self._score(images[start:end], labels[start:end], pairs)

    def evaluate(self, phase: str, step: int) -> dict[str, float]:
        # data-parallel, each rank scores every N-th test image; the hit counts add up exactly
        indices = self.my_share(self.test_indices)
        samples = EvalSamples(self.test_split, indices, eval_transform(self.cfg.image_size))
        top1 = top5 = 0
        pairs: Counter | None = Counter() if phase == "test" else None
        if indices:
            for images, labels in self._data_loader(samples, batch_size=self.cfg.eval_batch_size):
                done = 0
                while done < len(labels):  # after an OOM back-off, the loaded batch in smaller pieces
                    hits1, hits5, n = evaluation_part(self, phase, step, "eval_batch_size",
                                                      partial(self._score_from, images, labels, done, pairs))
                    top1, top5, done = top1 + hits1, top5 + hits5, done + n
        if self.cache_every:
            empty_cache(self.device)
        hits = self.all_sum({"top1": top1, "top5": top5})
        if pairs is not None:  # data-parallel, each rank counted its share of the test images
            group = self.ctx.distributed
            self.pairs = sum(group.gather(pairs), Counter()) if group is not None else pairs
        metrics = {"top1": hits["top1"] / len(self.test_indices), "top5": hits["top5"] / len(self.test_indices)}
        if metrics["top1"] > self.best_top1:
            self.best_top1 = metrics["top1"]
            self._save_model(step, metrics)
        return metrics

    def _save_model(self, step: int, metrics: dict[str, float]) -> None:
        """The best model so far as `model.pt` (the torchvision network's state dict and what it classifies) and as
        `model.safetensors` (the same tensors, the rest as metadata), which loads without unpickling anything."""
        if self.ctx.run_dir is None:
            return
        from safetensors.torch import save_file  # only a finished run exports its model

        path = Path(self.ctx.run_dir) / "model.pt"
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.net.state_dict().items()}
        about = {"model_name": self.cfg.model, "classes": self.classes, "image_size": self.cfg.image_size,
                 "step": step, **metrics}
        # a reader never sees half a file
        atomic_write_bytes(path, lambda handle: torch.save({"model": state, **about}, handle))
        metadata = {k: json.dumps(v) for k, v in about.items()}
        atomic_write_file(path.with_suffix(".safetensors"), lambda name: save_file(state, name, metadata=metadata))

    def set_knob(self, name: str, value: int, accumulation: int) -> None:
        super().set_knob(name, value, accumulation)
        self.ctx.emit("micro_batch", batch_size=self.effective_batch, micro_batch=value,
                      micro_batches=math.ceil(self.effective_batch / value))

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(best_top1=self.best_top1, effective_batch=self.effective_batch)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.best_top1 = state["best_top1"]
        if state["effective_batch"] != self.effective_batch:
            raise BadInput(f"The checkpoint was trained with batches of {state['effective_batch']}; "
                           f"resume it with --batch-size {state['effective_batch']}.")
        self._loader, self._last = None, None

    def finish(self, metrics: dict[str, float]) -> dict[str, float]:
        """The best top-1 among the evaluations; confusion.csv/.png and per_class.csv of the final test."""
        from fewshot_cli.reports.confusion import write_confusion  # matplotlib loads only for the reports

        self._loader = None  # stops the worker processes
        if self.ctx.run_dir is not None:
            named = Counter({(self.classes[t], self.classes[p]): n for (t, p), n in self.pairs.items()})
            write_confusion(Path(self.ctx.run_dir), named, self.classes)
        return {**metrics, "best_top1": self.best_top1}

    def plan_phases(self) -> dict[str, Callable[[], Any]]:
        """The real step (`_optimise`) and the real scoring of a test batch (`_score`), each on a batch of zeros of the
        run's shape: the loaded batch goes through torchvision's v2 transforms, whose `tv_tensors.Image` cannot wrap a
        fake tensor (torch raises "Creating a new Tensor subclass Image ..."); tests/test_food101.py fails once it
        can, and then these two lambdas give way to `train_step(1)` and the test loader's first batch. A split smaller
        than a batch (a --dev-samples run) makes every batch that split: the plan traces what is loaded."""
        def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
            size = self.cfg.image_size
            return torch.zeros(n, 3, size, size), torch.zeros(n, dtype=torch.long)

        # the planner puts the model in eval mode under inference_mode for the test, as the runner does
        return {"train": lambda: self._optimise(1, *batch(self.batch_images)),
                "test": lambda: self._score(*batch(min(self.cfg.eval_batch_size, len(self.test_indices))))}

    def plan_extra_bytes(self) -> dict[str, dict[str, int]]:
        """Batches the loader's workers hold ready in host memory (the same pool as the GPU's on Apple silicon), and
        in evaluation the last training batch, kept for an OOM retry of its step (`_batch`)."""
        size = self.cfg.image_size
        batch_bytes = self.batch_images * 3 * size * size * 4
        prefetch = self.cfg.workers * PREFETCH_FACTOR * batch_bytes
        loader = {"loader_prefetch": prefetch} if prefetch else {}
        return {"train": loader, "test": {**loader, "kept_train_batch": batch_bytes}}

    def plan_notes(self) -> dict[str, dict[str, str]]:
        prefetch = {"loader_prefetch": f"{self.cfg.workers} workers x {PREFETCH_FACTOR} batches"}
        return {"train": prefetch, "test": {**prefetch, "kept_train_batch": "for an OOM retry of its step"}}
