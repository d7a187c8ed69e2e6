#!/usr/bin/env bash
# Every GPU check the open issues ask for, in one device call of at most 8 minutes including compilation:
# the parts run in order of importance, each under a time limit (seconds, overridable) cut to what is left
# of the suite's budget (SUITE_S=450, leaving 30 s of the 480 for start-up and the summary); a part that
# hits its limit leaves what it measured so far, and a part with under 15 s left is skipped and says so.
#   graph_check  (GRAPH_S=90)   issues 10, 24: benchmarks/graph_check.py, the quickstart, the CIFAR pixel ViT
#                and a ViT-B/2 step, each as a CUDA graph and eagerly from one seed: fails unless every graph
#                variant replayed a graph and the states agree
#   train_speed  (SPEED_S=190)  issue 10: the real Trainer loop (compiled) for the CIFAR-size pixel ViT alone
#                and 4 at once, then ViT-B/2 at batch 256: steps/s, img/s, MFU against the bf16 matmul peak
#                measured in the same run (targets: >= 300 steps/s alone, 4 at once >= 1.5x, MFU >= 55%)
#   backbones    (BACKBONE_S=35) issue 3: ViT-B/2 at 256 and ViT-XL/2 at 64, eager bf16 fwd+bwd alone
#   cifar_data, cifar_train, pareto_l0, pareto_l1  (15, CIFAR_S=80, 20, 20) issue 7: a short CIFAR-10 run
#                (CIFAR_STEPS=1500, the 20k subset from shared/data), then `minsnr pareto` at lambda 0 and at
#                relative lambda 1
#   speed_rest   (whatever is left, >= 60 s) ViT-XL/2 and the quickstart alone and 4 at once in the train loop
# Then benchmarks/gpu_summary.py merges every part's JSON into $OUT/gpu_suite.json (each part's exit status
# and seconds in $OUT/parts.tsv) and prints one Markdown table of the targets, met or not ($OUT/gpu_suite.md).
# ABLATE=1 runs issue 10's ablations instead (ABLATE_S=450), in this order until the budget is spent: the
# defaults (CIFAR alone and 4 at once, ViT-B/2) as the baseline on the same machine; CIFAR without the
# CUDA graph; 4 CIFAR runs with torch's default thread count (the old behaviour); CIFAR with the host
# loader; ViT-B/2 with the flash and cuDNN attention backends and with compile_mode=max-autotune-no-cudagraphs.
# Results land in $OUT (default benchmarks/results/gpu). SMOKE=1 runs tiny versions on the CPU to test
# the script itself (graph_check with --allow-eager: no graph can run there; targets read "n/a on cpu"):
#   SMOKE=1 bash benchmarks/gpu_suite.sh
# The lent machine's python3 has torch, timm, tqdm, pyyaml, scikit-learn, safetensors, scipy and matplotlib but
# no omegaconf and no registry: carry its wheel (pure Python; 2.4 vendors antlr4, PyYAML is there):
#   pip download --no-deps -d wheels omegaconf==2.4.0      (here, into the repository root)
# and this script installs wheels/omegaconf-*.whl when omegaconf is missing (minsnr itself comes by PYTHONPATH).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if ! $PY -c "import omegaconf" 2>/dev/null; then
    wheel=$(ls wheels/omegaconf-*.whl 2>/dev/null | head -n 1)
    [[ -n "$wheel" ]] && $PY -m pip install -q --no-index --no-deps "$wheel"
    $PY -c "import omegaconf" 2>/dev/null \
        || { echo "gpu_suite: $PY has no omegaconf and wheels/ holds no omegaconf wheel (see this script's header)"; exit 1; }
fi
if [[ "${SMOKE:-0}" == 1 ]]; then
    DEV=cpu; CHECK=(--smoke --allow-eager --steps 6); SPEED=(--smoke --seconds 0.5 --concurrent 2)
    BENCH=(--models vit_tiny --dtype fp32 --steps 2 --warmup 1); CIFAR_STEPS=20; CIFAR_MODEL="vit_tiny"; TASKS=4
    CIFAR_BATCH=32; REST=(--concurrent 1); COMPILE=false; ABL_SET=(--smoke --seconds 0.5); ATTN=(flash math)
else
    DEV=cuda; CHECK=(--steps 40); SPEED=(--seconds 6 --warmup 30 --concurrent 4); ATTN=(flash cudnn)
    BENCH=(--models vit_b --dtype bf16 --peak-tflops 989); CIFAR_STEPS=${CIFAR_STEPS:-1500}; CIFAR_MODEL="vit_s"
    TASKS=20; CIFAR_BATCH=128; REST=(); COMPILE=true; ABL_SET=(--seconds 6 --warmup 30)
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

