#!/usr/bin/env bash
# Crash-consistency benchmark (issue 12). ckpt-chaos runs a 20-step quickstart once fault-free, then kills
# a fresh copy before (and, for torch.save / safetensors / open() writes, in the middle of) every file
# operation the run makes, resumes it with the same command and classifies the outcome: PASS, LOST_WORK
# (resumed from an older checkpoint than the newest complete one), HARD_FAIL (the resume failed) or
# SILENT_DIVERGENCE (the final state differs from the fault-free run; benchmarks/chaos_result.py).
# Every checkpoint is kept (checkpoint.keep=10), as ckpt-chaos needs to judge LOST_WORK. A step file is
# complete when its name is there (--ckpt-ignore-size): it only ever appears by an atomic rename of a
# fsynced temporary, and its size varies from run to run (it holds Python's unseeded `random` state).
#
# Two variants (issue 24), each with its own summary: one process, killed before and inside every file
# operation and SIGTERMed at every point (term: SIGTERM, then a kill after --grace s); and two gloo ranks
# (ckpt-chaos --ranks 2: RANK / WORLD_SIZE / MASTER_* set as a launcher does), rank 0 (the one that writes)
# killed at every point, then both resumed.
#
#   benchmarks/chaos.sh [WORK_DIR]          # about an hour on 2 cores; not part of `make test`
#
# Exits non-zero when any point of either variant is not PASS. PYTHON picks the interpreter (default
# .venv/bin/python), JOBS the crash points run at once (default 1), VARIANTS which to run (default
# "single ranks2"), MODES_SINGLE / MODES_RANKS2 their crash modes (default before,torn,term for both).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" -c "import ckpt_chaos" 2>/dev/null || "$PY" -m pip install --quiet ckpt-chaos==0.1.8
WORK=${1:-runs/chaos-$(date +%Y%m%d-%H%M%S)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=1
status=0
for variant in ${VARIANTS:-single ranks2}; do
    case $variant in
        single) extra=(--modes "${MODES_SINGLE:-before,torn,term}") ;;
        ranks2) extra=(--ranks 2 --crash-rank 0 --modes "${MODES_RANKS2:-before,torn,term}") ;;
        *) echo "unknown variant $variant (single, ranks2)"; exit 2 ;;
    esac
    start=$(date +%s)
    rc=0
    "$PY" -m ckpt_chaos run --work "$WORK/$variant" "${extra[@]}" --max-points 500 --jobs "${JOBS:-1}" --timeout 600 \
        --checkpoint-glob '{out}/checkpoints/step_*.pt' --ckpt-ignore-size --step-regex 'resumed from \S+ at step (\d+)' \
        --result-cmd "$PY benchmarks/chaos_result.py {out}" \
        --fail-on HARD_FAIL,SILENT_DIVERGENCE,LOST_WORK,CONTROL_FAIL --summary "$WORK/$variant/summary.md" \
        -- "$PY" -m minsnr train configs/quickstart.yaml 'run_dir={out}' train.steps=20 checkpoint.every=5 \
        checkpoint.keep=10 log.every=5 log.preview_every=0 log.tensorboard=false train.threads=1 train.device=cpu || rc=$?
    leftovers=$(find "$WORK/$variant" -path '*/out/*' -name '.*.tmp' | wc -l)
    echo "$variant: ckpt-chaos exit $rc after $(( $(date +%s) - start )) s; temporary files left after the resumes: $leftovers; load: $(uptime | sed 's/.*load/load/')"
    [[ $rc == 0 && $leftovers == 0 ]] || status=1
done
exit "$status"
