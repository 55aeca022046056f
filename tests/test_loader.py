"""Episodes through the DataLoader: the same losses and metrics with any number of workers, batches in order."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from conftest import SMALL, events, fewshot

from fewshot_cli.data.loader import Feed, ImageCache, ItemReader, Loaders, cache_share, stack_images
from fewshot_cli.runner.input_wait import from_steps

DETECT_TINY = ["--preset", "cpu", "--image-size", "64", "--embedding-dim", "8", "--head-hidden", "16",
               "--objectness-hidden", "4", "--proposal-step", "16", "--proposals-top-k", "8", "--n-way", "2",
               "--k-shot", "1", "--n-query", "2", "--episodes", "4", "--test-episodes", "2", "--val-every", "2",
               "--val-episodes", "1", "--score-threshold", "0.0", "--quiet"]


def _run(command: str, args: list[str], workers: int, out: Path) -> tuple[list[float], list[dict], dict]:
    done = fewshot(command, *args, "--workers", workers, "--out", out, "--name", f"w{workers}")
    assert done.returncode == 0, done.stderr
    run_dir = out / f"w{workers}"
    steps = events(run_dir, "step")
    assert all(s["data_wait_s"] >= 0 for s in steps)
    evals = [{k: v for k, v in e.items() if k not in ("time", "elapsed_s", "mem")} for e in events(run_dir, "eval")]
    return [s["loss"] for s in steps], evals, json.loads((run_dir / "metrics.json").read_text())


def test_mahalanobis_results_do_not_depend_on_the_number_of_workers(tmp_path: Path) -> None:
    runs = [_run("mahalanobis-train", SMALL, w, tmp_path) for w in (0, 1, 2)]
    assert len(runs[0][0]) == 6 and runs[0][1]
    assert runs[1] == runs[0] and runs[2] == runs[0]


def test_detect_results_do_not_depend_on_the_number_of_workers(tmp_path: Path) -> None:
    runs = [_run("detect-train", DETECT_TINY, w, tmp_path) for w in (0, 2)]
    assert len(runs[0][0]) == 4 and runs[0][1]
    assert runs[1] == runs[0]


class Squares:
    """item i is an image filled with i; counts how often each item was read in this process."""

    def __init__(self) -> None:
        self.reads: list[int] = []

    def __getitem__(self, item: int) -> tuple[torch.Tensor, int]:
        self.reads.append(item)
        return torch.full((1, 2, 2), float(item)), 0


def _schedule(first: tuple[int, int]):
    for step in range(first[0], 6):
        if (step, 0) >= first:
            yield (step, 0), [step * 10, step * 10 + 1]


def _feed(data: Squares) -> Feed:
    return Feed(Loaders(ItemReader(data), stack_images, 0, torch.device("cpu")), _schedule)


def test_a_retried_step_gets_its_batch_again_without_reading_it_twice() -> None:
    data = Squares()
    feed = _feed(data)
    first = feed.get((1, 0))
    assert feed.get((1, 0)) is first and data.reads == [10, 11]
    assert feed.get((2, 0))[:, 0, 0, 0].tolist() == [20.0, 21.0]


def test_a_step_asked_out_of_order_restarts_the_loader_there() -> None:
    feed = _feed(Squares())
    assert feed.get((1, 0))[0, 0, 0, 0] == 10.0
    assert feed.get((4, 0))[0, 0, 0, 0] == 40.0  # a resume from step 4
    assert feed.get((5, 0))[0, 0, 0, 0] == 50.0
    with pytest.raises(KeyError):
        feed.get((9, 0))


class MarkedSquares(Squares):
    """Squares that leave a file behind for each item read, in whichever process reads it."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = folder

    def __getitem__(self, item: int) -> tuple[torch.Tensor, int]:
        (self.folder / str(item)).touch()
        return super().__getitem__(item)


def test_a_started_feed_reads_its_first_batches_before_they_are_asked_for(tmp_path: Path) -> None:
    data = MarkedSquares(tmp_path)
    feed = Feed(Loaders(ItemReader(data), stack_images, 2, torch.device("cpu")), _schedule)
    feed.start((2, 0))  # what a task's `prefetch` does before the run's first step
    deadline = time.monotonic() + 30
    while not {"20", "21"} <= {p.name for p in tmp_path.iterdir()} and time.monotonic() < deadline:
        time.sleep(0.05)
    assert {"20", "21"} <= {p.name for p in tmp_path.iterdir()}  # read by a worker, nothing asked yet
    assert feed.get((2, 0))[:, 0, 0, 0].tolist() == [20.0, 21.0]
    assert feed.get((3, 0))[:, 0, 0, 0].tolist() == [30.0, 31.0]
    feed.close()


