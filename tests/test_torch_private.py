"""torch's private parts fewshot uses are where fewshot_cli/memory/torch_private.py says; a moved one is named."""

from __future__ import annotations

import pytest
import torch

from fewshot_cli.memory import torch_private
from fewshot_cli.memory.torch_private import MEM_TRACKER_HOOKS, PRIVATE, TorchMoved, load


@pytest.mark.parametrize("name", sorted(PRIVATE))
def test_every_private_symbol_is_where_the_adapter_looks(name: str) -> None:
    module, attribute = PRIVATE[name]
    try:
        load(name)
    except TorchMoved as err:
        pytest.fail(f"torch {torch.__version__} moved {module}.{attribute}, which fewshot uses as {name}: {err}")


def test_the_memory_trackers_hooks_and_kinds_the_planner_relies_on_exist() -> None:
    from fewshot_cli.memory.plan import _KINDS

    tracker = torch_private.MemTracker
    missing = [hook for hook in MEM_TRACKER_HOOKS if not callable(getattr(tracker, hook, None))]
    assert not missing, f"torch {torch.__version__}'s MemTracker has no {', '.join(missing)}: the planner's " \
                        "StepTracker overrides them to skip per-module statistics"
    kinds = {kind.name for kind in torch_private.MemRefType}
    assert set(_KINDS) <= kinds, f"torch {torch.__version__}'s memory tracker no longer reports the kinds " \
                                 f"{sorted(set(_KINDS) - kinds)} the plan's lines are named from"


def test_a_moved_symbol_fails_in_one_sentence_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(PRIVATE, "Gone", ("torch._subclasses.fake_tensor", "NoSuchThing"))
    with pytest.raises(TorchMoved, match=r"no torch\._subclasses\.fake_tensor\.NoSuchThing \(fewshot's Gone\)"):
        torch_private.Gone  # noqa: B018 - the attribute access is the import
    monkeypatch.setitem(PRIVATE, "GoneModule", ("torch._no_such_module", "FakeTensor"))
    with pytest.raises(TorchMoved, match=r"torch\._no_such_module\.FakeTensor"):
        from fewshot_cli.memory.torch_private import GoneModule  # noqa: F401


def test_the_planner_and_the_models_import_no_private_torch_module_themselves() -> None:
    import re
    from pathlib import Path

    import fewshot_cli

    root = Path(fewshot_cli.__file__).parent
    private = re.compile(r"\b(torch|nn)(\.[a-z]\w*)*\._[A-Za-z]")  # torch._C, torch.distributed._tools, ...
    offenders = [f"{path.relative_to(root)}:{number}" for path in sorted(root.rglob("*.py"))
                 if path.name != "torch_private.py"
                 for number, line in enumerate(path.read_text().splitlines(), 1) if private.search(line)]
    assert not offenders, f"private torch used outside fewshot_cli/memory/torch_private.py: {', '.join(offenders)}"
