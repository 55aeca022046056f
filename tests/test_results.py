"""Results tables and plots: `fewshot table` and `fewshot memreport` over run directories."""

from __future__ import annotations

import csv
import io
import json
import math
import random
import re
from pathlib import Path

import pytest
from conftest import fewshot

from fewshot_cli.errors import BadInput
from fewshot_cli.reports.memory import memreport
from fewshot_cli.reports.plots import plot_memory, plot_table
from fewshot_cli.reports.tables import build_table, render_table, summary_table

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def fake_run(root: Path, name: str, *, head: str = "cosine", k_shot: int = 1, seed: int = 0,
             metrics: dict | None = None, command: str = "mahalanobis-train", steps: int = 5,
             rss: list[float] | None = None, status: str = "completed", log: bool = True) -> Path:
    """A run directory written by hand, shaped as the runner writes one."""
    run = root / name
    run.mkdir(parents=True)
    knobs = {"head": {"value": head, "source": "cli"}, "k_shot": {"value": k_shot, "source": "cli"},
             "episodes": {"value": steps, "source": "cli"}}
    config = {"command": command, "preset": "cpu", "seed": seed, "device": "cpu", "data": None, "knobs": knobs}
    (run / "config.json").write_text(json.dumps(config))
    metrics = {"accuracy": 0.5, "accuracy_ci95": 0.05, "test_episodes": 10} if metrics is None else metrics
    if status == "completed":
        (run / "metrics.json").write_text(json.dumps(metrics))
    if log:
        rss = rss or [100.0 + i for i in range(steps)]
        lines = [{"event": "run_start", "time": 0, "elapsed_s": 0, "command": command}]
        lines += [{"event": "step", "time": i, "elapsed_s": i, "phase": "train", "step": i + 1, "loss": 1.0,
                   "step_s": 0.5, "mem": {"rss_mb": value}} for i, value in enumerate(rss)]
        lines.append({"event": "eval", "time": steps, "elapsed_s": steps, "phase": "test", "step": len(rss),
                      **metrics, "mem": {"rss_mb": max(rss) + 10}})
        end = {"event": "run_end", "time": steps, "elapsed_s": steps, "status": status}
        lines.append({**end, "metrics": metrics} if status == "completed" else end)
        (run / "log.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return run


@pytest.fixture
def grid(tmp_path: Path) -> list[Path]:
    """Two heads x two shots x two seeds, accuracies all different."""
    runs = []
    for h, head in enumerate(("euclidean", "cosine")):
        for k_shot in (5, 1):
            for seed in (0, 1):
                accuracy = 0.4 + 0.1 * h + 0.02 * k_shot + 0.01 * seed
                runs.append(fake_run(tmp_path, f"{head}-{k_shot}-{seed}", head=head, k_shot=k_shot, seed=seed,
                                     metrics={"accuracy": accuracy, "test_episodes": 10}))
    return runs


def md_rows(text: str) -> list[list[str]]:
    rows = [line for line in text.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in rows[2:]]


def test_table_does_not_depend_on_the_order_of_run_directories(grid: list[Path]) -> None:
    shuffled = grid[:]
    random.Random(1).shuffle(shuffled)
    for fmt in ("md", "csv", "latex"):
        first = render_table(build_table(grid, [], ["head", "k_shot"]), fmt)
        assert render_table(build_table(shuffled, [], ["head", "k_shot"]), fmt) == first
        assert render_table(build_table(grid[::-1], [], ["head", "k_shot"]), fmt) == first


def test_rows_are_sorted_by_group_key_numbers_as_numbers(tmp_path: Path) -> None:
    runs = [fake_run(tmp_path, f"k{k}", k_shot=k) for k in (10, 5, 1)]
    table = build_table(runs, ["accuracy"], ["k_shot"])
    assert [row["k_shot"] for row in table["rows"]] == [1, 5, 10]


def test_a_group_of_seeds_gives_the_mean_and_a_student_t_confidence_interval(tmp_path: Path) -> None:
    runs = [fake_run(tmp_path, f"s{s}", seed=s, metrics={"accuracy": a}) for s, a in enumerate((0.5, 0.6, 0.7))]
    mean, ci = build_table(runs, ["accuracy"], ["head"])["rows"][0]["accuracy"]
    assert mean == pytest.approx(0.6)
    assert ci == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-5)  # t(0.975, 2 dof)


def test_a_single_run_has_no_confidence_interval_over_runs(tmp_path: Path) -> None:
    table = build_table([fake_run(tmp_path, "one")], ["accuracy"], [])
    assert table["rows"][0]["accuracy"] == (0.5, None)


def test_a_directory_given_twice_counts_once(tmp_path: Path) -> None:
    run = fake_run(tmp_path, "one")
    assert build_table([run, tmp_path / "." / "one"], ["accuracy"], [])["rows"][0]["runs"] == 1


