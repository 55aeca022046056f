"""The CPU allocator's settings that must be made before torch's first allocation: torch reads them once. No torch."""

from __future__ import annotations

import os

#: torch's switch (c10's `alloc_cpu`, read once, at the process's first tensor) for transparent huge pages: each CPU
#: tensor of 2 MiB or more is advised MADV_HUGEPAGE, so that it is mapped in 2 MiB pages instead of 4 KiB ones
THP_SWITCH = "THP_MEM_ALLOC_ENABLE"


def huge_pages_before_torch() -> None:
    """Ask torch for transparent huge pages on large CPU tensors, unless the environment already says otherwise.

    Every CPU run maps each freed tensor afresh (`memory.measure.return_freed_memory`), and a training step then
    faults in every page of its activations again: at the cpu preset, 50,000 page faults and about 80 ms of system
    time per conv4 step on 4 KiB pages, 17,000 and 50 ms with huge pages (docs/internals/allocator.md). The values
    computed, and the resident set the plan counts, are the same (a huge page is mapped only inside a tensor's own
    range). Where the kernel leaves huge pages off (`never`) nothing changes. It takes effect only where torch has
    not allocated yet: the CLI calls it before any import of torch."""
    os.environ.setdefault(THP_SWITCH, "1")
