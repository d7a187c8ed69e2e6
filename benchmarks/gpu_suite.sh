#!/usr/bin/env bash
# Every GPU check the open issues ask for, in one call (the lent device machine gives ~15 minutes):
#   1. ViT-B/2 at batch 256 and ViT-XL/2 at batch 64, bf16 + compile: img/s, peak memory, MFU (issue 3)
#   2. the quickstart-sized model's training steps/s with train.compile (DESIGN: hundreds per second)
#   3. a few minutes of CIFAR-10 training, then `minsnr pareto` at lambda 0 and relative lambda 1 (issue 7)
# Results land in $OUT (default benchmarks/results/gpu). SMOKE=1 runs tiny versions on the CPU to test
# the script itself:  SMOKE=1 bash benchmarks/gpu_suite.sh
# The lent machine has torch, safetensors, scipy and matplotlib but no registry: carry wheels of the rest,
#   pip download -d wheels omegaconf pyyaml tqdm scikit-learn   (match the device's Python version)
# and there: pip install --no-index --find-links wheels omegaconf pyyaml tqdm scikit-learn && pip install --no-deps -e .
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [[ "${SMOKE:-0}" == 1 ]]; then
    DEV=cpu; MODELS_B="vit_tiny"; MODELS_XL="vit_tiny"; BENCH=(--dtype fp32 --steps 2 --warmup 1)
    CIFAR_STEPS=20; CIFAR_MODEL="vit_tiny"; QS_STEPS=20; TASKS=4; COMPILE=false
else
    DEV=cuda; MODELS_B="vit_b"; MODELS_XL="vit_xl"; BENCH=(--dtype bf16 --compile --peak-tflops 989)
    CIFAR_STEPS=${CIFAR_STEPS:-4000}; CIFAR_MODEL="vit_s"; QS_STEPS=3000; TASKS=20; COMPILE=true
fi
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true

# 1. backbones
$PY benchmarks/models.py --device $DEV --batch 256 --models $MODELS_B "${BENCH[@]}" --out "$OUT/vit_b.json" | tee "$OUT/vit_b.txt"
$PY benchmarks/models.py --device $DEV --batch 64 --models $MODELS_XL "${BENCH[@]}" --out "$OUT/vit_xl.json" | tee "$OUT/vit_xl.txt"

# 2. small-model step rate through the real training loop (no previews, logs every 500 steps)
$PY -m minsnr train configs/quickstart.yaml run_dir="$OUT/quickstart" resume=never train.device=$DEV \
    train.steps=$QS_STEPS train.compile=$COMPILE log.every=500 log.preview_every=0 checkpoint.every=0 log.tensorboard=false \
    2>&1 | tr '\r' '\n' | tail -n 12 | tee "$OUT/quickstart.txt"

# 3. CIFAR-10 (the 20k subset carried in shared/data), then the Pareto comparison of figure 4
$PY ../shared/data/decode_cifar10.py ../shared/data/cifar10_jpeg_sub20k.npz "$OUT/cifar20k.npz"
$PY -m minsnr train configs/quickstart.yaml run_dir="$OUT/cifar" resume=never train.device=$DEV \
    data.source=npz data.path="$OUT/cifar20k.npz" data.hflip=true model.name=$CIFAR_MODEL model.input_size=32 \
    model.in_channels=3 model.args.patch_size=2 train.steps=$CIFAR_STEPS train.batch_size=128 optim.lr=2e-4 \
    optim.betas=[0.99,0.99] ema.decay=0.999 train.compile=$COMPILE log.every=500 log.preview_every=1000 log.tensorboard=false \
    checkpoint.every=1000 2>&1 | tr '\r' '\n' | tail -n 12 | tee "$OUT/cifar.txt"
for lam in "--lambda 0" "--lambda 1 --relative-lambda"; do
    $PY -m minsnr pareto "$OUT/cifar/checkpoints/latest.pt" --tasks $TASKS $lam --device $DEV \
        --out "$OUT/pareto_${lam//[^a-z0-9]/_}" 2>&1 | tr '\r' '\n' | grep -v "task gradients" | tee -a "$OUT/pareto.txt"
done
rm -f "$OUT/cifar20k.npz" "$OUT"/*/checkpoints/step_*.pt
echo "done: $OUT"