def test_an_incomplete_run_is_listed_apart_and_not_averaged_in(tmp_path: Path, capsys) -> None:
    done = fake_run(tmp_path, "done", metrics={"accuracy": 0.8})
    killed = fake_run(tmp_path, "killed", seed=1, metrics={"accuracy": 0.1}, status="interrupted")
    table = build_table([killed, done], ["accuracy"], ["head"])
    assert table["rows"][0]["runs"] == 1 and table["rows"][0]["accuracy"] == (0.8, None)
    assert table["incomplete"] == [(str(killed), "interrupted")]
    text = render_table(table, "md")
    assert "Incomplete runs (not averaged in)" in text and f"- {killed}: interrupted" in text
    assert "did not complete" in capsys.readouterr().err


def test_a_run_without_run_end_or_metrics_counts_as_killed(tmp_path: Path) -> None:
    done = fake_run(tmp_path, "done")
    cut = fake_run(tmp_path, "cut", status="none")
    lines = (cut / "log.jsonl").read_text().splitlines()[:-1]  # no run_end at all
    (cut / "log.jsonl").write_text("\n".join(lines) + "\n")
    table = build_table([done, cut], ["accuracy"], [])
    assert table["incomplete"] == [(str(cut), "running or killed (no run_end)")]


def test_no_completed_run_is_bad_input(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="None of the 1 runs completed"):
        build_table([fake_run(tmp_path, "killed", status="interrupted")], [], [])


def test_a_cut_last_log_line_is_skipped_with_a_warning(tmp_path: Path, capsys) -> None:
    run = fake_run(tmp_path, "cut", rss=[100.0, 120.0, 110.0])
    text = (run / "log.jsonl").read_text()
    (run / "log.jsonl").write_text(text + '{"event": "step", "phase": "train", "step": 4, "mem": {"rss_mb": 99')
    table = build_table([run], ["peak_rss_mb", "episodes_per_s"], [])
    assert table["rows"][0]["peak_rss_mb"] == (130.0, None)  # the test evaluation: 120 + 10
    assert table["rows"][0]["episodes_per_s"] == (2.0, None)  # 3 steps of 0.5 s
    assert "cut or malformed log line" in capsys.readouterr().err


def test_a_missing_log_still_tabulates_metrics_but_not_memory(tmp_path: Path) -> None:
    run = fake_run(tmp_path, "nolog", log=False)
    assert build_table([run], ["accuracy"], [])["rows"][0]["accuracy"] == (0.5, None)
    with pytest.raises(BadInput, match="No run has a metric 'peak_rss_mb'"):
        build_table([run], ["peak_rss_mb"], [])


def test_cuda_memory_of_a_cpu_run_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="No run has a metric 'peak_cuda_allocated_mb'"):
        build_table([fake_run(tmp_path, "cpu")], ["peak_cuda_allocated_mb"], [])


def test_memory_columns_are_marked_machine_dependent(tmp_path: Path) -> None:
    text = render_table(build_table([fake_run(tmp_path, "a")], ["accuracy", "peak_rss_mb"], []), "md")
    assert "Machine-dependent columns (measured on the machine that ran them): peak_rss_mb." in text


def test_runs_of_different_commands_share_no_metric(tmp_path: Path) -> None:
    runs = [fake_run(tmp_path, "cls"), fake_run(tmp_path, "det", command="detect-train",
                                                 metrics={"map": 0.2, "map50": 0.4, "test_episodes": 10})]
    with pytest.raises(BadInput, match="share no metric"):
        build_table(runs, [], [])


def test_a_metric_some_runs_lack_is_a_bad_input_exit_2(tmp_path: Path) -> None:
    cls = fake_run(tmp_path, "cls")
    det = fake_run(tmp_path, "det", command="detect-train", metrics={"map": 0.2, "test_episodes": 10})
    result = fewshot("table", cls, det, "--metric", "accuracy")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {det} has no metric 'accuracy' (it has episodes_per_s, map, peak_rss_mb, test_episodes, wall_s); "
        "these runs are not comparable."]


def test_group_by_an_unknown_key_is_bad_input(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="no config key 'shots'"):
        build_table([fake_run(tmp_path, "a")], [], ["shots"])


def test_averaging_runs_that_differ_in_more_than_seed_warns(tmp_path: Path, capsys) -> None:
    runs = [fake_run(tmp_path, "k1", k_shot=1), fake_run(tmp_path, "k5", k_shot=5, seed=1)]
    build_table(runs, ["accuracy"], ["head"])
    assert "differ in k_shot, not only in seed" in capsys.readouterr().err


def test_csv_parses_back_with_the_csv_module(grid: list[Path]) -> None:
    text = render_table(build_table(grid, ["accuracy"], ["head", "k_shot"]), "csv")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 4
    assert list(rows[0]) == ["head", "k_shot", "runs", "accuracy", "accuracy_ci95_over_runs"]
    first = rows[0]  # cosine sorts before euclidean, 1 before 5
    assert (first["head"], first["k_shot"], first["runs"]) == ("cosine", "1", "2")
    assert float(first["accuracy"]) == pytest.approx(0.525)
    assert float(first["accuracy_ci95_over_runs"]) > 0


