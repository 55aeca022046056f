"""blobs-train's declaration: its knobs, presets and `COMMAND`, without torch (the CLI builds --help from it)."""

from __future__ import annotations

from dataclasses import dataclass

from fewshot_cli.runner.command import Command
from fewshot_cli.runner.config import BaseConfig, knob


@dataclass
class BlobsConfig(BaseConfig):  # a training command: BaseConfig brings --val-every, --checkpoint-every, --workers
    steps: int = knob(40, "training steps", minimum=1)
    classes: int = knob(3, "classes, one Gaussian blob each", minimum=2)
    batch_size: int = knob(32, "points per training step", minimum=1)
    lr: float = knob(0.5, "SGD learning rate", minimum=0.0)


COMMAND = Command(
    name="blobs-train",  # the same name as its entry point
    help="A linear classifier on Gaussian blobs: the smallest command another package can add.",
    config=BlobsConfig,
    # a device preset it leaves out (t4, mps, ...) keeps the defaults; a name of its own is a preset too
    presets={"cpu": {"steps": 40}, "quick": {"steps": 8, "batch_size": 16}},
    task_path="blobs_task:BlobsTask",  # imported, with torch, only when the command runs or is planned
    primary_metric="accuracy",
    data_parallel=False,  # its step does not share its work among torchrun ranks
    demo={"steps": 8},
)
