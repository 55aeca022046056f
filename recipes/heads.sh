#!/usr/bin/env bash
# Accuracy by head and shot: mahalanobis-train, cosine / euclidean / mahalanobis x 1 / 5 shots, 3 seeds each,
# at the cpu preset on the built-in data, 150 training episodes; writes results/heads.{md,csv,png}.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
export OMP_NUM_THREADS=1  # two runs at a time, one thread each; results do not depend on it

NAME=heads
RUNS=runs/recipes/$NAME
SHORT="--preset cpu --episodes 150 --test-episodes 300 --val-every 0 --quiet"
rm -rf "$RUNS" && mkdir -p "$RUNS" results

for head in cosine euclidean mahalanobis; do
  for k_shot in 1 5; do
    for seed in 0 1 2; do
      echo "mahalanobis-train $SHORT --head $head --k-shot $k_shot --seed $seed --out $RUNS --name $head-k$k_shot-s$seed"
    done
  done
done | xargs -P 2 -L 1 bash -c 'fewshot "$@" > /dev/null' fewshot

TABLE="table $RUNS/* --metric accuracy --group-by head,k_shot"
{
  echo "# Accuracy by head and shot (mahalanobis-train)"
  echo
  echo "Rebuild with \`bash recipes/$NAME.sh\`, which runs, for head in cosine euclidean mahalanobis, k_shot in 1 5,"
  echo "seed in 0 1 2:"
  echo
  echo '```'
  echo "fewshot mahalanobis-train $SHORT --head \$head --k-shot \$k_shot --seed \$seed --out $RUNS --name \$head-k\$k_shot-s\$seed"
  echo "fewshot $TABLE"
  echo '```'
  echo
  echo "5-way episodes of the built-in synthetic images (32 px, the cpu preset), 150 training episodes, 300 test episodes per run;"
  echo "accuracy is the mean test-episode accuracy of a run, averaged over the 3 seeds of a row."
  echo
  fewshot $TABLE
  echo
  echo "![accuracy by head and shot]($NAME.png)"
} > results/$NAME.md
fewshot $TABLE --format csv --out results/$NAME.csv --plot results/$NAME.png
echo "wrote results/$NAME.md, results/$NAME.csv, results/$NAME.png"
