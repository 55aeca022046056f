"""fewshot against easyfsl 1.5.0, end to end, on handwritten digits and on photo-sized JPEGs; and fewshot's bare
training steps beside its full run (the share the pipeline and runner cost).

    python benchmarks/peer_speed.py [--modes digits,jpeg] [--repeats 2] [--backbone conv4]
        [--digits-episodes 300,600] [--jpeg-episodes 30,30] [--note TEXT] [--out results/peer_speed.md]

Two settings, as a researcher would run them:

- digits: scikit-learn's digits as an image folder (`recipes/digits_split.py`: train on 0-4, test on 5-9), 32 px,
  300 training and 600 test episodes, no loader workers;
- jpeg: the 512 x 384 JPEGs of `input_pipeline.py` (16 classes x 30), 84 px, 2 loader workers.

Every run is a process of its own, and each repeat runs the three of a setting in turn (the order rotating from one
repeat to the next, so that a busy spell of a shared machine does not always fall on one side; `--jobs N` runs N
repeats at once, their CPU seconds still each process's own, from wait4):

- easyfsl 1.5.0: its README's loop (`input_pipeline.run_easyfsl`: EasySet, TaskSampler, DataLoader,
  PrototypicalNetworks, Adam), the same conv4 and episode shape (5-way 5-shot 15 queries);
- fewshot: `mahalanobis-train --head euclidean --adapt none` (`input_pipeline.run_fewshot`);
- bare: fewshot's own model, head and optimizer (the task `mahalanobis-train` builds, channels_last on a CPU), its
  training steps on episodes whose images are already float tensors in memory: no loader, no runner (no log, no
  memory probe, no seeding, no checkpoint). It cycles through up to 20 distinct episodes. Its allocator is the
  CLI's: huge pages for large tensors (`memory.allocator`, set before torch loads) and each freed tensor of 128 KiB
  or more returned to the system (`memory.measure.return_freed_memory`, as every CPU run does), so that a step
  faults in the same fresh pages in both.

Figures per run: `process` is the whole process's wall time (interpreter start to exit, as a user's shell sees it);
`window` from the first training step's start to the end of the test (the run's fixed cost left out, as
input_pipeline.py measures); `cpu` the process's and its workers' user + system CPU seconds. x easyfsl divides
easyfsl's figure by fewshot's, run against run of the same repeat. A step's time is measured from the second step on
(the first waits for the loader's start): wall time from fewshot's log, CPU time of its process and workers sampled
when the log shows the first and the last step (`watch`). full / bare divides fewshot's full-run training rate by
the bare training rate (the share of the bare rate the full run keeps: 1 - the share its pipeline and runner cost),
in wall time and in CPU time; on cores other processes share, the CPU figure is the steadier. Figures depend on the
machine; on shared cores read the spread over the repeats."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import torch
from input_pipeline import K_SHOT, LR, N_QUERY, N_WAY, import_easyfsl, make_folder, run_easyfsl, run_fewshot

from fewshot_cli.memory.allocator import THP_SWITCH

ROOT = Path(__file__).resolve().parent.parent
NOTES = "## Notes"
SETTINGS = {"digits": {"size": 32, "workers": 0}, "jpeg": {"size": 84, "workers": 2}}
BARE_EPISODES = 20  # distinct episodes held in memory; the bare loop cycles through them


def run_process(command: list[str], env: dict[str, str], on_poll=None, period_s: float = 0.1
                ) -> tuple[int, str, str, float]:
    """Run a process to its end, calling `on_poll()` every `period_s` while it runs; its exit code, stdout, stderr
    and CPU seconds (user + system of it and of its children it waited for: its loader workers), from wait4, so
    that runs going on at the same time in other threads are not counted."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, text=True, env=env)
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if on_poll is not None:
                on_poll(process.pid)
            time.sleep(period_s)
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return process.returncode, out.read(), err.read(), usage.ru_utime + usage.ru_stime


def side(args: argparse.Namespace) -> None:
    """One side's run in this process (`--side easyfsl` or `--side bare`): its figures as one JSON line."""
    data, size, workers = Path(args.data), args.image_size, args.workers
    train, test = args.episodes, args.test_episodes
    if args.side == "easyfsl":
        import_easyfsl()
        with tempfile.TemporaryDirectory() as tmp:
            figures = run_easyfsl(data, args.backbone, workers, train, torch.device("cpu"), Path(tmp), size,
                                  test_episodes=test)
        figures.pop("window")
    else:
        figures = bare(data, args.backbone, size, train)
    print(json.dumps(figures), flush=True)


