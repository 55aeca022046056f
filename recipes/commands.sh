#!/usr/bin/env bash
# Every experiment command at the cpu preset on the built-in data (the demo's settings), its main metric.
# Rebuilds results/commands.md.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
runs=runs/recipes/commands
rm -rf "$runs"
fewshot detect-train --preset cpu --test-episodes 20 --quiet --out "$runs" --name detect > /dev/null
fewshot triplet-train --preset cpu --episodes 120 --val-every 40 --val-episodes 2 --test-episodes 10 --quiet \
  --out "$runs" --name triplet > /dev/null
fewshot mahalanobis-train --preset cpu --episodes 200 --val-every 100 --val-episodes 20 --test-episodes 300 --quiet \
  --out "$runs" --name mahalanobis > /dev/null
fewshot classify-food101 --preset cpu --epochs 8 --quiet --out "$runs" --name food101 > /dev/null
fewshot embed-classify --preset cpu --quiet --out "$runs" --name embed > /dev/null
{
  echo "# Every command on the built-in data"
  echo
  echo "\`bash recipes/commands.sh\`: each command at the cpu preset with the demo's settings, seed 0."
  for pair in "detect map map50" "triplet st_iou box_ap50" "mahalanobis accuracy accuracy_ci95" \
              "food101 top1 top5" "embed accuracy unknown_rate"; do
    set -- $pair
    echo
    echo "## $(python3 -c "import json; print(json.load(open('$runs/$1/config.json'))['command'])")"
    echo
    echo "\`fewshot table $runs/$1 --metric $2 --metric $3 --group-by command\`"
    echo
    fewshot table "$runs/$1" --metric "$2" --metric "$3" --group-by command --format md
  done
} > results/commands.md
