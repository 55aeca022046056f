#!/usr/bin/env bash
# Memory over training steps of mahalanobis-train at the cpu preset: image side 16 and 32, and 32 with activation
# checkpointing; writes results/memory_presets.{md,csv} and a plot per comparison.
# MACHINE-DEPENDENT: peak RSS and episodes per second depend on the machine, the libraries and its load; this table
# is not expected to reproduce byte for byte (accuracy tables are).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
export OMP_NUM_THREADS=1

NAME=memory_presets
RUNS=runs/recipes/$NAME
SHORT="--preset cpu --episodes 40 --n-query 5 --test-episodes 10 --val-every 20 --val-episodes 5 --quiet"
rm -rf "$RUNS" && mkdir -p "$RUNS" results

# one at a time, so that one run's memory does not depend on another's
fewshot mahalanobis-train $SHORT --image-size 16 --out $RUNS --name image16 > /dev/null
fewshot mahalanobis-train $SHORT --image-size 32 --out $RUNS --name image32 > /dev/null
fewshot mahalanobis-train $SHORT --image-size 32 --checkpoint-activations --out $RUNS --name image32-checkpointed > /dev/null

TABLE="table $RUNS/* --metric peak_rss_mb --metric episodes_per_s --group-by image_size,checkpoint_activations"
{
  echo "# Memory of mahalanobis-train at the cpu preset (MACHINE-DEPENDENT)"
  echo
  echo "Peak resident memory and training speed measured on the machine that ran the recipe: they change with the"
  echo "machine, the library versions and its load, so this table is not expected to reproduce byte for byte."
  echo "Rebuild with \`bash recipes/$NAME.sh\`, which runs:"
  echo
  echo '```'
  echo "fewshot mahalanobis-train $SHORT --image-size 16 --out $RUNS --name image16"
  echo "fewshot mahalanobis-train $SHORT --image-size 32 --out $RUNS --name image32"
  echo "fewshot mahalanobis-train $SHORT --image-size 32 --checkpoint-activations --out $RUNS --name image32-checkpointed"
  echo "fewshot $TABLE"
  echo "fewshot memreport $RUNS/image32 --plot results/$NAME-image32.png"
  echo '```'
  echo
  fewshot $TABLE
  echo
  echo "## Memory report of image32"
  echo
  echo '```'
  fewshot memreport $RUNS/image32
  echo '```'
  echo
  echo "![rss_mb over training steps, one line per configuration]($NAME.png)"
  echo
  echo "![every memory series of image32 over training steps, evaluations shaded]($NAME-image32.png)"
} > results/$NAME.md
fewshot $TABLE --format csv --out results/$NAME.csv
fewshot memreport $RUNS/image32 --plot results/$NAME-image32.png > /dev/null
# several runs on one plot: fewshot memreport plots one run, so call the same library function on all three
python -c "import sys; from pathlib import Path; from fewshot_cli.reports.plots import plot_memory_runs; \
plot_memory_runs([Path(p) for p in sys.argv[2:]], Path(sys.argv[1]))" results/$NAME.png $RUNS/*
echo "wrote results/$NAME.md, results/$NAME.csv, results/$NAME.png, results/$NAME-image32.png"
