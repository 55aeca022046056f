"""JPEG decoding on the GPU (`--decode-device cuda`): loader workers read JPEG files as bytes, the main process
decodes a batch's files in one nvjpeg call and resizes them on the device; every other file arrives decoded by the
one CPU reader.

nvjpeg's pixels differ slightly from libjpeg-turbo's (its IDCT and chroma upsampling round differently: a few
levels of 255 on some pixels), so a run decoded on the GPU is equivalent in kind to one decoded on the CPU, not
bit-identical. Decoded images are not cached on the GPU (device memory is what the planner budgets, and nvjpeg
decodes an episode in milliseconds): the workers' `--image-cache-mb` cache holds the files' bytes instead."""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from fewshot_cli.data.images import read_image, resize

JPEG = b"\xff\xd8\xff"
#: PIL modes of JPEGs nvjpeg decodes to RGB as libjpeg does (CMYK and YCCK JPEGs stay on the CPU)
_NVJPEG_MODES = frozenset({"RGB", "L"})
#: the EXIF tag of an image's orientation; 1 (or none) is upright
_ORIENTATION = 0x0112
#: files per nvjpeg call, and the float pixels one resize call may hold, so a batch of large photos stays bounded
DECODE_GROUP = 32
RESIZE_BYTES = 128 * 1024 * 1024


def encoded_or_read(path: Path | str, size: int) -> torch.Tensor:
    """A JPEG nvjpeg decodes as it stands: its bytes, (N,) uint8; any other image (a PNG, a CMYK JPEG, a JPEG with
    an EXIF rotation, which nvjpeg does not apply): `read_image`'s (3, size, size) float32."""
    from torchvision.io import read_file  # torchvision (and the dynamo it loads) only where files are read

    try:
        raw = read_file(str(path))
    except RuntimeError:  # an empty file, say: the CPU reader raises the reader's own error for it
        return read_image(path, size)
    return raw if gpu_decodable(raw) else read_image(path, size)


def gpu_decodable(raw: torch.Tensor) -> bool:
    """A baseline colour or grey JPEG whose pixels are upright as stored (read from its header alone)."""
    if bytes(raw[:3].tolist()) != JPEG:
        return False
    try:
        with Image.open(io.BytesIO(raw.numpy().tobytes())) as image:  # parses the header, decodes nothing
            return image.mode in _NVJPEG_MODES and image.getexif().get(_ORIENTATION, 1) == 1
    except (OSError, ValueError, SyntaxError):
        return False  # let the CPU reader decide, and raise its own error


@dataclass
class Encoded:
    """A batch as the workers read it: its JPEGs' bytes end to end (one storage, so one transfer between
    processes) with each file's length, and its other images decoded, each kind with its places in the batch."""

    jpeg_bytes: torch.Tensor
    jpeg_lengths: list[int]
    jpeg_at: list[int]
    images: torch.Tensor
    image_at: list[int]

    def pin_memory(self) -> Encoded:
        """The DataLoader's pinning thread calls this: the decoded images' copy to the GPU can then overlap."""
        return dataclasses.replace(self, images=self.images.pin_memory())


def gather(samples: list[tuple[torch.Tensor, int]]) -> Encoded:
    """(file, label) samples -> their files as one `Encoded` batch; labels come from the episode."""
    parts = [part for part, _ in samples]
    jpeg_at = [i for i, p in enumerate(parts) if p.ndim == 1]
    image_at = [i for i, p in enumerate(parts) if p.ndim != 1]
    jpegs = [parts[i] for i in jpeg_at]
    return Encoded(torch.cat(jpegs) if jpegs else torch.empty(0, dtype=torch.uint8), [len(j) for j in jpegs],
                   jpeg_at, torch.stack([parts[i] for i in image_at]) if image_at else torch.empty(0), image_at)


class Decoder:
    """`Encoded` batch -> (B, 3, size, size) float32 in [0, 1] on `device`: JPEG bytes decoded there (nvjpeg on
    CUDA), grouped by shape and resized as `read_image` resizes; decoded images copied as they are."""

    def __init__(self, size: int, device: torch.device) -> None:
        self.size, self.device = size, device

    def __call__(self, batch: Encoded) -> torch.Tensor:
        out = torch.empty(len(batch.jpeg_at) + len(batch.image_at), 3, self.size, self.size, device=self.device)
        if batch.image_at:
            out[batch.image_at] = batch.images.to(self.device, non_blocking=True)
        raws = list(torch.split(batch.jpeg_bytes, batch.jpeg_lengths)) if batch.jpeg_lengths else []
        for start in range(0, len(raws), DECODE_GROUP):
            decoded = self._decode(raws[start:start + DECODE_GROUP])
            for i, image in zip(batch.jpeg_at[start:start + DECODE_GROUP], resized(decoded, self.size), strict=True):
                out[i] = image
        return out

    def _decode(self, raws: list[torch.Tensor]) -> list[torch.Tensor]:
        from torchvision.io import ImageReadMode  # torchvision only where JPEGs are decoded

        if self.device.type == "cuda":
            # nvjpeg's hardware decoder writes its outputs on a stream of its own, without waiting for the work
            # queued on ours, into blocks the caching allocator may just have recycled from tensors that work
            # still reads (pytorch/vision#9606): the previous step's kernels must be done before it runs
            torch.cuda.current_stream(self.device).synchronize()
        try:
            return decode_jpeg(raws, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            # nvjpeg refuses a few files libjpeg-turbo reads (some progressive or unusual subsamplings): the batch
            # is decoded on the CPU instead, where the same files would have been decoded without the knob
            return [decode_jpeg(raw, mode=ImageReadMode.RGB).to(self.device) for raw in raws]


def decode_jpeg(data: torch.Tensor | list[torch.Tensor], **kwargs: object) -> torch.Tensor | list[torch.Tensor]:
    """torchvision's `decode_jpeg`, imported when a JPEG is first decoded: importing torchvision loads its dynamo."""
    from torchvision.io import decode_jpeg as decode  # torchvision only where JPEGs are decoded

    return decode(data, **kwargs)


def resized(images: list[torch.Tensor], size: int) -> list[torch.Tensor]:
    """(3, H, W) uint8 images -> (3, size, size) float32 in [0, 1], those of one shape resized together, in
    slices of at most RESIZE_BYTES of float pixels (a resize works in float32 off the CPU)."""
    from torchvision.transforms.v2 import functional as TF  # torchvision only where JPEGs are decoded

    out: list[torch.Tensor | None] = [None] * len(images)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        by_shape.setdefault(tuple(image.shape), []).append(i)
    for shape, indices in by_shape.items():
        step = max(1, RESIZE_BYTES // (4 * shape[0] * shape[1] * shape[2]))
        for start in range(0, len(indices), step):
            chunk = indices[start:start + step]
            batch = TF.to_dtype(resize(torch.stack([images[i] for i in chunk]), size), torch.float32, scale=True)
            for i, image in zip(chunk, batch, strict=True):
                out[i] = image
    return out  # type: ignore[return-value]