BUDGET=${SUITE_S:-450}
: > "$OUT/parts.tsv"
allot() {  # allot CAP: the seconds a part gets, CAP cut to what is left of the budget
    local left=$((BUDGET - (SECONDS - start)))
    echo $(( $1 < left ? $1 : left ))
}
part() {  # part NAME SECONDS CMD...: CMD under its limit, output in $OUT/NAME.txt; parts.tsv gets its exit and time
    local name=$1 s=$2; shift 2
    if (( s < 15 )); then
        echo "== $name: skipped, $s s left of the ${BUDGET} s budget"
        printf '%s\t-\t0\t%s\tskipped: %s s left of the %s s budget\n' "$name" "$s" "$s" "$BUDGET" >> "$OUT/parts.tsv"
        return
    fi
    echo "== $name (limit $s s, at $((SECONDS - start)) s)"
    local t0=$SECONDS
    timeout -k 5 "$s" "$@" 2>&1 | tr '\r' '\n' | tee "$OUT/$name.txt"
    local rc=${PIPESTATUS[0]}
    [[ $rc == 0 ]] || echo "  ($name: exit $rc$([[ $rc == 124 ]] && echo ", stopped at its $s s limit"))"
    printf '%s\t%s\t%s\t%s\t\n' "$name" "$rc" "$((SECONDS - t0))" "$s" >> "$OUT/parts.tsv"
}
skip() {  # skip NAME WHY: a part that cannot run here, recorded as such
    echo "== $1: skipped, $2"
    printf '%s\t-\t0\t0\t%s\n' "$1" "$2" >> "$OUT/parts.tsv"
}

# issues 10, 24: the CUDA graph ran, and computes what the eager step computes (uncompiled, three workloads)
part graph_check "$(allot "${GRAPH_S:-90}")" $PY benchmarks/graph_check.py --device $DEV "${CHECK[@]}" \
    --out "$OUT/graph_check.json"

# issue 10: the README's speed targets through the real Trainer loop, most important first
s=$(allot "${SPEED_S:-190}")
part train_speed "$s" $PY benchmarks/train_speed.py --device $DEV --workloads cifar,vit_b "${SPEED[@]}" \
    --budget $((s - 15)) --out "$OUT/train_speed.json"

# issue 3: the backbones alone (eager; train_speed above has them compiled in the real loop)
part backbones "$(allot "${BACKBONE_S:-35}")" bash -c "$PY benchmarks/models.py --device $DEV --batch 256 ${BENCH[*]} \
    --out $OUT/vit_b.json && $PY benchmarks/models.py --device $DEV --batch 64 ${BENCH[*]/vit_b/vit_xl} --out $OUT/vit_xl.json"

# issue 7: CIFAR-10 (the 20k subset carried in shared/data), then the Pareto comparison of figure 4
data=$(ls shared/data/cifar10_jpeg_sub20k.npz ../shared/data/cifar10_jpeg_sub20k.npz 2>/dev/null | head -n 1)
if [[ -z "$data" ]]; then
    for name in cifar_data cifar_train pareto_l0 pareto_l1; do
        skip $name "no cifar10_jpeg_sub20k.npz in shared/data or ../shared/data"
    done
else
    part cifar_data "$(allot 15)" $PY "$(dirname "$data")/decode_cifar10.py" "$data" "$OUT/cifar20k.npz"
    part cifar_train "$(allot "${CIFAR_S:-80}")" $PY -m minsnr train configs/quickstart.yaml run_dir="$OUT/cifar" \
        resume=never train.device=$DEV data.source=npz data.path="$OUT/cifar20k.npz" data.hflip=true \
        model.name=$CIFAR_MODEL model.input_size=32 model.in_channels=3 model.args.patch_size=2 \
        train.steps=$CIFAR_STEPS train.batch_size=$CIFAR_BATCH optim.lr=2e-4 optim.betas=[0.99,0.99] ema.decay=0.999 \
        train.compile=$COMPILE log.every=500 log.preview_every=500 log.tensorboard=false checkpoint.every=500
    ckpt="$OUT/cifar/checkpoints/latest.pt"
    if [[ -f "$ckpt" ]]; then
        part pareto_l0 "$(allot 20)" $PY -m minsnr pareto "$ckpt" --tasks $TASKS --lambda 0 --device $DEV \
            --out "$OUT/pareto_l0"
        part pareto_l1 "$(allot 20)" $PY -m minsnr pareto "$ckpt" --tasks $TASKS --lambda 1 --relative-lambda \
            --device $DEV --out "$OUT/pareto_l1"
    else
        skip pareto_l0 "the CIFAR run left no checkpoint"; skip pareto_l1 "the CIFAR run left no checkpoint"
    fi
    # the numbers are in metrics.jsonl and pareto.json; the data and weights are too big to bring back
    rm -rf "$OUT/cifar20k.npz" "$OUT/cifar/checkpoints" "$OUT/cifar/ema.safetensors"
fi

# the rest, only with time to spare: the other train-loop workloads
s=$(allot 600)
if (( s >= 60 )); then
    part speed_rest "$s" $PY benchmarks/train_speed.py --device $DEV --workloads vit_xl,quickstart "${SPEED[@]}" "${REST[@]}" \
        --budget $((s - 15)) --out "$OUT/train_speed_rest.json"
else
    skip speed_rest "only $s s left of the ${BUDGET} s budget (needs 60)"
fi

echo "parts done in $((SECONDS - start)) s"
$PY benchmarks/gpu_summary.py "$OUT" --budget "$BUDGET"
echo "done in $((SECONDS - start)) s: $OUT"
