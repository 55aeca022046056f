"""Torchvision classification networks built without downloads, with local weights and a frozen backbone."""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn

from fewshot_cli.errors import BadInput
from fewshot_cli.models.names import CLASSIFIERS
from fewshot_cli.models.weights import read_state_dict

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


def load_weights(net: nn.Module, name: str, path: Path) -> None:
    """Load a local state dict into `net` except the class layer (replaced to our class count); every other
    tensor must match by name and shape, else a BadInput naming the first differences."""
    state = read_state_dict(path)
    layer = HEADS[name][1] + "."
    own = {k: v for k, v in net.state_dict().items() if not k.startswith(layer)}
    given = {k: v for k, v in state.items() if not k.startswith(layer)}
    missing, unexpected = sorted(own.keys() - given.keys()), sorted(given.keys() - own.keys())
    if missing or unexpected:
        detail = "; ".join(part for part in (
            f"missing {', '.join(missing[:3])}" + (" ..." if len(missing) > 3 else "") if missing else "",
            f"unexpected {', '.join(unexpected[:3])}" + (" ..." if len(unexpected) > 3 else "") if unexpected else "",
        ) if part)
        raise BadInput(f"--weights {path} does not fit {name} ({detail}).")
    wrong = [k for k in own if own[k].shape != given[k].shape]
    if wrong:
        raise BadInput(f"--weights {path} does not fit {name}: {wrong[0]} is {tuple(given[wrong[0]].shape)}, "
                       f"{name} needs {tuple(own[wrong[0]].shape)}.")
    net.load_state_dict(given, strict=False)


def build_classifier(name: str, num_classes: int, weights: Path | None = None,
                     freeze_backbone: bool = False) -> Classifier:
    """`name` from torchvision with `num_classes` outputs, random or from a local state dict; nothing downloads."""
    if name not in HEADS:
        raise BadInput(f"Unknown model {name!r}; choose one of {', '.join(MODELS)}.")
    if freeze_backbone and weights is None:
        raise BadInput("--freeze-backbone needs --weights: a random backbone would stay random.")
    net = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    if weights is not None:
        load_weights(net, name, weights)
    else:
        # mobilenet_v3's BatchNorm momentum 0.01 suits long ImageNet schedules; from scratch in a short run its
        # running statistics lag the weights and evaluation collapses to one class, so use PyTorch's 0.1
        for module in net.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = 0.1
    return Classifier(net, name, frozen=freeze_backbone)