def test_markdown_has_one_line_per_group_and_the_mean_with_its_interval(grid: list[Path]) -> None:
    rows = md_rows(render_table(build_table(grid, ["accuracy"], ["head", "k_shot"]), "md"))
    assert len(rows) == 4
    assert rows[0][:3] == ["cosine", "1", "2"]
    assert re.fullmatch(r"0\.5250 ± 0\.\d{4}", rows[0][3])


def test_latex_is_a_well_formed_tabular(grid: list[Path]) -> None:
    text = render_table(build_table(grid, ["accuracy", "test_episodes"], ["head", "k_shot"]), "latex")
    lines = [line for line in text.splitlines() if not line.startswith("%")]
    assert lines[0] == "\\begin{tabular}{llrrr}" and lines[-1] == "\\end{tabular}"
    rows = [line for line in lines if line.endswith(" \\\\")]
    assert len(rows) == 5  # header + 4 groups
    assert all(len(re.findall(r"(?<!\\)&", row)) == 4 for row in rows)
    assert "test\\_episodes" in rows[0] and not re.search(r"(?<!\\)[_%#]", "\n".join(lines))
    assert text.count("{") - text.count("\\{") == text.count("}") - text.count("\\}")
    assert text.count("$") % 2 == 0


def test_summary_table_is_sorted_by_command_then_metric(tmp_path: Path) -> None:
    runs = [fake_run(tmp_path, "det", command="detect-train", metrics={"map50": 0.4, "map": 0.2}),
            fake_run(tmp_path, "cls")]
    rows = summary_table(runs)["rows"]
    assert [(r["command"], r["metric"]) for r in rows] == [
        ("detect-train", "map"), ("detect-train", "map50"), ("mahalanobis-train", "accuracy"),
        ("mahalanobis-train", "accuracy_ci95"), ("mahalanobis-train", "test_episodes")]


def test_memreport_json_has_peaks_and_growth_per_phase_and_a_leak_verdict(tmp_path: Path) -> None:
    run = fake_run(tmp_path, "steady", steps=40, rss=[500.0 + (i % 3) for i in range(40)])
    result = fewshot("memreport", run, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report) == {"phases", "leak", "leaks"}
    assert set(report["phases"]) == {"train", "test"}
    assert report["phases"]["train"]["peak_mb"] == {"rss_mb": 502.0}
    assert set(report["phases"]["train"]["growth_mb"]) == {"rss_mb"}
    assert report["leak"] is False and report["leaks"] == []


def test_memreport_finds_a_leak_the_log_did_not_warn_of(tmp_path: Path) -> None:
    run = fake_run(tmp_path, "leaky", steps=60, rss=[500.0 + 3 * i for i in range(60)])
    report = memreport(run)
    assert report["leak"] is True and report["leaks"][0]["series"] == "rss_mb"
    assert report["phases"]["train"]["growth_mb"]["rss_mb"] == pytest.approx(3 * 59 - 3 * 6)


def is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == PNG_SIGNATURE and path.stat().st_size > 10_000


def test_table_plot_is_a_png_and_the_same_bytes_twice(grid: list[Path], tmp_path: Path) -> None:
    table = build_table(grid, ["accuracy"], ["head", "k_shot"])
    plot_table(table, tmp_path / "a.png")
    plot_table(table, tmp_path / "b.png")
    assert is_png(tmp_path / "a.png")
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_memory_plot_is_a_png(tmp_path: Path) -> None:
    run = fake_run(tmp_path, "leaky", steps=30, rss=[500.0 + 3 * i for i in range(30)])
    plot_memory(run, tmp_path / "plots" / "memory.png")
    assert is_png(tmp_path / "plots" / "memory.png")


def test_memory_plot_of_a_log_without_memory_is_bad_input(tmp_path: Path) -> None:
    run = fake_run(tmp_path, "nolog", log=False)
    (run / "log.jsonl").write_text('{"event": "run_start", "time": 0, "elapsed_s": 0}\n')
    with pytest.raises(BadInput, match="no training step with a memory record"):
        plot_memory(run, tmp_path / "m.png")


def test_table_of_real_runs_through_the_cli(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    args = ["--preset", "cpu", "--image-size", "16", "--episodes", "6", "--n-query", "4", "--test-episodes", "10",
            "--val-every", "0", "--quiet", "--out", runs]
    trained = fewshot("mahalanobis-train", *args, "--name", "real")
    assert trained.returncode == 0, trained.stderr
    out = tmp_path / "table.csv"
    result = fewshot("table", runs / "real", "--metric", "accuracy", "--metric", "peak_rss_mb", "--group-by",
                     "head,k_shot", "--format", "csv", "--out", out, "--plot", tmp_path / "t.png")
    assert result.returncode == 0, result.stderr
    (row,) = csv.DictReader(io.StringIO(out.read_text()))
    metrics = json.loads((runs / "real" / "metrics.json").read_text())
    assert (row["head"], row["k_shot"], row["runs"]) == ("mahalanobis", "5", "1")
    assert float(row["accuracy"]) == pytest.approx(metrics["accuracy"], abs=1e-6)
    assert float(row["peak_rss_mb"]) > 50
    assert is_png(tmp_path / "t.png")
