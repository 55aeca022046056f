"""The whole GPU proof in one command: plan checks at the t4 preset, a real OOM backed off, leaks, AMP, overhead,
seed 000's configurations and two torchrun ranks on one GPU. Without a CUDA device it says so and exits 0.

    python benchmarks/gpu_check.py [--markdown results/gpu_check.md] [--only plans oom leak amp overhead seed ranks]

Every run goes through the real CLI (`python -m fewshot_cli`, so nothing needs installing) in a subprocess, at
`--preset t4 --memory-budget 15GiB`: the budget caps the caching allocator, so a bigger card behaves as a 16 GB T4.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torchvision

from fewshot_cli.memory.terms import CUDA_ALLOCATOR, CUDA_CONTEXT, CUDA_WORKSPACES, HOST_LINES

MiB = 1024**2
T4 = ["--preset", "t4", "--memory-budget", "15GiB", "--device", "cuda", "--quiet", "--json"]
#: each command's short run at the t4 preset: only its length is cut (and embed-classify's backbone, see NOTES)
SHORT = {
    "detect-train": {"episodes": 4, "val_every": 2, "val_episodes": 2, "test_episodes": 2},
    "triplet-train": {"episodes": 4, "val_every": 2, "val_episodes": 2, "test_episodes": 2},
    "mahalanobis-train": {"episodes": 4, "val_every": 2, "val_episodes": 2, "test_episodes": 4},
    "classify-food101": {"epochs": 1, "dev_samples": 3},
    "embed-classify": {"backbone": "resnet50"},
}
NOTES = {"embed-classify": "ResNet-50 with random weights: CLIP and DINOv2 weights cannot be downloaded here"}
SECTIONS = ("plans", "oom", "leak", "amp", "overhead", "seed", "ranks")


def args_of(knobs: dict[str, Any]) -> list[str]:
    out = []
    for name, value in knobs.items():
        flag = "--" + name.replace("_", "-")
        out += ([flag] if value else [f"--no-{flag[2:]}"]) if isinstance(value, bool) else [flag, str(value)]
    return out


def fewshot(*args: str, env: dict[str, str] | None = None, ranks: int = 1) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
                if ranks > 1 else [sys.executable])
    command = [*launcher, "-m", "fewshot_cli", *args]
    print("$", " ".join(command[1:]), flush=True)
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})}, check=False)
    print(f"  exit {done.returncode} in {time.perf_counter() - started:.1f} s", flush=True)
    if done.returncode not in (0, 2):
        print(done.stderr[-3000:], flush=True)
    return done


def events(run_dir: Path, name: str | None = None) -> list[dict[str, Any]]:
    path = run_dir / "log.jsonl"
    if not path.is_file():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [e for e in lines if name is None or e["event"] == name]


def cli(args: list[str]) -> str:
    return "`fewshot " + " ".join(a for a in args if a not in ("--quiet", "--json")) + "`"


def plan_components(command: str, knobs: dict[str, Any]) -> dict[str, dict[str, int]]:
    """The t4 plan's lines per phase, made in this process as `fewshot plan` makes them."""
    from fewshot_cli.commands import load_commands
    from fewshot_cli.memory.plan import plan_run
    from fewshot_cli.runner.config import resolve

    cmd = load_commands()[command]
    report = plan_run(cmd, resolve(cmd.config, cmd.presets, "t4", dict(knobs)), torch.device("cuda"), 15 * 1024**3)
    # the device's lines and the host's loader lines (a section of their own, with this process's resident set)
    return {phase: {**entry["components"], **{k: v for k, v in entry["host"]["components"].items() if k in HOST_LINES}}
            for phase, entry in report["phases"].items()}


