#!/usr/bin/env bash
# fewshot against easyfsl 1.5.0 on 512 x 384 JPEGs: episodes/s, input wait and accuracy, conv4 and resnet12 at
# 84 px, 0 and 2 workers; writes results/input_pipeline.md (machine-dependent). Needs the `bench` extra.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # both sides alike; on shared cores more threads only contend
mkdir -p results
# NOTE: a word on the machine for the table's machine line (a shared machine, say)
python benchmarks/input_pipeline.py --episodes "${EPISODES:-30,5}" --backbones conv4,resnet12 --workers 0,2 --amp \
  ${NOTE:+--note "$NOTE"} --out results/input_pipeline.md
