"""Few-shot detector: backbone, frozen-support class prototypes, dense proposals, modulated objectness, boxes."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.ops import batched_nms, box_iou, clip_boxes_to_image, roi_align, sigmoid_focal_loss

from fewshot_cli.data.images import IMAGENET_MEAN, IMAGENET_STD
from fewshot_cli.errors import BadInput
from fewshot_cli.models.weights import Pretrained, from_resnet, load_pretrained

ROI_SIZE = 7
# Faster R-CNN's delta weights: keep the regression targets near unit scale
BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
MAX_LOG_SCALE = math.log(1000.0 / 16)


# ---------------------------------------------------------------- boxes


@dataclass
class BoxCounts:
    """Boxes dropped by validation, by reason, summed over a stage or a run."""

    non_finite: int = 0
    degenerate: int = 0
    clamped: int = 0

    def add(self, other: BoxCounts) -> None:
        self.non_finite += other.non_finite
        self.degenerate += other.degenerate
        self.clamped += other.clamped

    @property
    def dropped(self) -> int:
        return self.non_finite + self.degenerate


def validate_boxes(boxes: Tensor, height: float, width: float,
                   min_side: float = 1.0) -> tuple[Tensor, Tensor, BoxCounts]:
    """Clamp xyxy boxes to the image and drop non-finite and degenerate ones: (kept boxes, keep mask, counts)."""
    boxes = boxes.reshape(-1, 4)
    finite = torch.isfinite(boxes).all(dim=1)
    safe = torch.where(finite[:, None], boxes, torch.zeros_like(boxes))
    clamped = clip_boxes_to_image(safe, (int(height), int(width)))
    moved = (clamped != safe).any(dim=1) & finite
    sides = clamped[:, 2:] - clamped[:, :2]
    # inverted boxes and boxes wholly outside the image both end up thinner than min_side after clamping
    large = (sides >= min_side).all(dim=1)
    keep = finite & large
    counts = BoxCounts(non_finite=int((~finite).sum()), degenerate=int((finite & ~large).sum()),
                       clamped=int((moved & large).sum()))
    return clamped[keep], keep, counts


def validate_box_array(boxes: np.ndarray, height: float, width: float,
                       min_side: float = 1.0) -> tuple[np.ndarray, np.ndarray, BoxCounts]:
    """`validate_boxes` for data on the host (numpy), so loading data never touches device or fake tensors."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    finite = np.isfinite(boxes).all(axis=1)
    safe = np.where(finite[:, None], boxes, 0.0)
    clamped = np.clip(safe, 0.0, np.array([width, height, width, height], dtype=np.float32)).astype(np.float32)
    moved = (clamped != safe).any(axis=1) & finite
    large = ((clamped[:, 2:] - clamped[:, :2]) >= min_side).all(axis=1)
    keep = finite & large
    counts = BoxCounts(non_finite=int((~finite).sum()), degenerate=int((finite & ~large).sum()),
                       clamped=int((moved & large).sum()))
    return clamped[keep], keep, counts


def decay_across_classes(boxes: Tensor, scores: Tensor, classes: Tensor, sigma: float) -> Tensor:
    """Gaussian Soft-NMS (Bodla et al., 2017) between classes, for detections that class-aware NMS kept: taken
    greedily by score, each detection multiplies the scores of the detections still to come that are of another
    class by exp(-IoU^2 / sigma), so a box keeps its best class at full score and its other classes lower. Boxes
    N x 4, scores N and class indices N in; the new scores N out (same order, same device)."""
    if len(scores) < 2:
        return scores.clone()
    iou = box_iou(boxes, boxes).cpu().double().numpy()
    other = (classes[:, None] != classes[None, :]).cpu().numpy()
    decay = np.where(other, np.exp(-iou**2 / sigma), 1.0)
    left = scores.cpu().double().numpy().copy()
    done = np.zeros(len(left), dtype=bool)
    out = np.empty_like(left)
    for _ in range(len(left)):
        best = int(np.argmax(np.where(done, -np.inf, left)))
        out[best], done[best] = left[best], True
        left = np.where(done, left, left * decay[best])
    return torch.from_numpy(out).to(scores)


