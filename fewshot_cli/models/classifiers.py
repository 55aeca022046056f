"""Torchvision classification networks, random or from pretrained weights, with a frozen backbone."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torchvision
from torch import nn

from fewshot_cli.errors import BadInput
from fewshot_cli.memory.torch_private import BatchNorm
from fewshot_cli.models.names import CLASSIFIERS
from fewshot_cli.models.weights import Pretrained, load_pretrained

#: each network's head module (trained when the backbone is frozen) and, inside it, the layer sized to the classes
HEADS = {
    "efficientnet_b0": ("classifier", "classifier.1"),
    "resnet50": ("fc", "fc"),
    "mobilenet_v3_large": ("classifier", "classifier.3"),
}
MODELS = CLASSIFIERS
assert set(HEADS) == set(MODELS), "every network in models.names has its head here"


class Classifier(nn.Module):
    """A torchvision network; with a frozen backbone only the head trains and the backbone's BatchNorm
    statistics stay as loaded."""

    def __init__(self, net: nn.Module, name: str, frozen: bool = False) -> None:
        super().__init__()
        self.net, self.name, self.frozen = net, name, frozen
        if frozen:
            for parameter in self.net.parameters():
                parameter.requires_grad_(False)
            for parameter in self.head().parameters():
                parameter.requires_grad_(True)
            self.train()  # the frozen backbone's BatchNorm in eval mode from the first step on

    def head(self) -> nn.Module:
        """The head module (kept out of the module tree so the state dict names each tensor once)."""
        return self.net.get_submodule(HEADS[self.name][0])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        if self.frozen and mode:
            self.net.eval()
            self.head().train()
        return self


def build_classifier(name: str, num_classes: int, weights: str | None = None, freeze_backbone: bool = False,
                     emit: Callable[..., None] = lambda event, **fields: None, strict: bool = True
                     ) -> tuple[Classifier, Pretrained | None]:
    """`name` from torchvision with `num_classes` outputs, random or from `--weights` (a torchvision name or a
    file); the class layer is new unless the weights' has the same size."""
    if name not in HEADS:
        raise BadInput(f"Unknown model {name!r}; choose one of {', '.join(MODELS)}.")
    net = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    loaded = load_pretrained(net, weights, name, name, emit, strict, head=(HEADS[name][1],))
    if loaded is None:
        # mobilenet_v3's BatchNorm momentum 0.01 suits long ImageNet schedules; from scratch in a short run its
        # running statistics lag the weights and evaluation collapses to one class, so use PyTorch's 0.1
        for module in net.modules():
            if isinstance(module, BatchNorm):
                module.momentum = 0.1
    return Classifier(net, name, frozen=freeze_backbone), loaded


def head_first_groups(model: Classifier, lr: float, lr_backbone: float | None) -> list[dict]:
    """The optimiser's groups: the head at `lr`, every other trainable layer at `lr_backbone` (default `lr`)."""
    head = {id(p) for p in model.head().parameters()}
    groups = [{"params": [p for p in model.parameters() if p.requires_grad and id(p) in head], "lr": lr},
              {"params": [p for p in model.parameters() if p.requires_grad and id(p) not in head],
               "lr": lr if lr_backbone is None else lr_backbone}]
    return [g for g in groups if g["params"]]
