"""The memory a run may use: the smallest of the machine's, a memory cgroup's, the address-space limit's, a shared
card's free memory and `--memory-budget`, each with where it comes from. Reads /proc and /sys only: no torch."""

from __future__ import annotations

import os
import re
import resource
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from fewshot_cli.errors import BadInput

GiB = 1024**3
#: what a run maps beyond its resident set from its start to its end under an address-space limit (with glibc's
#: arenas capped at two, `memory.measure.return_freed_memory`): thread stacks, arenas, libraries loaded late;
#: VmSize's growth less VmRSS's over a mahalanobis-train run (resnet18 at 64 px), measured
ADDRESS_SPACE_RESERVE = 432 * 1024**2
#: cgroup v1 writes this (a page-rounded 2**63 - 1) for "no limit"; v2 writes "max"
_V1_UNLIMITED = 2**62


@dataclass(frozen=True)
class Limit:
    """One bound on a run's memory: its bytes for the run, a key, and words naming it for a user."""

    bytes: int
    #: machine, cgroup, cgroup_high, address_space, budget, device, device_free
    source: str
    #: "this container's memory limit (cgroup memory.limit_in_bytes)"
    text: str
    #: for a cgroup: the directory whose limit binds, so a report can read its oom-kill count later
    where: str | None = None

    def record(self) -> dict[str, object]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class Cgroup:
    """The memory cgroup a process runs in: its own directory (what it and its cgroup-mates use) and the tightest
    limit along its path up to the hierarchy's root."""

    version: int
    own: Path
    limit: int
    #: the directory and file of the tightest limit
    limit_dir: Path
    limit_file: str
    #: v2's soft limit (memory.high): past it the kernel throttles and reclaims rather than kills
    high: int | None = None

    def usage(self) -> int:
        """The bytes the kernel counts against the limit less the page cache it drops before it kills: the usage
        less inactive file pages (measured to predict the kill: `Cgroup.usage` near the limit, usage_in_bytes
        stays at the limit for as long as there is cache to reclaim)."""
        stat = _stat(self.own / "memory.stat")
        if self.version == 1:
            total = _int(self.own / "memory.usage_in_bytes")
            return max(0, total - stat.get("total_inactive_file", stat.get("inactive_file", 0)))
        return max(0, _int(self.own / "memory.current") - stat.get("inactive_file", 0))

    def oom_kills(self) -> int | None:
        """How many times the kernel's OOM killer has killed in the binding cgroup, where the kernel says."""
        for path in (self.limit_dir / "memory.oom_control", self.limit_dir / "memory.events"):
            found = _stat(path).get("oom_kill")
            if found is not None:
                return found
        return None


def cgroup(proc: Path = Path("/proc/self")) -> Cgroup | None:
    """This process's memory cgroup with a limit (v2's memory controller, else v1's), or None where it has none
    or none can be read."""
    try:
        lines = (proc / "cgroup").read_text().splitlines()
        mounts = (proc / "mountinfo").read_text().splitlines()
    except OSError:
        return None
    paths = {}
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            paths[2] = path
        elif "memory" in controllers.split(","):
            paths[1] = path
    for version in (2, 1):
        if version not in paths:
            continue
        for root, mount_point in _mounts(mounts, version):
            path = paths[version]
            relative = path[len(root):] if path.startswith(root) else path
            own = Path(mount_point) / relative.lstrip("/")
            limit_name = "memory.max" if version == 2 else "memory.limit_in_bytes"
            if not (own / limit_name).is_file():
                continue
            found = _tightest(own, Path(mount_point), limit_name)
            high = _tightest(own, Path(mount_point), "memory.high")[0] if version == 2 else None
            if version == 1:  # ancestors above the mount (a container's view) count too
                inherited = _stat(own / "memory.stat").get("hierarchical_memory_limit")
                if inherited is not None and inherited < found[0]:
                    found = (inherited, own, "memory.stat hierarchical_memory_limit")
            if found[0] >= _V1_UNLIMITED and (high is None or high >= _V1_UNLIMITED):
                return None
            return Cgroup(version, own, found[0], found[1], found[2],
                          high if high is not None and high < _V1_UNLIMITED else None)
    return None


