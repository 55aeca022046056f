#!/usr/bin/env bash
# ProtoNet (conv4, 84 px) on photo-like JPEGs made from images installed with scikit-learn and matplotlib:
# fewshot against easyfsl 1.5.0 as users run them, one difference at a time on the same episodes and initial
# weights, and test accuracy against training episodes; writes results/peer_accuracy.md. Needs the `bench` extra.
# About 3 hours of CPU at the defaults (a conv4 training episode at 84 px took 1.1 to 1.5 s of CPU on a 2-core
# EPYC); each part and seed is a process of its own, run side by side.
# BUDGET_S=SECONDS: past that much wall time a process stops (fewshot's and easyfsl's 60 episodes always finish).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # both sides alike; on shared cores more threads only contend
SEEDS=${SEEDS:-0 1 2}
parts=$(mktemp -d)
trap 'rm -rf "$parts"' EXIT
cd benchmarks
python photo_folder.py "$parts/data"
for seed in $SEEDS; do
  python peer_accuracy.py reproduce --data "$parts/data" --seeds "$seed" --episodes 60 --test-episodes 100 \
    --workers 2 --json "$parts/reproduce-$seed.json" &
  python peer_accuracy.py controlled --data "$parts/data" --seeds "$seed" --episodes 60 \
    --checkpoints "${CHECKPOINTS:-300,1000}" --budget-s "${BUDGET_S:-inf}" --test-episodes 100 \
    ${VARIANTS:+--only "$VARIANTS"} --json "$parts/controlled-$seed.json" &
done
wait
shopt -s nullglob  # a part that failed or was stopped is left out of the table; the table lists what ran
python peer_accuracy.py render "$parts"/reproduce-*.json "$parts"/controlled-*.json --out ../results/peer_accuracy.md
