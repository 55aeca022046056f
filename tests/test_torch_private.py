"""torch's private parts fewshot uses are where fewshot_cli/memory/torch_private.py says; a moved one is named."""

from __future__ import annotations

import pytest
import torch

from fewshot_cli.memory import torch_private
from fewshot_cli.memory.torch_private import PRIVATE, TorchMoved, load


@pytest.mark.parametrize("name", sorted(PRIVATE))
def test_every_private_symbol_is_where_the_adapter_looks(name: str) -> None:
    module, attribute = PRIVATE[name]
    try:
        load(name)
    except TorchMoved as err:
        pytest.fail(f"torch {torch.__version__} moved {module}.{attribute}, which fewshot uses as {name}: {err}")


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


# Adam's steps, its state saved and loaded, after `defer_dynamo` (argv[1] == "defer") or as torch makes them: the
# parameters it ends with, bit for bit, and whether torch._dynamo was loaded by then
OPTIMIZER_STEPS = """
import json, sys, torch
if sys.argv[1] == "defer":
    from fewshot_cli.memory.torch_private import defer_dynamo
    covered = defer_dynamo("torch.optim")
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 36, 2))
optimizer = torch.optim.Adam([{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.01}])
for step in range(3):
    optimizer.zero_grad(set_to_none=True)
    model(torch.randn(2, 3, 8, 8)).square().sum().backward()
    optimizer.step()
    optimizer.load_state_dict(optimizer.state_dict())
grad_mode = torch.is_grad_enabled()
loaded = "torch._dynamo" in sys.modules
import torch._dynamo
optimizer.zero_grad()
model(torch.randn(2, 3, 8, 8)).square().sum().backward()
optimizer.step()  # torch's own wrappers, now that dynamo is loaded
print(json.dumps({"dynamo": loaded, "grad_mode": grad_mode,
                  "params": [p.detach().flatten().tolist() for p in model.parameters()]}))
"""


def test_deferred_dynamo_steps_an_optimizer_as_torch_does_without_importing_it() -> None:
    import json
    import os
    import subprocess
    import sys

    runs = {}
    for how in ("defer", "torch"):
        done = subprocess.run([sys.executable, "-c", OPTIMIZER_STEPS, how], capture_output=True, text=True,
                              timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr[-2000:]
        runs[how] = json.loads(done.stdout.splitlines()[-1])
    assert runs["torch"]["dynamo"], "torch's optimizer no longer imports torch._dynamo: defer_dynamo may go"
    assert not runs["defer"]["dynamo"], "an optimizer imported torch._dynamo after defer_dynamo"
    assert runs["defer"]["grad_mode"] and runs["defer"]["params"] == runs["torch"]["params"]


def test_defer_dynamo_covers_the_optimizers_marked_functions_once() -> None:
    from fewshot_cli.memory.torch_private import defer_dynamo

    defer_dynamo("torch.optim")  # whatever an earlier test did: now covered
    assert defer_dynamo("torch.optim") == 0  # nothing left to cover: a second launch changes nothing
    marked = torch.optim.Optimizer.add_param_group.__wrapped__
    assert getattr(marked, "__dynamo_disable", None) is not None