def bare(data: Path, backbone: str, size: int, steps: int) -> dict:
    """fewshot's training step without its loader and runner: the model, head and optimizer mahalanobis-train
    builds, on episodes read once into float tensors; `train_s` for `steps` steps."""
    import torch.nn.functional as F

    from fewshot_cli.commands.mahalanobis import MahalanobisTask
    from fewshot_cli.commands.mahalanobis_config import PRESETS, MahalanobisConfig
    from fewshot_cli.data.images import to_float
    from fewshot_cli.data.loader import stack_images
    from fewshot_cli.memory.measure import return_freed_memory
    from fewshot_cli.runner.config import resolve
    from fewshot_cli.runner.task import RunContext

    knobs = {"backbone": backbone, "image_size": size, "head": "euclidean", "adapt": "none", "reduced_dim": 0,
             "n_way": N_WAY, "k_shot": K_SHOT, "n_query": N_QUERY, "episodes": steps, "lr": LR, "workers": 0}
    cfg: MahalanobisConfig = resolve(MahalanobisConfig, PRESETS, "cpu", knobs).config
    return_freed_memory(torch.device("cpu"))  # the CLI's allocator (memory.check.start): fresh pages each step
    task = MahalanobisTask(cfg, RunContext(torch.device("cpu"), seed=0, run_dir=None, data=data, in_process=True))
    sampler, model, optimizer = task.samplers["train"], task.model, task.optimizer
    held = []
    for i in range(1, min(steps, BARE_EPISODES) + 1):
        episode = sampler.episode(i)
        (s_items, s_labels), (q_items, q_labels) = episode.support_items(), episode.query_items()
        images = to_float(stack_images([task.data[item] for item in (*s_items, *q_items)]))
        held.append((images, torch.tensor(s_labels), torch.tensor(q_labels), len(s_items)))
    model.train()
    started = time.perf_counter()
    for step in range(steps):
        if step == 1:  # steps 2 to N, as the full run's are measured
            later, later_cpu = time.perf_counter(), time.process_time()
        images, s_labels, q_labels, n_support = held[step % len(held)]
        optimizer.zero_grad(set_to_none=True)
        support, query = model(images[:n_support]), model(images[n_support:])
        loss = F.cross_entropy(model.logits(support, s_labels, query, N_WAY), q_labels)
        loss.backward()
        optimizer.step()
    return {"train_s": time.perf_counter() - started, "steps": steps,
            "wall_per_step_s": (time.perf_counter() - later) / (steps - 1),
            "cpu_per_step_s": (time.process_time() - later_cpu) / (steps - 1)}


def run_side(name: str, data: Path, backbone: str, size: int, workers: int, train: int, test: int) -> dict:
    command = [sys.executable, __file__, "--side", name, "--data", str(data), "--backbone", backbone,
               "--image-size", str(size), "--workers", str(workers), "--episodes", str(train),
               "--test-episodes", str(test)]
    started = time.time()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if name == "bare":  # the allocator setting the CLI makes before torch loads (cli.main), so the steps compare
        env.setdefault(THP_SWITCH, "1")
    code, out, err, cpu = run_process(command, env)
    if code:
        raise SystemExit(f"{name} failed: {err[-2000:]}")
    return {**json.loads(out.strip().splitlines()[-1]), "process_s": time.time() - started, "cpu_s": cpu}


def run_full(data: Path, backbone: str, size: int, workers: int, train: int, test: int, out: Path,
             small_pages: bool = False) -> dict:
    """fewshot's CLI; `small_pages`: with torch's huge pages for large CPU tensors turned off (as before the CLI
    turned them on, `memory.allocator`)."""
    env = {**os.environ, **({THP_SWITCH: "0"} if small_pages else {})}
    figures = run_fewshot(data, backbone, workers, train, "cpu", out, 256, size, test_episodes=test,
                          name=f"run{time.monotonic_ns()}", watch=lambda c, log: watch(c, log, train, env))
    figures.pop("window")
    return figures


def watch(command: list[str], log: Path, steps: int, env: dict[str, str]) -> tuple[int, str, dict]:
    """Run fewshot's CLI, sampling the CPU seconds of it and its loader workers when its log shows the first step
    done and the last: `cpu_per_step_s`, the CPU a step took from the second on (to within a poll's 0.1 s)."""
    marks: dict[int, tuple[int, float]] = {}
    state = {"seen": 0, "offset": 0}

    def poll(pid: int) -> None:
        if not log.exists() or len(marks) == 2:
            return
        with open(log) as handle:
            handle.seek(state["offset"])
            text = handle.read()
        complete = text[:text.rfind("\n") + 1]  # a line still being written waits for the next look
        state["offset"] += len(complete)
        state["seen"] += complete.count('"event": "step"')
        for mark in (1, steps):
            if state["seen"] >= mark and mark not in marks:
                marks[mark] = (state["seen"], tree_cpu(psutil.Process(pid)))

    code, _, error, cpu = run_process(command, env, poll)
    (first, first_cpu), (last, last_cpu) = marks.get(1, (0, 0.0)), marks.get(steps, (0, 0.0))
    later = {"cpu_per_step_s": (last_cpu - first_cpu) / (last - first)} if last > first else {}
    return code, error, {**later, "cpu_s": cpu}


