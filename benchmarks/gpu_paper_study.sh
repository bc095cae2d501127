#!/usr/bin/env bash
# The paper-recipe study on one lent GPU, in one prepared run of at most 8 minutes (issue 24).
#
#   STUDY_COMMIT=$(git rev-parse HEAD) bash benchmarks/gpu_paper_study.sh
#
# Steps, each under its own time limit, each writing its results (and the summary so far) as it ends:
#   1. tests      the CUDA tests: tests/test_cuda.py, tests/test_cuda_graphs.py (captured update against eager,
#                 capture_meta_updates(l2w) against eager, the L2W update under torch.cuda.set_sync_debug_mode('error'))
#   2. throughput benchmarks/train_throughput.py on the quiet GPU: images/s and time over equal weighting,
#                 msdnet_l2w_cifar then msdnet_l2w_cifar_tiny, batch 1024 then 64, L2W at meta interval
#                 1 / 10 / 100, eager and CUDA graphs (the JSON is rewritten after every model and batch)
#   3. tf32       benchmarks/tf32_precision.py: the fp32 meta gradient against float64 with TF32 off /
#                 torch's default / on; the study uses --tf32 on only when that keeps the median cosine
#   4. study      the paper's CIFAR recipe on Fashion-MNIST (benchmarks/fidelity.py): msdnet_l2w_cifar,
#                 batch 1024, SGD lr 0.8 with cosine, momentum 0.9, weight decay 1e-4, no warmup, equal
#                 weighting against L2W (eps 0.8, col, q = 0.75, meta interval 1), seeds 0 1 2, all six runs at
#                 once on the GPU with --device-data (and --cuda-graphs when step 2 measured them faster);
#                 as many whole epochs as fit in the time left (benchmarks/paper_study_plan.py, from step 2's
#                 images/s), so the runs finish and write their result files
#   5. summary    fidelity.py --summarize-only (summary.md / .json, plots), then summary.md of the whole script
# Results: benchmarks/results/gpu/paper_study/ (GPU_PAPER_OUT); with $OUT set (the device tool), an archive of
# them (no checkpoints) and the logs are copied there after every step. Fashion-MNIST is read from
# GPU_PAPER_DATA (default .gpu_data/fashion-mnist, the four IDX files, else Debian's
# /usr/share/datasets/fashion-mnist). Wheels in .whl/ are installed to /tmp/site first (as gpu_study.sh).
# GPU_PAPER_SECONDS (default 470) is the whole script's budget; GPU_PAPER_ONLY="tests study" runs only the
# steps named. Without CUDA (or with GPU_PAPER_SMOKE=1) every step runs at tiny sizes in seconds on the
# device there is, into .../cpu-smoke/ (these are not GPU results; they show that every step runs).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python
RESULTS=${GPU_PAPER_OUT:-benchmarks/results/gpu/paper_study}
DATA=${GPU_PAPER_DATA:-.gpu_data/fashion-mnist}
[ -d "$DATA" ] || DATA=/usr/share/datasets/fashion-mnist
TOTAL=${GPU_PAPER_SECONDS:-470}
COPY=${OUT:-}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "gpu_paper_study: wheel install failed"; exit 2; }
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
DEVICE=cuda
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null || DEVICE=cpu
SMOKE=${GPU_PAPER_SMOKE:-0}
if [ "$DEVICE" = cpu ] || [ "$SMOKE" = 1 ]; then
    SMOKE=1
    RESULTS=$RESULTS/cpu-smoke
    echo "gpu_paper_study: smoke run on $DEVICE at tiny sizes (these are not GPU results; they show every step runs)"
fi
echo "gpu_paper_study: device $DEVICE, $("$PY" -c 'import sys, torch, timm; print("python", sys.version.split()[0], "torch", torch.__version__, "timm", timm.__version__)')"
mkdir -p "$RESULTS"
STATUS="$RESULTS/steps.tsv"
: > "$STATUS"
T0=$(date +%s)
left() { echo $(( TOTAL - ($(date +%s) - T0) )); }

