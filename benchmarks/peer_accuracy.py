"""Why fewshot's ProtoNet tests worse than easyfsl's on photo-sized JPEGs: one difference at a time, on the same
episodes and from the same initial weights, and the curve of test accuracy against training episodes.

    python benchmarks/peer_accuracy.py reproduce [--seeds 0,1,2] [--episodes 60] [--test-episodes 100]
        [--workers 2] [--data DIR] --json PART.json
    python benchmarks/peer_accuracy.py controlled [--seeds 0,1,2] [--episodes 60] [--checkpoints 300,1000]
        [--test-episodes 100] [--only NAME;...] [--budget-s S] [--data DIR] --json PART.json
    python benchmarks/peer_accuracy.py render PART.json ... --out results/peer_accuracy.md

The data: `photo_folder.make_photo_folder` (crops of the photographs and elevation renders installed with
scikit-learn and matplotlib, 512 x 384 JPEGs; 72 train and 48 test classes of 20 images). Every part: conv4 (fewshot's
`build_backbone`), 5-way 5-shot 15 queries at 84 px, Adam, one episode per step, on one thread.

`reproduce`: the two libraries as a user runs them: fewshot's CLI (`mahalanobis-train --preset cpu --backbone
conv4 --head euclidean --adapt none --reduced-dim 0`, with `--distance squared` and `plain`) and easyfsl 1.5.0's
own loop (`EasySet` + `TaskSampler` + `PrototypicalNetworks`, `input_pipeline.run_easyfsl`), each with its own
episodes and initial weights.

`controlled`: a harness that holds every image of the folder in memory, read both ways (fewshot's
reader: torchvision's antialiased resize of the uint8 pixels, rounded to uint8; easyfsl's: PIL's resize, then
ToTensor), and trains one model per setting on the same episodes (fewshot's `EpisodeSampler` at the seed) from the
same initial weights (drawn at the seed; extra parameters, a convolution bias or the projection, from a stream of
their own). A setting is fewshot's choices (`FEWSHOT`) with one of them changed to easyfsl's, or easyfsl's
(`EASYFSL`) with one changed to fewshot's. Test accuracy: the mean over the test episodes, with its 95% interval.
The curve's settings (--libraries: fewshot's, fewshot's with -distance, easyfsl's) are trained on and tested
again after each of --checkpoints.
An out file's hand-written notes (from its `## Notes` heading on) are kept when the table is rewritten.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from photo_folder import make_photo_folder
from PIL import Image
from torch import nn

from fewshot_cli.data.images import IMAGENET_MEAN, IMAGENET_STD, read_pixels, to_float
from fewshot_cli.data.splits import open_splits
from fewshot_cli.episodes import EpisodeSampler
from fewshot_cli.models.backbones import build_backbone, feature_dim
from fewshot_cli.models.heads import prototypes

N_WAY, K_SHOT, N_QUERY, SIZE = 5, 5, 15, 84
MEAN, STD = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
NOTES = "## Notes"


@dataclass(frozen=True)
class Setting:
    """One side's choices. Defaults: fewshot's `mahalanobis-train --head euclidean --adapt none` at 84 px."""

    squared: bool = True  # logits -||q - c||^2 (fewshot's EuclideanHead) or -||q - c|| (easyfsl's cdist)
    bias: bool = False  # the convolutions' bias
    pixels: str = "fewshot"  # fewshot's uint8 tensor resize, or easyfsl's PIL resize + ToTensor
    reduced_dim: int = 0  # fewshot's projection (Linear, LayerNorm, ReLU) to this size; 512 is its default
    layout: str = "channels_last"  # fewshot's on the CPU; easyfsl runs contiguous
    lr: float = 1e-3
    optimizer: str = "adam"
    test: str = "batched"  # every test image embedded once (fewshot) or each episode's images (easyfsl), eval mode
    test_bn: str = "running"  # BatchNorm at test: running statistics (both), or each episode's own batch
    joint: bool = False  # one forward for support and queries together (neither library) instead of two
    scale: str = "none"  # "learned": the logits times exp(s), s learnt from 0 at 10x the lr (TADAM's scaling)


FEWSHOT = Setting()
#: easyfsl tests each episode's images in eval mode: the same features as embedding every test image once in eval
#: mode (the row "fewshot, test per episode" checks it), so its settings here test batched, at a tenth of the cost
EASYFSL = Setting(squared=False, pixels="easyfsl", layout="contiguous")

VARIANTS: dict[str, Setting] = {
    "fewshot": FEWSHOT,
    "fewshot, -distance (easyfsl's logits)": dataclasses.replace(FEWSHOT, squared=False),
    "fewshot, easyfsl's pixels (PIL resize)": dataclasses.replace(FEWSHOT, pixels="easyfsl"),
    "fewshot, contiguous layout": dataclasses.replace(FEWSHOT, layout="contiguous"),
    "fewshot, convolution bias": dataclasses.replace(FEWSHOT, bias=True),
    "fewshot, test per episode": dataclasses.replace(FEWSHOT, test="per-episode"),
    "fewshot, test BatchNorm on each episode's batch": dataclasses.replace(FEWSHOT, test_bn="episode"),
    "fewshot, lr 1e-4": dataclasses.replace(FEWSHOT, lr=1e-4),
    "fewshot, projection to 512 (--reduced-dim default)": dataclasses.replace(FEWSHOT, reduced_dim=512),
    "fewshot, projection to 512, -distance": dataclasses.replace(FEWSHOT, reduced_dim=512, squared=False),
    "fewshot, projection to 512, learned scale": dataclasses.replace(FEWSHOT, reduced_dim=512, scale="learned"),
    "easyfsl": EASYFSL,
    "easyfsl, -squared distance (fewshot's logits)": dataclasses.replace(EASYFSL, squared=True),
    "fewshot, support and queries in one forward": dataclasses.replace(FEWSHOT, joint=True),
}
#: what `controlled` trains unless --only says otherwise (after the curve's settings); the others on request
DEFAULT_VARIANTS = ["fewshot, easyfsl's pixels (PIL resize)", "fewshot, convolution bias",
                    "fewshot, projection to 512 (--reduced-dim default)"]


# --- the data, held in memory both ways -----------------------------------------------------------------------------

class Images:
    """Every image of the folder at SIZE px, normalised, read by fewshot's reader and by easyfsl's transform."""

    def __init__(self, root: Path) -> None:
        from torchvision import transforms  # torchvision's PIL transforms: easyfsl's reader, only here

        self.data = open_splits(root, SIZE)
        paths = list(self.data.paths)
        easyfsl = transforms.Compose([transforms.Resize([SIZE, SIZE]), transforms.ToTensor(),
                                      transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        self.pixels = {
            "fewshot": (to_float(torch.stack([read_pixels(p, SIZE) for p in paths])) - MEAN) / STD,
            "easyfsl": torch.stack([easyfsl(Image.open(p).convert("RGB")) for p in paths]),
        }

    def sampler(self, split: str, seed: int) -> EpisodeSampler:
        return EpisodeSampler(self.data.items_by_class(split), N_WAY, K_SHOT, N_QUERY, seed=seed, split=split)


# --- the model ---------------------------------------------------------------------------------------------------

class ProtoNet(nn.Module):
    """conv4 (with or without bias), fewshot's projection when asked, and either library's logits."""

    def __init__(self, setting: Setting, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.backbone = build_backbone("conv4")
        if setting.bias:  # the same weights, and a bias drawn from a stream of its own
            torch.manual_seed(seed + 1000)
            for block in self.backbone:
                if isinstance(block, nn.Sequential):
                    conv = block[0]
                    block[0] = nn.Conv2d(conv.in_channels, conv.out_channels, 3, padding=1, bias=True)
                    block[0].weight.data.copy_(conv.weight.data)
        self.reduction = None
        dim = feature_dim(self.backbone, SIZE)
        if setting.reduced_dim and dim > setting.reduced_dim:
            torch.manual_seed(seed + 2000)
            self.reduction = nn.Sequential(nn.Linear(dim, setting.reduced_dim), nn.LayerNorm(setting.reduced_dim),
                                           nn.ReLU())
        self.squared = setting.squared
        # no random draw: the other weights stay those of the settings without it
        self.log_scale = nn.Parameter(torch.tensor(0.0)) if setting.scale == "learned" else None
        if setting.layout == "channels_last":
            self.backbone.to(memory_format=torch.channels_last)
        self.layout = torch.channels_last if setting.layout == "channels_last" else torch.contiguous_format

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.backbone(images.contiguous(memory_format=self.layout))
        return self.reduction(features) if self.reduction is not None else features

    def logits(self, support: torch.Tensor, labels: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        distance = torch.cdist(query, prototypes(support, labels, N_WAY))
        logits = -distance.pow(2) if self.squared else -distance
        return logits * self.log_scale.exp() if self.log_scale is not None else logits


def train_step(model: ProtoNet, optimizer: torch.optim.Optimizer, setting: Setting, pixels: torch.Tensor,
               episode) -> float:
    (s_items, s_labels), (q_items, q_labels) = episode.support_items(), episode.query_items()
    model.train()
    if setting.joint:
        both = model(pixels[s_items + q_items])
        support, query = both[:len(s_items)], both[len(s_items):]
    else:
        support, query = model(pixels[s_items]), model(pixels[q_items])
    loss = F.cross_entropy(model.logits(support, torch.tensor(s_labels), query), torch.tensor(q_labels))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return float(loss.detach())


@torch.no_grad()
def test(model: ProtoNet, setting: Setting, pixels: torch.Tensor, episodes: list) -> tuple[float, float]:
    """Mean test accuracy over `episodes` and its 95% interval."""
    scores = []
    if setting.test == "batched" and setting.test_bn == "running":
        model.eval()
        items = sorted({i for e in episodes for i in (*e.support_items()[0], *e.query_items()[0])})
        row = {item: r for r, item in enumerate(items)}
        features = torch.cat([model(pixels[items[a:a + 256]]) for a in range(0, len(items), 256)])
        embed = lambda chosen: features[[row[i] for i in chosen]]  # noqa: E731
    else:
        model.train(setting.test_bn == "episode")  # train mode: BatchNorm on the batch (running stats untouched below)
        embed = lambda chosen: model(pixels[chosen])  # noqa: E731
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    for e in episodes:
        (s_items, s_labels), (q_items, q_labels) = e.support_items(), e.query_items()
        predicted = model.logits(embed(s_items), torch.tensor(s_labels), embed(q_items)).argmax(1)
        scores.append(float((predicted == torch.tensor(q_labels)).float().mean()))
    model.load_state_dict(saved)  # BatchNorm's running statistics as training left them
    return float(np.mean(scores)), 1.96 * float(np.std(scores, ddof=1)) / math.sqrt(len(scores))


class Run:
    """One setting trained from seed's initial weights on seed's episodes, extended checkpoint by checkpoint."""

    def __init__(self, images: Images, setting: Setting, seed: int, test_episodes: int) -> None:
        self.setting, self.seed, self.done, self.cpu_s = setting, seed, 0, 0.0
        self.model = ProtoNet(setting, seed)
        scale = [self.model.log_scale] if self.model.log_scale is not None else []
        groups = [{"params": [p for p in self.model.parameters() if all(p is not q for q in scale)]},
                  *([{"params": scale, "lr": 10 * setting.lr}] if scale else [])]
        self.optimizer = (torch.optim.Adam(groups, lr=setting.lr) if setting.optimizer == "adam"
                          else torch.optim.SGD(groups, lr=setting.lr, momentum=0.9))
        self.pixels = images.pixels[setting.pixels]
        self.train = images.sampler("train", seed)
        test_sampler = images.sampler("test", seed)
        self.test_set = [test_sampler.episode(i) for i in range(test_episodes)]

    def train_to(self, episodes: int, deadline: float = math.inf) -> float | None:
        """Train up to `episodes` episodes in all; the mean loss of the last 20, or None if the wall clock
        (`time.perf_counter`) passed `deadline` first."""
        started, losses = time.process_time(), []
        for i in range(self.done, episodes):
            if time.perf_counter() > deadline:
                return None
            losses.append(train_step(self.model, self.optimizer, self.setting, self.pixels, self.train.episode(i + 1)))
            self.done = i + 1
        self.cpu_s += time.process_time() - started
        return float(np.mean(losses[-20:]))

    def row(self, name: str, loss: float, test_setting: Setting | None = None) -> dict:
        accuracy, ci95 = test(self.model, test_setting or self.setting, self.pixels, self.test_set)
        return {"part": "controlled", "setting": name, "seed": self.seed, "episodes": self.done,
                "accuracy": accuracy, "ci95": ci95, "last_loss": loss, "train_cpu_s": self.cpu_s,
                **({"scale": float(self.model.log_scale.detach().exp())} if self.model.log_scale is not None
                   else {})}


#: test procedures that need no training of their own: fewshot's model at `--episodes`, tested another way
TEST_VARIANTS = {"fewshot, test per episode": dataclasses.replace(FEWSHOT, test="per-episode"),
                 "fewshot, test BatchNorm on each episode's batch": dataclasses.replace(FEWSHOT, test_bn="episode")}


def part_controlled(args: argparse.Namespace, images: Images) -> list[dict]:
    """Per seed: the curve's settings (--libraries), then the others, trained for --episodes and tested; then the
    curve's trained on to each later checkpoint. Past --budget-s of wall time, no other setting and no later
    checkpoint is finished (the curve's first one always is)."""
    rows, started = [], time.perf_counter()
    names = args.only.split(";") if args.only else DEFAULT_VARIANTS
    curve = args.libraries.split(";")
    checkpoints = [int(c) for c in args.checkpoints.split(",") if int(c) > args.episodes]

    def emit(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json is not None:  # after every row: a part stopped by its budget keeps what it measured
            args.json.write_text(json.dumps({"meta": meta(args, started), "rows": rows}))

    for seed in seeds(args):
        kept = {}
        for name in dict.fromkeys([*curve, *names]):
            run = Run(images, VARIANTS[name], seed, args.test_episodes)
            loss = run.train_to(args.episodes, math.inf if name in curve else started + args.budget_s)
            if loss is None:  # the budget is spent: the other settings are left out
                break
            emit(run.row(name, loss))
            if name == "fewshot":
                for test_name, test_setting in TEST_VARIANTS.items():
                    emit(run.row(test_name, loss, test_setting))
            if name in curve:
                kept[name] = run
        for checkpoint in checkpoints:
            for name, run in kept.items():
                loss = run.train_to(checkpoint, started + args.budget_s)
                if loss is None:  # the budget is spent: the checkpoint not reached is left blank
                    return rows
                emit(run.row(name, loss))
    return rows


def part_reproduce(args: argparse.Namespace, root: Path, tmp: Path) -> list[dict]:
    # input_pipeline's easyfsl loop and its torch-2.6 patch of easyfsl's sampler, only for this part
    from input_pipeline import import_easyfsl, run_easyfsl

    import_easyfsl()
    rows = []
    for seed in seeds(args):
        easy = run_easyfsl(root, "conv4", args.workers, args.episodes, torch.device("cpu"), tmp, SIZE, seed=seed,
                           test_episodes=args.test_episodes)
        rows.append({"part": "reproduce", "setting": "easyfsl 1.5.0 (its own loop)", "seed": seed,
                     "episodes": args.episodes, "accuracy": easy["accuracy"], "ci95": easy["ci95"]})
        print(json.dumps(rows[-1]), flush=True)
        for extra in (["--distance", "squared"], ["--distance", "plain"]):
            label = "fewshot CLI, --reduced-dim 0 " + " ".join(extra)
            result = run_cli(root, tmp / "runs", seed, args, ["--reduced-dim", "0", *extra])
            rows.append({"part": "reproduce", "setting": label, "seed": seed, "episodes": args.episodes, **result})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def run_cli(root: Path, out: Path, seed: int, args: argparse.Namespace, extra: list[str]) -> dict:
    command = [sys.executable, "-m", "fewshot_cli", "mahalanobis-train", "--data", str(root), "--preset", "cpu",
               "--backbone", "conv4", "--head", "euclidean", "--adapt", "none", "--image-size", str(SIZE),
               "--n-way", str(N_WAY), "--k-shot", str(K_SHOT), "--n-query", str(N_QUERY), "--seed", str(seed),
               "--episodes", str(args.episodes), "--test-episodes", str(args.test_episodes), "--val-every", "0",
               "--checkpoint-every", str(args.episodes), "--workers", str(args.workers), "--quiet", "--json",
               "--out", str(out), *extra]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"fewshot failed: {done.stderr[-2000:]}")
    metrics = json.loads(done.stdout.strip().splitlines()[-1])
    shown = ["DATA" if c == str(root) else "RUNS" if c == str(out) else c for c in command[3:]]
    return {"accuracy": metrics["accuracy"], "ci95": metrics["accuracy_ci95"], "command": "fewshot " + " ".join(shown)}


def shown_arguments(argv: list[str]) -> str:
    """The command line without its temporary paths (--json, --data and their values)."""
    kept = [a for i, a in enumerate(argv) if a not in ("--json", "--data") and argv[i - 1] not in ("--json", "--data")]
    return " ".join(a if " " not in a and ";" not in a else repr(a) for a in kept)


def seeds(args: argparse.Namespace) -> list[int]:
    return [int(s) for s in args.seeds.split(",")]


# --- the table ---------------------------------------------------------------------------------------------------

def render(rows: list[dict], meta: dict) -> str:
    ran = "; ".join(f"`{c}`" for c in meta["commands"])
    lines = ["# ProtoNet on photo-like JPEGs: fewshot against easyfsl 1.5.0, one difference at a time", "",
             f"Written by `python benchmarks/peer_accuracy.py render` (`bash recipes/peer_accuracy.sh`) over the "
             f"rows of {ran}, on "
             f"{meta['machine']}, torch {torch.__version__}, "
             # the parts' own setting: render runs in a process of its own, after them
             f"OMP_NUM_THREADS={meta.get('threads', 'not recorded')}. Data: "
             "`benchmarks/photo_folder.py` (120 classes of 20 crops of the photographs and elevation renders "
             "installed with scikit-learn and matplotlib, 512 x 384 JPEGs; 72 train, 48 test classes). conv4, "
             f"{N_WAY}-way {K_SHOT}-shot {N_QUERY} queries at {SIZE} px, Adam; accuracy: mean over the test episodes "
             "(95% interval of one run's episodes); mean: over the seeds. See `benchmarks/peer_accuracy.py` for "
             "what each setting changes.", ""]
    reproduce = [r for r in rows if r["part"] == "reproduce"]
    if reproduce:
        lines += ["## The libraries as a user runs them", "",
                  f"Each with its own episodes and initial weights; {reproduce[0]['episodes']} training episodes, "
                  f"{meta.get('reproduce_test', '?')} test episodes, {meta.get('workers', '?')} workers.", ""]
        lines += seed_table(reproduce)
    controlled = [r for r in rows if r["part"] == "controlled"]
    if controlled:
        first = min(r["episodes"] for r in controlled)
        lines += ["## One difference at a time (same episodes, same initial weights)", "",
                  f"{first} training episodes, {meta.get('controlled_test', '?')} test episodes."
                  + (" The two test rows are fewshot's trained model tested another way."
                     if any(r["setting"] in TEST_VARIANTS for r in controlled) else ""), ""]
        lines += seed_table([r for r in controlled if r["episodes"] == first], baseline=True)
        curve = [r for r in controlled if any(o["setting"] == r["setting"] and o["episodes"] > first
                                              for o in controlled)]
        lines += ["## Test accuracy against training episodes (same episodes, same initial weights)", ""]
        if not curve:
            lines += [f"No run went past {first} episodes within its part's time budget (`--budget-s`).", ""]
            return "\n".join(lines)
        lines += ["One run per seed and setting, tested after each number of episodes (a blank: not reached within "
                  "the part's time budget).", ""]
        checkpoints = sorted({r["episodes"] for r in curve})
        seeds_seen = sorted({r["seed"] for r in curve})
        lines += ["| setting | episodes | " + " | ".join(f"seed {s}" for s in seeds_seen) + " | mean |",
                  "|---|---|" + "---|" * len(seeds_seen) + "---|"]
        for name in dict.fromkeys(r["setting"] for r in curve):
            for c in checkpoints:
                cells = {r["seed"]: r for r in curve if r["setting"] == name and r["episodes"] == c}
                if not cells:
                    continue
                mean = f"{np.mean([r['accuracy'] for r in cells.values()]):.3f}" + (
                    "" if len(cells) == len(seeds_seen) else f" ({len(cells)} seeds)")
                lines.append(f"| {name} | {c} | " + " | ".join(
                    f"{cells[s]['accuracy']:.3f} +- {cells[s]['ci95']:.3f}" if s in cells else "" for s in seeds_seen)
                    + f" | {mean} |")
        lines.append("")
    return "\n".join(lines)


def seed_table(rows: list[dict], baseline: bool = False) -> list[str]:
    seeds_seen = sorted({r["seed"] for r in rows})
    lines = ["| setting | " + " | ".join(f"seed {s}" for s in seeds_seen) + " | mean |" + (" vs its side |" if
                                                                                            baseline else ""),
             "|---|" + "---|" * len(seeds_seen) + "---|" + ("---|" if baseline else "")]
    means = {}
    for name in dict.fromkeys(r["setting"] for r in rows):
        cells = {r["seed"]: r for r in rows if r["setting"] == name}
        means[name] = float(np.mean([r["accuracy"] for r in cells.values()]))
        side = "fewshot" if name.startswith("fewshot") else "easyfsl"
        delta = f" {means[name] - means[side]:+.3f} |" if baseline and side in means else (" |" if baseline else "")
        lines.append(f"| {name} | " + " | ".join(
            f"{cells[s]['accuracy']:.3f} +- {cells[s]['ci95']:.3f}" if s in cells else "" for s in seeds_seen)
            + f" | {means[name]:.3f} |" + delta)
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("reproduce", "controlled", "render"))
    parser.add_argument("parts", nargs="*", type=Path, help="render: the parts' JSON files")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--episodes", type=int, default=60)
    parser.add_argument("--test-episodes", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--only", default="", help="controlled: these settings besides the curve's (names "
                        "separated by ;)")
    parser.add_argument("--checkpoints", default="300,1000", help="controlled: the curve's later checkpoints")
    parser.add_argument("--budget-s", type=float, default=math.inf,
                        help="controlled: past this much wall time, stop (what was not finished is left out; the "
                        "curve's settings at --episodes always finish)")
    parser.add_argument("--libraries", default="fewshot;fewshot, -distance (easyfsl's logits);easyfsl",
                        help="curve: these settings (separated by ;)")
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--data", type=Path, help="the folder photo_folder.py wrote (default: write one here)")
    parser.add_argument("--json", type=Path, help="write the part's rows here")
    parser.add_argument("--out", type=Path, help="render: write the table here")
    args = parser.parse_args()
    if args.part == "render":
        parts = [json.loads(p.read_text()) for p in args.parts]
        rows = [r for p in parts for r in p["rows"]]
        merged = {k: v for p in parts for k, v in p["meta"].items()}
        merged["commands"] = [c for p in parts for c in p["meta"]["commands"]]
        # each part's own thread setting, not the last part's alone (a part before the record has none)
        merged["threads"] = ", ".join(dict.fromkeys(p["meta"].get("threads", "not recorded") for p in parts))
        table = render(rows, merged)
        print(table)
        if args.out is not None:
            notes = args.out.read_text().partition(NOTES) if args.out.exists() else ("", "", "")
            args.out.write_text(table + (f"\n{NOTES}{notes[2]}" if notes[1] else ""))
        return
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        root = args.data or make_photo_folder(tmp / "data", args.per_class)
        started = time.perf_counter()
        if args.part == "reproduce":
            rows = part_reproduce(args, root, tmp)
        else:
            rows = part_controlled(args, Images(root))
    if args.json is not None:
        args.json.write_text(json.dumps({"meta": meta(args, started), "rows": rows}))


def meta(args: argparse.Namespace, started: float) -> dict:
    return {"machine": f"{platform.machine()} ({os.cpu_count()} CPU cores)",
            "commands": ["python benchmarks/peer_accuracy.py " + shown_arguments(sys.argv[1:])],
            f"{args.part}_test": args.test_episodes, "workers": args.workers,
            "threads": os.environ.get("OMP_NUM_THREADS", "unset"),
            f"{args.part}_seconds": time.perf_counter() - started}


if __name__ == "__main__":
    main()