def check_plans(out: Path, md: list[str]) -> bool:
    md += ["## Plan checks at `--preset t4 --memory-budget 15GiB`", "",
           "Each command's short run; `plan_check` events from its log. Predicted: the plan less the CUDA context "
           "(outside the caching allocator); measured: `max_memory_reserved` over the phase (allocated beside it); "
           "traced: the plan's tensor lines alone; device used: the card's memory in use at the phase's end "
           "(`mem_get_info`), context and libraries included.", "",
           "| command | phase | traced MiB | predicted MiB | reserved MiB | allocated MiB | device used MiB "
           "| error | within goal |", "|---|---|---|---|---|---|---|---|---|"]
    ok, terms = True, []
    for command, knobs in SHORT.items():
        args = [command, *T4, *args_of(knobs), "--out", str(out), "--name", command]
        done = fewshot(*args)
        checks = events(out / command, "plan_check")
        components = plan_components(command, knobs)
        if done.returncode != 0 or not checks:
            ok = False
            md.append(f"| {command} | FAILED (exit {done.returncode}) | | | | | | {done.stderr.strip()[-200:]} | |")
            continue
        top = max(checks, key=lambda c: c.get("allocated_mb", 0))
        top_lines = components.get(top["phase"], {})
        terms.append((command, top["phase"], sum(v for k, v in top_lines.items() if k not in DEVICE_LINES) / MiB,
                      top.get("allocated_mb", 0), top["measured_mb"], top.get("device_used_mb", 0)))
        for check in checks:
            phase = check["phase"]
            lines = components.get(phase, components.get("test", {}))
            traced = sum(v for k, v in lines.items() if k not in DEVICE_LINES) / MiB
            within = -0.05 <= check["error"] <= 0.10
            ok &= within
            md.append(f"| {command} | {phase} | {traced:,.0f} | {check['predicted_mb']:,.0f} | "
                      f"{check['measured_mb']:,.0f} | {check.get('allocated_mb', 0):,.0f} | "
                      f"{check.get('device_used_mb', 0):,.0f} | {100 * check['error']:+.1f}% | "
                      f"{'yes' if within else 'NO'} |")
        md_note = NOTES.get(command)
        if md_note:
            md.append(f"| {command} | note | {md_note} | | | | | | |")
    md += ["", "Goal: within 10% and never more than 5% under. A validation or test phase is predicted at least "
           "the training plan: the caching allocator keeps what training reserved. Commands: " +
           "; ".join(cli([c, *T4, *args_of(k)]) for c, k in SHORT.items()), ""]
    md += cuda_terms(terms)
    return ok


def cuda_terms(terms: list[tuple[str, str, float, float, float, float]]) -> list[str]:
    """The figures the plan's CUDA terms are read from: each command's largest phase, and their medians."""
    md = ["### CUDA terms", "",
          "What the plan's CUDA lines stand for, measured in the runs above (each command's phase with the largest "
          "allocated peak): the caching allocator's overhead (peak reserved over peak allocated), the workspaces "
          "and other allocations the trace does not see (peak allocated less traced), and the context with the "
          "loaded kernels and libraries (device in use less reserved).", "",
          "| command | phase | reserved / allocated | allocated - traced MiB | device used - reserved MiB |",
          "|---|---|---|---|---|"]
    ratios, unseen, context = [], [], []
    for command, phase, traced, allocated, reserved, used in terms:
        ratios.append(reserved / allocated if allocated else float("nan"))
        unseen.append(allocated - traced)
        context.append(used - reserved)
        md.append(f"| {command} | {phase} | {ratios[-1]:.3f} | {unseen[-1]:+,.0f} | {context[-1]:,.0f} |")
    if terms:
        md.append(f"| median | | {statistics.median(ratios):.3f} | {statistics.median(unseen):+,.0f} | "
                  f"{statistics.median(context):,.0f} |")
    md += [f"| in the plan (fewshot_cli/memory/terms.py) | | {1 + CUDA_ALLOCATOR:.3f} (`cuda_allocator`) | "
           f"{CUDA_WORKSPACES / MiB:+,.0f} (`cuda_workspaces`) | {CUDA_CONTEXT / MiB:,.0f} "
           "(`cuda_context`) |", ""]
    return md


#: plan lines that are not tensors on the GPU: the device's own terms, and what the host holds (fewshot_cli.memory.plan)
DEVICE_LINES = ("cuda_context", "cuda_allocator", "cuda_workspaces", *HOST_LINES)


def check_oom(out: Path, md: list[str]) -> bool:
    knobs = {"episodes": 3, "val_every": 0, "test_episodes": 1}
    args = ["detect-train", "--preset", "t4", "--memory-budget", "3GiB", "--force", "--device", "cuda", "--quiet",
            "--json", *args_of(knobs), "--out", str(out), "--name", "oom"]
    done = fewshot(*args)
    backoffs = events(out / "oom", "oom_backoff")
    end = (events(out / "oom", "run_end") or [{}])[-1]
    ok = done.returncode == 0 and bool(backoffs) and end.get("status") == "completed"
    md += ["## A real CUDA out-of-memory error, backed off", "",
           f"{cli(args)} (the plan needs about 6.5 GiB; the 3 GiB cap is set with "
           "`torch.cuda.set_per_process_memory_fraction`, no simulation):", ""]
    md += [f"- step {b['step']}: {b['knob']} {b['from']} -> {b['to']} (gradient accumulation "
           f"{b['grad_accumulation']})" for b in backoffs] or ["- no back-off happened"]
    md += [f"- run ended: {end.get('status', 'no run_end')} (exit {done.returncode}); "
           f"{'PASS' if ok else 'FAIL'}", ""]
    return ok