def test_fixed_batches_repeat_through_persistent_workers_in_order() -> None:
    loaders = Loaders(ItemReader(Squares()), stack_images, 2, torch.device("cpu"))
    batches = [[3, 1], [2], [7, 5, 4]]
    for _ in range(2):
        got = [b[:, 0, 0, 0].tolist() for b in loaders.fixed("val", batches)]
        assert got == [[3.0, 1.0], [2.0], [7.0, 5.0, 4.0]]
    assert loaders.take_wait() >= 0 and loaders.wait_s == 0


def test_an_input_bound_run_says_so_in_its_log_and_memreport(tmp_path: Path) -> None:
    done = fewshot("mahalanobis-train", *SMALL, "--out", tmp_path, "--name", "slow",
                   env={"FEWSHOT_SIMULATE_SLOW_READ_S": "0.01"})
    assert done.returncode == 0, done.stderr
    [verdict] = events(tmp_path / "slow", "input_bound")
    assert verdict["data_wait_share"] > 0.5 and "--workers 2" in verdict["advice"]
    report = json.loads(fewshot("memreport", tmp_path / "slow", "--json").stdout)
    assert report["input"]["input_bound"] is True and "--workers" in report["input"]["advice"]
    assert "input-bound" in fewshot("memreport", tmp_path / "slow").stdout


def test_input_wait_is_judged_against_step_time() -> None:
    waits = from_steps([{"data_wait_s": 0.05, "step_s": 1.0}, {"data_wait_s": 0.04, "step_s": 1.0}, {"step_s": 9}])
    assert waits.share == pytest.approx(0.045) and waits.verdict(0) is None
    waits.add({"data_wait_s": 1.0}, 1.0)
    assert waits.verdict(3)["advice"].endswith("try --workers 6 (now 3)")


def test_the_image_cache_keeps_the_most_recent_items_within_its_bytes() -> None:
    cache = ImageCache(max_bytes=3 * 16)  # three 2x2 float32 images
    for item in range(3):
        cache.put(item, (torch.zeros(2, 2), item))
    assert cache.get(0) is not None  # 0 is now the most recent
    cache.put(3, (torch.zeros(2, 2), 3))
    assert cache.get(1) is None and cache.get(0) is not None and cache.get(3) is not None
    assert cache.bytes == 48
    cache.put(4, torch.zeros(4, 4))  # larger than the whole cache: not kept, nothing evicted
    assert cache.get(4) is None and cache.bytes == 48 and (cache.hits, cache.misses) == (3, 2)


def test_a_cached_item_is_read_once() -> None:
    data = Squares()
    reader = ItemReader(data, cache_bytes=cache_share(1, 0))
    loaders = Loaders(reader, stack_images, 0, torch.device("cpu"))
    for _ in range(2):
        list(loaders.fixed("val", [[1, 2], [2, 3]]))
    assert data.reads == [1, 2, 3]
    assert ItemReader(Squares(), cache_bytes=cache_share(4, 2)).cache.max_bytes == 2 * 1024 * 1024


def test_a_dropped_cache_holds_nothing_and_reads_again() -> None:
    data = Squares()
    loaders = Loaders(ItemReader(data, cache_bytes=cache_share(1, 0)), stack_images, 0, torch.device("cpu"))
    list(loaders.fixed("train", [[1, 2]]))
    assert loaders.reader.cache.bytes > 0
    loaders.drop_cache()
    assert loaders.reader.cache.bytes == 0
    list(loaders.fixed("train", [[1, 2]]))
    assert data.reads == [1, 2, 1, 2]


def test_the_image_cache_does_not_change_results(tmp_path: Path) -> None:
    cached = _run("mahalanobis-train", SMALL, 0, tmp_path / "cached")
    uncached = _run("mahalanobis-train", [*SMALL, "--image-cache-mb", "0"], 0, tmp_path / "uncached")
    assert cached == uncached