def dense_proposals(image_size: int, step: int, sides: tuple[float, ...], ratios: tuple[float, ...] = (1.0,)
                    ) -> Tensor:
    """Boxes of each side (pixels: the square root of their area) and each width / height ratio, centred on a grid
    every `step` px, validated: every pixel lies within step/2 of a centre, and the last row and column of centres
    are pulled inside the image."""
    n = math.ceil(image_size / step)
    centres = np.minimum(np.arange(n) * step + step / 2, image_size - min(step, image_size) / 2)
    cy, cx = (a.reshape(-1) for a in np.meshgrid(centres, centres, indexing="ij"))
    shapes = [(s * math.sqrt(r) / 2, s / math.sqrt(r) / 2) for s in sides for r in ratios]
    boxes = np.concatenate([np.stack([cx - w, cy - h, cx + w, cy + h], axis=1) for w, h in shapes])
    kept, _, _ = validate_box_array(boxes, image_size, image_size)
    return torch.from_numpy(kept)


def encode_boxes(reference: Tensor, proposals: Tensor) -> Tensor:
    """Regression targets (dx, dy, dw, dh) taking `proposals` to `reference`."""
    wx, wy, ww, wh = BOX_WEIGHTS
    pw, ph = proposals[:, 2] - proposals[:, 0], proposals[:, 3] - proposals[:, 1]
    px, py = proposals[:, 0] + 0.5 * pw, proposals[:, 1] + 0.5 * ph
    gw, gh = reference[:, 2] - reference[:, 0], reference[:, 3] - reference[:, 1]
    gx, gy = reference[:, 0] + 0.5 * gw, reference[:, 1] + 0.5 * gh
    return torch.stack([wx * (gx - px) / pw, wy * (gy - py) / ph, ww * torch.log(gw / pw),
                        wh * torch.log(gh / ph)], dim=1)


def decode_boxes(deltas: Tensor, proposals: Tensor) -> Tensor:
    """Apply regression deltas to proposals (the inverse of `encode_boxes`)."""
    wx, wy, ww, wh = BOX_WEIGHTS
    pw, ph = proposals[:, 2] - proposals[:, 0], proposals[:, 3] - proposals[:, 1]
    px, py = proposals[:, 0] + 0.5 * pw, proposals[:, 1] + 0.5 * ph
    dw = (deltas[:, 2] / ww).clamp(max=MAX_LOG_SCALE)
    dh = (deltas[:, 3] / wh).clamp(max=MAX_LOG_SCALE)
    x, y = px + deltas[:, 0] / wx * pw, py + deltas[:, 1] / wy * ph
    w, h = pw * torch.exp(dw), ph * torch.exp(dh)
    return torch.stack([x - w / 2, y - h / 2, x + w / 2, y + h / 2], dim=1)


# ---------------------------------------------------------------- backbones


def small_backbone(channels: int) -> nn.Sequential:
    """A stride-4 conv net for the cpu preset: cheap, and fine enough for 20-40 px objects."""

    def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.GroupNorm(8, cout), nn.ReLU(inplace=True)]

    return nn.Sequential(*block(3, 24, 2), *block(24, 48, 2), *block(48, 48, 1), nn.Conv2d(48, channels, 1))


class ResNet50Features(nn.Module):
    """torchvision resnet50 up to layer3 (stride 16), projected to `channels` by a 1x1 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        trunk = torchvision.models.resnet50(weights=None)
        self.body = nn.Sequential(trunk.conv1, trunk.bn1, trunk.relu, trunk.maxpool, trunk.layer1, trunk.layer2,
                                  trunk.layer3)
        self.project = nn.Conv2d(1024, channels, 1)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        return self.project(self.body((images - self.mean) / self.std))


def load_backbone_weights(backbone: nn.Module, spec: str | None, name: str, emit: Callable[..., None],
                          strict: bool = True) -> Pretrained | None:
    """`--weights` for a detection backbone: a torchvision ResNet-50 trunk up to layer3 (its layer4 and ImageNet
    classifier unused; the new 1x1 projection left at its initial values), or a file for either backbone."""
    def adapt(state: dict) -> dict:
        return {k: v for k, v in from_resnet(state, "body.").items() if not k.startswith("body.7.")}

    weights = load_pretrained(backbone, spec, name, "backbone", emit, strict,
                              head=("project",) if name == "resnet50" else (), adapt=adapt)
    if weights is not None and weights.mean is not None and isinstance(backbone, ResNet50Features):
        backbone.mean.copy_(torch.tensor(weights.mean).view(1, 3, 1, 1))  # the weights' transforms() constants
        backbone.std.copy_(torch.tensor(weights.std).view(1, 3, 1, 1))
    return weights


def build_feature_backbone(name: str, channels: int) -> tuple[nn.Module, int]:
    """A feature-map extractor with `channels` outputs (one of `names.DETECTION_BACKBONES`) and its stride."""
    if name == "resnet50":
        return ResNet50Features(channels), 16
    if name == "small":
        return small_backbone(channels), 4
    raise BadInput(f"Unknown backbone {name!r}; choose small or resnet50.")


# ---------------------------------------------------------------- detector


@dataclass
class DetectionLoss:
    """The terms of one episode's loss and the counts behind them."""

    total: Tensor
    classification: Tensor
    objectness: Tensor
    regression: Tensor
    positives: Tensor
    negatives: Tensor


