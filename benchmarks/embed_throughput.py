"""Images per second of embed-classify's whole extraction path (read, preprocess, forward, CPU copy, store
append) against the bare backbone forward on the same batches, and the RSS of the path after warm-up.

    .venv/bin/python benchmarks/embed_throughput.py --backbone resnet50 --images 1000 --batch-size 16
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from PIL import Image

from fewshot_cli.data.embedding_store import EmbeddingStore, extract
from fewshot_cli.data.images import read_pil
from fewshot_cli.data.synthetic import SyntheticImages
from fewshot_cli.models.embedders import build_embedder

MiB = 1024 * 1024


def write_images(folder: Path, count: int, side: int) -> list[Path]:
    """`count` distinct PNG files (synthetic classes, jittered) in `folder`."""
    images = SyntheticImages(image_size=side, n_classes=100, per_class=max(1, -(-count // 100)), seed=0)
    paths = []
    for item in range(count):
        path = folder / f"img-{item:05d}.png"
        Image.fromarray(np.rint(images.image(item) * 255).astype(np.uint8), "RGB").save(path)
        paths.append(path)
    return paths


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_rate(model: torch.nn.Module, paths: list[Path], batch_size: int, device: torch.device) -> float:
    """Forward only, timed batch by batch; decoding and preprocessing happen outside the clock."""
    seconds, count = 0.0, 0
    for start in range(0, len(paths), batch_size):
        pixels = torch.stack([model.preprocess(read_pil(p)) for p in paths[start:start + batch_size]]).to(device)
        sync(device)
        began = time.perf_counter()
        with torch.inference_mode():
            model(pixels).float().cpu()
        sync(device)
        seconds += time.perf_counter() - began
        count += len(pixels)
    return count / seconds


def path_rate(model: torch.nn.Module, paths: list[Path], batch_size: int, workers: int, device: torch.device,
              store_dir: Path) -> tuple[float, list[float]]:
    """The whole extraction path into a fresh store; RSS (MiB) sampled after every batch."""
    process, rss = psutil.Process(os.getpid()), []
    store = EmbeddingStore(store_dir, model.identity)
    sync(device)
    began = time.perf_counter()
    report = extract(model, paths, store, device, batch_size, workers,
                     on_batch=lambda done, total: rss.append(process.memory_info().rss / MiB))
    sync(device)
    seconds = time.perf_counter() - began
    store.close()
    return report.extracted / seconds, rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet50", choices=("small", "resnet50"))
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--side", type=int, default=256, help="side of the generated image files")
    parser.add_argument("--image-size", type=int, default=32, help="small backbone's input side")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    model = build_embedder(args.backbone, image_size=args.image_size).to(device).eval()
    with tempfile.TemporaryDirectory(prefix="embed-bench-") as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        paths = write_images(folder, args.images, args.side)
        warm = paths[: 2 * args.batch_size]
        bare_rate(model, warm, args.batch_size, device)  # warm-up: allocator, kernels, page cache
        bare = bare_rate(model, paths, args.batch_size, device)
        full, rss = path_rate(model, paths, args.batch_size, args.workers, device, Path(tmp) / "store")
    warm_batches = max(1, len(rss) // 10)  # RSS growth is measured after the first tenth of the batches
    result = {
        "backbone": args.backbone, "device": str(device), "images": args.images, "batch_size": args.batch_size,
        "workers": args.workers, "threads": torch.get_num_threads(),
        "bare_forward_images_per_s": round(bare, 2), "extraction_path_images_per_s": round(full, 2),
        "path_over_bare": round(full / bare, 4),
        "rss_after_warmup_mb": round(rss[warm_batches - 1], 1), "rss_max_mb": round(max(rss), 1),
        "rss_end_mb": round(rss[-1], 1), "rss_growth_after_warmup_mb": round(max(rss[warm_batches:] or rss)
                                                                            - rss[warm_batches - 1], 1),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
