"""embed-classify: training-free few-shot classification by cosine to class prototypes of frozen backbone
embeddings, with an Unknown threshold; extraction streamed into a resumable on-disk store."""

from __future__ import annotations

import csv
import os
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from fewshot_cli.commands.embed_config import COMMAND as COMMAND
from fewshot_cli.commands.embed_config import PRESETS as PRESETS
from fewshot_cli.commands.embed_config import EmbedConfig
from fewshot_cli.data.embed_layout import UNKNOWN, EmbedData, ImageRef, scan, write_synthetic
from fewshot_cli.data.embedding_store import EmbeddingStore, FileKey, extract
from fewshot_cli.errors import BadInput, RunFailed
from fewshot_cli.memory.measure import probe
from fewshot_cli.models.embedders import build_embedder
from fewshot_cli.models.frozen_heads import FrozenHead, build_frozen_head, l2_normalise, prototypes
from fewshot_cli.reports.embedding import MAX_POINTS
from fewshot_cli.reports.files import write_csv
from fewshot_cli.reports.open_set import OpenSetScores, unknown_auroc
from fewshot_cli.runner.backoff import evaluation_part
from fewshot_cli.runner.checkpoint import atomic_write_bytes
from fewshot_cli.runner.evaluation import EvaluationTask
from fewshot_cli.runner.metrics import RunningMean
from fewshot_cli.runner.task import RunContext

QUERY_CHUNK = 1024  # queries scored at once: bounds memory whatever the number of queries


def parse_threshold(text: str) -> float | None:
    """None for auto, else the cosine threshold; `none` is -2, below every cosine (no query is Unknown)."""
    word = str(text).strip().lower()
    if word == "auto":
        return None
    if word == "none":
        return -2.0
    try:
        return float(text)
    except ValueError:
        raise BadInput(f"--threshold must be a number, auto or none, not {text!r}.") from None


