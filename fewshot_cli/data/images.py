"""The one image reader: torchvision's decoders (libjpeg-turbo, libpng, WebP, GIF), PIL for the rest, one set of
rules for EXIF orientation, 16-bit, palette and transparency, and resizing on tensors."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
#: what a file that is not a readable image raises, from either decoder
READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
#: the normalisation every ImageNet-trained backbone here expects
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision 0.29 points to torchcodec for decoding, which is not installed; 0.26 on the GPU machines says nothing
warnings.filterwarnings("ignore", "The image decoding and encoding capabilities of TorchVision", DeprecationWarning)
#: torchvision decodes these itself, EXIF orientation included; the rest go to PIL
_TORCHVISION = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"RIFF")


def read_rgb(path: Path | str) -> torch.Tensor:
    """An image file as upright 8-bit RGB, (3, H, W) uint8; transparency is laid on white."""
    raw = Path(path).read_bytes()
    if raw.startswith(_TORCHVISION) and not _png_transparency(raw):
        from torchvision.io import ImageReadMode, decode_image  # torchvision (and the dynamo it loads): on a file only

        data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        try:
            image = decode_image(data, mode=ImageReadMode.UNCHANGED, apply_exif_orientation=True)
        except RuntimeError:
            image = None  # a variant libpng or libwebp refuses; PIL may still read it
        if image is not None and image.dtype == torch.uint8:  # 16-bit PNGs take PIL's path, scaled there
            return _rgb(image[0] if image.ndim == 4 else image)  # an animated GIF: its first frame
    from torchvision.transforms.v2 import functional as TF  # torchvision only once an image file is read

    return TF.pil_to_tensor(read_pil(path))


def _png_transparency(raw: bytes) -> bool:
    """A PNG whose transparency is a tRNS chunk (palette or colour key): libpng's RGB drops it, PIL keeps it."""
    return raw.startswith(b"\x89PNG") and raw.find(b"tRNS", 0, max(raw.find(b"IDAT"), 0)) >= 0


def read_image(path: Path | str, size: int) -> torch.Tensor:
    """An image resized to size x size (antialiased bilinear), (3, size, size) float32 in [0, 1]."""
    return to_float(read_pixels(path, size))


def read_pixels(path: Path | str, size: int) -> torch.Tensor:
    """An image resized to size x size (antialiased bilinear), (3, size, size) uint8: a quarter of the float
    image's bytes to cache, to pass between processes and to copy to the device, where `to_float` finishes it."""
    return resize(read_rgb(path), size)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels to float32 in [0, 1] (the same operation wherever it runs, so the same values); float images
    pass as they are. It is torchvision's `to_dtype(images, torch.float32, scale=True)` for uint8, written out so that
    a run that reads no image file loads no torchvision (`tests/test_images.py` holds the two equal)."""
    return images.to(torch.float32).mul_(1.0 / 255) if images.dtype == torch.uint8 else images


def resize(image: torch.Tensor, size: int) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as TF  # torchvision only once an image is resized

    return TF.resize(image, [size, size], antialias=True)


def _rgb(image: torch.Tensor) -> torch.Tensor:
    """(C, H, W) uint8 with 1 to 4 channels (grey, grey+alpha, RGB, RGBA) to RGB on white."""
    channels = image.shape[0]
    if channels in (2, 4):
        colour, alpha = image[:-1].float(), image[-1:].float() / 255
        image = (colour * alpha + 255 * (1 - alpha)).round().to(torch.uint8)
    return image.expand(3, -1, -1).contiguous() if image.shape[0] == 1 else image


def read_pil(path: Path | str) -> Image.Image:
    """Decode an image fully with PIL, apply its EXIF orientation and return it as 8-bit RGB; raises READ_ERRORS."""
    with Image.open(path) as opened:
        opened.load()
        image = ImageOps.exif_transpose(opened)
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode: 16-bit and 32-bit grey are rescaled, transparency is laid on white."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        grey = np.asarray(image, dtype=np.float64)
        # 16-bit data scaled to 8 bits; Pillow opens some 16-bit PNGs as mode I
        grey = grey / 257.0 if grey.max(initial=0) > 255 or image.mode != "I" else grey
        image = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        grey = np.asarray(image, dtype=np.float64)
        grey = grey * 255.0 if grey.max(initial=0) <= 1.0 else grey
        image = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(canvas, rgba)
    return image if image.mode == "RGB" else image.convert("RGB")
