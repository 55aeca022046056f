#!/usr/bin/env bash
# Memory over steps: triplet-train's 300 episodes with validation every 20 (the seed's leak scenario), and the
# planner's predictions against real steps. Memory figures are machine-dependent: this rebuilds the plot
# results/triplet_memory.png, results/triplet_memory.md (marked machine-dependent) and results/plan_accuracy.md.
set -euo pipefail
cd "$(dirname "$0")/.."
fewshot() { if [ -x .venv/bin/fewshot ]; then .venv/bin/fewshot "$@"; else command fewshot "$@"; fi; }
python() { if [ -x .venv/bin/python ]; then .venv/bin/python "$@"; else command python3 "$@"; fi; }
runs=runs/recipes/memory
rm -rf "$runs"
fewshot triplet-train --preset cpu --quiet --out "$runs" --name triplet > /dev/null
fewshot memreport "$runs/triplet" --plot results/triplet_memory.png > /dev/null
{
  echo "# Memory of triplet-train over 300 episodes (machine-dependent)"
  echo
  echo "\`bash recipes/memory.sh\`: \`fewshot triplet-train --preset cpu\`, then \`fewshot memreport\` on the run."
  echo "Figures depend on the machine and its allocator; the plot is results/triplet_memory.png."
  echo
  echo '```'
  fewshot memreport "$runs/triplet"
  echo '```'
} > results/triplet_memory.md
python benchmarks/plan_accuracy.py --markdown results/plan_accuracy.md > /dev/null
