"""torch's OpenMP threads sleep while they wait in every CLI run (set before torch loads), unless a user says no."""

from __future__ import annotations

import os

from fewshot_cli import cli
from fewshot_cli.cpu_threads import WAIT_POLICY, passive_threads_before_torch


def test_passive_waiting_is_asked_for_when_the_environment_is_silent(monkeypatch) -> None:
    monkeypatch.delenv(WAIT_POLICY, raising=False)
    passive_threads_before_torch()
    assert os.environ[WAIT_POLICY] == "PASSIVE"


def test_a_users_own_policy_is_kept(monkeypatch) -> None:
    monkeypatch.setenv(WAIT_POLICY, "ACTIVE")
    passive_threads_before_torch()
    assert os.environ[WAIT_POLICY] == "ACTIVE"


def test_the_cli_sets_it_before_its_commands_run(monkeypatch) -> None:
    monkeypatch.delenv(WAIT_POLICY, raising=False)
    seen = []
    monkeypatch.setattr(cli, "app", lambda **kwargs: seen.append(os.environ.get(WAIT_POLICY)))
    monkeypatch.setattr(cli, "_NOT_LOADED", None)
    monkeypatch.setenv("WORLD_SIZE", "1")
    cli.main()
    assert seen == ["PASSIVE"]
