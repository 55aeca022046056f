"""Pretrained weights for every command: `none`, a torchvision weights name through the torch hub cache, or a file;
read without running any pickled code, checked key by key, and recorded with the sha256 of every file read."""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import socket
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from fewshot_cli.errors import BadInput

#: seconds a download may wait to connect: an offline machine gives up at once instead of hanging
CONNECT_TIMEOUT_S = 3.0
#: seconds a download may wait for the server's next bytes once connected: a stalled transfer gives up
TRANSFER_TIMEOUT_S = 30.0
FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")
#: torchvision ResNets' top-level children in order; our Sequential trunks name them by index
RESNET_CHILDREN = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")


@dataclass
class Pretrained:
    """A state dict of tensors and where it came from: `record` goes to config.json and the log."""

    state: dict[str, torch.Tensor]
    record: dict[str, Any]
    #: the weights' own preprocessing (`weights.transforms()`) for a torchvision name, else None
    transforms: Any = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    left_at_init: list[str] = field(default_factory=list)


def is_none(spec: str | None) -> bool:
    return spec is None or spec.strip().lower() in ("", "none")


def resolve(spec: str | None, arch: str, option: str = "--weights") -> Pretrained | None:
    """`none` (None), a torchvision weights name for `arch` (`DEFAULT`, `IMAGENET1K_V1`, ...), or a file."""
    if is_none(spec):
        return None
    assert spec is not None
    if _is_file_spec(spec):
        path = Path(spec)
        state = read_state_dict(path, option)
        return Pretrained(state, {"option": option, "path": str(path), "files": {str(path): sha256(path)}})
    return _torchvision(spec, arch, option)


def _is_file_spec(spec: str) -> bool:
    return Path(spec).exists() or "/" in spec or os.sep in spec or spec.lower().endswith(FILE_SUFFIXES)


def torchvision_weights(spec: str, arch: str, option: str = "--weights") -> Any:
    """The `torchvision.models.WeightsEnum` member `spec` names for `arch`; an unknown name is a BadInput."""
    import torchvision  # torchvision (and the dynamo it loads) only for its own weights' names

    try:
        enum = torchvision.models.get_model_weights(arch)
    except (ValueError, KeyError):
        raise BadInput(f"{option} {spec}: {arch} has no torchvision weights; pass none or a weights file.") from None
    name = spec.split(".")[-1]
    if name not in enum.__members__:
        names = ", ".join(["DEFAULT", *(m.name for m in enum)])
        raise BadInput(f"{option} {spec} is neither a file nor a torchvision weights name for {arch} ({names}).")
    return enum[name]


