#!/usr/bin/env bash
# The MNIST recipe end to end (issue 13): train configs/mnist.yaml on 28x28 MNIST, train (or reuse) the
# MNIST classifier of `minsnr train-classifier`, draw 500 samples (50 per digit) with the config's sampler
# settings, and print the share the classifier reads as the asked digit (the issue asks for >= 80%).
#
#   bash benchmarks/mnist_recipe.sh [MNIST_NPZ]        # default ../shared/data/mnist.npz; ~10 min on 2 idle cores
#   SMOKE=1 bash benchmarks/mnist_recipe.sh            # 20 steps, 20 samples: tests the script, not the recipe
#
# Environment: OUT (results folder, default benchmarks/results/mnist_recipe), PY (python), THREADS (torch
# threads for training, default 2), NUM (samples, default 500). Writes $OUT/result.json, $OUT/grid.png (one
# row per digit), $OUT/train.txt (the training log) and keeps the classifier in $OUT/classifier.* for reuse.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/mnist.npz}
OUT=${OUT:-benchmarks/results/mnist_recipe}
PY=${PY:-python3}
THREADS=${THREADS:-2}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [[ "${SMOKE:-0}" == 1 ]]; then
    NUM=${NUM:-20}; TRAIN=(train.steps=20 log.every=10); CLF=(--limit 2000 --epochs 1)
else
    NUM=${NUM:-500}; TRAIN=(); CLF=()
fi
if [[ ! -f "$DATA" ]]; then
    echo "mnist_recipe: $DATA not found; pass an MNIST .npz with x_train/y_train/x_test/y_test as the first argument" >&2
    exit 1
fi
mkdir -p "$OUT"
rm -rf "$OUT/run"

load_before=$(cat /proc/loadavg)
start=$(date +%s.%N)
$PY -m minsnr train configs/mnist.yaml data.path="$DATA" run_dir="$OUT/run" resume=never train.threads="$THREADS" \
    log.tensorboard=false "${TRAIN[@]}" 2>&1 | tr '\r' '\n' | grep -v '^ *[0-9]*%|' | tee "$OUT/train.txt"
train_s=$($PY -c "import time; print(round(time.time() - $start, 1))")
load_after=$(cat /proc/loadavg)

if [[ ! -f "$OUT/classifier.json" ]]; then
    $PY -m minsnr train-classifier "$DATA" --out "$OUT/classifier" --device cpu "${CLF[@]}"
fi
rm -rf "$OUT/samples.npz" "$OUT/samples.npz.chunks"
$PY -m minsnr sample "$OUT/run/checkpoints/latest.pt" --num "$NUM" --batch 250 --out "$OUT/samples.npz" --device cpu

$PY - "$OUT" "$train_s" "$load_before" "$load_after" <<'EOF'
import json, sys
from pathlib import Path

import numpy as np

from minsnr.config import load_config
from minsnr.evaluate.classifier import classify, load_classifier
from minsnr.evaluate.grid import save_grid

out, train_s, load_before, load_after = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3], sys.argv[4]
clf, meta = load_classifier(out / "classifier")
with np.load(out / "samples.npz") as z:
    images, labels = z["arr_0"], z["arr_1"]
_, pred = classify(clf, [images[i:i + 500] for i in range(0, len(images), 500)], meta["image_shape"])
hit = pred == labels
cfg = load_config(out / "run" / "config.yaml")
result = {
    "share_classified_as_asked": float(hit.mean()),
    "per_digit": {str(c): float(hit[labels == c].mean()) for c in range(10) if (labels == c).any()},
    "samples": int(len(labels)), "classifier_test_accuracy": meta["test_accuracy"],
    "train_steps": cfg.train.steps, "train_seconds": train_s, "threads": cfg.train.threads,
    "loadavg_before": load_before, "loadavg_after": load_after,
    "sample": {"sampler": cfg.sample.sampler, "steps": cfg.sample.steps, "sigma_max": cfg.sample.sigma_max,
               "cfg_scale": cfg.sample.cfg_scale},
}
rows = [images[labels == c][:10] for c in range(10)]
per_row = min(len(r) for r in rows)
if per_row:
    save_grid(np.concatenate([r[:per_row] for r in rows]), out / "grid.png", nrow=per_row, min_width=320)
(out / "result.json").write_text(json.dumps(result, indent=2))
print(f"{100 * result['share_classified_as_asked']:.1f}% of {len(labels)} samples classified as the asked digit "
      f"(classifier: {100 * meta['test_accuracy']:.1f}% on real test digits); trained {cfg.train.steps} steps "
      f"in {train_s:.0f} s (load before {load_before.split()[0]}, after {load_after.split()[0]})")
print("per digit: " + "  ".join(f"{c}:{100 * a:.0f}%" for c, a in result["per_digit"].items()))
print(f"wrote {out / 'result.json'} and {out / 'grid.png'}")
EOF
