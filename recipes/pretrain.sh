#!/usr/bin/env bash
# What pre-training buys: mahalanobis-train on scikit-learn's digits split by class (recipes/digits_split.py), with
# and without --pretrain-epochs PRETRAIN (5 unless set) before EPISODES training episodes (100 unless set), at 1 and 5
# shots, 3 seeds each, at the cpu preset (conv4, 32 px); writes results/pretrain.md.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
export OMP_NUM_THREADS=1  # two runs at a time, one thread each; results do not depend on it

NAME=pretrain
RUNS=runs/recipes/$NAME
DIGITS=runs/recipes/digits-split-$NAME
EPISODES=${EPISODES:-100}
PRETRAIN=${PRETRAIN:-5}
SHORT="--preset cpu --data $DIGITS --episodes $EPISODES --test-episodes 300 --val-every 0 --quiet"
rm -rf "$RUNS" "$DIGITS" && mkdir -p "$RUNS" results
python recipes/digits_split.py "$DIGITS" > /dev/null

for epochs in 0 "$PRETRAIN"; do
  for k_shot in 1 5; do
    for seed in 0 1 2; do
      echo "mahalanobis-train $SHORT --pretrain-epochs $epochs --k-shot $k_shot --seed $seed --out $RUNS --name p$epochs-k$k_shot-s$seed"
    done
  done
done | xargs -P 2 -L 1 bash -c 'fewshot "$@" > /dev/null' fewshot

GROUP="--metric accuracy --group-by pretrain_epochs,k_shot"
{
  echo "# What pre-training buys (mahalanobis-train --pretrain-epochs)"
  echo
  echo "Rebuild with \`bash recipes/$NAME.sh\`, which writes scikit-learn's digits as an image folder split by class"
  echo "(\`python recipes/digits_split.py $DIGITS\`: train 0-4, test 5-9) and runs, for epochs in 0 $PRETRAIN,"
  echo "k_shot in 1 5, seed in 0 1 2:"
  echo
  echo '```'
  echo "fewshot mahalanobis-train $SHORT --pretrain-epochs \$epochs --k-shot \$k_shot --seed \$seed --out $RUNS --name ..."
  echo "fewshot table $RUNS/* $GROUP"
  echo '```'
  echo
  echo "5-way episodes at 32 px (the cpu preset: conv4, prototype adaptation, the Mahalanobis head), $EPISODES training"
  echo "episodes, 300 test episodes per run. A row with pretrain_epochs $PRETRAIN first trains the backbone with a linear"
  echo "classifier over the 5 training classes for $PRETRAIN epochs (batches of 64 images, Adam at --lr), then runs the"
  echo "same episodes from that backbone. Accuracy is the mean test-episode accuracy of a run, averaged over the 3 seeds"
  echo "of a row."
  echo
  fewshot table $RUNS/* $GROUP
  echo
  echo "Training time per run (s), the mean over the seeds of each row: pre-training's steps, then the episodes'."
  echo
  echo "| pretrain_epochs | k_shot | pretrain steps | pretrain_s | episodes_s |"
  echo "|---|---|---|---|---|"
  python - "$RUNS" <<'PY'
import json
import sys
from pathlib import Path

rows: dict[tuple[int, int], list[tuple[int, float, float]]] = {}
for run in sorted(Path(sys.argv[1]).iterdir()):
    knobs = json.loads((run / "config.json").read_text())["knobs"]
    steps = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    steps = [e for e in steps if e["event"] == "step"]
    pre = [e["step_s"] for e in steps if e["phase"] == "pretrain"]
    rows.setdefault((knobs["pretrain_epochs"]["value"], knobs["k_shot"]["value"]), []).append(
        (len(pre), sum(pre), sum(e["step_s"] for e in steps if e["phase"] == "train")))
for (epochs, k_shot), runs in sorted(rows.items()):
    n = len(runs)
    print(f"| {epochs} | {k_shot} | {runs[0][0]} | {sum(r[1] for r in runs) / n:.1f} | {sum(r[2] for r in runs) / n:.1f} |")
PY
} > results/$NAME.md
echo "wrote results/$NAME.md"
