"""Data-parallel runs under torchrun: the process group, each rank's micro-steps, and exact cross-rank reductions."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fewshot_cli.errors import BadInput

T = TypeVar("T")


class StepFailedElsewhere(Exception):
    """A rank ran out of memory in this step: every rank backs off the same knob and retries the step."""


@dataclass
class Distributed:
    """This process's place in a data-parallel run: rank `rank` of `world_size` (started by torchrun)."""

    rank: int
    world_size: int
    local_rank: int
    #: the ranks on this machine, which share its memory
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def place(self, device: torch.device) -> torch.device:
        """One GPU per rank on each machine: CUDA runs on cuda:LOCAL_RANK; CPU and MPS stay as they are."""
        if device.type != "cuda":
            return device
        count = torch.cuda.device_count()
        shared = dist.is_initialized() and dist.get_backend() == "gloo"  # gloo lets ranks share a GPU; NCCL not
        if self.local_rank >= count and not shared:
            raise BadInput(f"Rank {self.rank} needs cuda:{self.local_rank}, but this machine has "
                           f"{count} CUDA device(s); lower --nproc-per-node.")
        index = self.local_rank % count
        torch.cuda.set_device(index)
        return torch.device("cuda", index)

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
        """Sums across ranks of each name any rank has (a rank may have none, e.g. no episode in a short step),
        added in rank order as Python floats: for two ranks, the very sum one process makes of the two parts."""
        totals: dict[str, float] = {}
        for share in self.gather(values):
            for name, value in share.items():
                totals[name] = totals.get(name, 0.0) + value
        return totals

    # ------------------------------------------------------------------ model state

    def wrap(self, model: nn.Module, sync_batchnorm: bool = False, find_unused_parameters: bool = False
             ) -> DistributedDataParallel:
        """`model` under DistributedDataParallel: its constructor starts every rank from rank 0's parameters and
        buffers, and a backward after a forward with `require_backward_grad_sync` set all-reduces the gradients in
        buckets while it runs (`runner.micro.Accumulation` sets it on a step's last micro-step alone).

        The gradients are summed, not averaged: a task weighs each micro-step's loss by its share of the whole
        step, so the sum over ranks is one process's gradient. Buffers are not broadcast at each forward (a
        step's BatchNorm statistics are merged by `Task.accumulate`); with `sync_batchnorm` on CUDA, BatchNorm
        normalises over every rank's share of the batch (nn.SyncBatchNorm runs on CUDA only).
        `find_unused_parameters`: the model may leave parameters without a gradient in a step's last backward."""
        if sync_batchnorm and next(model.parameters()).device.type == "cuda":
            nn.SyncBatchNorm.convert_sync_batchnorm(model)  # in place below the root: the optimizer's parameters
        # named forward_sync_buffers from torch 2.14 on; both still sync buffers once, at construction
        no_forward_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in _DDP_PARAMETERS
                           else {"broadcast_buffers": False})
        ddp = DistributedDataParallel(model, find_unused_parameters=find_unused_parameters, **no_forward_sync)
        # a hook rather than DDP's own all-reduce, which divides by the number of ranks: the losses are weighted
        # by their share of the whole step already
        ddp.register_comm_hook(state=None, hook=_sum_hook)
        return ddp

    def reduce_tensors(self, tensors: Sequence[torch.Tensor], op: str) -> None:
        """Sum (`op="sum"`) or take the largest (`"max"`) of tensors across ranks, in place."""
        for tensor in tensors:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)


_DDP_PARAMETERS = inspect.signature(DistributedDataParallel.__init__).parameters


def zero_backward(ddp: DistributedDataParallel) -> None:
    """Meet the other ranks' gradient all-reduce, adding nothing to it: for a rank with no part of a step, or
    one out of memory in it. DDP joins a backward to its all-reduce through a forward of its model only, and this
    rank has no input for one; so DDP's own steps around a forward (private: the ones its `forward` runs) wrap
    a zero loss, whose gradients are zeros."""
    params = [p for p in ddp.module.parameters() if p.requires_grad]
    if ddp.find_unused_parameters:  # DDP counts those the loss leaves out as unused here: one is enough
        params = params[:1]
    ddp.require_backward_grad_sync = True
    ddp._pre_forward()
    ddp._post_forward(sum(p.sum() for p in params) * 0.0).backward()


def _sum_hook(state, bucket):  # noqa: ANN001, ANN202 - DDP reads these annotations: GradBucket objects or none
    """DistributedDataParallel's all-reduce, without its division by the number of ranks."""
    return dist.all_reduce(bucket.buffer(), op=dist.ReduceOp.SUM, async_op=True).get_future().then(
        lambda done: done.value()[0])


def from_env() -> Distributed | None:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, MASTER_ADDR, ...); None outside torchrun
    or with one process. CUDA tensors travel by NCCL, CPU tensors (and control messages) by gloo; with
    FEWSHOT_DIST_BACKEND=gloo everything goes by gloo, so several ranks can share one GPU (a test of the code
    path, not a speed-up)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return None
    if not dist.is_initialized():
        default = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=os.environ.get("FEWSHOT_DIST_BACKEND") or default)
    return Distributed(rank=dist.get_rank(), world_size=dist.get_world_size(),
                       local_rank=int(os.environ.get("LOCAL_RANK", "0") or 0),
                       local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))


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