save() {  # the summary so far, then (device tool) an archive of the results and the logs into $OUT
    "$PY" - "$RESULTS" "$DEVICE" "$SMOKE" "$(( $(date +%s) - T0 ))" <<'EOF'
"""summary.md and gpu_paper_study.json from the step table and the results present."""
import json
import sys
from pathlib import Path

out, device, smoke, seconds = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])
steps = [dict(zip(("step", "status", "seconds"), line.split("\t"))) for line in
         (out / "steps.tsv").read_text().splitlines() if line]
lines = [f"# GPU paper study ({'smoke, ' if smoke else ''}{device}), {seconds} s so far", "",
         "| step | status | seconds |", "|---|---|---|"] + [f"| {s['step']} | {s['status']} | {s['seconds']} |" for s in steps]
log = out / "tests.log"
if log.is_file():
    lines += ["", "## tests", "    " + (log.read_text().strip().splitlines() or [""])[-1]]
path = out / "train_throughput.json"
if path.is_file():
    result = json.loads(path.read_text())
    lines += ["", f"## train_throughput.py ({result['device']}, torch {result['torch']}, precision {result['precision']}, "
              f"backend {result['backend']}, tf32 {result.get('tf32')})",
              "| model | batch | weighting | meta interval | mode | images/s | time / equal weighting | graphs |",
              "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['batch']} | {r['weighting']} | {r['meta_interval'] or '-'} | {r['mode']} | "
              f"{r['images_per_s']:.0f} | {r['time_over_uniform']:.2f} | {r.get('graphs', '-')} |" for r in result["rows"]]
path = out / "tf32_precision.json"
if path.is_file():
    result = json.loads(path.read_text())
    lines += ["", "## tf32_precision.py: the fp32 meta gradient against float64", "",
              "| state | tf32 | cos min | cos median | rel median | non-finite |", "|---|---|---|---|---|---|"]
    for state, by in result["summary"].items():
        for name, s in by.items():
            nums = " | ".join(f"{s[k]:.6f}" if k in s else "-" for k in ("cos_min", "cos_median", "rel_median"))
            lines.append(f"| {state} | {name} | {nums} | {s['nonfinite']} |")
    lines += ["", result["verdict"]]
path = out / "study_plan.json"
if path.is_file():
    lines += ["", "## study plan", "    " + path.read_text().strip()]
summary = out / "study" / "summary.md"
if summary.is_file():
    lines += ["", "## study (benchmarks/fidelity.py --summarize-only)", "", summary.read_text()]
elif (out / "study").is_dir():
    done = sorted(p.name for p in (out / "study").glob("*_seed*.json"))
    lines += ["", f"## study: {len(done)} result files so far: {', '.join(done) or 'none'}"]
(out / "summary.md").write_text("\n".join(lines) + "\n")
(out / "gpu_paper_study.json").write_text(json.dumps({"device": device, "smoke": smoke, "seconds": seconds,
                                                      "steps": steps}, indent=2) + "\n")
