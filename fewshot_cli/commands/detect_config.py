"""detect-train's knobs, presets and declaration, without torch: the CLI builds its options from them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fewshot_cli.help import MEMORY
from fewshot_cli.models.names import DETECTION_BACKBONES
from fewshot_cli.models.pretrained import FREEZE_HELP, LR_BACKBONE_HELP, PRETRAINED, STRICT_HELP, WEIGHTS_HELP
from fewshot_cli.runner.command import Command
from fewshot_cli.runner.config import EpisodicConfig, knob


@dataclass
class DetectConfig(EpisodicConfig):
    image_size: int = knob(256, "input image side in pixels (images are resized to a square)", minimum=32)
    backbone: str = knob("resnet50", "feature extractor; small is a built-in net with random weights",
                         choices=DETECTION_BACKBONES)
    weights: str | None = knob(None, WEIGHTS_HELP, metavar="W")
    weights_strict: bool = knob(True, STRICT_HELP)
    freeze_backbone: bool = knob(False, FREEZE_HELP)
    lr_backbone: float | None = knob(None, LR_BACKBONE_HELP, minimum=0.0)
    embedding_dim: int = knob(256, "channels of the feature map and size of the ROI embedding", minimum=8)
    head_hidden: int = knob(512, "hidden width of the detection head Linear(C*7*7, H) -> Linear(H, C)", minimum=8)
    objectness_hidden: int = knob(64, "hidden width of the objectness net Linear(C, H) -> Linear(H, 1)", minimum=1)
    proposal_step: int = knob(24, "pixels between dense proposal centres", minimum=1)
    proposal_scales: str = knob("0.15,0.21,0.3", "proposal box sides as fractions of the image side, comma-separated",
                                metavar="LIST")
    proposal_ratios: str = knob("1", "proposal box width / height ratios, comma-separated (each side and ratio makes "
                                "a box of that area)", metavar="LIST")
    proposals_top_k: int = knob(64, "proposals kept per image, the most prototype-like", minimum=1)
    eval_top_k: int | None = knob(None, "proposals kept per image in evaluation and its fine-tuning (default: "
                                  "--proposals-top-k)", minimum=1)
    negative_ratio: float = knob(3.0, "hard negatives per positive", minimum=0.0)
    lr: float = knob(1e-4, "AdamW learning rate", minimum=0.0)
    novel_classes: str | None = knob(None, "COCO data: category names or ids held out for the test, comma-separated",
                                     metavar="NAMES")
    finetune_steps: int = knob(0, "test: steps fine-tuning a copy of the head and the prototypes on each episode's "
                               "support (backbone frozen) before its queries are scored; 0: none", minimum=0)
    finetune_lr: float = knob(1e-3, "AdamW learning rate of the --finetune-steps stage", minimum=0.0)
    finetune_negatives: int = knob(0, "test: training images holding none of an episode's classes added to its "
                                   "--finetune-steps stage as background only; 0: none", minimum=0)
    class_scores: str = knob("sigmoid", "a detection's class probability: sigmoid of its own logit, softmax over "
                             "the episode's classes, or both (their product); times sigmoid(objectness)",
                             choices=("sigmoid", "softmax", "both"))
    score_threshold: float = knob(0.05, "lowest detection score kept", minimum=0.0)
    nms_iou: float = knob(0.5, "IoU above which class-aware NMS suppresses a box", minimum=0.0)
    soft_nms_sigma: float = knob(0.0, "after the class-aware NMS, Gaussian Soft-NMS between classes: a detection "
                                 "under a better one of another class is scored times exp(-IoU^2 / S); 0: off",
                                 minimum=0.0, metavar="S")
    max_detections: int = knob(100, "detections kept per image after NMS", minimum=1)
    eval_batch_size: int | None = knob(None, "query images scored at once in evaluation, halved on OOM (default: "
                                       "an episode's n_way x n_query)", minimum=1, result_neutral=True)
    image_cache_mb: int = knob(256, "MiB of decoded, resized images kept for reuse (LRU; --workers split it)",
                               minimum=0, panel=MEMORY, result_neutral=True)


# t4 is the original study's configuration after its OOM fix; a100/h100 its configuration before (fits 40+ GB)
_AFTER = {"image_size": 256, "embedding_dim": 256, "k_shot": 3, "n_query": 10, "proposal_step": 24,
          "head_hidden": 512, "objectness_hidden": 64}
_BEFORE = {"image_size": 384, "embedding_dim": 512, "k_shot": 5, "n_query": 20, "proposal_step": 16,
           "head_hidden": 1024, "objectness_hidden": 128}
_GPU = {"backbone": "resnet50", "n_way": 5, "episodes": 2000, "test_episodes": 100, "val_every": 500,
        "val_episodes": 20, "proposals_top_k": 128, "lr": 1e-4, "checkpoint_every": 100,
        "weights": PRETRAINED}
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {"image_size": 128, "backbone": "small", "embedding_dim": 32, "head_hidden": 128, "objectness_hidden": 32,
            "proposal_step": 8, "proposals_top_k": 64, "n_way": 3, "k_shot": 3, "n_query": 2, "episodes": 400,
            "test_episodes": 40, "val_every": 0, "val_episodes": 5, "lr": 2e-3, "checkpoint_every": 100,
            # measured on real-digit scenes (benchmarks/detect_scenes.py, results/detect_scenes.md)
            "finetune_steps": 100, "finetune_lr": 2e-3, "finetune_negatives": 18, "class_scores": "both",
            "score_threshold": 0.0, "nms_iou": 0.3, "soft_nms_sigma": 0.5, "eval_top_k": 128},
    "t4": {**_GPU, **_AFTER},
    "mps": {**_GPU, **_AFTER},
    "a100": {**_GPU, **_BEFORE},
    "h100": {**_GPU, **_BEFORE},
}


COMMAND = Command(name="detect-train", help="Episodic few-shot object detection: class prototypes matched over "
                  "dense proposals, focal loss with hard negatives, scored by pycocotools on novel classes.",
                  config=DetectConfig, presets=PRESETS, primary_metric="map50",
                  secondary_metric="map", task_path="fewshot_cli.commands.detect:DetectTask",
                  plan_knobs=("n_query", "image_size", "proposals_top_k"),
                  # a shorter fine-tuning keeps the demo's time near what it was before the stage
                  demo={"test_episodes": 20, "finetune_steps": 25},
                  example="fewshot detect-train --data ~/data/coco-fewshot --novel-classes cat,dog --preset t4",
                  docs="docs/commands/detect-train.md")