def _mounts(mountinfo: list[str], version: int) -> list[tuple[str, str]]:
    """(root within the hierarchy, mount point) of each mount of the v1 memory hierarchy or of cgroup2."""
    found = []
    for line in mountinfo:
        fields = line.split()
        if "-" not in fields:
            continue
        dash = fields.index("-")
        kind, super_options = fields[dash + 1], fields[dash + 3] if len(fields) > dash + 3 else ""
        if (version == 2 and kind == "cgroup2") or (
                version == 1 and kind == "cgroup" and "memory" in super_options.split(",")):
            found.append((fields[3], fields[4]))
    return found


def _tightest(own: Path, top: Path, name: str) -> tuple[int, Path, str]:
    """The smallest value of the limit file `name` from `own` up to `top`, with its directory."""
    best, where = 2**63, own
    directory = own
    while True:
        value = _int(directory / name)
        if value < best:
            best, where = value, directory
        if directory == top or directory.parent == directory:
            return best, where, name
        directory = directory.parent


def _int(path: Path) -> int:
    try:
        text = path.read_text().strip()
    except OSError:
        return 2**63
    return 2**63 if text == "max" else int(text)


def _stat(path: Path) -> dict[str, int]:
    try:
        return {k: int(v) for k, v in (line.split() for line in path.read_text().splitlines() if line.strip())}
    except (OSError, ValueError):
        return {}


def _status(key: str) -> int | None:
    """A figure of /proc/self/status in bytes (VmSize, VmRSS, ...)."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith(key + ":"))
    except (OSError, StopIteration, ValueError):
        return None


def host_limits() -> list[Limit]:
    """Every bound on this process's resident memory the system sets, for the whole process (its resident set
    now included): the machine's available memory, a memory cgroup's limit less what the cgroup's other processes
    use, and RLIMIT_AS's room (address space) counted from the resident set now."""
    rss = psutil.Process(os.getpid()).memory_info().rss
    found = [Limit(int(psutil.virtual_memory().available) + rss, "machine",
                   "the machine's available memory (MemAvailable)")]
    group = cgroup()
    if group is not None:
        others = max(0, group.usage() - rss)  # the cgroup's other processes (and kernel memory) hold this
        where = str(group.limit_dir)
        if group.limit < _V1_UNLIMITED:
            text = f"this container's memory limit (cgroup {group.limit_file})"
            if others > 64 * 1024**2:
                text += f", less {others / GiB:.2f} GiB its other processes use"
            found.append(Limit(group.limit - others, "cgroup", text, where))
        if group.high is not None:
            found.append(Limit(group.high - others, "cgroup_high",
                               "this container's soft memory limit (cgroup memory.high)", where))
    soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    size = _status("VmSize")
    if soft != resource.RLIM_INFINITY and size is not None:
        room = max(0, soft - size - ADDRESS_SPACE_RESERVE)
        found.append(Limit(rss + room, "address_space", "the address-space limit (RLIMIT_AS, ulimit -v) less the "
                           "address space in use and what a run maps beside its memory"))
    return found


def tightest(limits: list[Limit]) -> Limit:
    return min(limits, key=lambda limit: limit.bytes)


def size_text(size: float) -> str:
    return f"{size / GiB:.2f} GiB" if size >= GiB else f"{size / 1024**2:,.0f} MiB"


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def parse_size(text: str) -> int:
    """'15GiB', '512MiB', '16GB', '1.5e9' to bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise BadInput(f"--memory-budget {text!r} is not a size; write it like 15GiB, 512MiB or 16GB.")
    value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if value <= 0:
        raise BadInput(f"--memory-budget must be positive, not {text!r}.")
    return int(value)
