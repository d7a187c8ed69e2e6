#!/usr/bin/env bash
# Every GPU check the open issues ask for, in one device call of at most 8 minutes: each part has a time
# limit (seconds, overridable), and a part that hits it leaves what it measured so far.
#   0. issue 10, benchmarks/graph_check.py (<= 75 s): the captured step against the eager step and the host
#      loader, 60 quickstart steps from one seed: weights, EMA and optimizer state compared
#   1. issue 10, benchmarks/train_speed.py (SPEED_S=225): the real Trainer loop for the CIFAR-size pixel
#      ViT alone and 4 at once, ViT-B/2 at batch 256, ViT-XL/2 at 64, the quickstart alone and 4 at once;
#      img/s, steps/s, TFLOP/s, MFU against the bf16 matmul peak measured in the same run, memory, warm-up
#   2. issue 3, backbones alone (BACKBONE_S=40): ViT-B/2 at 256 and ViT-XL/2 at 64, eager bf16 fwd+bwd
#   3. issue 7 (CIFAR_S=145): a short CIFAR-10 run (CIFAR_STEPS=1500), then `minsnr pareto` at lambda 0
#      and at relative lambda 1
# ABLATE=1 runs issue 10's ablations instead (ABLATE_S=450), in this order until the budget is spent: the
# defaults (CIFAR alone and 4 at once, ViT-B/2) as the baseline on the same machine; CIFAR without the
# CUDA graph; 4 CIFAR runs with torch's default thread count (the old behaviour); CIFAR with the host
# loader; ViT-B/2 with the flash and cuDNN attention backends and with compile_mode=max-autotune-no-cudagraphs.
# Results land in $OUT (default benchmarks/results/gpu). SMOKE=1 runs tiny versions on the CPU to test
# the script itself:  SMOKE=1 bash benchmarks/gpu_suite.sh
# The lent machine has torch, safetensors, scipy and matplotlib but no registry: carry wheels of the rest,
#   pip download -d wheels omegaconf pyyaml tqdm scikit-learn   (match the device's Python version)
# and there: pip install --no-index --find-links wheels omegaconf pyyaml tqdm scikit-learn && pip install --no-deps -e .
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [[ "${SMOKE:-0}" == 1 ]]; then
    DEV=cpu; SPEED=(--smoke --workloads cifar,vit_b --seconds 0.5); BENCH=(--models vit_tiny --dtype fp32 --steps 2 --warmup 1)
    CIFAR_STEPS=20; CIFAR_MODEL="vit_tiny"; TASKS=4; COMPILE=false; ABL_SET=(--smoke --seconds 0.5); ATTN=(flash math)
    CHECK_STEPS=6
else
    DEV=cuda; SPEED=(--workloads cifar,vit_b,vit_xl,quickstart --seconds 6 --warmup 30); ATTN=(flash cudnn)
    BENCH=(--models vit_b --dtype bf16 --peak-tflops 989); CIFAR_STEPS=${CIFAR_STEPS:-1500}; CIFAR_MODEL="vit_s"
    TASKS=20; COMPILE=true; ABL_SET=(--seconds 6 --warmup 30); CHECK_STEPS=60
fi
limit() {  # limit SECONDS CMD...: run CMD, stopped after SECONDS; never ends the suite
    local s=$1; shift
    timeout -k 10 "$s" "$@"; local rc=$?
    [[ $rc == 0 ]] || echo "  (exit $rc$([[ $rc == 124 ]] && echo ": stopped at the ${s} s limit"): $*)"
}
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
start=$SECONDS

