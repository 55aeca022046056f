"""Mahalanobis head: ms per episode and peak memory of dense Cholesky vs exact low-rank vs torch.inverse, side by side.

5-way 5-shot, 40 queries, float32 on the CPU, for each covariance estimator. Peak memory is the torch tensors alive
at once, measured by torch's memory tracker in real mode. Dense and torch.inverse run only where their d x d matrices
fit in --max-gib; torch.inverse is the reference code's Simple CNAPS, timed beside every estimator. The last column
compares the low-rank path with the dense path of the same estimator in float64.

    python benchmarks/mahalanobis.py [--dims 64 512 2048 25088] [--estimators ledoit-wolf simple-cnaps]
        [--repeats 3] [--markdown results/mahalanobis.md]
"""

from __future__ import annotations

import argparse
import time

import torch

from fewshot_cli.memory.step_tracker import StepTracker
from fewshot_cli.models.heads import MahalanobisHead, covariance_bytes
from fewshot_cli.models.names import ESTIMATORS

N_WAY, K_SHOT, QUERIES = 5, 5, 40


def episode(d: int):
    g = torch.Generator().manual_seed(d)
    labels = torch.arange(N_WAY).repeat_interleave(K_SHOT)
    centres = torch.randn(N_WAY, d, generator=g)
    support = centres[labels] + 0.5 * torch.randn(N_WAY * K_SHOT, d, generator=g)
    query = centres[torch.arange(QUERIES) % N_WAY] + 0.5 * torch.randn(QUERIES, d, generator=g)
    return support, labels, query


def inverse_logits(support, labels, query, beta: float = 1.0) -> torch.Tensor:
    """The reference code's way: build each Q_k and invert it with torch.inverse."""
    n = support.shape[0]
    task_c = support - support.mean(0)
    out = []
    for k in range(N_WAY):
        xk = support[labels == k]
        lam = len(xk) / (len(xk) + 1)
        class_c = xk - xk.mean(0)
        cov = lam * class_c.T @ class_c / (len(xk) - 1) + (1 - lam) * task_c.T @ task_c / (n - 1)
        cov = cov + beta * torch.eye(cov.shape[0])
        diff = query - xk.mean(0)
        out.append(-((diff @ torch.inverse(cov)) * diff).sum(1))
    return torch.stack(out, 1)


def measure(fn, repeats: int) -> tuple[float, int]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    tracker = StepTracker()
    with tracker:
        fn()
    peak = sum(snap["Total"] for snap in tracker.get_tracker_snapshot("peak").values())
    return 1e3 * min(times), peak


def measure_dim(estimator: str, d: int, args: argparse.Namespace) -> dict:
    support, labels, query = episode(d)

    def run(mode: str, support=support, query=query) -> torch.Tensor:
        head = MahalanobisHead(1.0, mode, estimator=estimator)
        head.process_support_set(support, labels, N_WAY)
        return head(query)

    row = {"estimator": estimator, "d": d, "lowrank": measure(lambda: run("lowrank"), args.repeats)}
    if covariance_bytes(N_WAY, d, N_WAY * K_SHOT, "dense") <= args.max_gib * 1024**3:
        row["dense"] = measure(lambda: run("dense"), args.repeats)
        row["inverse"] = measure(lambda: inverse_logits(support, labels, query), args.repeats)
        reference = run("dense", support.double(), query.double())
        row["max_rel_diff"] = float(((run("lowrank").double() - reference).abs() / reference.abs()).max())
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 512, 2048, 25088])
    parser.add_argument("--estimators", nargs="+", default=["ledoit-wolf", "simple-cnaps"], choices=ESTIMATORS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-gib", type=float, default=6.0, help="skip dense methods whose matrices exceed this")
    parser.add_argument("--markdown", help="also write the table here")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    rows = []
    for estimator in args.estimators:
        for d in args.dims:
            rows.append(measure_dim(estimator, d, args))
    header = ("| estimator | d | dense ms | dense peak MiB | low-rank ms | low-rank peak MiB | torch.inverse ms | "
              "torch.inverse peak MiB | low-rank vs float64 dense (max rel. diff) |")
    lines = [header, "|" + "---|" * 9]
    for row in rows:
        cells = [row["estimator"], str(row["d"])]
        for method in ("dense", "lowrank", "inverse"):
            if method in row:
                ms, peak = row[method]
                cells += [f"{ms:,.1f}", f"{peak / 2**20:,.1f}"]
            else:
                predicted = covariance_bytes(N_WAY, row["d"], N_WAY * K_SHOT, "dense") / 2**30
                cells += ["skipped", f"(needs > {predicted:,.1f} GiB)"]
        cells.append(f"{row['max_rel_diff']:.1e}" if "max_rel_diff" in row else "-")
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    print(f"5-way 5-shot, {QUERIES} queries, float32, {torch.get_num_threads()} threads, best of {args.repeats}")
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write(f"Mahalanobis head, 5-way 5-shot, {QUERIES} queries, float32 on the CPU "
                         f"(machine-dependent timings; `python benchmarks/mahalanobis.py`).\n\n{table}")


if __name__ == "__main__":
    main()
