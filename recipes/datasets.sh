#!/usr/bin/env bash
# Every layout mahalanobis-train reads: scikit-learn's digits written in each (recipes/digits_split.py), one run on
# each at the cpu preset, and one with --test-data from another layout; the layouts list the same images in the
# same order, so every row has the same accuracy. Writes results/datasets.md.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
export OMP_NUM_THREADS=1  # two runs at a time, one thread each; results do not depend on it

NAME=datasets
RUNS=runs/recipes/$NAME
DIGITS=runs/recipes/digits-layouts
LAYOUTS=(folders filelists split-csv easyfsl omniglot)
SHORT="--preset cpu --episodes ${EPISODES:-100} --test-episodes 300 --val-every 0 --quiet"
rm -rf "$RUNS" "$DIGITS" && mkdir -p "$RUNS" "$DIGITS" results
for layout in "${LAYOUTS[@]}"; do
  python recipes/digits_split.py "$DIGITS/$layout" --layout "$layout" > /dev/null
done

{
  for layout in "${LAYOUTS[@]}"; do
    echo "mahalanobis-train $SHORT --data $DIGITS/$layout --out $RUNS --name $layout"
  done
  echo "mahalanobis-train $SHORT --data $DIGITS/folders --test-data $DIGITS/filelists --out $RUNS --name cross"
} | xargs -P 2 -L 1 bash -c 'fewshot "$@" > /dev/null' fewshot

GROUP="--metric accuracy --group-by data_format,test_data_format"
{
  echo "# One dataset in every layout (mahalanobis-train)"
  echo
  echo "Rebuild with \`bash recipes/$NAME.sh\`, which writes scikit-learn's digits (train 0-4, test 5-9) in each layout"
  echo "(\`python recipes/digits_split.py $DIGITS/\$layout --layout \$layout\`) and runs, for layout in ${LAYOUTS[*]}:"
  echo
  echo '```'
  echo "fewshot mahalanobis-train $SHORT --data $DIGITS/\$layout --out $RUNS --name \$layout"
  echo "fewshot mahalanobis-train $SHORT --data $DIGITS/folders --test-data $DIGITS/filelists --out $RUNS --name cross"
  echo "fewshot table $RUNS/* $GROUP"
  echo '```'
  echo
  fewshot table "$RUNS"/* $GROUP
} > results/$NAME.md
cat results/$NAME.md
