"""Frozen image embedders for embed-classify: each backbone with its own preprocessing and pretrained weights."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from torchvision import transforms
from torchvision.models import resnet50

from fewshot_cli.data.images import IMAGENET_MEAN, IMAGENET_STD
from fewshot_cli.errors import BadInput
from fewshot_cli.models.hub import HF_BACKBONES, HF_MODELS, hf_local, hf_model
from fewshot_cli.models.names import EMBEDDER_BACKBONES
from fewshot_cli.models.weights import load_pretrained

SMALL_SEED = 20240601  # fixed, not --seed: the small backbone is one network, so its cache key stays stable


class Embedder(nn.Module):
    """A frozen backbone: `preprocess` turns one RGB PIL image into a CHW float32 tensor, `forward` a batch of
    them into (B, D) float32 embeddings; `identity` names what decides the numbers (the cache key); `loaded` is the
    record of the pretrained weights read (for config.json), None for random ones."""

    def __init__(self) -> None:
        super().__init__()
        self.identity: dict[str, Any] = {}
        self.loaded: dict[str, Any] | None = None

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class SmallConvNet(Embedder):
    """A three-layer conv net with fixed seeded random weights; mean- and max-pooled ReLU maps as the embedding.
    Needs no weights file, runs fast on a CPU, and separates the built-in synthetic classes well."""

    def __init__(self, image_size: int = 32, width: int = 32) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(SMALL_SEED)
        chans = (3, width, 2 * width, 4 * width)
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1) for a, b in zip(chans, chans[1:], strict=False))
        with torch.no_grad():
            for conv in self.convs:
                fan_in = conv.in_channels * 9
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * (2 / fan_in) ** 0.5)
                conv.bias.zero_()
        self.requires_grad_(False)
        self.transform = transforms.Compose([
            transforms.Resize((image_size, image_size)), transforms.ToTensor(),
            transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
        self.identity = {"backbone": "small", "image_size": image_size, "width": width, "seed": SMALL_SEED}

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self.transform(image)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        h = pixels
        for i, conv in enumerate(self.convs):
            h = torch.relu(conv(h))
            if i < len(self.convs) - 1:
                h = nn.functional.avg_pool2d(h, 2)
        return torch.cat([h.mean((2, 3)), h.amax((2, 3))], dim=1)


class ResNet50(Embedder):
    """torchvision ResNet-50 without its classifier (2048-d pooled features). Preprocessed as its weights were
    trained: a torchvision name's own `weights.transforms()`; else Resize 256, CenterCrop 224, ImageNet mean/std."""

    def __init__(self, weights: str | None = None, emit: Callable[..., None] = lambda event, **fields: None,
                 strict: bool = True) -> None:
        super().__init__()
        self.net = resnet50(weights=None)
        # the ImageNet classifier is not used: a file without it (or with another) is fine
        pretrained = load_pretrained(self.net, weights, "resnet50", "resnet50", emit, strict, head=("fc",))
        self.net.fc = nn.Identity()
        self.requires_grad_(False)
        self.transform = pretrained.transforms if pretrained and pretrained.transforms else transforms.Compose([
            transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        self.loaded = pretrained.record if pretrained else None
        digest = next(iter(self.loaded["files"].values())) if self.loaded else "random"
        self.identity = {"backbone": "resnet50", "weights": digest}

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self.transform(image)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net(pixels)


#: the configuration and image processor of each Hugging Face backbone's default model (`HF_MODELS`), as
#: transformers' defaults give them (CLIPConfig(): ViT-B/32 at 224 px with its text tower, as
#: openai/clip-vit-base-patch32; Dinov2Config(): ViT-B/14, as facebook/dinov2-base, at the processor's 224 px):
#: a plan is made from them where the model is not at hand
KNOWN_CONFIGS = {"clip": ("CLIPConfig", "CLIPModel", "CLIPImageProcessor", "ViT-B/32, 224 px"),
                 "dinov2": ("Dinov2Config", "Dinov2Model", "BitImageProcessor", "ViT-B/14, 224 px")}


class HFEmbedder(Embedder):
    """CLIP (image tower + projection), DINOv2 or any `AutoModel` image encoder (pooled output) from a Hugging Face
    id through the HF cache, or a local directory; preprocessed by the model's own image processor. With
    `random_weights`, built from its configuration alone (a traced copy needs shapes only): the cached or local
    config.json, else the default model's known configuration; nothing is downloaded."""

    #: what a planned model was built from, for the plan's header (None: its weights were read)
    planned_from: str | None = None

    def __init__(self, kind: str, model: str | None, emit: Callable[..., None] = lambda event, **fields: None,
                 random_weights: bool = False) -> None:
        super().__init__()
        try:
            import transformers  # an optional extra: only the Hugging Face backbones need it
        except ImportError:
            raise BadInput(f"--backbone {kind} needs the transformers package: pip install 'fewshot[hf]'.") from None
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        self.kind = kind
        if random_weights:
            self._plan_from_config(transformers, kind, model)
            return
        path, self.loaded = hf_model(kind, model)
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
        expected = {"clip": "clip", "dinov2": "dinov2"}.get(kind)
        if expected and model_type != expected:
            raise BadInput(f"--model {model} holds a {model_type!r} model, not {expected!r}.")
        try:
            if kind == "clip":
                self.net = transformers.CLIPModel.from_pretrained(path, local_files_only=True)
                self.processor = transformers.CLIPImageProcessor.from_pretrained(path, local_files_only=True)
            else:
                self.net = transformers.AutoModel.from_pretrained(path, local_files_only=True)
                self.processor = transformers.AutoImageProcessor.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as err:
            raise BadInput(f"--model {model} ({path}) could not be loaded: {str(err).splitlines()[0]}") from None
        self.net = self.net.float()
        self.requires_grad_(False)
        self.identity = {"backbone": kind, "model": directory_digest(path)}
        emit("weights_loaded", **self.loaded, module=kind)

    def _plan_from_config(self, transformers: Any, kind: str, model: str | None) -> None:
        """The network of `--model` with random weights, from its config.json where it is here, else from the
        known configuration of the backbone's default model."""
        path, name = hf_local(kind, model)
        if path is not None:
            config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
            self.net = (transformers.CLIPModel(config) if kind == "clip" else
                        transformers.AutoModel.from_config(config))
            self.processor = transformers.AutoImageProcessor.from_pretrained(path, local_files_only=True)
            self.planned_from = f"{name}'s config.json, random weights"
        elif kind in KNOWN_CONFIGS and name == HF_MODELS[kind]:
            config, net, processor, what = KNOWN_CONFIGS[kind]
            self.net = getattr(transformers, net)(getattr(transformers, config)())
            self.processor = getattr(transformers, processor)()
            self.planned_from = f"the known configuration of {name} ({what}), random weights"
        else:
            raise BadInput(f"--backbone {kind} is planned from its model's config.json, and --model {name or '(none)'}"
                           f" is neither a local directory nor in the Hugging Face cache.")
        if any(p.dtype != torch.float32 for p in self.net.parameters()):  # under fake tensors, only if needed
            self.net = self.net.float()
        self.requires_grad_(False)
        self.identity = {"backbone": kind, "model": "planned"}

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        pixels = self.processor(images=image, return_tensors="pt")["pixel_values"][0]
        return pixels.float()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.kind == "clip":
            out = self.net.get_image_features(pixel_values=pixels)
            # transformers 5 returns an output object whose pooler_output is projected; 4.x the tensor itself
            return out if isinstance(out, torch.Tensor) else out.pooler_output
        out = self.net(pixel_values=pixels)
        pooled = getattr(out, "pooler_output", None)
        return pooled.flatten(1) if pooled is not None else out.last_hidden_state.mean(1)


def build_embedder(backbone: str, weights: str | None = None, model: str | None = None, image_size: int = 32,
                   emit: Callable[..., None] = lambda event, **fields: None, strict: bool = True,
                   random_weights: bool = False) -> Embedder:
    """The named backbone, its weights resolved (`--weights` for resnet50, `--model` for Hugging Face ones); with
    `random_weights`, a Hugging Face backbone from its configuration alone (`HFEmbedder`)."""
    if backbone == "small":
        return SmallConvNet(image_size)
    if backbone == "resnet50":
        return ResNet50(weights, emit, strict)
    if backbone in HF_BACKBONES:
        return HFEmbedder(backbone, model, emit, random_weights)
    raise BadInput(f"--backbone must be one of {', '.join(EMBEDDER_BACKBONES)}, not {backbone!r}.")


def directory_digest(path: Path) -> str:
    """sha1 over a model directory's files (name and bytes), so new weights in the same place change the key."""
    digest = hashlib.sha1()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        with file.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()
