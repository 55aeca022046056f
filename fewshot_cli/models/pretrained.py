"""Which weights a run starts from, decided without torch: pretrained on the GPU presets with real data, random
initialisation on the cpu preset and the built-in data (the demo and the tests need no file)."""

from __future__ import annotations

from typing import Any

from fewshot_cli.errors import BadInput

#: our backbones that torchvision publishes ImageNet weights for
TORCHVISION_WEIGHTED = frozenset({"resnet18", "resnet34", "resnet50", "efficientnet_b0", "mobilenet_v3_large"})
#: Hugging Face backbones and the model `--model DEFAULT` loads for each
HF_MODELS = {"clip": "openai/clip-vit-base-patch32", "dinov2": "facebook/dinov2-base"}
#: the value a GPU preset gives `--weights` and `--model`
PRETRAINED = "DEFAULT"

WEIGHTS_HELP = ("none, a torchvision weights name for the backbone (DEFAULT, IMAGENET1K_V1, ...) from the torch hub "
                "cache, or a file: .pt/.pth/.safetensors state dict, a checkpoint, a fewshot model.pt/checkpoint.pt")
STRICT_HELP = "every tensor of --weights must fit (the new head's excepted); --no-weights-strict loads those that fit"
FREEZE_HELP = "keep the pretrained backbone fixed: train only the layers after it"
LR_BACKBONE_HELP = "learning rate of the backbone's layers (default: --lr), smaller to keep pretrained features"


def architecture(cfg: Any) -> str:
    """The network `--weights` is for: the `backbone` knob, or classify-food101's `model`."""
    return getattr(cfg, "backbone", None) or cfg.model


def settle(resolved: Any, data: Any) -> None:
    """Turn a preset's `DEFAULT` into none where it cannot apply, saying why in the knob's note: the built-in
    data, a backbone torchvision has no weights for, a backbone that takes no Hugging Face model. A frozen backbone
    needs weights."""
    cfg = resolved.config
    arch = architecture(cfg)
    for knob in ("weights", "model"):
        if knob == "model" and not hasattr(cfg, "backbone"):
            continue  # classify-food101's `model` is the architecture itself
        if not hasattr(cfg, knob) or resolved.sources.get(knob) != "preset" or getattr(cfg, knob) is None:
            continue
        reason = ("the built-in data starts from random initialisation" if data is None else
                  f"{arch} has no torchvision weights" if knob == "weights" and arch not in TORCHVISION_WEIGHTED
                  else f"{arch} takes no Hugging Face model" if knob == "model" and arch not in HF_MODELS else "")
        if reason:
            resolved.set(knob, None, "preset", note=reason)
    if getattr(cfg, "freeze_backbone", False) and cfg.weights is None and not getattr(cfg, "init", None):
        source = "--weights or --init" if hasattr(cfg, "init") else "--weights"
        raise BadInput(f"--freeze-backbone needs {source}: a random backbone would stay random.")
