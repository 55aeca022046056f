"""The one image reader: torchvision's decoders where they read the file, PIL's rules for the rest, one result."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fewshot_cli.data.images import READ_ERRORS, read_image, read_pil, read_rgb
from fewshot_cli.errors import BadInput


def _photo(path: Path, mode: str = "RGB", size: tuple[int, int] = (24, 16), **save: object) -> Path:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
    pixels[..., 3] = np.where(np.arange(size[0]) < size[0] // 2, 0, 255)  # left half transparent
    Image.fromarray(pixels, "RGBA").convert(mode).save(path, **save)
    return path


@pytest.mark.parametrize(("name", "mode"), [("a.png", "RGB"), ("a.png", "RGBA"), ("a.png", "L"), ("a.png", "LA"),
                                            ("a.png", "P"), ("a.gif", "P"), ("a.bmp", "RGB"), ("a.tiff", "RGB")])
def test_every_decoder_gives_the_pixels_pil_rules_give(tmp_path: Path, name: str, mode: str) -> None:
    path = _photo(tmp_path / name, mode)
    expected = torch.from_numpy(np.asarray(read_pil(path)).copy()).permute(2, 0, 1)
    got = read_rgb(path)
    assert got.dtype == torch.uint8 and got.shape == (3, 16, 24)
    assert (got.int() - expected.int()).abs().max() <= 1  # alpha blending rounds once


def test_transparent_pixels_are_laid_on_white(tmp_path: Path) -> None:
    path = tmp_path / "clear.png"
    Image.new("RGBA", (4, 4), (255, 0, 0, 0)).save(path)
    assert read_rgb(path)[:, 0, 0].tolist() == [255, 255, 255]


def test_a_jpeg_is_read_upright_from_its_exif_orientation(tmp_path: Path) -> None:
    image = Image.new("RGB", (20, 10), (10, 20, 30))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image.save(tmp_path / "rot.jpg", exif=exif)
    assert read_rgb(tmp_path / "rot.jpg").shape == (3, 20, 10)


def test_16_bit_png_is_scaled_to_8_bits(tmp_path: Path) -> None:
    grey = np.full((4, 4), 65535, dtype=np.uint16)
    grey[0, 0] = 0
    Image.fromarray(grey).save(tmp_path / "deep.png")
    pixels = read_rgb(tmp_path / "deep.png")
    assert pixels[:, 1, 1].tolist() == [255, 255, 255] and pixels[:, 0, 0].tolist() == [0, 0, 0]


def test_read_image_resizes_to_a_float_square(tmp_path: Path) -> None:
    image = read_image(_photo(tmp_path / "a.jpg", quality=95), 8)
    assert image.shape == (3, 8, 8) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1


@pytest.mark.parametrize("content", [b"\xff\xd8\xff\xe0 not really a jpeg", b"\x89PNG broken", b"plain text"])
def test_a_file_that_is_no_image_raises_a_read_error(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "bad.jpg").write_bytes(content)
    with pytest.raises(READ_ERRORS):
        read_rgb(tmp_path / "bad.jpg")


def test_an_unreadable_image_in_a_folder_is_bad_input(tmp_path: Path) -> None:
    from fewshot_cli.data.splits import open_splits

    for split in ("train", "test"):
        (tmp_path / split / f"{split}-a").mkdir(parents=True)
        (tmp_path / split / f"{split}-a" / "x.jpg").write_bytes(b"\xff\xd8\xff broken")
    with pytest.raises(BadInput, match="Cannot read image"):
        open_splits(tmp_path, 8)[0]


def test_to_float_is_torchvisions_uint8_scaling_to_the_bit() -> None:
    from torchvision.transforms.v2 import functional as TF

    from fewshot_cli.data.images import to_float

    pixels = torch.arange(256, dtype=torch.uint8).repeat(3, 4, 1)
    pixels = torch.cat([pixels, torch.randint(0, 256, (3, 4, 256), generator=torch.Generator().manual_seed(0),
                                              dtype=torch.uint8)])
    ours, theirs = to_float(pixels), TF.to_dtype(pixels, torch.float32, scale=True)
    assert ours.dtype == theirs.dtype == torch.float32 and torch.equal(ours, theirs)
    assert to_float(theirs) is theirs  # float images pass as they are
