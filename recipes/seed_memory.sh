#!/usr/bin/env bash
# The seeds' memory tables as `fewshot plan` predicts them (nothing is run). Rebuilds results/seed_memory.md.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
python benchmarks/seed_memory.py --markdown results/seed_memory.md > /dev/null
