#!/usr/bin/env bash
# Memory over steps: triplet-train's 300 episodes with validation every 20 (the seed's leak scenario), and the
# planner's predictions against real steps. Memory figures are machine-dependent: this rebuilds the plot
# results/triplet_memory.png, results/triplet_memory.md (marked machine-dependent) and results/plan_accuracy.md.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
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