def check_leak(out: Path, md: list[str]) -> bool:
    knobs = {"episodes": 40, "val_every": 0, "test_episodes": 2, "checkpoint_every": 1000}
    rows, ok = [], True
    for name, leak in (("leak", "8"), ("clean", "0")):
        args = ["mahalanobis-train", *T4, *args_of(knobs), "--out", str(out), "--name", name]
        done = fewshot(*args, env={"FEWSHOT_SIMULATE_LEAK_MB": leak})
        warnings = events(out / name, "leak_warning")
        cuda = [w for w in warnings if w["series"].startswith("cuda_")]
        good = done.returncode == 0 and (bool(cuda) if leak != "0" else not warnings)
        ok &= good
        seen = "; ".join(f"{w['series']} +{w['growth_mb']:.0f} MiB at step {w['step']}" for w in warnings) or "none"
        rows.append(f"| {name} | {leak} | {seen} | {'PASS' if good else 'FAIL'} |")
    md += ["## Leak detector on CUDA tensors", "",
           f"{cli(['mahalanobis-train', *T4, *args_of(knobs)])}, once with `FEWSHOT_SIMULATE_LEAK_MB=8` (each step "
           "keeps 8 MiB on the GPU) and once clean:", "", "| run | leak MiB/step | leak warnings | verdict |",
           "|---|---|---|---|", *rows, ""]
    return ok


def check_amp(out: Path, md: list[str]) -> bool:
    """`--amp` on and off for the two commands that have it, at the t4 preset (food101's turns it on)."""
    runs = {"classify-food101": {"epochs": 1, "dev_samples": 6}, "mahalanobis-train": SHORT["mahalanobis-train"]}
    rows, ok, commands = [], True, []
    for command, knobs in runs.items():
        commands.append(cli([command, *T4, *args_of(knobs), "--amp"]))
        for amp in (True, False):
            name = f"amp-{command}-{'on' if amp else 'off'}"
            done = fewshot(command, *T4, *args_of({**knobs, "amp": amp}), "--out", str(out), "--name", name)
            steps = events(out / name, "step")
            reserved = max((s["mem"].get("cuda_reserved_peak_mb", 0) for s in steps), default=0)
            step_s = statistics.median(s["step_s"] for s in steps[1:]) if len(steps) > 1 else float("nan")
            ok &= done.returncode == 0 and bool(steps)
            rows.append(f"| {command} | {'on' if amp else 'off'} | {len(steps)} | {1000 * step_s:,.1f} | "
                        f"{reserved:,.0f} |")
    md += ["## AMP", "",
           "`--amp` (autocast in bf16 where the GPU computes in it, fp16 with loss scaling on a T4): "
           + " and ".join(commands) + ", each against `--no-amp`:", "",
           "| command | AMP | steps | median ms/step (after the first) | peak reserved MiB |", "|---|---|---|---|---|",
           *rows, ""]
    return ok


def check_overhead(out: Path, md: list[str]) -> bool:
    from fewshot_cli.commands.mahalanobis import COMMAND
    from fewshot_cli.models.pretrained import settle
    from fewshot_cli.runner.config import resolve
    from fewshot_cli.runner.launch import LaunchOptions, launch
    from fewshot_cli.runner.task import RunContext, step_seed

    episodes, device = 40, torch.device("cuda")
    knobs = {"episodes": episodes, "val_every": 0, "test_episodes": 1, "checkpoint_every": 10**6}

    def config():  # the built-in data: the preset's pretrained weights settle to none, as on the command line
        resolved = resolve(COMMAND.config, COMMAND.presets, "t4", knobs)
        settle(resolved, None)
        return resolved

    def bare() -> float:
        torch.manual_seed(0)
        task = COMMAND.task(config().config, RunContext(device, 0, None))
        task.train_step(1)  # warm-up: cuDNN picks its kernels
        torch.cuda.synchronize()
        started = time.perf_counter()
        for step in range(2, episodes + 1):
            torch.manual_seed(step_seed(0, step))
            task.train_step(step)
        torch.cuda.synchronize()
        return (time.perf_counter() - started) / (episodes - 1)

    def runner(name: str) -> float:
        launch(COMMAND, knobs, LaunchOptions(device="cuda", preset="t4", out=out, name=name, quiet=True))
        steps = events(out / name, "step")
        return (steps[-1]["elapsed_s"] - steps[0]["elapsed_s"]) / (len(steps) - 1)

    rows, ratios = [], []
    for repeat in range(3):
        b, w = bare(), runner(f"overhead{repeat}")
        ratios.append(w / b)
        rows.append(f"| {repeat} | {1000 * b:.2f} | {1000 * w:.2f} | {w / b:.3f} |")
    md += ["## Runner overhead on the GPU", "",
           f"mahalanobis-train at the t4 preset, {episodes} episodes, in this process: the task's own steps in a bare "
           "loop against the same steps through the runner (probes, log, plan check, back-off guard), time per "
           "step after the first.", "", "| repeat | bare ms/step | runner ms/step | ratio |", "|---|---|---|---|",
           *rows, "", f"Median ratio {statistics.median(ratios):.3f}.", ""]
    return True


