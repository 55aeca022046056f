"""mahalanobis-train's knobs, presets and declaration, without torch: the CLI builds its options from them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fewshot_cli.errors import BadInput
from fewshot_cli.help import AMP_HELP, DATA, MEMORY
from fewshot_cli.models import names
from fewshot_cli.models.names import BACKBONES, COVARIANCES, EMBEDDING_PLOTS, ESTIMATORS, HEADS, VARIANTS
from fewshot_cli.models.pretrained import FREEZE_HELP, LR_BACKBONE_HELP, PRETRAINED, STRICT_HELP, WEIGHTS_HELP
from fewshot_cli.runner.command import Command
from fewshot_cli.runner.config import EpisodicConfig, knob


@dataclass
class MahalanobisConfig(EpisodicConfig):
    image_size: int = knob(32, "input image side in pixels", minimum=8)
    backbone: str = knob("conv4", "feature extractor (conv4, conv6, resnet12: random weights; resnet18/34/50: "
                         "--weights)", choices=BACKBONES)
    flatten: bool = knob(False, "torchvision ResNets: keep the last feature map unpooled (512x7x7 at 224 px)")
    weights: str | None = knob(None, WEIGHTS_HELP, metavar="W")
    weights_strict: bool = knob(True, STRICT_HELP)
    freeze_backbone: bool = knob(False, FREEZE_HELP)
    lr_backbone: float | None = knob(None, LR_BACKBONE_HELP, minimum=0.0)
    head: str = knob("mahalanobis", "classification head", choices=HEADS)
    covariance: str = knob("auto", "Mahalanobis covariance: dense (d x d matrices), lowrank (exact, without them), "
                           "auto (lowrank when d exceeds the support count)", choices=COVARIANCES)
    covariance_estimator: str = knob("ledoit-wolf", "Mahalanobis covariance: the pooled within-class scatter shrunk "
                                     "by Ledoit-Wolf or OAS, or Simple CNAPS's own", choices=ESTIMATORS)
    distance: str = knob("squared", "euclidean head: logits -squared distance (squared, the ProtoNet paper's) or "
                         "-distance (plain, easyfsl's: smaller logits when features are many, as conv4's 1600 at 84 "
                         "px)",
                         choices=("squared", "plain"))
    beta: float = knob(1.0, "simple-cnaps: ridge beta in Q_k = l_k S_k + (1 - l_k) S_task + beta I", minimum=1e-8)
    ridge: float = knob(10.0, "ledoit-wolf / oas: ridge as a multiple of the features' mean variance", minimum=1e-8)
    reduced_dim: int = knob(512, "project features above this size to it (0: never)", minimum=0)
    adapt: str = knob("prototypes", "what the set-to-set transformer adapts: the class prototypes, every support "
                      "embedding (support), or nothing (none)", choices=("none", "prototypes", "support"))
    variant: str = knob("cosine", "the transformer's attention metric", choices=VARIANTS)
    checkpoint_activations: bool = knob(False, "recompute backbone activations in backward to save memory")
    amp: bool = knob(False, AMP_HELP + " (the backbone; the head's statistics stay float32)")
    test_data: str | None = knob(None, "test on this dataset (any layout --data reads; its test split is enough): "
                                 "training and validation read --data, which then needs no test split", panel=DATA)
    image_root: str | None = knob(None, "where the images of file lists, split files or specs are now, when their "
                                  "listed paths are not: the folder that holds what the listed paths share",
                                  panel=DATA, result_neutral=True)
    decode_device: str = knob("cpu", "decode --data's JPEGs in the loader workers (cpu) or batched on the GPU with "
                              "nvjpeg (cuda; its pixels differ slightly from libjpeg's)", choices=names.DECODE_DEVICES,
                              panel=DATA)
    image_cache_mb: int = knob(256, "MiB of decoded, resized images kept for reuse (LRU; --workers split it)",
                               minimum=0, panel=MEMORY, result_neutral=True)
    batch_size: int = knob(128, "images per forward when computing evaluation features (halved on OOM)", minimum=1,
                           result_neutral=True)
    lr: float = knob(1e-3, "Adam learning rate", minimum=0.0)
    pretrain_epochs: int = knob(0, "epochs of pre-training before the episodes: the backbone and a linear classifier "
                                "over the training split's classes, on batches of images (0: none)", minimum=0,
                                panel=DATA)
    pretrain_batch_size: int = knob(64, "images per pre-training step (halved on OOM: the step then runs in "
                                    "micro-batches)", minimum=1, panel=MEMORY)
    pretrain_lr: float | None = knob(None, "pre-training's Adam learning rate (default: --lr)", minimum=0.0)
    plots: bool = knob(False, "write embedding.png, the test images' features in 2-D")
    embedding_plot: str = knob("pca", "the 2-D projection of --plots", choices=EMBEDDING_PLOTS)

    def check_pretraining(self) -> None:
        """Pre-training trains the backbone: a frozen one has nothing to learn from it."""
        if self.pretrain_epochs and self.freeze_backbone:
            raise BadInput("--pretrain-epochs trains the backbone, which --freeze-backbone keeps fixed: drop one of "
                           "them.")

    def check_device(self, device_type: str) -> None:
        if self.decode_device == "cuda" and device_type != "cuda":
            raise BadInput(f"--decode-device cuda decodes JPEGs on the run's CUDA device, and this run's device is "
                           f"{device_type}: use --decode-device cpu.")


_GPU = {"image_size": 84, "backbone": "resnet12", "n_query": 15, "test_episodes": 600, "weights": PRETRAINED}
#: a T4 and Apple silicon run the same schedule; the larger GPUs a longer one. Batch sizes (of the embedding pass
#: in evaluation) follow each device's memory.
_SHORT = {**_GPU, "episodes": 2000, "val_every": 200, "val_episodes": 100, "checkpoint_every": 200, "workers": 4}
_LONG = {**_GPU, "episodes": 4000, "val_every": 250, "val_episodes": 200, "checkpoint_every": 250, "workers": 8}
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {"image_size": 32, "backbone": "conv4", "episodes": 300, "n_query": 10, "val_every": 100,
            "val_episodes": 50, "test_episodes": 600, "checkpoint_every": 100, "batch_size": 256, "workers": 0},
    "t4": {**_SHORT, "batch_size": 64},
    "mps": {**_SHORT, "batch_size": 32},
    "a100": {**_LONG, "batch_size": 256},
    "h100": {**_LONG, "batch_size": 512},
}


def describe_data(cfg: MahalanobisConfig, data: Path | None) -> dict[str, Any]:
    """The layout of --data and of --test-data, as config.json and `fewshot plan` record them."""
    from fewshot_cli.data.splits import detect  # imports torch: only once a run or a plan is under way

    if data is None:
        if cfg.test_data is not None or cfg.image_root is not None:
            raise BadInput("--test-data and --image-root read datasets on disk: give --data too.")
        return {}
    record = {"data_format": detect(data)}
    if cfg.test_data is not None:
        record["test_data_format"] = detect(Path(cfg.test_data), "--test-data")
    return record


COMMAND = Command(
    name="mahalanobis-train",
    help="Episodic few-shot classification: set-to-set adaptation and a Mahalanobis / cosine / euclidean head.",
    config=MahalanobisConfig, presets=PRESETS, primary_metric="accuracy",
    task_path="fewshot_cli.commands.mahalanobis:MahalanobisTask",
    plan_knobs=("n_query", "image_size"),
    describe_data=describe_data,
    demo={"episodes": 200, "test_episodes": 300, "val_every": 100, "val_episodes": 20},
    example="fewshot mahalanobis-train --data ~/data/miniImageNet --preset t4",
    docs="docs/commands/mahalanobis-train.md")