class FewShotDetector(nn.Module):
    """Class prototypes from support boxes, matched by scaled cosine against ROI embeddings of dense proposals."""

    def __init__(self, backbone: nn.Module, stride: int, embedding_dim: int, head_hidden: int,
                 objectness_hidden: int) -> None:
        super().__init__()
        self.backbone, self.stride = backbone, stride
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(embedding_dim * ROI_SIZE * ROI_SIZE, head_hidden),
                                  nn.ReLU(inplace=True), nn.Linear(head_hidden, embedding_dim))
        # modulation keeps the objectness input at embedding_dim whatever n_way is (the original study's shape bug)
        self.objectness = nn.Sequential(nn.Linear(embedding_dim, objectness_hidden), nn.ReLU(inplace=True),
                                        nn.Linear(objectness_hidden, 1))
        self.box_regression = nn.Linear(embedding_dim, 4)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        # focal-loss prior: start with ~1% foreground probability so background does not swamp early steps
        self.logit_bias = nn.Parameter(torch.tensor(-math.log(99.0)))
        nn.init.zeros_(self.box_regression.weight)
        nn.init.zeros_(self.box_regression.bias)
        nn.init.constant_(self.objectness[-1].bias, -math.log(99.0))

    def head_state(self) -> dict[str, Tensor]:
        """A copy of every weight but the backbone's: what a fine-tuning of the head changes."""
        return {name: value.detach().clone() for name, value in self.state_dict().items()
                if not name.startswith("backbone.")}

    def head_parameters(self) -> list[nn.Parameter]:
        """The parameters of the head, objectness, box regression and class-logit scale and bias."""
        return [p for name, p in self.named_parameters() if not name.startswith("backbone.")]

    def forward(self, images: Tensor) -> Tensor:
        """Images B x 3 x S x S to the backbone's feature map B x embedding_dim x S/stride x S/stride."""
        return self.backbone(images)

    def roi_embeddings(self, feature_map: Tensor, boxes: list[Tensor]) -> Tensor:
        rois = roi_align(feature_map, boxes, ROI_SIZE, spatial_scale=1 / self.stride, sampling_ratio=1,
                         aligned=True)
        return self.head(rois)

    def pooled(self, feature_map: Tensor, boxes: list[Tensor]) -> Tensor:
        """One mean feature per box: the cheap descriptor that ranks proposals before the head runs."""
        return roi_align(feature_map, boxes, 1, spatial_scale=1 / self.stride, sampling_ratio=4,
                         aligned=True).flatten(1)

    @torch.no_grad()
    def prototypes(self, images: Tensor, boxes: Tensor, labels: Tensor, n_way: int) -> tuple[Tensor, Tensor]:
        """Frozen support encoder: per class, the mean unit ROI embedding and the mean unit pooled feature
        of its support boxes (one box per support image), computed without gradients."""
        feature_map = self(images)
        per_image = [b[None] for b in boxes]
        embeddings = F.normalize(self.roi_embeddings(feature_map, per_image), dim=1)
        pooled = F.normalize(self.pooled(feature_map, per_image), dim=1)
        onehot = (labels[None, :] == torch.arange(n_way, device=labels.device)[:, None]).float()
        count = onehot.sum(1).clamp(min=1)[:, None]
        return F.normalize(onehot @ embeddings / count, dim=1), F.normalize(onehot @ pooled / count, dim=1)

    @torch.no_grad()
    def rank_proposals(self, feature_map: Tensor, proposals: Tensor, pooled_prototypes: Tensor, top_k: int) -> Tensor:
        """Indices (images x top_k) of the proposals most like any prototype, by cosine of pooled features."""
        n = feature_map.shape[0]
        pooled = F.normalize(self.pooled(feature_map, [proposals] * n), dim=1).view(n, len(proposals), -1)
        likeness = (pooled @ pooled_prototypes.T).amax(dim=2)
        return likeness.topk(min(top_k, len(proposals)), dim=1).indices

    def score(self, embeddings: Tensor, prototypes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(class logits R x n_way, objectness logits R, box deltas R x 4)."""
        unit = F.normalize(embeddings, dim=1)
        class_logits = self.logit_scale.exp() * unit @ prototypes.T + self.logit_bias
        confidence = torch.sigmoid(class_logits.amax(dim=1, keepdim=True))
        objectness = self.objectness(embeddings * confidence).squeeze(1)
        return class_logits, objectness, self.box_regression(embeddings)

    def loss(self, feature_map: Tensor, gt_boxes: list[Tensor], gt_labels: list[Tensor], prototypes: Tensor,
             pooled_prototypes: Tensor, proposals: Tensor, top_k: int, negative_ratio: float) -> DetectionLoss:
        """Focal class and objectness losses over positives and the hardest negatives, smooth L1 on positives, of
        the queries' feature map (this model's forward of the query images)."""
        rois, labels, targets = self.assign(feature_map, gt_boxes, gt_labels, pooled_prototypes, proposals, top_k,
                                            prototypes.shape[0])
        return self.roi_loss(rois, labels, targets, prototypes, negative_ratio)

    def assign(self, feature_map: Tensor, gt_boxes: list[Tensor], gt_labels: list[Tensor], pooled_prototypes: Tensor,
               proposals: Tensor, top_k: int, n_way: int, positive_iou: float = 0.5, negative_iou: float = 0.4,
               ) -> tuple[Tensor, Tensor, Tensor]:
        """The training candidates of each image (its ranked proposals and its ground-truth boxes): their ROI
        features R x C x 7 x 7, labels R (an episode label, n_way for background, -1 ignored) and box targets R x 4."""
        top = self.rank_proposals(feature_map, proposals, pooled_prototypes, top_k)
        # the ground-truth boxes join the ranked proposals so every object has a positive from step one
        candidates = [torch.cat([proposals[idx], gt]) for idx, gt in zip(top, gt_boxes, strict=True)]
        labels, matched = [], []
        for boxes, gt, gl in zip(candidates, gt_boxes, gt_labels, strict=True):
            if len(gt):
                best, which = box_iou(boxes, gt).max(dim=1)
                # between the two IoU thresholds a proposal is ignored (-1); below, background (n_way)
                label = torch.where(best >= positive_iou, gl[which],
                                    torch.where(best < negative_iou, n_way, -1))
                matched.append(encode_boxes(gt[which], boxes))
            else:
                label = torch.full((len(boxes),), n_way, dtype=torch.long, device=boxes.device)
                matched.append(torch.zeros_like(boxes))
            labels.append(label)
        rois = roi_align(feature_map, candidates, ROI_SIZE, spatial_scale=1 / self.stride, sampling_ratio=1,
                         aligned=True)
        return rois, torch.cat(labels), torch.cat(matched)

    def roi_loss(self, rois: Tensor, labels_all: Tensor, deltas_target: Tensor, prototypes: Tensor,
                 negative_ratio: float) -> DetectionLoss:
        """The loss of `assign`'s candidates against the prototypes (n_way x C)."""
        n_way = prototypes.shape[0]
        class_logits, objectness, deltas = self.score(self.head(rois), prototypes)
        # every term below keeps a fixed shape (masks as weights, counts as tensors) so the memory planner can
        # trace the step under fake tensors
        positive = (labels_all >= 0) & (labels_all < n_way)
        negative = labels_all == n_way
        onehot = (labels_all[:, None] == torch.arange(n_way, device=labels_all.device)).float()
        class_loss = sigmoid_focal_loss(class_logits, onehot, reduction="none").sum(dim=1)
        object_loss = sigmoid_focal_loss(objectness, positive.float(), reduction="none")
        n_pos = positive.sum()
        norm = n_pos.clamp(min=1).float()
        # hard negative mining: only the highest-loss negatives, at a fixed ratio to the positives
        order = (class_loss + object_loss).detach().masked_fill(~negative, -math.inf).argsort(descending=True)
        rank = torch.empty_like(order).scatter_(0, order, torch.arange(len(order), device=order.device))
        hard = negative & (rank < (negative_ratio * norm).round())
        weight = positive | hard
        zero = class_loss.new_zeros(())
        cls_total = torch.where(weight, class_loss, zero).sum() / norm
        obj_total = torch.where(weight, object_loss, zero).sum() / norm
        smooth = F.smooth_l1_loss(deltas, deltas_target, beta=1 / 9, reduction="none").sum(dim=1)
        reg = torch.where(positive, smooth, zero).sum() / norm
        return DetectionLoss(cls_total + obj_total + reg, cls_total, obj_total, reg, n_pos, hard.sum())

    @torch.no_grad()
    def candidates(self, images: Tensor, prototypes: Tensor, pooled_prototypes: Tensor, proposals: Tensor,
                   top_k: int, classes: str = "sigmoid") -> tuple[Tensor, Tensor]:
        """Decoded boxes (images x top_k x 4) and class scores (images x top_k x n_way) of the ranked proposals:
        sigmoid(objectness) times each class's probability, `classes` `sigmoid` (of its own logit: is the box this
        class at all), `softmax` (over the episode's classes, which exclude one another) or `both` (their
        product: the softmax picks among the episode's classes, the sigmoid keeps a box unlike all of them low)."""
        feature_map = self(images)
        top = self.rank_proposals(feature_map, proposals, pooled_prototypes, top_k)
        ranked = [proposals[idx] for idx in top]
        class_logits, objectness, deltas = self.score(self.roi_embeddings(feature_map, ranked), prototypes)
        probability = torch.sigmoid(class_logits) if classes == "sigmoid" else class_logits.softmax(dim=1)
        if classes == "both":
            probability = probability * torch.sigmoid(class_logits)
        scores = probability * torch.sigmoid(objectness)[:, None]
        boxes = decode_boxes(deltas, torch.cat(ranked))
        n = len(images)
        return boxes.view(n, top.shape[1], 4), scores.view(n, top.shape[1], -1)

    @torch.no_grad()
    def detect(self, images: Tensor, prototypes: Tensor, pooled_prototypes: Tensor, proposals: Tensor, top_k: int,
               score_threshold: float, nms_iou: float, max_detections: int, classes: str = "sigmoid",
               soft_nms_sigma: float = 0.0) -> tuple[list[tuple[Tensor, Tensor, Tensor]], BoxCounts]:
        """Per image (boxes, scores, class indices) after box validation, class-aware NMS and, with
        `soft_nms_sigma`, `decay_across_classes`; at most `max_detections`, best first."""
        boxes, scores = self.candidates(images, prototypes, pooled_prototypes, proposals, top_k, classes)
        height, width = images.shape[-2:]
        n_way = prototypes.shape[0]
        counts, out = BoxCounts(), []
        for image_boxes, image_scores in zip(boxes, scores, strict=True):
            kept_boxes, keep, c = validate_boxes(image_boxes, height, width)
            counts.add(c)
            s = image_scores[keep].reshape(-1)
            b = kept_boxes[:, None].expand(-1, n_way, -1).reshape(-1, 4)
            classes = torch.arange(n_way, device=b.device).repeat(len(kept_boxes))
            good = s > score_threshold
            b, s, classes = b[good], s[good], classes[good]
            kept = batched_nms(b, s, classes, nms_iou)
            b, s, classes = b[kept], s[kept], classes[kept]
            if soft_nms_sigma:
                s = decay_across_classes(b, s, classes, soft_nms_sigma)
                order = s.argsort(descending=True, stable=True)
                b, s, classes = b[order], s[order], classes[order]
            out.append((b[:max_detections], s[:max_detections], classes[:max_detections]))
        return out, counts
