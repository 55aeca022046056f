"""embed-classify's knobs, presets and declaration, without torch: the CLI builds its options from them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fewshot_cli.models.names import EMBEDDER_BACKBONES, EMBEDDING_PLOTS, FROZEN_HEADS
from fewshot_cli.models.pretrained import PRETRAINED, STRICT_HELP, WEIGHTS_HELP
from fewshot_cli.runner.command import Command
from fewshot_cli.runner.config import EvaluationConfig, knob


def _built_in_data(default: int, help: str) -> Any:
    """A knob that shapes the built-in synthetic data (a run with --data ignores it)."""
    return knob(default, "built-in data: " + help, minimum=1)


@dataclass
class EmbedConfig(EvaluationConfig):
    backbone: str = knob("small", "frozen feature extractor; small is a built-in net with random weights",
                         choices=EMBEDDER_BACKBONES, built_in="small")
    weights: str | None = knob(None, "resnet50: " + WEIGHTS_HELP, metavar="W")
    weights_strict: bool = knob(True, STRICT_HELP)
    model: str | None = knob(None, "clip / dinov2 / hf: a Hugging Face model id (through the HF cache) or a local "
                             "directory; DEFAULT: openai/clip-vit-base-patch32, facebook/dinov2-base",
                             metavar="ID_OR_DIR")
    image_size: int = knob(32, "small backbone's input side; side of the built-in images", minimum=8)
    batch_size: int = knob(32, "images per extraction batch (halved on OOM)", minimum=1, result_neutral=True)
    threshold: str = knob("auto", "cosine below which a query is Unknown; auto: leave-one-out on the support; none: "
                          "no Unknown, every query gets a class (closed-set accuracy)", metavar="X|auto|none")
    cache_dir: str | None = knob(None, "embedding store to share across runs (default: RUN_DIR/embeddings)",
                                 metavar="DIR")
    categories: int = _built_in_data(4, "categories")
    n_way: int = _built_in_data(3, "classes per class-folder category")
    k_shot: int = _built_in_data(5, "support images per class")
    n_query: int = _built_in_data(10, "query images per class")
    head: str = knob("prototype", "classifier over the embeddings; every head shares the Unknown threshold on "
                     "the best cosine to a prototype", choices=FROZEN_HEADS)
    neighbours: int = knob(5, "knn head: support shots that vote", minimum=1)
    probe_c: float = knob(1.0, "logistic head: inverse L2 regularisation strength C", minimum=1e-8)
    plots: bool = knob(False, "write embedding.png, the test queries' embeddings in 2-D")
    embedding_plot: str = knob("pca", "the 2-D projection of --plots", choices=EMBEDDING_PLOTS)


#: data on disk on a GPU or Apple-silicon preset: ImageNet's ResNet-50, which needs no extra (CLIP needs [hf]);
#: the built-in data keeps the small net (`built_in`), which no weights file serves
_PRETRAINED = {"backbone": "resnet50", "weights": PRETRAINED, "model": PRETRAINED}
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {"batch_size": 32, "image_size": 32, "workers": 0},
    "mps": {**_PRETRAINED, "batch_size": 64, "image_size": 64, "workers": 2},
    "t4": {**_PRETRAINED, "batch_size": 64, "image_size": 64, "workers": 4},
    "a100": {**_PRETRAINED, "batch_size": 128, "image_size": 64, "workers": 8},
    "h100": {**_PRETRAINED, "batch_size": 128, "image_size": 64, "workers": 8},
}


COMMAND = Command(
    name="embed-classify",
    help="Training-free few-shot classification from frozen embeddings (cosine to prototypes, Unknown threshold).",
    config=EmbedConfig, presets=PRESETS, primary_metric="accuracy",
    secondary_metric="unknown_rate", task_path="fewshot_cli.commands.embed:EmbedTask",
    plan_knobs=("batch_size",), data_parallel=False, evaluation_only=True,
    example="fewshot embed-classify --data ~/photos --backbone clip --model DEFAULT",
    docs="docs/commands/embed-classify.md")
