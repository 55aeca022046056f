"""--decode-device cuda's CPU side: JPEG bytes from the workers, the CPU reader's fallback, the cache, the check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import fewshot
from PIL import Image

from fewshot_cli.data import gpu_decode
from fewshot_cli.data.gpu_decode import Decoder, encoded_or_read, gather
from fewshot_cli.data.images import read_image
from fewshot_cli.data.loader import ItemReader, Loaders
from fewshot_cli.data.splits import FewShotSplits, open_splits

SIZE = 12


def _save(path: Path, size: tuple[int, int], mode: str = "RGB", seed: int = 0, **save: object) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).convert(mode).save(path, **save)
    return path


def _rotated(path: Path) -> Path:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: the reader turns it upright
    return _save(path, (20, 12), exif=exif)


def _folder(root: Path) -> FewShotSplits:
    """Two classes in train and test: baseline JPEGs of two sizes, a grey JPEG, a PNG, a CMYK and a rotated JPEG."""
    for split in ("train", "test"):
        for c in range(2):
            folder = root / split / f"{split}{c}"
            _save(folder / "a.jpg", (40, 30), seed=c)
            _save(folder / "b.jpg", (33, 21), seed=c + 2)
            _save(folder / "c.jpg", (40, 30), "L", seed=c + 4)
            _save(folder / "d.png", (25, 25), seed=c + 6)
            _save(folder / "e.jpg", (30, 40), "CMYK", seed=c + 8)
            _rotated(folder / "f.jpg")
    return open_splits(root, SIZE)


def test_baseline_jpegs_travel_as_bytes_and_the_rest_as_decoded_images(tmp_path: Path) -> None:
    data = _folder(tmp_path)
    kinds = {p.name: encoded_or_read(p, SIZE) for p in data.paths[:6]}
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        raw = kinds[name]
        assert raw.dtype == torch.uint8 and raw.ndim == 1
        assert bytes(raw.tolist()) == (tmp_path / "train" / "train0" / name).read_bytes()
    for name in ("d.png", "e.jpg", "f.jpg"):  # a PNG; CMYK and an EXIF rotation, which nvjpeg does not handle
        assert kinds[name].shape == (3, SIZE, SIZE) and kinds[name].dtype == torch.float32


def test_decoding_the_bytes_gives_the_cpu_readers_pixels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _folder(tmp_path)
    monkeypatch.setattr(gpu_decode, "RESIZE_BYTES", 40 * 30 * 3 * 4)  # one image per resize: slices are exercised
    monkeypatch.setattr(gpu_decode, "DECODE_GROUP", 2)
    items = list(range(len(data.paths)))
    # on the CPU both sides decode with libjpeg-turbo, so they agree exactly; nvjpeg on CUDA differs slightly
    got = Decoder(SIZE, torch.device("cpu"))(gather([data.encoded(i) for i in items]))
    expected = torch.stack([read_image(data.paths[i], SIZE) for i in items])
    assert got.shape == (len(items), 3, SIZE, SIZE) and torch.equal(got, expected)
    # why a rotated JPEG takes the CPU reader: its bytes decoded as they are come out sideways
    sideways = Decoder(SIZE, torch.device("cpu"))(gather([(_raw(data.paths[5]), 0)]))[0]
    assert not torch.equal(sideways, read_image(data.paths[5], SIZE))


def _raw(path: Path) -> torch.Tensor:
    return torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)


def test_a_batch_the_batched_decoder_refuses_is_decoded_one_file_at_a_time(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _folder(tmp_path)
    real = gpu_decode.decode_jpeg

    def refuse_batches(raw, **kwargs):
        if isinstance(raw, list):
            raise RuntimeError("nvjpeg: unsupported")
        return real(raw, **kwargs)

    monkeypatch.setattr(gpu_decode, "decode_jpeg", refuse_batches)
    got = Decoder(SIZE, torch.device("cpu"))(gather([data.encoded(i) for i in (0, 1)]))
    assert torch.equal(got, torch.stack([read_image(data.paths[i], SIZE) for i in (0, 1)]))


def test_the_cache_holds_the_jpegs_bytes_and_the_decoded_fallbacks(tmp_path: Path) -> None:
    data = _folder(tmp_path)
    reader = ItemReader(data, "encoded", cache_bytes=1 << 20)
    for i in range(6):
        reader[i]
    files = sum(data.paths[i].stat().st_size for i in range(3))
    assert reader.cache.bytes == files + 3 * (3 * SIZE * SIZE * 4)
    assert reader[0][0] is reader[0][0] and reader.cache.hits == 2


def test_workers_send_bytes_the_main_process_decodes(tmp_path: Path) -> None:
    data = _folder(tmp_path)
    loaders = Loaders(ItemReader(data, "encoded"), gather, 2, torch.device("cpu"),
                      finish=Decoder(SIZE, torch.device("cpu")))
    batches = [[0, 6, 3], [11, 1], [3, 9]]  # the last one holds no baseline JPEG
    got = list(loaders.fixed("test", batches))
    for batch, items in zip(got, batches, strict=True):
        assert torch.equal(batch, torch.stack([read_image(data.paths[i], SIZE) for i in items]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_decoding_on_cuda_without_a_cuda_device_is_bad_input(tmp_path: Path) -> None:
    done = fewshot("mahalanobis-train", "--decode-device", "cuda", "--episodes", "1", "--quiet",
                   "--out", tmp_path / "runs", "--name", "x")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().count("\n") == 0 and "--decode-device cuda" in done.stderr
    assert not (tmp_path / "runs" / "x").exists()
