"""Atomic CSV tables and matplotlib figures in a run directory."""

from __future__ import annotations

import csv
import io
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


def load_libraries() -> None:
    """Import what the reports draw and score with (matplotlib's file-only backend, scikit-learn's metrics) now, for
    a run to call while it has address space to spare: a run capped near its limit by its end cannot map their
    shared libraries then (measured: `ImportError: ... failed to map segment from shared object` after a capped
    test evaluation had backed off)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    import sklearn.metrics  # noqa: F401


def figure(width: float = 6.0, height: float = 4.5) -> tuple[Any, Any]:
    """A figure and its axes from matplotlib's file-only backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def save_figure(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    # no creation date in the file, so a figure drawn twice from the same run is the same bytes
    atomic_write_bytes(Path(path), lambda handle: fig.savefig(handle, format="png", dpi=110,
                                                              metadata={"Software": None}))
    plt.close(fig)


def fmt(value: float) -> str:
    return f"{value:.6f}"
