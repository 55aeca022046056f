"""Which weights a run starts from, decided without torch: pretrained on the GPU presets with real data, random
initialisation on the cpu preset and the built-in data (the demo and the tests need no file)."""

from __future__ import annotations

import dataclasses
from typing import Any

from fewshot_cli.errors import BadInput

#: our backbones that torchvision publishes ImageNet weights for
TORCHVISION_WEIGHTED = frozenset({"resnet18", "resnet34", "resnet50", "efficientnet_b0", "mobilenet_v3_large"})
#: the Hugging Face backbones: CLIP's image tower, DINOv2, and any image encoder `AutoModel` loads
HF_BACKBONES = ("clip", "dinov2", "hf")
#: Hugging Face backbones and the model `--model DEFAULT` loads for each
HF_MODELS = {"clip": "openai/clip-vit-base-patch32", "dinov2": "facebook/dinov2-base"}
#: the value a GPU preset gives `--weights` and `--model`
PRETRAINED = "DEFAULT"

WEIGHTS_HELP = ("none, a torchvision weights name for the backbone (DEFAULT, IMAGENET1K_V1, ...) from the torch hub "
                "cache, or a file: .pt/.pth/.safetensors state dict, a checkpoint, a fewshot model.pt/checkpoint.pt")
STRICT_HELP = "every tensor of --weights must fit (a new head's excepted); --no-weights-strict loads those that fit"
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
    if data is None:
        _built_in(resolved)
    arch = architecture(cfg)
    for knob in ("weights", "model"):
        if knob == "model" and not hasattr(cfg, "backbone"):
            continue  # classify-food101's `model` is the architecture itself
        if not hasattr(cfg, knob) or resolved.sources.get(knob) != "preset" or getattr(cfg, knob) is None:
            continue
        reason = _why_not(knob, arch, data)
        if reason:
            resolved.set(knob, None, "preset", note=reason)
    _check_options(cfg, arch, resolved.sources)
    if getattr(cfg, "freeze_backbone", False) and cfg.weights is None and not getattr(cfg, "init", None):
        source = "--weights or --init" if hasattr(cfg, "init") else "--weights"
        raise BadInput(f"--freeze-backbone needs {source}: a random backbone would stay random.")


def _built_in(resolved: Any) -> None:
    """The built-in data runs a knob's `built_in` value where a preset chose another for data on disk."""
    for f in dataclasses.fields(resolved.config):
        value, chosen = f.metadata.get("built_in"), getattr(resolved.config, f.name)
        if value is not None and resolved.sources.get(f.name) == "preset" and chosen != value:
            resolved.set(f.name, value, "preset", note=f"the preset's {chosen} is for --data; the built-in data "
                                                       f"runs {value}")


def _why_not(knob: str, arch: str, data: Any) -> str:
    """Why a preset's `DEFAULT` for `knob` cannot apply here; empty when it can."""
    if data is None:
        return "the built-in data starts from random initialisation"
    if knob == "weights" and arch not in TORCHVISION_WEIGHTED:
        return f"{arch} has no torchvision weights"
    if knob == "model" and arch not in HF_MODELS:
        return f"{arch} takes no Hugging Face model"
    return ""


def _check_options(cfg: Any, arch: str, sources: dict[str, str]) -> None:
    """embed-classify: `--model` is for Hugging Face backbones and `--weights` for the others; a value given on
    the command line for the wrong one would be ignored, so it is bad input."""
    if not (hasattr(cfg, "backbone") and hasattr(cfg, "model")):
        return
    if cfg.model is not None and sources.get("model") == "cli" and arch not in HF_BACKBONES:
        raise BadInput(f"--model is for --backbone {', '.join(HF_BACKBONES)}; {arch} takes --weights.")
    if cfg.weights is not None and sources.get("weights") == "cli" and arch in HF_BACKBONES:
        raise BadInput(f"--backbone {arch} loads its weights with --model ID_OR_DIR, not --weights.")
