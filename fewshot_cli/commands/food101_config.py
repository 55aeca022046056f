"""classify-food101's knobs, presets and declaration, without torch: the CLI builds its options from them."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from fewshot_cli.errors import BadInput
from fewshot_cli.help import AMP_HELP
from fewshot_cli.models.names import CLASSIFIERS as MODELS
from fewshot_cli.models.pretrained import LR_BACKBONE_HELP, PRETRAINED, STRICT_HELP, WEIGHTS_HELP
from fewshot_cli.runner.command import Command
from fewshot_cli.runner.config import BaseConfig, knob


@dataclass
class Food101Config(BaseConfig):
    """Knobs of classify-food101: a step is one batch, a run is `epochs` passes over the train split."""

    val_episodes: int = knob(10, "unused: validation scores the whole test split", cli=False)
    epochs: int = knob(10, "passes over the train split", minimum=0)
    batch_size: int = knob(24, "images per optimiser step (OOM back-off keeps it with gradient accumulation)",
                           minimum=1)
    image_size: int = knob(224, "side of the square network input in pixels", minimum=16)
    model: str = knob("efficientnet_b0", "torchvision classification network", choices=MODELS)
    weights: str | None = knob(None, WEIGHTS_HELP + "; its class layer is replaced", metavar="W")
    weights_strict: bool = knob(True, STRICT_HELP)
    freeze_backbone: bool = knob(False, "train only the classification head (needs --weights)")
    lr_backbone: float | None = knob(None, LR_BACKBONE_HELP, minimum=0.0)
    lr: float = knob(1e-3, "AdamW peak learning rate (cosine schedule, 5% warm-up)", minimum=0)
    weight_decay: float = knob(0.05, "AdamW weight decay", minimum=0)
    dev_samples: int = knob(0, "N train and N/3 test images per class, stratified and seeded (0: all)", minimum=0)
    empty_cache_every: int | None = knob(None, "steps between empty_cache calls (default: 10 on MPS, else never)",
                                         minimum=0)
    mps_high_watermark: float | None = knob(None, "PYTORCH_MPS_HIGH_WATERMARK_RATIO, 0 to 2 (0: no limit)",
                                            minimum=0)
    amp: bool = knob(False, AMP_HELP)
    synthetic_classes: int = knob(101, "classes of the built-in data (used without --data)", minimum=2)
    eval_batch_size: int | None = knob(None, "images scored at once in evaluation, halved on OOM (default: "
                                       "--batch-size)", minimum=1, result_neutral=True)


PRESETS: dict[str, dict[str, Any]] = {
    # two cores: small inputs and a light network so a default run ends in minutes
    "cpu": {"epochs": 12, "batch_size": 64, "image_size": 32, "model": "mobilenet_v3_large", "lr": 2e-3,
            "synthetic_classes": 20, "workers": 0, "checkpoint_every": 100},
    # the original study's fix: 224 px at batch 24 stays under 48 GB where 1024 px at 32 did not
    "mps": {"epochs": 10, "batch_size": 24, "image_size": 224, "model": "efficientnet_b0",
            "empty_cache_every": 10, "workers": 4, "checkpoint_every": 500, "weights": PRETRAINED},
    "t4": {"epochs": 10, "batch_size": 64, "image_size": 224, "model": "efficientnet_b0", "amp": True,
           "workers": 4, "checkpoint_every": 500, "weights": PRETRAINED},
    "a100": {"epochs": 10, "batch_size": 128, "image_size": 224, "model": "efficientnet_b0", "amp": True,
             "workers": 8, "checkpoint_every": 500, "weights": PRETRAINED},
    "h100": {"epochs": 10, "batch_size": 256, "image_size": 224, "model": "efficientnet_b0", "amp": True,
             "workers": 8, "checkpoint_every": 500, "weights": PRETRAINED},
}


#: torch refuses to start MPS above this ratio on unified memory (MPSAllocator.mm), and its default low ratio
MPS_WATERMARK_UPPER_BOUND = 2.0
MPS_DEFAULT_LOW_WATERMARK = 1.4


def apply_mps_env(cfg: Any) -> dict[str, str]:
    """Set PYTORCH_MPS_HIGH_WATERMARK_RATIO from --mps-high-watermark (a config or the CLI's knob dict), and the
    low ratio with it so that low <= high (else torch refuses to start MPS). Call before torch first allocates
    on MPS; returns what it set."""
    high = cfg.get("mps_high_watermark") if isinstance(cfg, dict) else getattr(cfg, "mps_high_watermark", None)
    if high is None:
        return {}
    if not 0.0 <= high <= MPS_WATERMARK_UPPER_BOUND:
        raise BadInput(f"--mps-high-watermark must be between 0 and {MPS_WATERMARK_UPPER_BOUND} "
                       f"(0: no limit), not {high}.")
    env = {"PYTORCH_MPS_HIGH_WATERMARK_RATIO": repr(float(high))}
    if high > 0:  # high 0 disables the limit; torch then checks low against the upper bound only
        low = float(os.environ.get("PYTORCH_MPS_LOW_WATERMARK_RATIO", MPS_DEFAULT_LOW_WATERMARK))
        env["PYTORCH_MPS_LOW_WATERMARK_RATIO"] = repr(min(low, float(high)))
    os.environ.update(env)
    return env


COMMAND = Command(
    name="classify-food101",
    help="Supervised Food-101 classification (its on-disk layout) with a torchvision network.",
    config=Food101Config,
    presets=PRESETS,
    task_path="fewshot_cli.commands.food101:Food101Task",
    primary_metric="top1", secondary_metric="top5",
    plan_knobs=("batch_size",),
    demo={"epochs": 8},
    prepare=apply_mps_env,
    example="fewshot classify-food101 --data ~/datasets --preset t4",
    docs="docs/commands/classify-food101.md")
