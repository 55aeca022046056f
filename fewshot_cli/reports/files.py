"""Atomic CSV tables and matplotlib figures: a run's own files and the report commands' plots."""

from __future__ import annotations

import csv
import io
import resource
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from fewshot_cli.runner.checkpoint import atomic_write_bytes


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    data = buffer.getvalue().encode()
    atomic_write_bytes(Path(path), lambda handle: handle.write(data))


def load_libraries() -> bool:
    """Where the address space is limited (RLIMIT_AS, `ulimit -v`), import what the reports draw with (matplotlib's
    file-only backend) now, for a run to call while it has address space to spare: a run capped near its limit by
    its end cannot map its shared libraries then (measured: `ImportError: ... failed to map segment from shared
    object` after a capped test evaluation had backed off). Elsewhere nothing refuses the mapping, and it loads
    when the reports are drawn, after the test: a run does not wait for it before its first step. Returns whether
    it was loaded now."""
    if resource.getrlimit(resource.RLIMIT_AS)[0] == resource.RLIM_INFINITY:
        return False
    import matplotlib  # matplotlib: loaded only when a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401

    return True


def figure(width: float = 6.0, height: float = 4.5) -> tuple[Any, Any]:
    """A figure and its axes from matplotlib's file-only backend (no display needed)."""
    import matplotlib  # matplotlib: loaded only when a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after the backend is chosen

    return plt.subplots(figsize=(width, height))


def save_figure(fig: Any, path: Path, dpi: int = 110) -> None:
    """Lay the figure out, write it as a PNG (its folder made if need be) and close it."""
    import matplotlib.pyplot as plt  # matplotlib: loaded only when a figure is drawn

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # no creation date in the file, so a figure drawn twice from the same run is the same bytes
    atomic_write_bytes(path, lambda handle: fig.savefig(handle, format="png", dpi=dpi, metadata={"Software": None}))
    plt.close(fig)


def fmt(value: float) -> str:
    return f"{value:.6f}"
