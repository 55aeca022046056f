#!/usr/bin/env bash
# docs/runs.md's pictures of what a run writes besides its metrics: embed-classify's threshold sweep, confusion matrix
# and embedding picture (PCA), mahalanobis-train's embedding picture (t-SNE), a TensorBoard export; and
# embed-classify's three heads side by side. Writes docs/img/*.png and results/embed_heads.{md,csv}.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
export OMP_NUM_THREADS=1

RUNS=runs/recipes/figures
rm -rf "$RUNS" && mkdir -p "$RUNS" docs/img results

for head in prototype logistic knn; do
  fewshot embed-classify --preset cpu --head "$head" --plots --out "$RUNS" --name "embed-$head" \
    --tensorboard "$RUNS/tensorboard" --quiet > /dev/null
done
fewshot mahalanobis-train --preset cpu --episodes 150 --test-episodes 100 --val-every 50 --plots \
  --embedding-plot tsne --out "$RUNS" --name mahalanobis --tensorboard "$RUNS/tensorboard" --quiet > /dev/null
fewshot export "$RUNS/mahalanobis" --tensorboard "$RUNS/tensorboard-exported" > /dev/null

cp "$RUNS/embed-prototype/threshold_sweep.png" docs/img/threshold_sweep.png
cp "$RUNS/embed-prototype/confusion.png" docs/img/confusion.png
cp "$RUNS/embed-prototype/embedding.png" docs/img/embedding_pca.png
cp "$RUNS/mahalanobis/embedding.png" docs/img/embedding_tsne.png

TABLE="table $RUNS/embed-* --metric accuracy --metric unknown_auroc --metric unknown_rate --group-by head"
{
  echo "# embed-classify by head"
  echo
  echo "Rebuild with \`bash recipes/figures.sh\`, which runs, for head in prototype logistic knn:"
  echo
  echo '```'
  echo "fewshot embed-classify --preset cpu --head \$head --plots --out $RUNS --name embed-\$head"
  echo "fewshot $TABLE"
  echo '```'
  echo
  echo "The built-in data (4 categories, 32 px images, small random-weight backbone); every head shares the Unknown"
  echo "threshold (auto) on the best cosine to a prototype, so unknown_auroc and unknown_rate are the same for all."
  echo
  fewshot $TABLE
} > results/embed_heads.md
fewshot $TABLE --format csv --out results/embed_heads.csv
echo "wrote docs/img/{threshold_sweep,confusion,embedding_pca,embedding_tsne}.png, results/embed_heads.{md,csv}"
