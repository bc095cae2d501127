#!/usr/bin/env bash
# The fidelity study (benchmarks/fidelity.py) on one GPU, in one prepared run (issues 14 and 15).
#
#   STUDY_COMMIT=$(git rev-parse HEAD) bash benchmarks/gpu_study.sh
#
# What it runs, all on the one visible GPU (each run a separate process, all at once):
#   1. smoke     3 steps of the two method variants (L2W + KD, equal weighting + GE + KD) with the
#                full evaluation: stops the script at once if anything fails
#   2. study     --epochs 1 of equal weighting and L2W at meta interval 1 / 10 / 100 for seeds 0 1 2
#                (the CPU study's settings), and L2W + KD and equal + GE + KD for seed 0; every run's
#                result file also holds the entropy and patience exit rules; wall time capped by
#                GPU_STUDY_SECONDS (runs that do not finish leave no result file)
#   3. cuda tests tests/test_cuda.py, beside the study
#   4. cost      benchmarks/train_throughput.py on the then quiet GPU: fp32 images/s of equal
#                weighting and L2W at meta interval 1, 10, 100 (the runs of step 2 share the GPU, so
#                their times are not a cost measurement)
#   5. summary   fidelity.py --summarize-only, then everything (not the checkpoints) in one archive
# Results go to benchmarks/results/fidelity/gpu_epoch1/ (GPU_STUDY_OUT); with $OUT set, the archive
# and the logs are copied there. Fashion-MNIST is read from GPU_STUDY_DATA (default .gpu_data/fashion-mnist,
# the four IDX files). Wheels in .whl/ (e.g. higher, timm) are installed to /tmp/site first.
# GPU_STUDY_VARIANTS / GPU_STUDY_SEEDS / GPU_STUDY_METHODS (seed 0; empty: none) pick the runs, e.g. only the
# interval-1 runs another session could not finish: GPU_STUDY_VARIANTS=l2w GPU_STUDY_METHODS=l2w_kd
# (result files already in GPU_STUDY_OUT are kept and skipped).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RESULTS=${GPU_STUDY_OUT:-benchmarks/results/fidelity/gpu_epoch1}
DATA=${GPU_STUDY_DATA:-.gpu_data/fashion-mnist}
BUDGET=${GPU_STUDY_SECONDS:-430}
EPOCHS=${GPU_STUDY_EPOCHS:-1}
SMOKE_ONLY=${GPU_STUDY_SMOKE_ONLY:-0}
VARIANTS=${GPU_STUDY_VARIANTS-uniform l2w l2w_int10 l2w_int100}
SEEDS=${GPU_STUDY_SEEDS-0 1 2}
METHODS=${GPU_STUDY_METHODS-uniform_ge_kd l2w_kd}
COPY=${OUT:-}
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "gpu_study: wheel install failed"; exit 2; }
    export PYTHONPATH="/tmp/site:$PWD"
fi
DEVICE=cuda
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || DEVICE=cpu
echo "gpu_study: device $DEVICE, python $("$PY" -c 'import sys, torch, timm; print(sys.version.split()[0], "torch", torch.__version__, "timm", timm.__version__)')"
mkdir -p "$RESULTS"
COMMON=(--device "$DEVICE" --data-dir "$DATA" --checkpoint-every 100)
T0=$(date +%s)

finish() {  # archive what exists and copy it to $OUT
    tar czf /tmp/gpu_study.tar.gz --exclude=runs -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")" 2>/dev/null
    if [ -n "$COPY" ]; then
        cp /tmp/gpu_study.tar.gz "$COPY/"
        for f in "$RESULTS"/smoke/*.log "$RESULTS"/cuda_tests.log "$RESULTS"/throughput.log; do
            [ -f "$f" ] && cp "$f" "$COPY/" 2>/dev/null
        done
    fi
    echo "gpu_study: done after $(( $(date +%s) - T0 ))s"
}

# 1. smoke
SMOKE="$RESULTS/smoke"
rm -rf "$SMOKE"
timeout 150 "$PY" benchmarks/fidelity.py "${COMMON[@]}" --out "$SMOKE" --steps 3 --seeds 0 --jobs 2 \
    --variants uniform_ge_kd l2w_kd --checkpoint-every 2 --extra --backend func > "$SMOKE.log" 2>&1
if ! [ -f "$SMOKE/l2w_kd_seed0.json" ] || ! [ -f "$SMOKE/uniform_ge_kd_seed0.json" ]; then
    echo "gpu_study: smoke failed after $(( $(date +%s) - T0 ))s"; cat "$SMOKE.log"; tail -30 "$SMOKE"/*.log
    cp "$SMOKE.log" "$SMOKE/"; finish; exit 1
fi
mv "$SMOKE.log" "$SMOKE/"
echo "gpu_study: smoke passed after $(( $(date +%s) - T0 ))s"
[ "$SMOKE_ONLY" = 1 ] && { finish; exit 0; }

# 2. study (and 3. cuda tests beside it)
timeout -s INT "$BUDGET" "$PY" benchmarks/fidelity.py "${COMMON[@]}" --out "$RESULTS" --epochs "$EPOCHS" \
    --seeds $SEEDS --variants $VARIANTS --jobs 12 --extra --backend func > "$RESULTS/study.log" 2>&1 &
PIDS=($!)
if [ -n "$METHODS" ]; then
    timeout -s INT "$BUDGET" "$PY" benchmarks/fidelity.py "${COMMON[@]}" --out "$RESULTS" --epochs "$EPOCHS" \
        --seeds 0 --variants $METHODS --jobs 4 --extra --backend func > "$RESULTS/methods.log" 2>&1 &
    PIDS+=($!)
fi
if [ "$DEVICE" = cuda ]; then
    timeout 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py > "$RESULTS/cuda_tests.log" 2>&1 &
fi
wait "${PIDS[@]}"
# stop this study's runs that are still going (only runs writing to $RESULTS: other studies on the machine live on)
MINE="--run-one [a-z0-9_]+ [0-9]+ --out $RESULTS --"
pkill -INT -f -- "$MINE" 2>/dev/null && sleep 5
pkill -KILL -f -- "$MINE" 2>/dev/null
wait
echo "gpu_study: study ended after $(( $(date +%s) - T0 ))s: $(ls "$RESULTS"/*_seed*.json 2>/dev/null | wc -l) result files"
tail -3 "$RESULTS/cuda_tests.log" 2>/dev/null

# 4. cost on the quiet GPU
timeout 90 "$PY" benchmarks/train_throughput.py --device "$DEVICE" --precision no --models msdnet_l2w_cifar_tiny \
    --sizes 32 --batch 64 --steps 50 --intervals 1 10 100 --num-classes 10 --backend func \
    --out "$RESULTS/train_throughput.json" > "$RESULTS/throughput.log" 2>&1
tail -5 "$RESULTS/throughput.log"

# 5. summary
"$PY" benchmarks/fidelity.py --summarize-only --out "$RESULTS" --seeds 0 1 2 \
    --variants uniform l2w l2w_int10 l2w_int100 uniform_ge_kd l2w_kd > "$RESULTS/summary.log" 2>&1
head -40 "$RESULTS/summary.md" 2>/dev/null
finish
