"""Few-shot backbones (Conv-4, Conv-6, ResNet-12) and torchvision's ResNet-18/34/50, optionally unpooled."""

from __future__ import annotations

import torch
from torch import nn

from fewshot_cli.errors import BadInput
from fewshot_cli.models.names import BACKBONES


def _conv_block(c_in: int, c_out: int, pool: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                               nn.ReLU(inplace=True)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


def conv_net(depth: int, width: int = 64) -> nn.Sequential:
    """Conv-4 / Conv-6 of the few-shot literature: 3x3 conv, BN, ReLU; the first four blocks pool."""
    blocks = [_conv_block(3 if i == 0 else width, width, pool=i < 4) for i in range(depth)]
    return nn.Sequential(*blocks, nn.Flatten())


class _ResBlock12(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.1),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.1),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out))
        self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        self.out = nn.Sequential(nn.LeakyReLU(0.1), nn.MaxPool2d(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(x) + self.shortcut(x))


def resnet12(widths: tuple[int, ...] = (64, 160, 320, 640)) -> nn.Sequential:
    """ResNet-12 (TADAM, MetaOptNet): four residual blocks of three 3x3 convs, each pooled, then global average."""
    blocks, c_in = [], 3
    for w in widths:
        blocks.append(_ResBlock12(c_in, w))
        c_in = w
    return nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())


def torchvision_resnet(name: str, flatten: bool) -> nn.Sequential:
    """torchvision's ResNet without its classifier; `flatten` keeps the last feature map (C x H x W) unpooled."""
    import torchvision  # torchvision (and the dynamo it loads) only for its own backbones

    model = getattr(torchvision.models, name)(weights=None)
    body = [model.conv1, model.bn1, model.relu, model.maxpool, model.layer1, model.layer2, model.layer3,
            model.layer4]
    tail = [nn.Flatten()] if flatten else [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*body, *tail)


def memory_format(device: torch.device) -> torch.memory_format:
    """The layout a convolutional backbone and its input take on `device`: channels_last (NHWC) on the CPU, where
    oneDNN's NHWC convolutions run conv4's and resnet12's training steps 1.2x to 1.6x faster than contiguous ones,
    by CPU (`benchmarks/backbone_step.py`); CUDA keeps the contiguous layout. The two layouts sum in different
    orders: one step's loss differs in its last digits, and over a run the trajectories part as two seeds' do."""
    return torch.channels_last if device.type == "cpu" else torch.contiguous_format


def build_backbone(name: str, flatten: bool = False) -> nn.Module:
    if name == "conv4":
        return conv_net(4)
    if name == "conv6":
        return conv_net(6)
    if name == "resnet12":
        return resnet12()
    if name in ("resnet18", "resnet34", "resnet50"):
        return torchvision_resnet(name, flatten)
    raise BadInput(f"Unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}.")


def feature_dim(backbone: nn.Module, image_size: int) -> int:
    """The flat feature size the backbone gives at this image size, from one dry forward on a single image."""
    was_training = backbone.training
    backbone.eval()
    with torch.no_grad():
        dim = backbone(torch.zeros(1, 3, image_size, image_size)).shape[1]
    backbone.train(was_training)
    return int(dim)