def leave_one_out_threshold(support_by_class: list[np.ndarray]) -> float:
    """The cosine threshold that best balances, over the support set, accepting a shot correctly by the
    prototype of its class built without it, and rejecting a shot when its whole class is left out."""
    protos = prototypes(support_by_class)
    genuine, genuine_ok, impostor = [], [], []
    for c, emb in enumerate(support_by_class):
        e = l2_normalise(emb)
        others = np.delete(protos, c, axis=0)
        best_other = (e @ others.T).max(axis=1) if len(others) else None
        if best_other is not None:
            impostor.extend(best_other.tolist())
        if len(e) >= 2:
            loo = l2_normalise(e.sum(axis=0, keepdims=True) - e)  # row i: the prototype without shot i
            own = (e * loo).sum(axis=1)
            genuine.extend(own.tolist())
            genuine_ok.extend((own > best_other).tolist() if best_other is not None else [True] * len(own))
    if not genuine and not impostor:
        return -1.0  # one single-shot class: nothing to calibrate on, so reject nothing
    g, ok, imp = np.asarray(genuine), np.asarray(genuine_ok, dtype=bool), np.asarray(impostor)
    values = np.unique(np.concatenate([g, imp]))
    candidates = np.concatenate([[values[0] - 1e-6], (values[:-1] + values[1:]) / 2, [values[-1] + 1e-6]])
    objective = np.zeros(len(candidates))
    if len(g):
        objective += ((g[None, :] >= candidates[:, None]) & ok[None, :]).mean(axis=1)
    if len(imp):
        objective += (imp[None, :] < candidates[:, None]).mean(axis=1)
    best = np.flatnonzero(objective == objective.max())
    return float(candidates[best[len(best) // 2]])


def classify(queries: np.ndarray, protos: np.ndarray, head: FrozenHead, threshold: float
             ) -> tuple[np.ndarray, ...]:
    """Per query: the head's class index, the best cosine to a prototype (the open-set score the threshold
    reads, whatever the head), the margin of the head's best score over its runner-up (NaN with one class),
    accepted."""
    best = (l2_normalise(queries) @ protos.T).max(axis=1)
    scores = head.scores(queries)
    order = np.argsort(-scores, axis=1, kind="stable")
    nearest = order[:, 0]
    top1 = scores[np.arange(len(scores)), nearest]
    top2 = scores[np.arange(len(scores)), order[:, 1]] if protos.shape[0] > 1 else np.full(len(scores), np.nan)
    return nearest, best, top1 - top2, best >= threshold


def _fmt(x: float) -> str:
    return "" if np.isnan(x) else f"{x:.6f}"


class EmbedTask(EvaluationTask):
    """Extract (streamed, cached) -> prototypes -> cosine with an Unknown threshold; the embedding store, not a
    checkpoint, is what `--resume` continues from."""

    def __init__(self, cfg: EmbedConfig, ctx: RunContext) -> None:
        super().__init__(cfg, ctx)
        self.threshold = parse_threshold(cfg.threshold)
        self.data: EmbedData | None = scan(Path(ctx.data)) if ctx.data else None
        self.model = build_embedder(cfg.backbone, cfg.weights, cfg.model, cfg.image_size, ctx.emit,
                                    cfg.weights_strict, random_weights=ctx.random_weights).to(ctx.device)
        self.loaded_weights = (self.model.loaded,) if self.model.loaded else ()
        self.model.eval()
        self._scratch: tempfile.TemporaryDirectory | None = None
        self.table: dict[str, Counter] = {}
        self.classes: list[str] = []
        self.unreadable: list[tuple[str, str]] = []
        self.predictions_part: Path | None = None

    #: libraries scoring imports lazily (AUROC, the frozen heads): scikit-learn's metrics and scipy add ~100 MiB
    #: to the resident set (measured here), so the planner loads them before reading its start-up baseline
    plan_libraries = ("sklearn.metrics", "sklearn.linear_model", "sklearn.neighbors")

    def plan_phases(self) -> dict[str, Callable[[], Any]]:
        """The forward of one extraction batch (`extract`'s), on zeros of the batch's shape: `extract` copies each
        batch's vectors out with `.numpy()`, which torch does not support for a fake tensor ("not supported for
        tensor subclasses"); tests/test_embed.py fails once it does, and then the plan can trace `extract` itself."""
        side = self.model.preprocess(Image.new("RGB", (self.cfg.image_size,) * 2)).shape[-1]
        # the batch is made inside the step, so the plan counts it: it is live through the forward pass
        return {"test": lambda: self.model(torch.zeros(self.cfg.batch_size, 3, side, side, device=self.ctx.device))}

    def plan_extra_bytes(self) -> dict[str, dict[str, int]]:
        """Batches the loader's workers hold ready (DataLoader's default prefetch factor, 2 per worker)."""
        side = self.model.preprocess(Image.new("RGB", (self.cfg.image_size,) * 2)).shape[-1]
        prefetch = self.cfg.workers * 2 * self.cfg.batch_size * 3 * side * side * 4
        return {"test": {"loader_prefetch": prefetch}} if prefetch else {}

    def plan_notes(self) -> dict[str, dict[str, str]]:
        return {"test": {"loader_prefetch": f"{self.cfg.workers} workers x 2 batches"}}

    def _work_dir(self) -> Path:
        if self.ctx.run_dir is not None:
            return Path(self.ctx.run_dir)
        if self._scratch is None:
            self._scratch = tempfile.TemporaryDirectory(prefix="fewshot-embed-")
        return Path(self._scratch.name)

    def evaluate(self, phase: str, step: int) -> dict[str, float]:
        cfg, work = self.cfg, self._work_dir()
        data = self.data or scan(write_synthetic(work / "builtin-data", cfg.categories, cfg.n_way, cfg.k_shot,
                                                 cfg.n_query, cfg.image_size, self.ctx.seed))
        store = EmbeddingStore(Path(cfg.cache_dir) if cfg.cache_dir else work / "embeddings", self.model.identity)
        try:
            self.unreadable = []
            paths = sorted({ref.path for ref in (*data.support, *data.queries)})
            # after an OOM back-off the store already holds what was extracted: the retry goes on from there
            report = evaluation_part(self, phase, step, "batch_size", lambda: extract(
                self.model, paths, store, self.ctx.device, cfg.batch_size, cfg.workers, on_batch=self._on_batch,
                on_failure=self._on_failure))
            self.ctx.emit("extraction", extracted=report.extracted, cached=report.cached,
                          unreadable=report.unreadable, store=str(store.dir))
            return self._score(data, store, report)
        finally:
            store.close()

    def _on_batch(self, done: int, total: int) -> None:
        self.ctx.emit("extract", phase="extract", images=done, of=total, mem=probe(self.ctx.device))
        if self.ctx.guard is not None:  # an out-of-memory error here backs the extraction off
            self.ctx.guard.check("test", "embedding extraction")

    def _on_failure(self, path: str, error: str) -> None:
        self.unreadable.append((path, error))
        self.ctx.emit("unreadable_image", path=path, error=error)

    def _rows(self, store: EmbeddingStore, refs: list[ImageRef]) -> tuple[list[ImageRef], list[int]]:
        kept, rows = [], []
        for ref in refs:
            entry = store.lookup(FileKey.of(ref.path))
            if entry is not None and "row" in entry:
                kept.append(ref)
                rows.append(entry["row"])
        return kept, rows

    def _score(self, data: EmbedData, store: EmbeddingStore, report: Any) -> dict[str, float]:
        by_class: dict[str, list[int]] = {}
        for ref in data.support:
            by_class.setdefault(ref.label, [])
        kept, rows = self._rows(store, list(data.support))
        for ref, row in zip(kept, rows, strict=True):
            by_class[ref.label].append(row)
        for name in sorted(c for c, r in by_class.items() if not r):
            self.ctx.emit("class_without_support", **{"class": name})
            del by_class[name]
        if not by_class:
            raise RunFailed("No support image could be read, so there is no class to classify into.")
        self.classes = sorted(by_class)
        support = [store.vectors(by_class[name]) for name in self.classes]
        protos = prototypes(support)
        head = build_frozen_head(self.cfg.head, self.cfg.neighbours, self.cfg.probe_c).fit(
            np.concatenate(support), np.repeat(np.arange(len(support)), [len(e) for e in support]), len(support))
        threshold = self.threshold if self.threshold is not None else leave_one_out_threshold(support)
        del support
        self.threshold_source = "auto" if self.threshold is None else "--threshold"
        self.ctx.emit("threshold", value=threshold, source="auto" if self.threshold is None else "cli")

        self.table = {category: Counter() for category in data.categories}
        per_category: dict[str, list[int]] = {category: [0, 0] for category in data.categories}  # correct, labelled
        unknown = scored = 0
        part = self._work_dir() / "predictions.csv.part"
        self.predictions_part = part
        queries = sorted(data.queries, key=lambda r: r.name)
        category_index = {category: i for i, category in enumerate(data.categories)}
        open_set: list[OpenSetScores] = []
        self.pairs: Counter = Counter()  # (true class, predicted) -> labelled queries
        drawn = self._plot_sample(queries)
        plotted: list[tuple[np.ndarray, list[str | None]]] = []
        with part.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(["path", "category", "predicted", "score", "margin", "nearest", "true_class"])
            for start in range(0, len(queries), QUERY_CHUNK):
                refs, rows = self._rows(store, queries[start:start + QUERY_CHUNK])
                if not refs:
                    continue
                vectors = store.vectors(rows)
                nearest, score, margin, accepted = classify(vectors, protos, head, threshold)
                open_set.append(OpenSetScores(
                    score, np.array([category_index[ref.category] for ref in refs]),
                    np.array([-1 if ref.label is None else int(ref.label != UNKNOWN) for ref in refs]),
                    np.array([self.classes[n] == ref.label for n, ref in zip(nearest, refs, strict=True)])))
                keep = [i for i, ref in enumerate(refs) if ref.name in drawn]
                if keep:
                    plotted.append((vectors[keep], [refs[i].label for i in keep]))
                for i, ref in enumerate(refs):
                    predicted = self.classes[nearest[i]] if accepted[i] else UNKNOWN
                    writer.writerow([ref.name, ref.category, predicted, _fmt(score[i]), _fmt(margin[i]),
                                     self.classes[nearest[i]], ref.label or ""])
                    self.table[ref.category][predicted] += 1
                    unknown += predicted == UNKNOWN
                    scored += 1
                    if ref.label is not None:
                        per_category[ref.category][0] += predicted == ref.label
                        per_category[ref.category][1] += 1
                        self.pairs[ref.label, predicted] += 1
        self.per_category = per_category
        self.open_set, self.used_threshold = OpenSetScores.concat(open_set), float(threshold)
        self.plotted = (np.concatenate([v for v, _ in plotted]) if plotted else np.zeros((0, 2)),
                        [label for _, labels in plotted for label in labels])
        has_label = self.open_set.truth >= 0
        auroc = unknown_auroc(self.open_set.score[has_label], self.open_set.truth[has_label] == 1)
        accuracy = RunningMean()  # an episode is one category: its labelled queries, scored together
        for correct, labelled in per_category.values():
            if labelled:
                accuracy.add(correct / labelled)
        return {"accuracy": accuracy.mean, "accuracy_ci95": accuracy.ci95,
                "unknown_rate": unknown / scored if scored else 0.0, "test_episodes": float(accuracy.count),
                "threshold": float(threshold), "queries": float(scored),
                "labelled_queries": float(sum(n for _, n in per_category.values())),
                "classes": float(len(self.classes)), "images_extracted": float(report.extracted),
                "images_cached": float(report.cached), "unreadable_images": float(report.unreadable),
                **({"unknown_auroc": auroc} if auroc is not None else {})}

    def _plot_sample(self, queries: list[ImageRef]) -> set[str]:
        """The queries --plots draws: all, or a seeded sample of MAX_POINTS (t-SNE grows with their square)."""
        if not self.cfg.plots:
            return set()
        if len(queries) <= MAX_POINTS:
            return {ref.name for ref in queries}
        picks = np.random.default_rng(self.ctx.seed).choice(len(queries), MAX_POINTS, replace=False)
        return {queries[i].name for i in picks}

    def _write_reports(self, run_dir: Path) -> None:
        """threshold_sweep.csv/.png, confusion.csv/.png, per_class.csv, and embedding.png with --plots."""
        # matplotlib loads only when a run writes its reports, not when the command is listed
        from fewshot_cli.reports.confusion import write_confusion
        from fewshot_cli.reports.embedding import write_embedding_plot
        from fewshot_cli.reports.open_set import write_sweep

        write_sweep(run_dir, self.open_set, self.used_threshold, self.threshold_source)
        truths = sorted({true for true, _ in self.pairs} - {UNKNOWN})
        write_confusion(run_dir, self.pairs, [*sorted(set(self.classes) | set(truths)), UNKNOWN])
        if self.cfg.plots:
            features, labels = self.plotted
            write_embedding_plot(run_dir / "embedding.png", l2_normalise(features), labels, UNKNOWN,
                                 self.cfg.embedding_plot, self.ctx.seed,
                                 f"embed-classify test queries, {self.cfg.backbone} backbone")

    def _per_category_rows(self) -> list[list[Any]]:
        """Per category its queries by predicted class, labelled and correct ones and its accuracy; a TOTAL row."""
        columns = [*self.classes, UNKNOWN]
        total: Counter = Counter()
        rows = []
        sum_correct = sum_labelled = 0
        for category in sorted(self.table):
            counts = self.table[category]
            correct, labelled = self.per_category[category]
            total.update(counts)
            sum_correct, sum_labelled = sum_correct + correct, sum_labelled + labelled
            rows.append([category, sum(counts.values()), *(counts[c] for c in columns), labelled, correct,
                         f"{correct / labelled:.6f}" if labelled else ""])
        rows.append(["TOTAL", sum(total.values()), *(total[c] for c in columns), sum_labelled, sum_correct,
                     f"{sum_correct / sum_labelled:.6f}" if sum_labelled else ""])
        return rows

    def finish(self, metrics: dict[str, float]) -> dict[str, float]:
        run_dir = self.ctx.run_dir
        if run_dir is None:
            return metrics
        run_dir = Path(run_dir)
        if self.predictions_part is not None and self.predictions_part.exists():
            os.replace(self.predictions_part, run_dir / "predictions.csv")
        write_csv(run_dir / "per_category.csv", ["category", "queries", *self.classes, UNKNOWN, "labelled", "correct",
                                                  "accuracy"], self._per_category_rows())
        text = "".join(f"{path}\t{error}\n" for path, error in sorted(self.unreadable))
        atomic_write_bytes(run_dir / "unreadable.txt", lambda handle: handle.write(text.encode("utf-8")))
        self._write_reports(run_dir)
        return metrics
