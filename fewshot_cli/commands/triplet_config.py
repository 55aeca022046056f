"""triplet-train's knobs, presets and declaration, without torch: the CLI builds its options from them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fewshot_cli.models.names import DETECTION_BACKBONES
from fewshot_cli.models.pretrained import FREEZE_HELP, LR_BACKBONE_HELP, PRETRAINED, STRICT_HELP, WEIGHTS_HELP
from fewshot_cli.runner.command import Command
from fewshot_cli.runner.config import EpisodicConfig, knob


@dataclass
class TripletConfig(EpisodicConfig):
    n_way: int = knob(4, "classes per episode", minimum=1)
    k_shot: int = knob(5, "support images per class", minimum=1)
    n_query: int = knob(8, "query clips per class", minimum=1)
    image_size: int = knob(128, "frame and support image side in pixels", minimum=16)
    clip_frames: int = knob(8, "frames per built-in synthetic clip", minimum=1)
    backbone: str = knob("small", "feature extractor; small is a built-in net with random weights",
                         choices=DETECTION_BACKBONES)
    embedding_dim: int = knob(64, "backbone width and embedding size (match a --init checkpoint's)", minimum=8)
    weights: str | None = knob(None, WEIGHTS_HELP, metavar="W")
    weights_strict: bool = knob(True, STRICT_HELP)
    freeze_backbone: bool = knob(False, FREEZE_HELP)
    lr_backbone: float | None = knob(None, LR_BACKBONE_HELP, minimum=0.0)
    init: str | None = knob(None, "stage-1 checkpoint (checkpoint.pt or its run directory) to take the backbone from",
                            metavar="CKPT")
    triplet_ratio: float = knob(0.3, "weight of the triplet loss; the localisation loss gets 1 minus it", minimum=0)
    triplet_batch_size: int = knob(8, "(anchor, positive, negative) triplets per step", minimum=1)
    triplet_margin: float = knob(0.2, "margin of the triplet loss", minimum=0)
    num_aug: int = knob(5, "augmented views per support image in training", minimum=0)
    frame_cache_size: int = knob(500, "decoded frames the LRU frame cache holds at most", minimum=0)
    frame_cache_mb: int = knob(256, "MiB the LRU frame cache holds at most", minimum=0)
    score_threshold: float = knob(0.3, "a frame's box counts as present when its score reaches this", minimum=0)
    lr: float = knob(2e-3, "AdamW learning rate (cosine decay over the run)", minimum=0)
    eval_frames: int = knob(64, "frames scored at once in evaluation, halved on OOM", minimum=1, result_neutral=True)


_GPU = dict(n_way=4, k_shot=5, n_query=8, triplet_batch_size=8, num_aug=5, val_episodes=10, workers=4,
            image_size=160, backbone="resnet50", embedding_dim=256, lr=3e-4, episodes=3000, val_every=100,
            test_episodes=100, frame_cache_size=500, frame_cache_mb=512, checkpoint_every=200,
            weights=PRETRAINED)
PRESETS: dict[str, dict[str, Any]] = {
    # small enough that 300 episodes with validation every 20 take a few minutes on two cores
    "cpu": dict(n_way=4, k_shot=2, n_query=2, triplet_batch_size=8, num_aug=1, val_episodes=4, workers=0,
                image_size=64, backbone="small", embedding_dim=32, episodes=300, val_every=20, test_episodes=20,
                frame_cache_size=500, frame_cache_mb=64, checkpoint_every=100),
    "t4": dict(_GPU, episodes=2000, n_query=4, image_size=128),  # 16 GB: the a100 episode plans at 16.5 GB
    "mps": dict(_GPU, image_size=96, episodes=2000),
    "a100": dict(_GPU),
    "h100": dict(_GPU),
}


COMMAND = Command(
    name="triplet-train",
    help="Stage-2 episodic training of a few-shot video localiser with a triplet loss; ST-IoU validation.",
    config=TripletConfig, presets=PRESETS, primary_metric="st_iou",
    secondary_metric="box_ap50", task_path="fewshot_cli.commands.triplet:TripletTask",
    plan_knobs=("triplet_batch_size", "n_query", "image_size"),
    demo={"episodes": 120, "val_every": 40, "val_episodes": 2, "test_episodes": 10},
    example="fewshot triplet-train --data ~/data/clips --init runs/detect-train-X",
    docs="docs/commands/triplet-train.md")
