#!/usr/bin/env bash
# What pre-training buys: mahalanobis-train with and without --pretrain-epochs PRETRAIN (5 unless set) before
# EPISODES training episodes (100 unless set), at 1 and 5 shots, 3 seeds each, at the cpu preset (conv4, 32 px), on
# two sets: scikit-learn's digits split by class (recipes/digits_split.py: 5 training classes) and the built-in
# images (64 training classes, miniImageNet's split); writes results/pretrain.md.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
export OMP_NUM_THREADS=1  # two runs at a time, one thread each; results do not depend on it

NAME=pretrain
RUNS=runs/recipes/$NAME
DIGITS=runs/recipes/digits-split-$NAME
EPISODES=${EPISODES:-100}
PRETRAIN=${PRETRAIN:-5}
SHORT="--preset cpu --episodes $EPISODES --test-episodes 300 --val-every 0 --quiet"
rm -rf "$RUNS" "$DIGITS" && mkdir -p "$RUNS" results
python recipes/digits_split.py "$DIGITS" > /dev/null

for set in digits builtin; do
  data=$([ "$set" = digits ] && echo "--data $DIGITS" || true)
  for epochs in 0 "$PRETRAIN"; do
    for k_shot in 1 5; do
      for seed in 0 1 2; do
        echo "mahalanobis-train $SHORT $data --pretrain-epochs $epochs --k-shot $k_shot --seed $seed --out $RUNS" \
             "--name $set-p$epochs-k$k_shot-s$seed"
      done
    done
  done
done | xargs -P 2 -L 1 bash -c 'fewshot "$@" > /dev/null' fewshot

GROUP="--metric accuracy --group-by pretrain_epochs,k_shot"
{
  echo "# What pre-training buys (mahalanobis-train --pretrain-epochs)"
  echo
  echo "Rebuild with \`bash recipes/$NAME.sh\`, which writes scikit-learn's digits as an image folder split by class"
  echo "(\`python recipes/digits_split.py $DIGITS\`: train 0-4, test 5-9) and runs, for each set (digits with"
  echo "\`--data $DIGITS\`, the built-in images with no \`--data\`), epochs in 0 $PRETRAIN, k_shot in 1 5, seed in 0 1 2:"
  echo
  echo '```'
  echo "fewshot mahalanobis-train $SHORT [--data $DIGITS] --pretrain-epochs \$epochs --k-shot \$k_shot --seed \$seed --out $RUNS --name \$set-..."
  echo "fewshot table $RUNS/\$set-* $GROUP"
  echo '```'
  echo
  echo "5-way episodes at 32 px (the cpu preset: conv4, prototype adaptation, the Mahalanobis head), $EPISODES training"
  echo "episodes, 300 test episodes per run. A row with pretrain_epochs $PRETRAIN first trains the backbone with a linear"
  echo "classifier over the training split's classes for $PRETRAIN epochs (batches of 64 images, Adam at --lr), then"
  echo "runs the same episodes from that backbone. Accuracy is the mean test-episode accuracy of a run, averaged over"
  echo "the 3 seeds of a row."
  for set in digits builtin; do
    echo
    if [ "$set" = digits ]; then
      echo "## Digits: 5 training classes (0-4), 5 test classes (5-9), 1,797 real scans"
    else
      echo "## Built-in images: 64 training classes, 20 test classes, 60 images each"
    fi
    echo
    fewshot table $RUNS/$set-* $GROUP
  done
  echo
  echo "Training time per run (s), the mean over the seeds of each row: pre-training's steps, then the episodes'."
  echo
  echo "| set | pretrain_epochs | k_shot | pretrain steps | pretrain_s | episodes_s |"
  echo "|---|---|---|---|---|---|"
  python - "$RUNS" <<'PY'
import json
import sys
from pathlib import Path

rows: dict[tuple[str, int, int], list[tuple[int, float, float]]] = {}
for run in sorted(Path(sys.argv[1]).iterdir()):
    knobs = json.loads((run / "config.json").read_text())["knobs"]
    steps = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    steps = [e for e in steps if e["event"] == "step"]
    pre = [e["step_s"] for e in steps if e["phase"] == "pretrain"]
    key = (run.name.split("-")[0], knobs["pretrain_epochs"]["value"], knobs["k_shot"]["value"])
    rows.setdefault(key, []).append((len(pre), sum(pre), sum(e["step_s"] for e in steps if e["phase"] == "train")))
for (name, epochs, k_shot), runs in sorted(rows.items(), key=lambda row: (row[0][0] != "digits", row[0][1:])):
    n = len(runs)
    print(f"| {name} | {epochs} | {k_shot} | {runs[0][0]} | {sum(r[1] for r in runs) / n:.1f} "
          f"| {sum(r[2] for r in runs) / n:.1f} |")
PY
} > results/$NAME.md
echo "wrote results/$NAME.md"
