#!/usr/bin/env bash
# Accuracy by head and shot: mahalanobis-train, cosine / euclidean / mahalanobis (the default Ledoit-Wolf estimator
# and Simple CNAPS's own) x 1 / 5 shots, 3 seeds each, at the cpu preset, on the built-in data and on scikit-learn's
# digits split by class (recipes/digits_split.py); EPISODES training episodes (150 unless set);
# writes results/heads.{md,csv,png} and results/heads_digits.{csv,png}.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
export OMP_NUM_THREADS=1  # two runs at a time, one thread each; results do not depend on it

NAME=heads
RUNS=runs/recipes/$NAME
DIGITS=runs/recipes/digits-split
EPISODES=${EPISODES:-150}
SHORT="--preset cpu --episodes $EPISODES --test-episodes 300 --val-every 0 --quiet"
HEADS=("cosine" "euclidean" "mahalanobis --covariance-estimator ledoit-wolf"
       "mahalanobis --covariance-estimator simple-cnaps")
rm -rf "$RUNS" "$DIGITS" && mkdir -p "$RUNS" results
python recipes/digits_split.py "$DIGITS"

for data in builtin digits; do
  for head in "${HEADS[@]}"; do
    for k_shot in 1 5; do
      for seed in 0 1 2; do
        tag=$(echo "$head" | awk '{print $1 ($3 ? "-" $3 : "")}')
        extra=$([ "$data" = digits ] && echo "--data $DIGITS" || true)
        echo "mahalanobis-train $SHORT $extra --head $head --k-shot $k_shot --seed $seed --out $RUNS/$data --name $tag-k$k_shot-s$seed"
      done
    done
  done
done | xargs -P 2 -L 1 bash -c 'fewshot "$@" > /dev/null' fewshot

GROUP="--metric accuracy --group-by head,covariance_estimator,k_shot"
{
  echo "# Accuracy by head and shot (mahalanobis-train)"
  echo
  echo "Rebuild with \`bash recipes/$NAME.sh\`, which writes scikit-learn's digits as an image folder split by class"
  echo "(\`python recipes/digits_split.py $DIGITS\`: train 0-4, test 5-9) and runs, for data in builtin digits, head in"
  echo "cosine, euclidean, mahalanobis with \`--covariance-estimator ledoit-wolf\` (the default) and \`simple-cnaps\`,"
  echo "k_shot in 1 5, seed in 0 1 2:"
  echo
  echo '```'
  echo "fewshot mahalanobis-train $SHORT [--data $DIGITS] --head \$head --k-shot \$k_shot --seed \$seed --out $RUNS/\$data --name ..."
  echo "fewshot table $RUNS/\$data/* $GROUP"
  echo '```'
  echo
  echo "5-way episodes at 32 px (the cpu preset: conv4, prototype adaptation), $EPISODES training episodes, 300 test"
  echo "episodes per run; accuracy is the mean test-episode accuracy of a run, averaged over the 3 seeds of a row."
  echo "\`covariance_estimator\` applies to the mahalanobis head only (the cosine and euclidean runs ignore it)."
  echo
  echo "## Built-in synthetic images"
  echo
  fewshot table $RUNS/builtin/* $GROUP
  echo
  echo "![accuracy by head and shot, built-in data]($NAME.png)"
  echo
  echo "## scikit-learn digits (8x8 scanned digits, upscaled; 5 test classes, about 180 images each)"
  echo
  fewshot table $RUNS/digits/* $GROUP
  echo
  echo "![accuracy by head and shot, digits]($NAME""_digits.png)"
} > results/$NAME.md
fewshot table $RUNS/builtin/* $GROUP --format csv --out results/$NAME.csv --plot results/$NAME.png
fewshot table $RUNS/digits/* $GROUP --format csv --out results/${NAME}_digits.csv --plot results/${NAME}_digits.png
echo "wrote results/$NAME.md, results/$NAME{,_digits}.csv, results/$NAME{,_digits}.png"
