"""The seed's validation loop (lists of arrays kept across validations) against `triplet-train`'s, side by side:
process RSS and tracemalloc-traced memory after each validation.

    .venv/bin/python benchmarks/triplet_memory.py [--validations 8] [--val-episodes 4] [--n-query 4]
"""

from __future__ import annotations

import argparse
import gc
import tracemalloc
from collections import defaultdict

import numpy as np
import psutil
import torch

from fewshot_cli.commands.triplet import PRESETS, TripletConfig, TripletTask, st_iou, to_input
from fewshot_cli.data.clips import load_episode
from fewshot_cli.models.localiser import best_boxes
from fewshot_cli.runner.task import RunContext

MiB = 2**20


def validate_seed_way(task: TripletTask, store: dict[str, list]) -> dict[str, float]:
    """The seed's loop: every prediction, target and dense map appended to lists that live on the trainer."""
    cfg, device = task.cfg, task.ctx.device
    for index in range(cfg.val_episodes):
        batch = load_episode(task.source, task.samplers["val"].episode(index), task.ctx.seed, "val", cfg.k_shot)
        prototypes = task.model.prototypes(to_input(batch.support, device))
        first = 0
        for length in batch.clip_frames:
            frames = slice(first, first + length)
            first += length
            logits, boxes = task.model.localise(to_input(batch.frames[frames], device),
                                                prototypes[batch.frame_label[frames]])
            pred, scores = best_boxes(logits, boxes, cfg.image_size)
            gt = batch.boxes[frames].numpy()
            store["all_pred_maps"].append(boxes.cpu().numpy().copy())
            store["all_pred_scores"].append(torch.sigmoid(logits).cpu().numpy().copy())
            store["all_pred_bboxes"].append(pred.cpu().numpy().copy())
            store["all_gt_bboxes"].append(gt.copy())
            keep = (scores >= cfg.score_threshold).cpu().numpy()[:, None]
            store["all_st_ious"].append(st_iou(np.where(keep, pred.cpu().numpy(), np.nan), gt))
    # the seed flattened everything again to score it, and kept the flat copies too
    store["all_pred_bboxes_flat"].append(np.concatenate(store["all_pred_bboxes"]))
    store["all_gt_bboxes_flat"].append(np.concatenate(store["all_gt_bboxes"]))
    return {"st_iou": float(np.mean(store["all_st_ious"]))}


def measure(label: str, validate, validations: int) -> list[tuple[float, float]]:
    process = psutil.Process()
    figures = []
    for _ in range(validations):
        with torch.inference_mode():
            validate()
        gc.collect()
        figures.append((process.memory_info().rss / MiB, tracemalloc.get_traced_memory()[0] / MiB))
    print(f"  {label}: done", flush=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--validations", type=int, default=8)
    parser.add_argument("--val-episodes", type=int, default=4)
    parser.add_argument("--n-query", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steady on busy cores)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = TripletConfig(**dict(PRESETS["cpu"], val_episodes=args.val_episodes, n_query=args.n_query))
    torch.manual_seed(0)
    task = TripletTask(cfg, RunContext(torch.device("cpu"), 0, None))
    task.model.eval()
    print(f"{args.validations} validations of {cfg.val_episodes} episodes, {cfg.n_way}-way {cfg.n_query}-query, "
          f"{cfg.clip_frames} frames/clip at {cfg.image_size}px (cpu preset otherwise)", flush=True)
    with torch.inference_mode():
        task.evaluate("val", 0)  # warm-up: imports, allocator pools and the frame cache, for both loops alike
    tracemalloc.start()
    ours = measure("ours (running sums, nothing kept)", lambda: task.evaluate("val", 0), args.validations)
    store: dict[str, list] = defaultdict(list)
    seed = measure("seed's way (lists kept across validations)", lambda: validate_seed_way(task, store),
                   args.validations)
    tracemalloc.stop()
    print(f"\n{'validation':>10} | {'ours RSS MiB':>12} {'ours traced MiB':>15} | {'seed RSS MiB':>12} "
          f"{'seed traced MiB':>15}")
    for i, ((o_rss, o_traced), (s_rss, s_traced)) in enumerate(zip(ours, seed, strict=True), start=1):
        print(f"{i:>10} | {o_rss:>12.1f} {o_traced:>15.2f} | {s_rss:>12.1f} {s_traced:>15.2f}")
    print(f"\ngrowth from validation 1 to {args.validations}: ours {ours[-1][0] - ours[0][0]:+.1f} MiB RSS, "
          f"{ours[-1][1] - ours[0][1]:+.2f} MiB traced; seed's way {seed[-1][0] - seed[0][0]:+.1f} MiB RSS, "
          f"{seed[-1][1] - seed[0][1]:+.2f} MiB traced")
    per_validation = (seed[-1][1] - seed[0][1]) / max(args.validations - 1, 1)
    print(f"seed's way keeps {per_validation:.2f} MiB per validation: 150 epochs would hold "
          f"{150 * per_validation / 1024:.2f} GiB at this size")


if __name__ == "__main__":
    main()