def tree_cpu(process: psutil.Process) -> float:
    """User + system CPU seconds of a process and its living children."""
    total = 0.0
    for member in (process, *process.children(recursive=True)):
        try:
            times = member.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def digits_folder(root: Path) -> Path:
    subprocess.run([sys.executable, str(ROOT / "recipes" / "digits_split.py"), str(root)], check=True,
                   capture_output=True)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="digits,jpeg")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--backbone", default="conv4")
    parser.add_argument("--digits-episodes", default="300,600", help="training,test episodes")
    parser.add_argument("--jpeg-episodes", default="30,30", help="training,test episodes")
    parser.add_argument("--small-pages", default="", metavar="MODES",
                        help="in these modes, also run fewshot with torch's huge pages off (THP_MEM_ALLOC_ENABLE=0)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="repeats run at once (each runs its sides in turn); CPU seconds are per process")
    parser.add_argument("--note", default="", help="added to the machine line (a shared machine, say)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here (markdown)")
    # one side's run, in a process of its own
    parser.add_argument("--side", choices=("easyfsl", "bare"), help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--image-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--episodes", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--test-episodes", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        side(args)
        return
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        folders = {mode: digits_folder(tmp / "digits") if mode == "digits" else make_folder(tmp / "jpeg", 16, 30)
                   for mode in args.modes.split(",")}
        chains = [(mode, repeat) for mode in folders for repeat in range(args.repeats)]
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            done = list(pool.map(lambda chain: repeat_runs(args, *chain, folders[chain[0]], tmp), chains))
    rows = [row for chain in done for row in chain]
    table = render(rows, args)
    print(table)
    if args.out is not None:
        notes = args.out.read_text().partition(NOTES) if args.out.exists() else ("", "", "")
        args.out.write_text(table + (f"\n{NOTES}{notes[2]}" if notes[1] else ""))


def repeat_runs(args: argparse.Namespace, mode: str, repeat: int, data: Path, tmp: Path) -> list[dict]:
    """One repeat of a setting: easyfsl, fewshot and bare (and fewshot with 4 KiB pages where asked), one after
    another, the order rotating with the repeat."""
    size, workers = SETTINGS[mode]["size"], SETTINGS[mode]["workers"]
    train, test = (int(n) for n in getattr(args, f"{mode}_episodes").split(","))
    small = mode in args.small_pages.split(",")
    order = ["easyfsl", "fewshot", "bare", *(["fewshot, 4 KiB pages"] if small else [])]
    order = order[repeat % len(order):] + order[:repeat % len(order)]
    runs = {}
    for name in order:
        if name.startswith("fewshot"):
            runs[name] = run_full(data, args.backbone, size, workers, train, test, tmp / "runs",
                                  small_pages=name != "fewshot")
        else:
            runs[name] = run_side(name, data, args.backbone, size, workers, train, test)
    rows = figures_of(mode, repeat, size, workers, train, test, runs)
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


def figures_of(mode: str, repeat: int, size: int, workers: int, train: int, test: int, runs: dict) -> list[dict]:
    """One row per fewshot run of the repeat, each against the repeat's easyfsl and bare runs."""
    easy, bare_run = runs["easyfsl"], runs["bare"]
    rows = []
    for variant in (name for name in runs if name.startswith("fewshot")):
        full = runs[variant]
        rows.append({
            "mode": mode, "repeat": repeat + 1, "size": size, "workers": workers, "train": train, "test": test,
            "order": list(runs), "variant": variant,
            "easyfsl": {"process_s": easy["process_s"], "window_s": easy["seconds"], "train_s": easy["train_s"],
                        "cpu_s": easy["cpu_s"], "accuracy": easy["accuracy"], "ci95": easy["ci95"]},
            "fewshot": {"process_s": full["process_s"], "window_s": full["seconds"],
                        "train_s": full["train_window_s"], "to_first_step_s": full["to_first_step_s"],
                        "cpu_s": full["cpu_s"], "accuracy": full["accuracy"], "ci95": full["ci95"],
                        "wait": full["wait"], "wall_per_step_s": full["later_s"] / (train - 1),
                        "cpu_per_step_s": full.get("cpu_per_step_s")},
            "bare": {"train_s": bare_run["train_s"], "process_s": bare_run["process_s"],
                     "wall_per_step_s": bare_run["wall_per_step_s"], "cpu_per_step_s": bare_run["cpu_per_step_s"]},
            "x_process": easy["process_s"] / full["process_s"],
            "x_window": easy["seconds"] / full["seconds"],
            "x_cpu": easy["cpu_s"] / full["cpu_s"],
            "full_over_bare": bare_run["wall_per_step_s"] * (train - 1) / full["later_s"],
            "full_over_bare_cpu": (bare_run["cpu_per_step_s"] / full["cpu_per_step_s"]
                                   if "cpu_per_step_s" in full else None),
        })
    return rows


def render(rows: list[dict], args: argparse.Namespace) -> str:
    command = " ".join(sys.argv[1:])
    lines = [
        "# fewshot against easyfsl 1.5.0, end to end, and fewshot's bare steps (machine-dependent figures)",
        "",
        f"Written by `python benchmarks/peer_speed.py {command}` on cpu ({platform.processor() or 'cpu'}), "
        f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {args.backbone}, 5-way 5-shot 15 queries, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}{'; ' + args.note if args.note else ''}. "
        "digits: scikit-learn's digits (train 0-4, test 5-9) at 32 px, no workers; jpeg: 16 classes x 30 JPEGs of "
        "512 x 384 at 84 px, 2 workers. Seconds per run: process (the whole process, start to exit), window (first "
        "training step to the end of the test), cpu (user + system of the whole process, workers included). "
        "x easyfsl: easyfsl's seconds over fewshot's, in the same repeat. A step (ms, from the second step on): "
        "wall and CPU (workers included) of fewshot's full run, and of the bare steps (the same model, head and "
        "optimizer on episodes already in memory: no loader, no runner). full / bare: the full run's training rate "
        "over the bare rate (the bare step's time over the full run's), in wall time and in CPU time. The order "
        "column is the order the runs of a repeat ran in"
        + (f"; {args.jobs} repeats ran at once, each its runs in turn (so the wall figures include their contention "
           "with each other, and the CPU figures do not)." if args.jobs > 1 else "."),
        "",
        "| setting | episodes | repeat | order | fewshot run | easyfsl process / window / cpu | "
        "fewshot process / window / cpu | "
        "fewshot to first step | x easyfsl process | x easyfsl window | x easyfsl cpu | step full wall / cpu | "
        "step bare wall / cpu | full / bare wall | full / bare cpu | accuracy easyfsl | accuracy fewshot |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        e, f, b = r["easyfsl"], r["fewshot"], r["bare"]
        full_cpu = "n/a" if f["cpu_per_step_s"] is None else f"{f['cpu_per_step_s'] * 1e3:.0f}"
        lines.append(
            f"| {r['mode']} ({r['size']} px, {r['workers']} workers) | {r['train']} + {r['test']} | {r['repeat']} | "
            f"{', '.join(r['order'])} | {r['variant']} | "
            f"{e['process_s']:.1f} / {e['window_s']:.1f} / {e['cpu_s']:.1f} | "
            f"{f['process_s']:.1f} / {f['window_s']:.1f} / {f['cpu_s']:.1f} | {f['to_first_step_s']:.1f} | "
            f"{r['x_process']:.2f} | {r['x_window']:.2f} | {r['x_cpu']:.2f} | "
            f"{f['wall_per_step_s'] * 1e3:.0f} / {full_cpu} | "
            f"{b['wall_per_step_s'] * 1e3:.0f} / {b['cpu_per_step_s'] * 1e3:.0f} | {r['full_over_bare']:.2f} | "
            f"{_ratio(r['full_over_bare_cpu'])} | {e['accuracy']:.3f} +- {e['ci95']:.3f} | "
            f"{f['accuracy']:.3f} +- {f['ci95']:.3f} |")
    keys = ("x_process", "x_window", "x_cpu", "full_over_bare", "full_over_bare_cpu")
    lines += ["", "Medians over the repeats:", "",
              "| setting | fewshot run | x easyfsl process | x easyfsl window | x easyfsl cpu | full / bare wall | "
              "full / bare cpu |", "|---|---|---|---|---|---|---|"]
    for mode, variant in dict.fromkeys((r["mode"], r["variant"]) for r in rows):
        mine = [r for r in rows if r["mode"] == mode and r["variant"] == variant]
        med = {k: _median([r[k] for r in mine]) for k in keys}
        lines.append(f"| {mode} | {variant} | " + " | ".join(_ratio(med[k]) for k in keys) + " |")
    return "\n".join(lines) + "\n"


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


if __name__ == "__main__":
    main()
