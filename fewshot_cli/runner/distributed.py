"""Data-parallel runs under torchrun: the process group, each rank's micro-steps, and exact cross-rank reductions."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from fewshot_cli.errors import BadInput

T = TypeVar("T")
BUCKET_BYTES = 25 * 1024 * 1024  # gradients travel in buckets of this size, as DistributedDataParallel's do


class StepFailedElsewhere(Exception):
    """Another rank ran out of memory in this step: every rank backs off the same knob and retries the step."""


@dataclass
class Distributed:
    """This process's place in a data-parallel run: rank `rank` of `world_size` (started by torchrun)."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def place(self, device: torch.device) -> torch.device:
        """One GPU per rank on each machine: CUDA runs on cuda:LOCAL_RANK; CPU and MPS stay as they are."""
        if device.type != "cuda":
            return device
        if self.local_rank >= torch.cuda.device_count():
            raise BadInput(f"Rank {self.rank} needs cuda:{self.local_rank}, but this machine has "
                           f"{torch.cuda.device_count()} CUDA device(s); lower --nproc-per-node.")
        torch.cuda.set_device(self.local_rank)
        return torch.device("cuda", self.local_rank)

    # ------------------------------------------------------------------ control messages (CPU, gloo)

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on any rank (a stop request, an error)."""
        value = torch.tensor([int(flag)], dtype=torch.int64)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def sum(self, values: dict[str, float]) -> dict[str, float]:
        """Sums across ranks, in float64 so that counts stay exact and sums lose next to nothing."""
        if not values:
            return {}
        names = sorted(values)
        total = torch.tensor([float(values[n]) for n in names], dtype=torch.float64)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return dict(zip(names, total.tolist(), strict=True))

    # ------------------------------------------------------------------ model state

    def sync_gradients(self, model: nn.Module) -> None:
        """Sum every parameter's gradient across ranks; first agree that no rank failed the step, and on which
        parameters have a gradient at all (a parameter no rank touched keeps no gradient, as in one process)."""
        params = list(model.parameters())
        status = torch.tensor([0] + [int(p.grad is not None) for p in params], dtype=torch.int64)
        dist.all_reduce(status, op=dist.ReduceOp.MAX)
        if status[0]:
            raise StepFailedElsewhere("another rank ran out of memory in this step")
        with_grad = []
        for param, has in zip(params, status[1:].tolist(), strict=True):
            if has:
                if param.grad is None:  # this rank's micro-steps did not reach it; the others did
                    param.grad = torch.zeros_like(param)
                with_grad.append(param.grad)
        for bucket in _buckets(with_grad):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for grad in bucket:
                grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
                offset += grad.numel()

    def report_failure(self, model: nn.Module) -> None:
        """Called by a rank whose step ran out of memory: meets the other ranks' `sync_gradients` and tells
        them, so that every rank leaves the step and backs off together."""
        status = torch.zeros(1 + len(list(model.parameters())), dtype=torch.int64)
        status[0] = 1
        dist.all_reduce(status, op=dist.ReduceOp.MAX)

    def sync_buffers(self, model: nn.Module) -> None:
        """BatchNorm running statistics saw only this rank's micro-steps: average them (counters: the largest),
        so every rank holds the same model and rank 0's checkpoint serves any number of ranks."""
        buffers = list(model.buffers())
        for buffer in buffers:
            if not buffer.is_floating_point():
                dist.all_reduce(buffer, op=dist.ReduceOp.MAX)
        for bucket in _buckets([b for b in buffers if b.is_floating_point()]):
            flat = torch.cat([b.reshape(-1) for b in bucket])
            spread = torch.cat([flat, -flat])
            dist.all_reduce(spread, op=dist.ReduceOp.MAX)
            mean = flat.clone()
            dist.all_reduce(mean, op=dist.ReduceOp.SUM)
            # values every rank shares stay bit for bit (a mean of N equal floats need not round back to them)
            same = spread[:len(flat)] == -spread[len(flat):]
            flat = torch.where(same, flat, mean / self.world_size)
            offset = 0
            for buffer in bucket:
                buffer.copy_(flat[offset:offset + buffer.numel()].view_as(buffer))
                offset += buffer.numel()

    def broadcast_model(self, model: nn.Module) -> None:
        """Start every rank from rank 0's parameters and buffers (as DistributedDataParallel does)."""
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                dist.broadcast(tensor, src=0)


def _buckets(grads: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Consecutive gradients of one device and dtype, up to BUCKET_BYTES each (one flat copy at a time)."""
    buckets: list[list[torch.Tensor]] = []
    size = 0
    for grad in grads:
        last = buckets[-1] if buckets else None
        if (last is None or size + grad.numel() * grad.element_size() > BUCKET_BYTES
                or (last[0].device, last[0].dtype) != (grad.device, grad.dtype)):
            buckets.append([grad])
            size = grad.numel() * grad.element_size()
        else:
            last.append(grad)
            size += grad.numel() * grad.element_size()
    return buckets


def from_env() -> Distributed | None:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, MASTER_ADDR, ...); None outside torchrun
    or with one process. CUDA tensors travel by NCCL, CPU tensors (and control messages) by gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return None
    if not dist.is_initialized():
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    return Distributed(rank=dist.get_rank(), world_size=dist.get_world_size(),
                       local_rank=int(os.environ.get("LOCAL_RANK", "0") or 0))


def shutdown(group: Distributed | None) -> None:
    if group is not None and dist.is_initialized():
        dist.destroy_process_group()


def agreed(group: Distributed | None, check: Callable[[], T]) -> T:
    """Run `check` on every rank; bad input found on any rank is bad input on all (exit 2 everywhere, no hang)."""
    error: str | None = None
    result: Any = None
    try:
        result = check()
    except BadInput as err:
        if group is None:
            raise
        error = str(err)
    if group is not None:
        errors = group.gather(error)
        first = next((f"rank {rank}: {e}" for rank, e in enumerate(errors) if e), None)
        if first is not None:
            raise BadInput(error or first)
    return result
