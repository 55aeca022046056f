"""Reading a local weights file: the one place that turns a path into a state dict of tensors, or a BadInput."""

from __future__ import annotations

from pathlib import Path

import torch

from fewshot_cli.errors import BadInput


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A local state dict: a bare one, or the `state_dict`/`model` entry of a training checkpoint; DataParallel's
    `module.` prefixes dropped. A missing, unreadable or tensor-less file is a BadInput naming it."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"--weights {path} does not exist.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises several kinds for a file that is not a state dict
        raise BadInput(f"--weights {path} is not a readable PyTorch state dict ({type(err).__name__}).") from None
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BadInput(f"--weights {path} does not hold a state dict of tensors.")
    return {k.removeprefix("module."): v for k, v in state.items()}
