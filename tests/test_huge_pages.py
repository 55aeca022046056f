"""Large CPU tensors ask for transparent huge pages in every CLI run (set before torch loads), unless a user says no."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fewshot_cli import cli
from fewshot_cli.memory.allocator import THP_SWITCH, huge_pages_before_torch

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def test_huge_pages_are_asked_for_when_the_environment_is_silent(monkeypatch) -> None:
    monkeypatch.delenv(THP_SWITCH, raising=False)
    huge_pages_before_torch()
    assert os.environ[THP_SWITCH] == "1"


def test_a_users_own_setting_is_kept(monkeypatch) -> None:
    monkeypatch.setenv(THP_SWITCH, "0")
    huge_pages_before_torch()
    assert os.environ[THP_SWITCH] == "0"


def test_the_cli_sets_it_before_its_commands_run(monkeypatch) -> None:
    monkeypatch.delenv(THP_SWITCH, raising=False)
    seen = []
    monkeypatch.setattr(cli, "app", lambda **kwargs: seen.append(os.environ.get(THP_SWITCH)))
    monkeypatch.setattr(cli, "_NOT_LOADED", None)
    monkeypatch.setenv("WORLD_SIZE", "1")
    cli.main()
    assert seen == ["1"]


@pytest.mark.skipif(not sys.platform.startswith("linux") or not THP.exists(), reason="Linux's transparent huge pages")
@pytest.mark.parametrize(("switch", "advised"), [("1", True), ("0", False)])
def test_torch_advises_huge_pages_for_a_large_tensor_when_asked(switch: str, advised: bool) -> None:
    """The kernel marks a mapping advised MADV_HUGEPAGE with `hg` in its VmFlags (torch reads the switch once)."""
    script = textwrap.dedent("""
        import torch
        data = torch.empty(8 * 2**20, dtype=torch.uint8)  # 8 MiB: over torch's 2 MiB threshold
        start = data.data_ptr()
        flags = None
        for line in open("/proc/self/smaps"):
            if "-" in line.split()[0] and ":" not in line.split()[0]:
                low, high = (int(x, 16) for x in line.split()[0].split("-"))
                inside = low <= start < high
            elif inside and line.startswith("VmFlags:"):
                flags = line.split()[1:]
        print("hg" in flags)
    """)
    env = {**os.environ, THP_SWITCH: switch, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    assert done.stdout.strip() == str(advised)
