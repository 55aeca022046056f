"""The guard before the kernel's kill: where a limit is enforced by killing (a memory cgroup, the machine's own
memory), an out-of-memory error raised while there is still room, so that back-off or a checkpoint can act."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fewshot_cli.memory.limits import Cgroup, Limit, cgroup, size_text

MiB = 1024**2
#: the room the guard keeps: the larger of these; a check sees the memory in use between two of its calls, not the
#: peak inside a step's forward or backward, which the plan bounds
MARGIN_SHARE, MARGIN_MIN = 0.05, 48 * MiB
#: a phase's plan is held to the share of the limit a new run's plan must fit in (the planner keeps 10% free)
PLANNED_SHARE = 0.9


class GuardedOutOfMemory(MemoryError):
    """Raised by the guard in place of the kernel's kill: handled as any out-of-memory error is."""


class MemoryGuard:
    """Compares the memory the kernel counts against a killing limit with that limit at step and micro-step
    boundaries and inside evaluations. `check` raises `GuardedOutOfMemory` once less than the margin is left, or
    when the phase's plan (where the run was forced over its limit) would pass the limit; `stop` says, between
    steps, whether the next step would cross the limit from where memory now rests (a leak)."""

    def __init__(self, used: Callable[[], int], limit: Limit, margin: int | None = None) -> None:
        self.used, self.limit = used, limit
        self.margin = margin if margin is not None else max(MARGIN_MIN, int(MARGIN_SHARE * limit.bytes))
        #: the last step's rise of memory (its peak above where it started), and the growth of the memory held from
        #: the last step's start to this one's (a leak's pace); the last, since the first step's include one-off
        #: costs (kernels loaded, the optimizer's state made)
        self.step_rise = self.held_growth = self._steps = 0
        self._held: int | None = None
        #: per plan phase, the plan's peak (MiB) above the memory in use when the run began; empty: no plan
        self.planned: dict[str, float] = {}
        self.predict: Callable[[str], float] | None = None
        self.start = 0
        self._stale: set[str] = set()

    @classmethod
    def for_limit(cls, limit: Limit, group: Cgroup | None = None) -> MemoryGuard | None:
        """A guard of the cgroup's limit where that is the limit a run is held to, or of the machine's memory; None
        where the tightest limit fails an allocation instead of killing (the address-space limit, a budget, a
        device)."""
        if limit.source in ("cgroup", "cgroup_high"):
            group = group or cgroup()
            return cls(group.usage, limit) if group is not None else None
        if limit.source == "machine":
            return cls(_machine_used(limit.bytes), limit)
        return None

    def follow_plan(self, planned_mb: dict[str, float], predict: Callable[[str], float] | None) -> None:
        """Hold each phase to its plan (MiB above the memory in use now, before the model is built), that phase
        planned again by `predict` after each of its back-offs: a run forced over its limit then backs off before
        its first step is killed, in training and in evaluation alike."""
        self.planned, self.predict, self.start = dict(planned_mb), predict, self.used()

    def backed_off(self, phase: str) -> None:
        """A knob of `phase` was halved: its plan is made again at its next check."""
        if self.predict is not None:
            self._stale.add(self._key(phase))

    def _key(self, phase: str) -> str:
        return "test" if phase == "val" and "val" not in self.planned else phase

    def check(self, phase: str, words: str | None = None) -> None:
        """Raise `GuardedOutOfMemory` where less than the margin is left before the limit, now or at the plan's peak
        of `phase` (`train`, `val`, `test`)."""
        used, line = self.used(), self.limit.bytes - self.margin
        where = words or phase
        if used > line:
            raise GuardedOutOfMemory(
                f"out of memory (guard): {size_text(used)} in use in the {where}, within {size_text(self.margin)} "
                f"of {self.limit.text}, {size_text(self.limit.bytes)}")
        planned = self._planned_peak(phase)
        if planned is not None and planned > PLANNED_SHARE * self.limit.bytes:
            raise GuardedOutOfMemory(
                f"out of memory (guard): the {where}'s plan needs {size_text(planned)}, over {self.limit.text}, "
                f"{size_text(self.limit.bytes)}, less {1 - PLANNED_SHARE:.0%}")

    def _planned_peak(self, phase: str) -> float | None:
        key = self._key(phase)
        if key in self._stale and self.predict is not None:
            self.planned[key] = self.predict(key)
            self._stale.discard(key)
        mb = self.planned.get(key)
        return None if mb is None else self.start + mb * MiB

    def rose(self, rise_bytes: float) -> None:
        """The last step's peak above where it started (the process's peak resident set less its resident set
        before)."""
        self._steps += 1
        if self._steps > 1:  # a run's first step also loads kernels and maps libraries: not a step's rise
            self.step_rise = max(0, int(rise_bytes))

    def stop(self) -> str | None:
        """Between steps: a sentence saying why the run must stop here, or None. Back-off cannot help memory that
        stays held between steps (a leak, a cache): once what is held, plus the last step's rise, plus the last growth
        of what is held from one step to the next, plus a quarter of the margin, would cross the limit, the run
        stops with a checkpoint before the kernel kills it."""
        used = self.used()
        if self._held is not None and self._steps > 1:  # the first step makes the optimizer's state: once
            self.held_growth = max(0, used - self._held)
        self._held = used
        need = self.step_rise + self.held_growth + self.margin // 4
        if used + need <= self.limit.bytes:
            return None
        return (f"memory held between steps reached {size_text(used)} of {self.limit.text}, "
                f"{size_text(self.limit.bytes)}, leaving no room for the next step ({size_text(need)} with its "
                f"growth)")


def _machine_used(total: int) -> Callable[[], int]:
    """The machine's memory in use as the kernel's OOM killer sees it: what is not available (MemAvailable)."""
    meminfo = Path("/proc/meminfo")
    base = total  # the limit is available memory plus the run's resident set, fixed at the run's start

    def used() -> int:
        try:
            with meminfo.open() as info:
                available = next(int(line.split()[1]) * 1024 for line in info if line.startswith("MemAvailable:"))
        except (OSError, StopIteration, ValueError):
            return 0
        return base - available

    return used
