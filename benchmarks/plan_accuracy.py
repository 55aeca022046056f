"""Planner accuracy: each command's predicted peak per phase against the same step measured for real, side by side.

Predicted: one step of each phase traced under fake tensors (nothing allocated). Measured on the CPU: the same step
run for real under the same tracker (tensor bytes alive at the peak), and the process's RSS rise during the step
(sampled every 2 ms; it includes the allocator's and Python's own overheads, which no tensor tracker sees).

    python benchmarks/plan_accuracy.py [--markdown results/plan_accuracy.md]
"""

from __future__ import annotations

import argparse
import threading
import time

import psutil
import torch

from fewshot_cli.commands import load_commands
from fewshot_cli.plan import trace
from fewshot_cli.runner.config import resolve

MiB = 1024**2
#: every command at its cpu preset, shrunk where one step would take long on two cores
OVERRIDES = {"detect-train": {}, "triplet-train": {}, "mahalanobis-train": {"image_size": 84},
             "classify-food101": {"image_size": 128}, "embed-classify": {}}


class RssPeak:
    """Samples the process RSS in a thread; `rise(phase)` is the peak during the phase less its start."""

    def __init__(self) -> None:
        self.process, self.marks, self.peaks = psutil.Process(), {}, {}
        self._phase: str | None = None
        self._stop = False
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop:
            if self._phase is not None:
                rss = self.process.memory_info().rss
                self.peaks[self._phase] = max(self.peaks.get(self._phase, 0), rss)
            time.sleep(0.002)

    def observe(self, phase: str, moment: str) -> None:
        if moment == "start":
            self.marks[phase] = self.process.memory_info().rss
            self._phase = phase
        else:
            time.sleep(0.01)
            self._phase = None

    def rise(self, phase: str) -> int:
        return self.peaks.get(phase, 0) - self.marks.get(phase, 0)

    def close(self) -> None:
        self._stop = True
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", help="also write the table here")
    parser.add_argument("--commands", nargs="*", help="only these commands")
    args = parser.parse_args()
    torch.set_num_threads(1)
    lines = ["| command | phase | predicted MiB | measured (tracker) MiB | error | RSS rise MiB |",
             "|---|---|---|---|---|---|"]
    for name, command in load_commands().items():
        if args.commands and name not in args.commands:
            continue
        config = resolve(command.config, command.presets, "cpu", OVERRIDES.get(name, {})).config
        predicted = trace(command, config)
        rss = RssPeak()
        measured = trace(command, config, fake=False, observe=rss.observe)
        rss.close()
        for phase in predicted:
            p, m = sum(predicted[phase].values()), sum(measured[phase].values())
            error = f"{100 * (p - m) / m:+.1f}%" if m else "-"
            rise = rss.rise(phase) / MiB
            lines.append(f"| {name} | {phase} | {p / MiB:,.1f} | {m / MiB:,.1f} | {error} | {rise:,.1f} |")
            print(lines[-1], flush=True)
    table = "\n".join(lines) + "\n"
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write("Planner accuracy on the CPU, every command at its `cpu` preset (`python "
                         "benchmarks/plan_accuracy.py --markdown results/plan_accuracy.md`). Predicted: traced under "
                         "fake tensors; measured: the same step run for real under the same tracker. RSS rise is "
                         "machine-dependent and includes allocator and interpreter overheads.\n\n" + table)


if __name__ == "__main__":
    main()