if [[ "${ABLATE:-0}" == 1 ]]; then
    budget=${ABLATE_S:-450}
    run() {  # run NAME SECONDS ARGS...: one train_speed.py call, cut to what is left of the budget
        local name=$1 s=$2; shift 2; local left=$((budget - (SECONDS - start)))
        (( left < s )) && s=$left
        (( s < 40 )) && { echo "skipped $name: ablation budget spent"; return; }
        echo "== $name"
        limit "$s" $PY benchmarks/train_speed.py "${ABL_SET[@]}" --budget $((s - 10)) --out "$OUT/ablate_$name.json" "$@" \
            2>&1 | tee "$OUT/ablate_$name.txt"
    }
    torch_threads=$(env -u OMP_NUM_THREADS $PY -c "import torch; print(torch.get_num_threads())")  # the old default
    run baseline 140 --workloads cifar,vit_b --concurrent 4  # the defaults, on this same machine
    run cifar_no_graph 60 --workloads cifar --concurrent 1 --set train.cuda_graph=false
    run cifar_x4_torch_threads 75 --workloads cifar --concurrent 4 --set train.threads=$torch_threads
    run cifar_host_data 60 --workloads cifar --concurrent 1 --set train.data_on_device=false
    for attn in "${ATTN[@]}"; do
        run vit_b_$attn 70 --workloads vit_b --set train.attention=$attn
    done
    run vit_b_max_autotune 180 --workloads vit_b --set train.compile_mode=max-autotune-no-cudagraphs
    echo "done in $((SECONDS - start)) s: $OUT"
    exit 0
fi

# 0. issue 10: the CUDA graph computes what the eager step computes
limit 75 $PY benchmarks/graph_check.py --device $DEV --steps $CHECK_STEPS --out "$OUT/graph_check.json" 2>&1 \
    | tr '\r' '\n' | grep -v "step/s\|s/step\|^ *$" | tee "$OUT/graph_check.txt"

# 1. issue 10: training speed through the Trainer loop
limit "${SPEED_S:-225}" $PY benchmarks/train_speed.py --device $DEV "${SPEED[@]}" --budget $((${SPEED_S:-225} - 15)) \
    --out "$OUT/train_speed.json" 2>&1 | tee "$OUT/train_speed.txt"

# 2. issue 3: the backbones alone (eager; train_speed above has them compiled in the real loop)
limit "${BACKBONE_S:-40}" bash -c "$PY benchmarks/models.py --device $DEV --batch 256 ${BENCH[*]} --out $OUT/vit_b.json \
    && $PY benchmarks/models.py --device $DEV --batch 64 ${BENCH[*]/vit_b/vit_xl} --out $OUT/vit_xl.json" 2>&1 | tee "$OUT/backbones.txt"

# 3. issue 7: CIFAR-10 (the 20k subset carried in shared/data), then the Pareto comparison of figure 4
limit 20 $PY ../shared/data/decode_cifar10.py ../shared/data/cifar10_jpeg_sub20k.npz "$OUT/cifar20k.npz"
left=$(( ${CIFAR_S:-145} - 60 ))
limit $left $PY -m minsnr train configs/quickstart.yaml run_dir="$OUT/cifar" resume=never train.device=$DEV \
    data.source=npz data.path="$OUT/cifar20k.npz" data.hflip=true model.name=$CIFAR_MODEL model.input_size=32 \
    model.in_channels=3 model.args.patch_size=2 train.steps=$CIFAR_STEPS train.batch_size=128 optim.lr=2e-4 \
    optim.betas=[0.99,0.99] ema.decay=0.999 train.compile=$COMPILE log.every=500 log.preview_every=500 log.tensorboard=false \
    checkpoint.every=500 2>&1 | tr '\r' '\n' | tail -n 12 | tee "$OUT/cifar.txt"
for lam in "--lambda 0" "--lambda 1 --relative-lambda"; do
    limit 25 $PY -m minsnr pareto "$OUT/cifar/checkpoints/latest.pt" --tasks $TASKS $lam --device $DEV \
        --out "$OUT/pareto_${lam//[^a-z0-9]/_}" 2>&1 | tr '\r' '\n' | grep -v "task gradients" | tee -a "$OUT/pareto.txt"
done
rm -f "$OUT/cifar20k.npz" "$OUT"/*/checkpoints/step_*.pt
echo "done in $((SECONDS - start)) s: $OUT"
