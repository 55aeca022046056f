"""Real out-of-memory errors: each training command run with its address space capped (RLIMIT_AS) a measured margin
above its start-up size backs off in training and in evaluation, and finishes."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import events

MiB = 2**20

# The child: start up (imports, torch's first op), measure its virtual size, cap its address space a margin above
# it, then run the CLI in the same process. It writes its start-up and peak virtual sizes to CAP_REPORT.
CHILD = """
import atexit, json, os, resource, sys
import torch
import fewshot_cli.cli as cli

torch.ones(1).add_(1)

def vm(key):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(key + ":"))

start = vm("VmSize")
if os.environ.get("CAP_MARGIN"):
    resource.setrlimit(resource.RLIMIT_AS, (start + int(os.environ["CAP_MARGIN"]),
                                            resource.getrlimit(resource.RLIMIT_AS)[1]))
atexit.register(lambda: open(os.environ["CAP_REPORT"], "w").write(json.dumps({"start": start, "peak": vm("VmPeak")})))
sys.argv = ["fewshot", *sys.argv[1:]]
cli.main()
"""


def _cap_unavailable() -> str | None:
    if not Path("/proc/self/status").is_file():
        return "no /proc/self/status to measure a process's virtual size"
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        return f"RLIMIT_AS already has a hard limit ({hard} bytes) here"
    try:  # lowering and restoring our own soft limit shows that this system honours it
        resource.setrlimit(resource.RLIMIT_AS, (2**40, hard))
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    except (ValueError, OSError) as err:
        return f"RLIMIT_AS cannot be set here ({err})"
    return None


pytestmark = pytest.mark.skipif(_cap_unavailable() is not None, reason=str(_cap_unavailable()))


def _child(args: list[str], report: Path, margin: int | None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CAP_REPORT": str(report),
           # a fixed mmap threshold: big blocks go back to the system when freed, so the virtual size follows
           # the memory in use (glibc's adaptive threshold keeps freed blocks of up to 32 MiB in the heap)
           "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_ARENA_MAX": "2",
           # oneDNN caches the primitives it built for the sizes that failed, with their memory, and torch offers
           # no way to empty that cache: without this a capped CPU run keeps failing after it backed off
           "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "0"}
    env.pop("CAP_MARGIN", None)
    if margin is not None:
        env["CAP_MARGIN"] = str(margin)
    return subprocess.run([sys.executable, "-c", CHILD, *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=300)


def capped_run(command: str, runs: Path, common: list[str], small: list[str], large: list[str]) -> Path:
    """Measure what `common + small` needs above start-up (the run `reference`), then run `common + large`
    capped at half as much again plus 64 MiB (the run `capped`, which must complete); returns its directory."""
    reference = _child([command, *common, *small, "--out", runs, "--name", "reference"], runs.parent / "ref.json",
                       None)
    assert reference.returncode == 0, reference.stderr
    sizes = json.loads((runs.parent / "ref.json").read_text())
    need = sizes["peak"] - sizes["start"]
    capped = _child([command, *common, *large, "--out", runs, "--name", "capped"], runs.parent / "cap.json",
                    int(need * 1.5) + 64 * MiB)
    assert capped.returncode == 0, capped.stderr
    return runs / "capped"


def real_backoffs(run: Path, phase: str) -> list[dict]:
    """The run's back-offs in `phase`, each checked to come from the CPU allocator's real failure."""
    found = [e for e in events(run, "oom_backoff") if e["phase"] == phase]
    assert found, f"no back-off in {phase}: {events(run, 'oom_backoff')}"
    assert all("can't allocate memory" in e["error"] or "Cannot allocate memory" in e["error"] for e in found)
    return found


def test_mahalanobis_train_backs_off_for_real_in_training_and_test(runs: Path) -> None:
    common = ["--preset", "cpu", "--image-size", "64", "--episodes", "2", "--val-every", "0", "--test-episodes", "5",
              "--quiet"]
    run = capped_run("mahalanobis-train", runs, common, ["--n-query", "2", "--batch-size", "16"],
                     ["--n-query", "16", "--batch-size", "1024"])
    assert {e["knob"] for e in real_backoffs(run, "train")} == {"n_query"}
    assert {e["knob"] for e in real_backoffs(run, "test")} == {"batch_size"}


def test_an_evaluation_backed_off_for_real_gives_the_metrics_of_one_that_was_not(runs: Path) -> None:
    common = ["--preset", "cpu", "--image-size", "64", "--episodes", "0", "--test-episodes", "5", "--quiet"]
    run = capped_run("mahalanobis-train", runs, common, ["--batch-size", "8"], ["--batch-size", "1024"])
    assert real_backoffs(run, "test")[-1]["to"] > 8  # the back-off stopped above the reference's batch
    assert (run / "metrics.json").read_text() == (runs / "reference" / "metrics.json").read_text()


DETECT = ["--preset", "cpu", "--image-size", "256", "--test-episodes", "1", "--n-way", "2", "--k-shot", "1",
          "--quiet"]


def test_detect_train_backs_off_for_real_in_training(runs: Path) -> None:
    common = [*DETECT, "--episodes", "2", "--eval-batch-size", "1"]
    run = capped_run("detect-train", runs, common, ["--n-query", "1"], ["--n-query", "16"])
    assert {e["knob"] for e in real_backoffs(run, "train")} == {"n_query"}


def test_detect_train_backs_off_for_real_in_its_test(runs: Path) -> None:
    # an episode's queries in evaluation weigh less than in training (no gradients): the test runs alone here
    common = [*DETECT, "--episodes", "0", "--n-query", "16"]
    run = capped_run("detect-train", runs, common, ["--eval-batch-size", "1"], ["--eval-batch-size", "32"])
    assert {e["knob"] for e in real_backoffs(run, "test")} == {"eval_batch_size"}
    assert (run / "detections.json").read_text() == (runs / "reference" / "detections.json").read_text()


TRIPLET = ["--preset", "cpu", "--val-every", "0", "--test-episodes", "1", "--n-way", "2", "--n-query", "1",
           "--k-shot", "1", "--num-aug", "0", "--quiet"]


def test_triplet_train_backs_off_for_real_in_training(runs: Path) -> None:
    common = [*TRIPLET, "--image-size", "96", "--clip-frames", "32", "--episodes", "2", "--eval-frames", "2",
              "--embedding-dim", "16"]
    run = capped_run("triplet-train", runs, common, ["--triplet-batch-size", "2"], ["--triplet-batch-size", "64"])
    assert {e["knob"] for e in real_backoffs(run, "train")} == {"triplet_batch_size"}


def test_triplet_train_backs_off_for_real_in_its_test(runs: Path) -> None:
    common = [*TRIPLET, "--image-size", "192", "--clip-frames", "128", "--episodes", "0", "--embedding-dim", "32"]
    run = capped_run("triplet-train", runs, common, ["--eval-frames", "2"], ["--eval-frames", "128"])
    assert {e["knob"] for e in real_backoffs(run, "test")} == {"eval_frames"}


FOOD = ["--preset", "cpu", "--image-size", "96", "--quiet"]


def test_classify_food101_backs_off_for_real_in_training(runs: Path) -> None:
    common = [*FOOD, "--epochs", "1", "--synthetic-classes", "4", "--dev-samples", "16", "--eval-batch-size", "4"]
    run = capped_run("classify-food101", runs, common, ["--batch-size", "4"], ["--batch-size", "64"])
    assert {e["knob"] for e in real_backoffs(run, "train")} == {"batch_size"}


def test_classify_food101_backs_off_for_real_in_its_test(runs: Path) -> None:
    common = [*FOOD, "--epochs", "0", "--synthetic-classes", "16"]
    run = capped_run("classify-food101", runs, common, ["--eval-batch-size", "4"], ["--eval-batch-size", "256"])
    assert {e["knob"] for e in real_backoffs(run, "test")} == {"eval_batch_size"}
    assert (run / "metrics.json").read_text() == (runs / "reference" / "metrics.json").read_text()
