"""A few-shot localiser: support prototypes correlated with query-frame features, one box and score per frame."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import sigmoid_focal_loss

from fewshot_cli.models.detection import build_feature_backbone

# the detector's backbones, so that a `detect-train` checkpoint can start stage 2 (`--init`)


def _conv(c_in: int, c_out: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    # GroupNorm, not BatchNorm: support, query and triplet batches differ in statistics, and micro-steps after an
    # OOM back-off must not change them
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, padding=dilation, dilation=dilation, bias=False),
                         nn.GroupNorm(8, c_out), nn.ReLU(inplace=True))


class Localiser(nn.Module):
    """Embeds support images to class prototypes; for each query frame, scores every feature-map cell against
    its clip's prototype and regresses a box from the cell (FCOS-style left/top/right/bottom distances)."""

    def __init__(self, backbone: str = "small", embedding_dim: int = 64) -> None:
        super().__init__()
        # the backbone's width is the embedding size, as in `detect-train`, so its checkpoints fit
        self.backbone, self.stride = build_feature_backbone(backbone, embedding_dim)
        # dilated context: an object's neighbourhood tells it from the distractor beside it
        self.context = nn.Sequential(_conv(embedding_dim, 64, dilation=2), _conv(64, 64, dilation=4))
        # one projection for support embeddings and query maps: the triplet loss shapes the space matched in
        self.project = nn.Conv2d(64, embedding_dim, 1)
        self.head = nn.Sequential(_conv(2 * embedding_dim + 1, 48), _conv(48, 48))
        self.objectness = nn.Conv2d(48, 1, 1)
        self.box = nn.Conv2d(48, 4, 1)
        nn.init.constant_(self.objectness.bias, -4.0)  # start near "absent": most cells are background

    def embed_map(self, images: torch.Tensor) -> torch.Tensor:
        """B x D x h x w unit-length embeddings of every cell."""
        return F.normalize(self.project(self.context(self.backbone(images))), dim=1)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """B x D unit-length image embeddings (mean over cells)."""
        return F.normalize(self.embed_map(images).mean((2, 3)), dim=1)

    def prototypes(self, support: torch.Tensor) -> torch.Tensor:
        """n_way x V x 3 x S x S support views to n_way x D prototypes."""
        n_way, views = support.shape[:2]
        embeddings = self.embed(support.flatten(0, 1)).view(n_way, views, -1)
        return F.normalize(embeddings.mean(1), dim=1)

    def forward(self, support: torch.Tensor, frames: torch.Tensor | None = None,
                frame_labels: torch.Tensor | None = None, triplets: torch.Tensor | None = None
                ) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, torch.Tensor | None]:
        """A training micro-step's model work: support views (n_way x V x 3 x S x S) to prototypes; `frames`
        (N x 3 x S x S) localised against their class's prototype (`frame_labels`, N) as `localise` does; and
        `triplets` (T x 3 x 3 x S x S: anchor, positive, negative) embedded to T x 3 x D. Either of those two may
        be None, and so is its result."""
        prototypes = self.prototypes(support)
        located = self.localise(frames, prototypes[frame_labels]) if frames is not None else None
        embeddings = (self.embed(triplets.flatten(0, 1)).view(len(triplets), 3, -1) if triplets is not None
                      else None)
        return located, embeddings

    def localise(self, frames: torch.Tensor, prototypes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Frames N x 3 x S x S and each frame's prototype N x D to objectness logits N x h x w and boxes
        N x h x w x 4 (xyxy, input pixels)."""
        query = self.embed_map(frames)
        proto = prototypes[:, :, None, None]
        similarity = (query * proto).sum(1, keepdim=True)
        hidden = self.head(torch.cat([query, query * proto, similarity], dim=1))
        logits = self.objectness(hidden)[:, 0]
        distances = F.softplus(self.box(hidden)) * (4 * self.stride)
        h, w = logits.shape[-2:]
        cy = (torch.arange(h, device=frames.device, dtype=distances.dtype) + 0.5) * self.stride
        cx = (torch.arange(w, device=frames.device, dtype=distances.dtype) + 0.5) * self.stride
        cy, cx = torch.meshgrid(cy, cx, indexing="ij")
        boxes = torch.stack([cx - distances[:, 0], cy - distances[:, 1], cx + distances[:, 2],
                             cy + distances[:, 3]], dim=-1)
        return logits, boxes


def best_boxes(logits: torch.Tensor, boxes: torch.Tensor, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each frame's highest-scoring box (N x 4, clamped to the frame) and its score in [0, 1] (N)."""
    flat = logits.flatten(1)
    best = flat.argmax(1)
    picked = boxes.flatten(1, 2)[torch.arange(len(best), device=best.device), best]
    return picked.clamp(0, image_size), torch.sigmoid(flat.gather(1, best[:, None])[:, 0])


def positive_cells(gt: torch.Tensor, shape: tuple[int, int], stride: int) -> torch.Tensor:
    """N x h x w mask of the cells that should fire for each frame's box: centres inside the box and within
    1.5 cells of its centre (always the centre cell); none where the box is absent (NaN)."""
    h, w = shape
    cy = (torch.arange(h, device=gt.device, dtype=gt.dtype) + 0.5) * stride
    cx = (torch.arange(w, device=gt.device, dtype=gt.dtype) + 0.5) * stride
    cy, cx = torch.meshgrid(cy, cx, indexing="ij")
    present = ~torch.isnan(gt).any(1)
    box = torch.nan_to_num(gt)[:, :, None, None]
    gx, gy = (box[:, 0] + box[:, 2]) / 2, (box[:, 1] + box[:, 3]) / 2
    inside = (cx > box[:, 0]) & (cx < box[:, 2]) & (cy > box[:, 1]) & (cy < box[:, 3])
    near = ((cx - gx).abs() <= 1.5 * stride) & ((cy - gy).abs() <= 1.5 * stride)
    centre = ((cx - gx).abs() <= stride / 2) & ((cy - gy).abs() <= stride / 2)
    return ((inside & near) | centre) & present[:, None, None]


def localisation_loss(logits: torch.Tensor, boxes: torch.Tensor, gt: torch.Tensor, stride: int) -> torch.Tensor:
    """Focal loss on objectness (normalised by positives) plus GIoU loss on the positive cells' boxes."""
    positive = positive_cells(gt, logits.shape[-2:], stride)
    n_pos = positive.sum().clamp(min=1)
    objectness = sigmoid_focal_loss(logits, positive.to(logits.dtype), reduction="sum") / n_pos
    # dense, then masked: no boolean indexing, so shapes never depend on the data (the planner traces this)
    target = torch.nan_to_num(gt)[:, None, None, :].expand_as(boxes)
    return objectness + torch.where(positive, giou_loss(boxes, target), 0.0).sum() / n_pos


def giou_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """1 - generalised IoU of paired xyxy boxes (... x 4), elementwise; torchvision's version checks its input
    with data-dependent indexing, which the memory planner's fake tensors cannot trace."""
    px0, py0, px1, py1 = pred.unbind(-1)
    tx0, ty0, tx1, ty1 = target.unbind(-1)
    width = (torch.min(px1, tx1) - torch.max(px0, tx0)).clamp(min=0)
    inter = width * (torch.min(py1, ty1) - torch.max(py0, ty0)).clamp(min=0)
    union = (px1 - px0) * (py1 - py0) + (tx1 - tx0) * (ty1 - ty0) - inter
    hull = (torch.max(px1, tx1) - torch.min(px0, tx0)) * (torch.max(py1, ty1) - torch.min(py0, ty0))
    iou = inter / (union + eps)
    return 1 - iou + (hull - union) / (hull + eps)
