"""The demo's last word: one row per command, its primary metric with its interval, its second metric, counts as
integers, wall time and peak memory."""

from __future__ import annotations

from pathlib import Path

from test_results import fake_run

from fewshot_cli.commands import load_commands
from fewshot_cli.reports.tables import demo_table

METRICS = {c.name: (c.primary_metric, c.secondary_metric) for c in load_commands().values()}


def cells(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("|")]


def test_one_row_per_command_with_interval_second_metric_counts_time_and_memory(tmp_path: Path) -> None:
    runs = [fake_run(tmp_path, "det", command="detect-train", metrics={"map50": 0.5983, "map": 0.3279,
                                                                        "test_episodes": 20.0}, steps=7),
            fake_run(tmp_path, "cls", rss=[400.0, 512.4, 450.0], steps=3)]
    header, rule, *rows = cells(demo_table(runs, METRICS))
    assert header == ["command", "metric", "value", "± 95%", "second metric", "test episodes", "wall time",
                      "peak RSS"]
    assert set(rule) == {"---"}
    assert rows == [["detect-train", "map50", "0.5983", "—", "map 0.3279", "20", "7 s", "116 MiB"],
                    ["mahalanobis-train", "accuracy", "0.5000", "0.0500", "—", "10", "3 s", "522 MiB"]]


def test_a_run_that_did_not_complete_is_listed_below_not_tabulated(tmp_path: Path) -> None:
    runs = [fake_run(tmp_path, "done"), fake_run(tmp_path, "killed", status="interrupted")]
    text = demo_table(runs, METRICS)
    assert len(cells(text)) == 3
    assert f"- {runs[1]}: interrupted" in text



def test_a_wall_time_the_caller_measured_wins_over_the_logs(tmp_path: Path) -> None:
    run = fake_run(tmp_path, "cls", steps=3)
    assert cells(demo_table([run], METRICS))[2][6] == "3 s"
    assert cells(demo_table([run], METRICS, {run: 41.6}))[2][6] == "42 s"
