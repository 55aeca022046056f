#!/usr/bin/env bash
# The seeds' memory tables as `fewshot plan` predicts them (nothing is run). Rebuilds results/seed_memory.md.
set -euo pipefail
cd "$(dirname "$0")/.."
fewshot() { if [ -x .venv/bin/fewshot ]; then .venv/bin/fewshot "$@"; else command fewshot "$@"; fi; }
python() { if [ -x .venv/bin/python ]; then .venv/bin/python "$@"; else command python3 "$@"; fi; }
python benchmarks/seed_memory.py --markdown results/seed_memory.md > /dev/null
