"""An experiment command as the CLI sees it, importable without torch: its knobs, presets, and where its Task is."""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fewshot_cli.runner.config import TRAINING_KNOBS, BaseConfig


@dataclass(frozen=True)
class Command:
    """An experiment command: its name, config, presets per preset name, and the path of its Task class."""

    name: str
    help: str
    config: type
    presets: dict[str, dict[str, Any]]
    #: "module:Class" of its `runner.task.Task`: imported (with torch) only when the command runs or is planned
    task_path: str
    #: the metric a results table shows first
    primary_metric: str
    #: the metric the demo's table shows beside it (None: the command reports one result)
    secondary_metric: str | None = None
    #: knobs `--preset auto` and the planner may walk, largest first, in this order
    plan_knobs: tuple[str, ...] = ()
    #: knob values `fewshot demo` uses to run the command briefly at the `cpu` preset
    demo: dict[str, Any] = field(default_factory=dict)
    #: called with the command-line knob values before torch touches the device (e.g. MPS environment)
    prepare: Callable[[dict[str, Any]], None] | None = None
    #: called with the resolved config and `--data` (None: the built-in data): what config.json and `fewshot plan`
    #: record of the data on disk (`{"data_format": ...}`), found without reading a dataset through
    describe_data: Callable[[Any, Path | None], dict[str, Any]] | None = None
    #: runs data-parallel under torchrun (its task builds each step's gradient with `Task.accumulate`)
    data_parallel: bool = True
    #: no training: its task is a `runner.evaluation.EvaluationTask`, evaluated once, in one process; its config
    #: extends `EvaluationConfig`, so it offers no validation, step or checkpoint knobs
    evaluation_only: bool = False
    #: a command line `--help` shows under the options, and the page that documents the command
    example: str = ""
    docs: str = ""

    def __post_init__(self) -> None:
        if not self.evaluation_only and not issubclass(self.config, BaseConfig):
            raise ValueError(f"{self.name} trains, yet its config {self.config.__name__} does not extend BaseConfig, "
                             "whose knobs (--val-every, --checkpoint-every, --workers) the training loop reads")
        if self.evaluation_only:
            training = sorted(TRAINING_KNOBS & {f.name for f in dataclasses.fields(self.config)})
            if training:
                raise ValueError(f"{self.name} is evaluation-only, yet its config has training knobs "
                                 f"({', '.join(training)}): extend EvaluationConfig, not BaseConfig")

    @property
    def task(self) -> type:
        """The command's Task class; importing it imports torch and the command's model code."""
        module, _, name = self.task_path.partition(":")
        return getattr(importlib.import_module(module), name)

    def traced_task(self, cfg: Any, seed: int) -> Any:
        """The command's Task as the planner builds it to trace a step: on the CPU, with no run directory, random
        weights where they are not at hand, and its data read in this process."""
        # both load torch: the CLI imports this module without it
        import torch

        from fewshot_cli.runner.task import RunContext  # loads torch too

        return self.task(cfg, RunContext(device=torch.device("cpu"), seed=seed, run_dir=None,
                                         random_weights=True, in_process=True))
