"""Hugging Face models by id through the HF cache (`HF_HOME`), or from a local directory: the cached snapshot is
used, a download happens only when it is absent and the hub answers, and `HF_HUB_OFFLINE=1` is respected."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from fewshot_cli.errors import BadInput
from fewshot_cli.models.pretrained import HF_BACKBONES as HF_BACKBONES
from fewshot_cli.models.pretrained import HF_MODELS, PRETRAINED

CONNECT_TIMEOUT_S = 3.0


def hf_model(kind: str, spec: str | None) -> tuple[Path, dict[str, Any]]:
    """The local directory of `--model` (an id, `DEFAULT`, or a directory) and its record for config.json: the id
    or path and the sha256 of every file in it."""
    from fewshot_cli.models.weights import sha256  # weights loads torch: this module stays torch-free

    if spec == PRETRAINED and kind in HF_MODELS:
        spec = HF_MODELS[kind]
    if not spec or spec == PRETRAINED:
        example = HF_MODELS.get(kind, "facebook/dinov2-small")
        raise BadInput(f"--backbone {kind} needs --model: a Hugging Face id such as {example}, or a local "
                       "directory saved with save_pretrained.")
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise BadInput(f"--model {path} is not a Hugging Face model directory (no config.json).")
        record = {"option": "--model", "path": str(path)}
    elif path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise BadInput(f"--model {spec} is neither a local model directory nor a Hugging Face id (org/name).")
    else:
        path, record = _snapshot(spec), {"option": "--model", "id": spec}
    files = sorted(p for p in path.rglob("*") if p.is_file())
    record["files"] = {str(p.relative_to(path)): sha256(p) for p in files}
    record["directory"] = str(path)
    return path, record


def hf_local(kind: str, spec: str | None) -> tuple[Path | None, str]:
    """For planning: the local directory of `--model` (a directory, or an id's snapshot already in the HF cache)
    and the id or path it stands for; None where it is not here. Never downloads, never opens a socket: no
    `--model` (or `DEFAULT`) stands for the backbone's default id."""
    if not spec or spec == PRETRAINED:
        spec = HF_MODELS.get(kind)
    if not spec:
        return None, ""
    path = Path(spec).expanduser()
    if path.is_dir():
        return (path if (path / "config.json").is_file() else None), str(path)
    if spec.count("/") != 1 or spec.startswith((".", "/", "~")):
        return None, spec
    return _cached(spec), spec


def _snapshot(repo: str) -> Path:
    """The cached snapshot of `repo`, downloaded first when absent and the hub can be reached."""
    from huggingface_hub import constants  # huggingface_hub: loaded only for a Hugging Face backbone

    cached = _cached(repo)
    if cached is not None:
        return cached
    folder = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    why = ("HF_HUB_OFFLINE is set" if _offline() or constants.HF_HUB_OFFLINE else
           "" if _reachable(host) else f"{host} cannot be reached")
    if why:
        raise BadInput(f"--model {repo} is not in the Hugging Face cache and {why}; looked for {folder}: on a "
                       f"connected machine run `hf download {repo}` (HF_HOME as here) and copy {folder.name} into "
                       f"{folder.parent}, or pass a local directory.")
    _download(repo)
    cached = _cached(repo)
    if cached is None:
        raise BadInput(f"--model {repo}: the download left no snapshot in {folder}.")
    return cached


def _cached(repo: str) -> Path | None:
    from huggingface_hub import snapshot_download  # huggingface_hub: loaded only for a Hugging Face backbone

    try:
        path = Path(snapshot_download(repo, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached, or not a valid id: both mean "not here"
        return None
    return path if (path / "config.json").is_file() else None


def _download(repo: str) -> None:
    """Fetch what transformers needs (config, weights, image processor) into the cache, nothing else."""
    import transformers  # transformers: loaded only for a Hugging Face backbone

    try:
        transformers.AutoConfig.from_pretrained(repo)
        transformers.AutoModel.from_pretrained(repo)
        transformers.AutoImageProcessor.from_pretrained(repo)
    except (OSError, ValueError) as err:
        raise BadInput(f"--model {repo} could not be downloaded: {str(err).splitlines()[0]}") from None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _reachable(host: str) -> bool:
    """One TCP connection with a short timeout: an offline machine answers in seconds instead of hanging."""
    try:
        socket.create_connection((host, 443), timeout=CONNECT_TIMEOUT_S).close()
    except OSError:
        return False
    return True