EOF
    if [ -n "$COPY" ]; then
        tar czf "$COPY/gpu_paper_study.tar.gz" --exclude=runs -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")" 2>/dev/null
        cp "$RESULTS"/*.log "$RESULTS"/summary.md "$COPY/" 2>/dev/null
    fi
}

# step NAME LIMIT_S COMMAND...: its output in NAME.log, its status and seconds in steps.tsv, then save
. benchmarks/steps.sh
step() {
    local name=$1 limit=$2
    shift 2
    if [ -n "${GPU_PAPER_ONLY:-}" ] && [[ " $GPU_PAPER_ONLY " != *" $name "* ]]; then
        printf '%s\t%s\t0\n' "$name" "not run (GPU_PAPER_ONLY)" >> "$STATUS"
        return
    fi
    [ "$limit" -gt "$(left)" ] && limit=$(left)
    if [ "$limit" -lt 5 ]; then
        printf '%s\t%s\t0\n' "$name" "not run (no time left)" >> "$STATUS"
        save
        return
    fi
    timed_step gpu_paper_study "$RESULTS/$name.log" "$STATUS" "$name" "$limit" "$@"
    echo "gpu_paper_study: $(left)s left"
    tail -3 "$RESULTS/$name.log"
    save
}

if [ "$SMOKE" = 1 ]; then
    MODEL=msdnet_l2w_cifar_tiny
    step tests 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda_graphs.py
    step throughput 120 "$PY" benchmarks/train_throughput.py --device "$DEVICE" --models $MODEL --sizes 32 \
        --batch 8 --steps 1 --warmup 1 --intervals 1 4 --modes eager graphs --out "$RESULTS/train_throughput.json"
    step tf32 120 "$PY" benchmarks/tf32_precision.py --device "$DEVICE" --model $MODEL --dataset digits --batch 8 \
        --batches 1 --train-steps 0 --rounds 1 --out "$RESULTS/tf32_precision.json"
    BATCH=8 SEEDS="0" JOBS=2 STUDY_SECONDS=300
else
    MODEL=msdnet_l2w_cifar
    step tests 100 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_cuda_graphs.py
    step throughput 130 "$PY" benchmarks/train_throughput.py --device cuda --models $MODEL msdnet_l2w_cifar_tiny \
        --sizes 32 32 --batch 1024 64 --intervals 1 10 100 --modes eager graphs --steps 10 --warmup 3 \
        --out "$RESULTS/train_throughput.json"
    step tf32 60 "$PY" benchmarks/tf32_precision.py --device cuda --model $MODEL --dataset digits --batch 128 \
        --batches 2 --train-steps 10 --rounds 3 --out "$RESULTS/tf32_precision.json"
    BATCH=1024 SEEDS="0 1 2" JOBS=6 STUDY_SECONDS=
fi

# 4. the study: its length and mode from the measured throughput, TF32 as measured
TF32=off
"$PY" -c "import json, sys; sys.exit(0 if json.load(open('$RESULTS/tf32_precision.json')).get('tf32_safe') else 1)" \
    2>/dev/null && TF32=on
BUDGET=$(( $(left) - 25 ))  # the summary and the copy after it
[ -n "$STUDY_SECONDS" ] && [ "$BUDGET" -gt "$STUDY_SECONDS" ] && BUDGET=$STUDY_SECONDS
mapfile -t PLAN < <("$PY" benchmarks/paper_study_plan.py "$RESULTS/train_throughput.json" "$BUDGET" \
    --model $MODEL --batch $BATCH)
LENGTH=${PLAN[0]:---steps 1}
GRAPHS=${PLAN[1]:-}
PLAN_JSON=${PLAN[2]:-}
[ -n "$PLAN_JSON" ] || PLAN_JSON='{"error": "paper_study_plan.py gave no plan"}'
printf '%s\n' "$PLAN_JSON" > "$RESULTS/study_plan.json"
[ "$SMOKE" = 1 ] && LENGTH="--steps 2"
echo "gpu_paper_study: study plan $LENGTH ${GRAPHS:-(eager)} --tf32 $TF32 in ${BUDGET}s"
STUDY="$RESULTS/study"
step study "$BUDGET" "$PY" benchmarks/fidelity.py --device "$DEVICE" --data-dir "$DATA" --out "$STUDY" \
    --model $MODEL --batch-size $BATCH --lr 0.8 --warmup-steps 0 --checkpoint-every 0 --seeds $SEEDS \
    --variants uniform l2w --jobs $JOBS $LENGTH \
    --extra --momentum 0.9 --weight-decay 1e-4 --backend func --device-data --tf32 $TF32 $GRAPHS
# (at its limit, timeout signals the study's whole process group: fidelity.py and its runs, nothing else)

# 5. summary (whatever result files exist)
step summary 30 "$PY" benchmarks/fidelity.py --summarize-only --out "$STUDY" --seeds $SEEDS --variants uniform l2w
FAILED=$(awk -F'\t' '$2 != "ok" && $2 !~ /^not run \(GPU_PAPER_ONLY/' "$STATUS" | wc -l)
echo "gpu_paper_study: done in $(( $(date +%s) - T0 ))s, $FAILED step(s) not ok; summary: $RESULTS/summary.md"
head -60 "$RESULTS/summary.md"
[ "$FAILED" -eq 0 ]
