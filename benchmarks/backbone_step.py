"""A backbone's compute on 100 images at 84 px (or the size given after its name) on this CPU: contiguous against
channels_last in float32, and channels_last under `--amp`'s bf16 autocast; a training forward, forward + backward,
and an evaluation forward under no_grad and under inference_mode (best of 2 after a warm-up). Each line also gives
the forward + backward's rate in GFLOP/s (the convolutions' and matmuls' FLOPs, counted by torch's
FlopCounterMode on meta tensors), against the rate of one large convolution's forward (3x3, 256 -> 256 channels,
32 x 32, batch 32, channels_last) in the same dtype: about the most this core's oneDNN reaches.

    OMP_NUM_THREADS=1 python benchmarks/backbone_step.py resnet12 [84]

It bounds what input_pipeline.py can show: the model's compute per episode is the same on both sides unless the
memory format or the precision differs."""

import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from fewshot_cli.models.backbones import build_backbone

LAYOUTS = (("contiguous", torch.contiguous_format, None), ("channels_last", torch.channels_last, None),
           ("channels_last, bf16 autocast", torch.channels_last, torch.bfloat16))


def best_of(f, n: int = 2) -> float:
    f()
    times = []
    for _ in range(n):
        started = time.perf_counter()
        f()
        times.append(time.perf_counter() - started)
    return min(times)


def training_flops(name: str, size: int) -> int:
    """FLOPs of one forward and backward of 100 images, counted on meta tensors (nothing is computed)."""
    model, x = build_backbone(name).to("meta"), torch.empty(100, 3, size, size, device="meta")
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    return counter.get_total_flops()


def reference_rate(dtype: torch.dtype) -> float:
    """GFLOP/s of one large channels_last convolution's forward in `dtype`."""
    x = torch.randn(32, 256, 32, 32, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(256, 256, 3, 3, dtype=dtype).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        seconds = best_of(lambda: F.conv2d(x, w, padding=1), n=3)
    return 2 * 32 * 32 * 32 * 256 * 256 * 9 / seconds / 1e9


def main() -> None:
    torch.set_num_threads(1)
    name = sys.argv[1] if len(sys.argv) > 1 else "resnet12"
    size = int(sys.argv[2]) if len(sys.argv) > 2 else 84
    flops = training_flops(name, size)
    print(f"{name}: {flops / 1e12:.2f} TFLOP per forward + backward of 100 images at {size} px; one large "
          f"convolution's forward: {reference_rate(torch.float32):.0f} GFLOP/s in float32, "
          f"{reference_rate(torch.bfloat16):.0f} in bf16", flush=True)
    torch.manual_seed(0)
    x = torch.randn(100, 3, size, size)
    for label, layout, dtype in LAYOUTS:
        model, images = build_backbone(name).to(memory_format=layout), x.contiguous(memory_format=layout)

        def autocast(dtype=dtype) -> torch.autocast:
            return torch.autocast("cpu", dtype=dtype, enabled=dtype is not None)

        def forward(m=model, xs=images) -> None:
            with autocast():
                m(xs)

        def train_step(m=model, xs=images) -> None:
            m.zero_grad()
            with autocast():
                out = m(xs)
            out.float().sum().backward()

        def no_grad(m=model, xs=images) -> None:
            with torch.no_grad(), autocast():
                m(xs)

        def inference(m=model, xs=images) -> None:
            with torch.inference_mode(), autocast():
                m(xs)

        model.train()
        forward_s = best_of(forward)
        both = best_of(train_step)
        model.eval()
        print(f"{name} {label}: train fwd {forward_s:.2f}s fwd+bwd {both:.2f}s ({flops / both / 1e9:.0f} GFLOP/s) "
              f"eval no_grad {best_of(no_grad):.2f}s inference_mode {best_of(inference):.2f}s (100 images at "
              f"{size} px)", flush=True)


if __name__ == "__main__":
    main()
