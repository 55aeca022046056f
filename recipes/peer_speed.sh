#!/usr/bin/env bash
# fewshot against easyfsl 1.5.0 end to end, on digits (32 px, 300 + 600 episodes, no workers) and on 512 x 384 JPEGs
# (84 px, 2 workers), with fewshot's bare steps beside its full run and, on digits, fewshot with 4 KiB pages;
# JOBS=N runs N repeats at once (for a busy machine: CPU seconds stay per process);
# writes results/peer_speed.md (machine-dependent). Needs the `bench` extra.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # both sides alike; on shared cores more threads only contend
mkdir -p results
# NOTE: a word on the machine for the table's machine line (a shared machine, say)
python benchmarks/peer_speed.py --modes digits,jpeg --repeats "${REPEATS:-2}" --digits-episodes 300,600 \
  --jpeg-episodes "${JPEG_EPISODES:-30,30}" --small-pages digits --jobs "${JOBS:-1}" ${NOTE:+--note "$NOTE"} \
  --out results/peer_speed.md
