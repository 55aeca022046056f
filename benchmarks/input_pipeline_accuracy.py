"""Why input_pipeline.py's accuracies differ between fewshot and easyfsl: one backbone trained on the same episodes
with each side's logits, tested with BatchNorm's running statistics (eval mode, what both sides do) and with the
test images' own statistics, over several initialisation seeds.

    python benchmarks/input_pipeline_accuracy.py [--backbone resnet12] [--image-size 32] [--episodes 5]
        [--test-episodes 20] [--seeds 0,1,2]

Logits: fewshot's Euclidean head scores -squared distance, easyfsl's PrototypicalNetworks -distance (the same
ranking at test, a different gradient in training). Adam at 1e-3, 5-way 5-shot 15 queries, on the JPEG folder
input_pipeline.py writes, read by fewshot's reader on both sides (so the pixels are the same)."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from input_pipeline import K_SHOT, LR, N_QUERY, N_WAY, make_folder

from fewshot_cli.data.images import IMAGENET_MEAN, IMAGENET_STD
from fewshot_cli.data.splits import open_splits
from fewshot_cli.episodes import EpisodeSampler
from fewshot_cli.models.backbones import build_backbone
from fewshot_cli.models.heads import prototypes

MEAN, STD = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def logits(support: torch.Tensor, labels: torch.Tensor, query: torch.Tensor, squared: bool) -> torch.Tensor:
    distance = torch.cdist(query, prototypes(support, labels, N_WAY))
    return -distance.pow(2) if squared else -distance


def accuracy(features: dict[int, torch.Tensor], episodes: list) -> float:
    scores = []
    for e in episodes:
        (s_items, s_labels), (q_items, q_labels) = e.support_items(), e.query_items()
        support, query = torch.stack([features[i] for i in s_items]), torch.stack([features[i] for i in q_items])
        predicted = logits(support, torch.tensor(s_labels), query, True).argmax(1)
        scores.append(float((predicted == torch.tensor(q_labels)).float().mean()))
    return float(np.mean(scores))


def test_features(model: torch.nn.Module, images: dict[int, torch.Tensor], batch_stats: bool) -> dict:
    """Every test image's features, with BatchNorm's running statistics or with the test images' own."""
    model.train(batch_stats)
    items = sorted(images)
    with torch.no_grad():
        features = model((torch.stack([images[i] for i in items]) - MEAN) / STD)
    return dict(zip(items, features, strict=True))


def run(backbone: str, seed: int, squared: bool, train: list, test: list, images: dict, test_images: dict
        ) -> dict[str, float]:
    torch.manual_seed(seed)
    model = build_backbone(backbone).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    for e in train:
        model.train()
        (s_items, s_labels), (q_items, q_labels) = e.support_items(), e.query_items()
        support = model((torch.stack([images[i] for i in s_items]) - MEAN) / STD)
        query = model((torch.stack([images[i] for i in q_items]) - MEAN) / STD)
        loss = F.cross_entropy(logits(support, torch.tensor(s_labels), query, squared), torch.tensor(q_labels))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {"eval": accuracy(test_features(model, test_images, False), test),
            "batch": accuracy(test_features(model, test_images, True), test)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet12")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--episodes", type=int, default=5)
    parser.add_argument("--test-episodes", type=int, default=20)
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = open_splits(make_folder(Path(tmp), 16, 30), args.image_size)
        samplers = {s: EpisodeSampler(data.items_by_class(s), n_way=N_WAY, k_shot=K_SHOT, n_query=N_QUERY, seed=0,
                                      split=s) for s in ("train", "test")}
        train = [samplers["train"].episode(i + 1) for i in range(args.episodes)]
        test = [samplers["test"].episode(i) for i in range(args.test_episodes)]
        used = {i for e in train for i in (*e.support_items()[0], *e.query_items()[0])}
        images = {i: data[i][0] for i in used}
        test_images = {i: data[i][0] for e in test for i in (*e.support_items()[0], *e.query_items()[0])}
    print(f"{args.backbone} at {args.image_size} px, {args.episodes} training episodes, {args.test_episodes} test "
          "episodes; test accuracy with BatchNorm's running statistics (eval) / the test images' own (batch)")
    print("| seed | logits | eval | batch |\n|---|---|---|---|")
    for seed in (int(s) for s in args.seeds.split(",")):
        for squared in (True, False):
            result = run(args.backbone, seed, squared, train, test, images, test_images)
            print(f"| {seed} | {'-squared distance (fewshot)' if squared else '-distance (easyfsl)'} | "
                  f"{result['eval']:.3f} | {result['batch']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
