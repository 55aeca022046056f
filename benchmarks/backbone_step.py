"""A backbone's compute on 100 images at 84 px (or the size given after its name) on this CPU, contiguous against
channels_last: a training forward, forward + backward, and an evaluation forward under no_grad and under
inference_mode (best of 2 after a warm-up).

    OMP_NUM_THREADS=1 python benchmarks/backbone_step.py resnet12 [84]

It bounds what input_pipeline.py can show: the model's compute per episode is the same on both sides unless the
memory format differs."""

import sys
import time

import torch

from fewshot_cli.models.backbones import build_backbone


def best_of(f, n: int = 2) -> float:
    f()
    times = []
    for _ in range(n):
        started = time.perf_counter()
        f()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    torch.set_num_threads(1)
    name = sys.argv[1] if len(sys.argv) > 1 else "resnet12"
    size = int(sys.argv[2]) if len(sys.argv) > 2 else 84
    torch.manual_seed(0)
    x = torch.randn(100, 3, size, size)
    for layout in ("contiguous", "channels_last"):
        model, images = build_backbone(name), x
        if layout == "channels_last":
            model = model.to(memory_format=torch.channels_last)
            images = x.contiguous(memory_format=torch.channels_last)

        def train_step(m=model, xs=images) -> None:
            m.zero_grad()
            m(xs).sum().backward()

        def no_grad(m=model, xs=images) -> None:
            with torch.no_grad():
                m(xs)

        def inference(m=model, xs=images) -> None:
            with torch.inference_mode():
                m(xs)

        model.train()
        forward = best_of(lambda m=model, xs=images: m(xs))
        both = best_of(train_step)
        model.eval()
        print(f"{name} {layout}: train fwd {forward:.2f}s fwd+bwd {both:.2f}s eval no_grad {best_of(no_grad):.2f}s "
              f"inference_mode {best_of(inference):.2f}s (100 images at {size} px)", flush=True)


if __name__ == "__main__":
    main()