def check_seed(out: Path, md: list[str]) -> bool:
    before = {"image_size": 384, "embedding_dim": 512, "k_shot": 5, "n_query": 20, "proposal_step": 16,
              "head_hidden": 1024, "objectness_hidden": 128}
    short = {"episodes": 2, "val_every": 0, "test_episodes": 1}
    refused_args = ["detect-train", *T4, *args_of({**before, **short}), "--out", str(out), "--name", "before"]
    refused = fewshot(*refused_args)
    forced_args = [*refused_args[:-1], "before-forced", "--force"]
    forced = fewshot(*forced_args)
    backoffs = events(out / "before-forced", "oom_backoff")
    after = events(out / "detect-train", "plan_check")
    ok = refused.returncode == 2 and "does not fit" in refused.stderr and not (out / "before").exists()
    message = refused.stderr.strip().splitlines()[0][:200] if refused.stderr.strip() else ""
    md += ["## Seed 000: the T4 detector", "",
           f"- before (384 px, 512 dims, 5-shot, 20 queries, 16 px): {cli(refused_args)} exits "
           f"{refused.returncode}: {message}",
           f"- the same with `--force` (2 episodes): exit {forced.returncode}; " +
           ("; ".join(f"OOM at step {b['step']}: {b['knob']} {b['from']} -> {b['to']}" for b in backoffs)
            or "no out-of-memory error"),
           "- after (the t4 preset: 256 px, 256 dims, 3-shot, 10 queries, 24 px): fits and ran in the plan checks "
           "above, " + ("; ".join(f"{c['phase']} {c['measured_mb']:,.0f} MiB reserved" for c in after) or "not run"),
           ""]
    return ok and bool(after)


def check_ranks(out: Path, md: list[str]) -> bool:
    knobs = {"episodes": 4, "episodes_per_step": 2, "val_every": 0, "test_episodes": 4}
    args = ["mahalanobis-train", *T4, *args_of(knobs), "--out", str(out), "--name", "ranks"]
    done = fewshot(*args, env={"FEWSHOT_DIST_BACKEND": "gloo"}, ranks=2)
    config = json.loads((out / "ranks" / "config.json").read_text()) if (out / "ranks" / "config.json").is_file() \
        else {}
    steps = events(out / "ranks", "step")
    ok = done.returncode == 0 and config.get("world_size") == 2 and bool(steps)
    ranks = len(steps[-1].get("mem_ranks", [])) if steps else 0
    md += ["## Two ranks under torchrun, gloo, one GPU", "",
           f"`FEWSHOT_DIST_BACKEND=gloo torchrun --standalone --nproc-per-node=2 -m fewshot_cli "
           f"{' '.join(a for a in args[:-4] if a not in ('--quiet', '--json'))}`: exit {done.returncode}, world size "
           f"{config.get('world_size')}, {len(steps)} steps with memory from {ranks} ranks, metrics "
           f"`{done.stdout.strip()[-200:]}`; {'PASS' if ok else 'FAIL'}", ""]
    return ok


CHECKS = {"plans": check_plans, "oom": check_oom, "leak": check_leak, "amp": check_amp,
          "overhead": check_overhead, "seed": check_seed, "ranks": check_ranks}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", help="write the report here")
    parser.add_argument("--only", nargs="*", choices=SECTIONS, help="only these checks")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device on this machine; nothing was checked.")
        return 0
    started = time.perf_counter()
    name = torch.cuda.get_device_name(0)
    total = torch.cuda.get_device_properties(0).total_memory / 1024**3
    md = ["# GPU check", "", f"`python benchmarks/gpu_check.py --markdown results/gpu_check.md` on {name} "
          f"({total:.1f} GiB), torch {torch.__version__}, torchvision {torchvision.__version__}, "
          f"Python {sys.version.split()[0]}.", ""]
    verdicts = {}
    with tempfile.TemporaryDirectory() as tmp:
        for section in args.only or SECTIONS:
            section_started = time.perf_counter()
            try:
                verdicts[section] = CHECKS[section](Path(tmp), md)
            except Exception as err:  # noqa: BLE001 - one failed check is reported, the others still run
                verdicts[section] = False
                md += [f"## {section}: FAILED", "", f"`{type(err).__name__}: {err}`", ""]
            print(f"{section}: {'PASS' if verdicts[section] else 'FAIL'} "
                  f"({time.perf_counter() - section_started:.0f} s)", flush=True)
    md += ["## Summary", "", "| check | verdict |", "|---|---|",
           *(f"| {k} | {'PASS' if v else 'FAIL'} |" for k, v in verdicts.items()), "",
           f"Total {time.perf_counter() - started:.0f} s.", ""]
    text = "\n".join(md)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