def cache_path(weights: Any) -> Path:
    """Where torchvision's `load_state_dict_from_url` keeps this weights file: $TORCH_HOME/hub/checkpoints/NAME."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def _torchvision(spec: str, arch: str, option: str) -> Pretrained:
    weights = torchvision_weights(spec, arch, option)
    path = cache_path(weights)
    if not path.is_file():
        _download(weights, path, option, spec)
    transforms = weights.transforms()
    record = {"option": option, "name": f"{type(weights).__name__}.{weights.name}", "url": weights.url,
              "files": {str(path): sha256(path)}}
    return Pretrained(read_state_dict(path, option), record, transforms,
                      tuple(getattr(transforms, "mean", ())) or None, tuple(getattr(transforms, "std", ())) or None)


def _download(weights: Any, path: Path, option: str, spec: str) -> None:
    """Fetch a torchvision weights file into the hub cache; unreachable is a BadInput within seconds, not a hang."""
    url = urlparse(weights.url)
    full = f"{type(weights).__name__}.{weights.name}"
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=CONNECT_TIMEOUT_S).close()
    except OSError:
        raise BadInput(
            f"{option} {spec}: torchvision's {full} is not in the torch hub cache and {url.hostname} cannot be "
            f"reached; looked for {path}: copy {path.name} there from a connected machine, where "
            f"`python -c \"import torchvision; torchvision.models.get_weight('{full}').get_state_dict()\"` puts it "
            f"in ~/.cache/torch/hub/checkpoints/ (or pass --weights none).") from None
    download(weights.url, path, f"{option} {spec}")


def download(url: str, path: Path, what: str, timeout_s: float = TRANSFER_TIMEOUT_S) -> None:
    """Fetch `url` into `path`. A server that sends nothing for `timeout_s` seconds, like any failed transfer, is a
    BadInput that names `what` (the option and its value), not a hang; no file is left behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_s)  # a stalled transfer fails instead of hanging the run before its first step
    try:
        torch.hub.download_url_to_file(url, str(path), progress=False)
    except Exception as err:  # noqa: BLE001 - urllib raises several kinds; none leaves a file behind
        # urllib wraps a stall while connecting or in the TLS handshake in a URLError; one in the reply it does not
        if isinstance(err, TimeoutError) or isinstance(getattr(err, "reason", None), TimeoutError):
            raise BadInput(f"{what}: {url} sent nothing for {timeout_s:g} s, so downloading it to {path} was given "
                           "up; copy the file there by hand.") from None
        raise BadInput(f"{what}: downloading {url} to {path} failed ({type(err).__name__}); "
                       "copy the file there by hand.") from None
    finally:
        socket.setdefaulttimeout(previous)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def safe_load(path: str | Path, option: str) -> Any:
    """`torch.load(weights_only=True)`: tensors and plain containers only. A file that needs any other object is a
    BadInput, and its pickle is never run."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise BadInput(f"{option} {path} holds Python objects besides tensors and plain containers; it will not be "
                       "unpickled, so no code in it runs.") from None
    except Exception as err:  # noqa: BLE001 - torch raises several kinds for a file that is not a torch file
        raise BadInput(f"{option} {path} is not a readable PyTorch file ({type(err).__name__}).") from None


def read_state_dict(path: str | Path, option: str = "--weights") -> dict[str, torch.Tensor]:
    """A state dict from a file: a bare one (.pt/.pth/.safetensors), the `state_dict` or `model` entry of a
    checkpoint, or the model of a fewshot `checkpoint.pt`/`model.pt`; DataParallel's `module.` prefixes dropped."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{option} {path} does not exist.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file  # safetensors: only for a .safetensors file

        try:
            state: Any = load_file(str(path))
        except Exception as err:  # noqa: BLE001 - safetensors raises its own kinds for a damaged file
            raise BadInput(f"{option} {path} is not a readable safetensors file ({type(err).__name__}).") from None
    else:
        state = _unwrap(safe_load(path, option))
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BadInput(f"{option} {path} does not hold a state dict of tensors.")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _unwrap(state: Any) -> Any:
    if isinstance(state, dict) and isinstance(state.get("task"), dict):  # a fewshot checkpoint.pt
        state = state["task"]
    # `params`: FEAT's checkpoints (`dict(params=model.state_dict())`); `state`: CloserLookFewShot's
    for key in ("state_dict", "model", "params", "state"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            return state[key]
    return state


# ---------------------------------------------------------------- fitting a state dict to a module


def from_resnet(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """torchvision ResNet names (`layer1.0.conv1.weight`) as our trunks' indices (`PREFIX4.0.conv1.weight`); its
    ImageNet classifier `fc` dropped. A state dict already in our names passes through."""
    if not any(k.partition(".")[0] in RESNET_CHILDREN for k in state):
        return state
    out = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head in RESNET_CHILDREN:
            out[f"{prefix}{RESNET_CHILDREN.index(head)}.{rest}"] = value
        elif head != "fc":
            out[key] = value
    return out


def from_few_shot_repos(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """FEAT's and CloserLookFewShot's backbones in our names, other state dicts unchanged (then torchvision's ResNet
    names as `from_resnet` maps them). FEAT's ResNet-12 (`encoder.layerN.0.convK`, `bnK`, `downsample.0/1`, no stem)
    is our `resnet12` block for block; its Conv-4 (`encoder.I.0` conv, `encoder.I.1` BatchNorm) and
    CloserLookFewShot's (`feature.trunk.I.C`, `.BN`, each saved a second time under `.trunk.`) are our `conv4` and
    `conv6`; the classifier or attention trained beside the backbone (`fc`, `classifier`, `slf_attn`) is left out.
    Their convolutions carry a bias where ours, followed by BatchNorm, have none: the bias moves into the
    BatchNorm's running mean, which gives the same output in evaluation and the same gradients in training (a
    batch's mean absorbs it)."""
    trunk = [key for key in state if key.startswith(("encoder.", "feature."))]  # the rest: heads trained with it
    bare = {key.partition(".")[2]: state[key] for key in trunk} if trunk else state
    if not any(_FEW_SHOT_KEY.match(key) for key in bare) or "conv1.weight" in bare:  # a torchvision stem: not FEAT's
        return from_resnet(state)
    out: dict[str, torch.Tensor] = {}
    for key, value in bare.items():
        if _CLOSER_LOOK_COPY.match(key):
            continue
        if match := _FEAT_RESNET12.match(key):
            layer, part, number, rest = match.groups()
            key = (f"{int(layer) - 1}.shortcut.{number}.{rest}" if part == "downsample" else
                   f"{int(layer) - 1}.body.{3 * (int(number) - 1) + (part == 'bn')}.{rest}")
        elif match := _CLOSER_LOOK_CONV.match(key):
            index, part, rest = match.groups()
            key = f"{index}.{int(part == 'BN')}.{rest}"
        out[key] = value
    for key in [k for k in out if k.endswith(".0.bias") and out.get(k[:-len("bias")] + "weight",
                                                                     torch.empty(0)).dim() == 4]:
        mean = key[:-len("0.bias")] + "1.running_mean"
        if mean in out:
            out[mean] = out[mean] - out.pop(key)
    return out


_FEAT_RESNET12 = re.compile(r"layer(\d)\.0\.(conv|bn|downsample)(?:\.?)(\d)\.(.+)")
_CLOSER_LOOK_CONV = re.compile(r"trunk\.(\d+)\.(C|BN)\.(.+)")
_CLOSER_LOOK_COPY = re.compile(r"trunk\.\d+\.trunk\.")
#: the keys that say a state dict is one of FEAT's or CloserLookFewShot's backbones
_FEW_SHOT_KEY = re.compile(r"layer\d\.0\.conv3\.|trunk\.\d+\.C\.|\d+\.0\.bias$")


def strip_prefix(state: dict[str, torch.Tensor], own: set[str]) -> dict[str, torch.Tensor]:
    """A whole model's state dict cut to the part `own` names (`backbone.0.weight` -> `0.weight`), by the prefix
    that makes the most keys fit; unchanged when it fits as it is."""
    best, fits = "", len(own & set(state))
    if fits == len(own):
        return state
    prefixes = {key[: i + 1] for key in state for i, char in enumerate(key) if char == "."}
    for prefix in sorted(prefixes):
        n = sum(1 for k in state if k.startswith(prefix) and k[len(prefix):] in own)
        if n > fits:
            best, fits = prefix, n
    if not best:
        return state
    return {k[len(best):]: v for k, v in state.items() if k.startswith(best)}


def load_into(module: nn.Module, weights: Pretrained, what: str, strict: bool = True,
              head: tuple[str, ...] = ()) -> Pretrained:
    """Copy `weights` into `module`. Keys under `head` (a new head) may differ: they keep their initial values.
    Strict, any other missing, unexpected or reshaped key is a BadInput naming the first; not strict, those keep
    their initial values too. `weights.left_at_init` lists the module's keys not loaded."""
    own = module.state_dict()
    given = strip_prefix(weights.state, set(own))

    def in_head(key: str) -> bool:
        return any(key == h or key.startswith(h + ".") for h in head)

    missing = [k for k in own if k not in given and not in_head(k)]
    unexpected = [k for k in given if k not in own and not in_head(k)]
    reshaped = [k for k in own if k in given and given[k].shape != own[k].shape and not in_head(k)]
    if strict and (missing or unexpected or reshaped):
        raise BadInput(f"{weights.record['option']} {_source(weights)} does not fit the {what}: "
                       f"{_differences(missing, unexpected, reshaped, given, own)} "
                       f"(--no-weights-strict loads the tensors that fit).")
    usable = {k: v for k, v in given.items() if k in own and v.shape == own[k].shape}
    if not usable:
        raise BadInput(f"{weights.record['option']} {_source(weights)} has no tensor that fits the {what}: "
                       f"{_differences(missing, unexpected, reshaped, given, own)}.")
    module.load_state_dict(usable, strict=False)
    weights.left_at_init = sorted(set(own) - set(usable))
    return weights


def _source(weights: Pretrained) -> str:
    return weights.record.get("name") or weights.record.get("path", "")


def _differences(missing: list[str], unexpected: list[str], reshaped: list[str], given: dict, own: dict) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing ({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])}"
                     f"{' ...' if len(unexpected) > 3 else ''})")
    if reshaped:
        key = reshaped[0]
        parts.append(f"{len(reshaped)} of another shape ({key} is {tuple(given[key].shape)}, needs "
                     f"{tuple(own[key].shape)})")
    return "; ".join(parts) or "no tensor in common"


def load_pretrained(module: nn.Module, spec: str | None, arch: str, what: str, emit: Callable[..., None],
                    strict: bool = True, head: tuple[str, ...] = (),
                    adapt: Callable[[dict], dict] | None = None, option: str = "--weights") -> Pretrained | None:
    """Resolve `spec` for `arch`, fit it to `module` and log a `weights_loaded` event; None for `none`."""
    weights = resolve(spec, arch, option)
    if weights is None:
        return None
    if adapt is not None:
        weights.state = adapt(weights.state)
    load_into(module, weights, what, strict, head)
    emit("weights_loaded", **weights.record, module=what, tensors=len(module.state_dict()) - len(
        weights.left_at_init), left_at_init=weights.left_at_init[:20], left_at_init_count=len(weights.left_at_init))
    return weights


def _freeze(module: nn.Module) -> None:
    """Fixed parameters and BatchNorm statistics: the module stays in eval mode whatever mode its parent is put in
    (in train mode BatchNorm would overwrite the pretrained running statistics with the new data's)."""
    module.requires_grad_(False)
    module.train = types.MethodType(lambda self, mode=True: nn.Module.train(self, False), module)
    module.eval()


def param_groups(model: nn.Module, backbone: nn.Module, lr: float, lr_backbone: float | None,
                 freeze: bool) -> list[dict[str, Any]]:
    """The optimiser's groups: the backbone at `lr_backbone` (default `lr`), or frozen and left out; the rest at
    `lr`."""
    if freeze:
        _freeze(backbone)
    inside = {id(p) for p in backbone.parameters()}
    rest = [p for p in model.parameters() if id(p) not in inside and p.requires_grad]
    trained = [p for p in backbone.parameters() if p.requires_grad]
    groups = [{"params": rest, "lr": lr}, {"params": trained, "lr": lr if lr_backbone is None else lr_backbone}]
    return [g for g in groups if g["params"]]
