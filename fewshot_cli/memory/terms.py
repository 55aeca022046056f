"""The device's own plan lines, which tracing a step cannot see: the CUDA context, workspaces and allocator, the MPS
heaps, the CPU runtime; with where each figure was measured and which lines a run's own measure leaves out."""

from __future__ import annotations

import torch

from fewshot_cli.memory.measure import MiB

#: the device's own terms that tracing the program cannot see. The CUDA ones are read from real runs of the five
#: commands at `--preset t4 --memory-budget 15GiB` (benchmarks/gpu_check.py on an H100, torch 2.11, CUDA 13; its
#: "CUDA terms" table in results/gpu_check.md lists each command's figures), medians across the commands:
#: the context and the kernels and libraries loaded, outside the caching allocator (device in use less reserved)
CUDA_CONTEXT = 771 * MiB
#: cuBLAS/cuDNN workspaces and other allocations the trace does not see (peak allocated less traced): the median
#: over the five commands' t4 runs on an H100 once host-side lines were no longer counted as traced
CUDA_WORKSPACES = 118 * MiB
#: the caching allocator's rounding and split blocks: peak reserved over peak allocated, less one
CUDA_ALLOCATOR = 0.161
#: the CPU's term, read from the short runs of benchmarks/plan_accuracy.py (results/plan_accuracy.md) on Linux,
#: glibc, with freed tensors returned to the system (`memory.measure.return_freed_memory`, every CPU run): what
#: a run's first steps add to the process besides tensors (oneDNN/MKL kernels and thread pools; with training,
#: autograd's engine and its threads), the gap left at the first ten configurations once oneDNN's convolution
#: copies and the optimizer state of later steps are planned; that gap does not grow with the configuration
#: (ResNet-12 at 84 px: a real step's peak is the traced one plus the copies to within 0.3%)
CPU_RUNTIME = {"training": int(29.5 * MiB), "inference": 13 * MiB}
#: what an evaluation in bf16 autocast after bf16 training adds on the CPU beyond its tensors (oneDNN's bf16
#: kernels and their scratch): read from the two `--amp` rows of results/plan_accuracy.md, 9.8 and 14.5 MiB
CPU_BF16_EVALUATION = 12 * MiB
MPS_OVERHEAD = 1.15  # the MPS allocator's heaps round up; measured overhead factor
#: plan lines a command declares for memory the host holds whatever the device (batches its loader's workers
#: prefetch, caches of decoded frames): on CUDA or MPS they are the machine's memory, not the device's
HOST_LINES = ("loader_prefetch", "prefetched_episodes", "frame_cache", "episode_uint8", "image_cache",
              "kept_train_batch")
#: traced lines of the CPU's own libraries: oneDNN's copies around a convolution (CUDA's are in its workspaces)
CPU_LINES = ("onednn_copies",)
#: per device type, plan lines that a run's own measure of its phases does not see: the CUDA context lies outside
#: the caching allocator, host lines outside any device's allocator, and the CPU's start-up resident set is there
#: before the run builds its model (the check subtracts it)
OUTSIDE_THE_MEASURE = {"cpu": ("startup_baseline",), "cuda": ("cuda_context", *HOST_LINES), "mps": HOST_LINES}

def device_terms(device: torch.device, components: dict[str, int], baseline: int = 0,
                 training: bool = True, bf16_evaluation: bool = False) -> dict[str, int]:
    """The plan lines that tracing cannot see, for the device the plan is for."""
    traced = sum(v for k, v in components.items() if device.type == "cpu" or k not in HOST_LINES)
    if device.type == "cuda":
        return {"cuda_context": CUDA_CONTEXT, "cuda_workspaces": CUDA_WORKSPACES,
                "cuda_allocator": int((traced + CUDA_WORKSPACES) * CUDA_ALLOCATOR)}
    if device.type == "mps":
        return {"mps_allocator": int(traced * (MPS_OVERHEAD - 1))}
    terms = {"cpu_runtime": CPU_RUNTIME["training" if training else "inference"]
             + (CPU_BF16_EVALUATION if bf16_evaluation else 0)}
    return {**terms, "startup_baseline": baseline} if baseline else terms


#: where each of the device's own plan lines comes from: shown in full under `fewshot plan --verbose`
TERM_NOTES = {
    "cuda_context": "context and loaded kernels, outside the allocator: measured on an H100, results/gpu_check.md",
    "cuda_workspaces": "cuBLAS/cuDNN workspaces: peak allocated less traced, measured, results/gpu_check.md",
    "cuda_allocator": f"caching allocator's rounding and split blocks: {CUDA_ALLOCATOR:.1%} of traced and workspaces, "
                      "reserved over allocated measured, results/gpu_check.md",
    "mps_allocator": f"MPS heaps' rounding: {MPS_OVERHEAD - 1:.0%}, not yet measured",
    "onednn_copies": "oneDNN's layout copies around a convolution, from its shapes: measured, "
                     "fewshot_cli/memory/onednn.py",
    "startup_baseline": "this process's resident set before any model: interpreter, torch, libraries",
    "cpu_runtime": "kernels, thread pools and autograd's engine a run's first steps load (and with --amp, "
                   "bf16 evaluation's kernels): measured, results/plan_accuracy.md",
}
#: the same in a few words, printed beside each line (a plan's lines fit 80 columns)
TERM_TAGS = {
    "cuda_context": "measured, H100",
    "cuda_workspaces": "measured, H100",
    "cuda_allocator": f"{CUDA_ALLOCATOR:.1%} of traced, measured, H100",
    "mps_allocator": f"{MPS_OVERHEAD - 1:.0%}, not yet measured",
    "onednn_copies": "from the convolutions' shapes",
    "startup_baseline": "this process, measured now",
    "cpu_runtime": "measured, glibc",
}
