"""blobs-train's Task: the model, one training step, one evaluation."""

from __future__ import annotations

import torch
from blobs_command import BlobsConfig
from torch import nn

from fewshot_cli.runner.task import RunContext, Task


class BlobsTask(Task):
    def __init__(self, cfg: BlobsConfig, ctx: RunContext) -> None:
        super().__init__(cfg, ctx)
        rng = torch.Generator().manual_seed(ctx.seed)
        self.centres = 2 * torch.randn(cfg.classes, 2, generator=rng)
        self.model = nn.Linear(2, cfg.classes).to(ctx.device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=cfg.lr)  # checkpointed with the model

    def points(self, n: int, rng: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(self.cfg.classes, (n,), generator=rng)
        points = self.centres[labels] + torch.randn(n, 2, generator=rng)
        return points.to(self.ctx.device), labels.to(self.ctx.device)

    def total_steps(self) -> int:
        return self.cfg.steps

    def train_step(self, step: int) -> dict[str, float]:
        points, labels = self.points(self.cfg.batch_size)  # the runner seeded torch from (seed, step)
        self.optimizer.zero_grad()
        loss = nn.functional.cross_entropy(self.model(points), labels)
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.item()}

    def evaluate(self, phase: str, step: int) -> dict[str, float]:
        rng = torch.Generator().manual_seed(self.ctx.seed + (1 if phase == "val" else 2))
        points, labels = self.points(1000, rng)
        return {"accuracy": (self.model(points).argmax(1) == labels).float().mean().item()}
