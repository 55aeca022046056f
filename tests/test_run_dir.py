"""The run directory: claimed atomically, and every error writing it one sentence naming the path and the cause."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
from conftest import SMALL, events, fewshot
from test_cli_runs import _start
from test_rerun import in_process

from fewshot_cli.errors import BadInput
from fewshot_cli.runner import rundir
from fewshot_cli.runner.log import read_log

LINE = ["mahalanobis-train", *SMALL]


def _one_sentence(result: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    assert result.returncode == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


@contextmanager
def _tmpfs(where: Path, options: str) -> Iterator[Path]:
    """A small filesystem of its own at `where`, full or read-only without touching the real disk. Mounting needs
    CAP_SYS_ADMIN (root in a container usually lacks it; a user namespace's root may have it): the mount is tried,
    and the test skipped with mount's own answer when it is refused."""
    where.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        pytest.skip("no mount command here to make a small tmpfs")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (mounting needs CAP_SYS_ADMIN): "
                    f"{(done.stderr.strip().splitlines() or ['mount failed'])[0]}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _fill(disk: Path) -> None:
    """Write a file until the filesystem is full."""
    handle = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
    with suppress(OSError):
        while True:
            os.write(handle, b"\0" * 4096)
    os.close(handle)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("finished")
    assert fewshot(*LINE, "--out", out, "--name", "a").returncode == 0
    return out / "a"


def test_of_many_claims_at_once_exactly_one_gets_the_directory(tmp_path: Path) -> None:
    run_dir, barrier, won, lost = tmp_path / "runs" / "r", threading.Barrier(8), [], []

    def claim(i: int) -> None:
        barrier.wait()
        try:
            rundir.claim(run_dir, {"claimant": i})
            won.append(i)
        except BadInput as err:
            lost.append(str(err))

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 1 and len(lost) == 7
    assert all("already exists" in message for message in lost)
    assert json.loads((run_dir / "config.json").read_text()) == {"claimant": won[0]}


def test_two_runs_started_at_once_with_one_name_one_runs_the_other_exits_2(tmp_path: Path) -> None:
    procs = [_start([*LINE, "--out", tmp_path, "--name", "same"]) for _ in range(2)]
    results = [(proc.wait(timeout=300), proc.stderr.read()) for proc in procs]
    assert sorted(code for code, _ in results) == [0, 2], results
    loser = next(stderr for code, stderr in results if code == 2)
    assert "already exists" in loser and "Traceback" not in loser
    assert len(events(tmp_path / "same", "run_start")) == 1
    assert (tmp_path / "same" / "metrics.json").is_file()


def test_a_file_in_the_way_of_out_is_exit_2_naming_it(tmp_path: Path) -> None:
    (tmp_path / "runs").write_text("not a directory")
    _one_sentence(fewshot(*LINE, "--out", tmp_path / "runs", "--name", "r"), 2, f"{tmp_path / 'runs'} is not a "
                  "directory")


def test_a_read_only_disk_is_exit_2_naming_the_path_and_the_cause(tmp_path: Path) -> None:
    with _tmpfs(tmp_path / "disk", "ro,size=1m") as disk:
        _one_sentence(fewshot(*LINE, "--out", disk / "runs", "--name", "r"), 2, str(disk / "runs" / "r"),
                      "Read-only file system")


def test_a_full_disk_before_the_first_step_is_exit_2_and_leaves_nothing(tmp_path: Path) -> None:
    with _tmpfs(tmp_path / "disk", "size=64k") as disk:
        _fill(disk)
        _one_sentence(fewshot(*LINE, "--out", disk, "--name", "r"), 2, str(disk / "r"), "No space left on device")
        assert not (disk / "r").exists()


def test_a_full_disk_after_the_first_step_is_exit_1_with_run_end_failed_and_no_metrics(tmp_path: Path) -> None:
    # room for config.json and the log, not for the first checkpoint (about 1.5 MB at step 2)
    with _tmpfs(tmp_path / "disk", "size=512k") as disk:
        result = fewshot(*LINE, "--out", disk, "--name", "r")
        _one_sentence(result, 1, f"Cannot write {disk / 'r' / 'checkpoint.pt'}: No space left on device")
        assert events(disk / "r", "run_end")[-1]["status"] == "failed"
        assert [e["step"] for e in events(disk / "r", "step")] == [1, 2]
        assert sorted(p.name for p in (disk / "r").iterdir()) == ["config.json", "log.jsonl"]


def test_a_log_that_fills_the_disk_is_exit_1_and_keeps_every_complete_line(tmp_path: Path) -> None:
    # two pages: config.json, then the log fills the second one before the run's only checkpoint at its end
    with _tmpfs(tmp_path / "disk", "size=8k") as disk:
        result = fewshot(*LINE, "--episodes", "30", "--val-every", "0", "--checkpoint-every", "100", "--out", disk,
                         "--name", "r")
        _one_sentence(result, 1, f"Cannot write {disk / 'r' / 'log.jsonl'}: No space left on device")
        logged = read_log(disk / "r" / "log.jsonl", warn=False)
        steps = [e["step"] for e in logged if e["event"] == "step"]
        assert steps == list(range(1, len(steps) + 1)) and 0 < len(steps) < 30
        assert not (disk / "r" / "metrics.json").exists()


def test_resume_on_a_read_only_disk_is_exit_2(finished: Path, tmp_path: Path) -> None:
    with _tmpfs(tmp_path / "disk", "size=4m") as disk:
        shutil.copytree(finished, disk / "a")
        (disk / "a" / "metrics.json").unlink()
        log = (disk / "a" / "log.jsonl").read_text()
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        _one_sentence(fewshot("mahalanobis-train", "--resume", disk / "a"), 2,
                      f"Cannot write {disk / 'a' / 'log.jsonl'}: Read-only file system")
        assert (disk / "a" / "log.jsonl").read_text() == log


@pytest.mark.parametrize(("spoil", "needle"), [
    (lambda run: (run / "checkpoint.pt").write_bytes(b"PK\x03\x04 not a checkpoint"), "checkpoint.pt cannot be read"),
    (lambda run: (run / "checkpoint.pt").write_bytes((run / "checkpoint.pt").read_bytes()[:1000]),
     "checkpoint.pt cannot be read"),
    (lambda run: (run / "config.json").write_bytes(b"\xff\xfe{"), "is not text"),
    (lambda run: (run / "config.json").write_text("{"), "is not valid JSON"),
    (lambda run: (run / "config.json").write_text((run / "config.json").read_text().replace(
        '"mahalanobis-train"', '"detect-train"')), "that is a detect-train run, not a mahalanobis-train one"),
])
def test_resume_of_an_unreadable_or_foreign_run_is_exit_2(finished: Path, tmp_path: Path, spoil, needle: str
                                                          ) -> None:
    run = tmp_path / "a"
    shutil.copytree(finished, run)
    (run / "metrics.json").unlink()
    spoil(run)
    _one_sentence(in_process("mahalanobis-train", "--resume", run), 2, needle)
    assert len(events(run, "run_start")) == 1 and not (run / "metrics.json").exists()


def test_a_file_written_by_name_lands_whole_and_a_failed_one_leaves_nothing(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    from fewshot_cli.errors import CannotWrite
    from fewshot_cli.runner.checkpoint import atomic_write_file

    state = {"w": torch.arange(6.0).reshape(2, 3)}
    target = tmp_path / "model.safetensors"
    atomic_write_file(target, lambda name: save_file(state, name, metadata={"step": "3"}))
    assert torch.equal(load_file(target)["w"], state["w"]) and [p.name for p in tmp_path.iterdir()] == [target.name]

    def fails(name: Path) -> None:
        name.write_bytes(b"half")
        raise RuntimeError("SafetensorError: No space left on device")

    with pytest.raises(CannotWrite, match="No space left"):
        atomic_write_file(target, fails)
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # the old file stands, no temporary is left
    assert torch.equal(load_file(target)["w"], state["w"])
