"""The run's JSON-lines event log: every line flushed when written; readers skip a cut last line."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import jsonlines

from fewshot_cli.errors import CannotWrite


class RunLog:
    """Appends events to `log.jsonl`, each with `event`, `time` and `elapsed_s`."""

    def __init__(self, path: Path, elapsed_offset: float = 0.0) -> None:
        self.path = path
        self._start = time.time() - elapsed_offset
        try:
            self._writer = jsonlines.open(path, mode="a", flush=True)
        except OSError as err:
            raise CannotWrite(path, err) from err

    def write(self, event: str, **fields: Any) -> dict[str, Any]:
        now = time.time()
        record = {"event": event, "time": round(now, 3), "elapsed_s": round(now - self._start, 3), **fields}
        try:
            self._writer.write(record)
        except OSError as err:
            raise CannotWrite(self.path, err) from err
        return record

    def close(self) -> None:
        try:
            self._writer.close()
        except OSError as err:
            raise CannotWrite(self.path, err) from err


def read_log(path: Path, warn: bool = True) -> list[dict[str, Any]]:
    """All complete events of a log; a cut or malformed line is skipped with a warning on stderr."""
    events = []
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                if warn:
                    print(f"warning: {path}:{number}: skipped a cut or malformed log line", file=sys.stderr)
    return events
