#!/usr/bin/env bash
# The prepared run on one lent GPU: at most 8 minutes, every step under its own time limit.
#
#   bash benchmarks/gpu_paper_study.sh          # the whole budget: GPU_PAPER_SECONDS (default 455)
#
# Steps, in this order, each writing its results (and summary.md / gpu_paper_study.json so far) as it ends;
# their limits on the GPU in seconds (each also cut to what is left of GPU_PAPER_SECONDS):
#   1. tests       90  the CUDA tests: tests/accel/test_cuda.py, tests/accel/test_cuda_graphs.py (captured update against
#                      eager, capture_meta_updates(l2w) against eager, the L2W update under set_sync_debug_mode('error'))
#   2. throughput 120  benchmarks/train_throughput.py on the quiet GPU: images/s and time over equal weighting,
#                      msdnet_l2w_cifar then msdnet_l2w_cifar_tiny, batch 1024 then 64, L2W at meta interval
#                      1 / 10 / 100, eager and CUDA graphs (the JSON is rewritten after every model and batch)
#   3. tf32        40  benchmarks/tf32_precision.py: the fp32 meta gradient against float64 with TF32 off /
#                      torch's default / on; the study uses --tf32 on only when that keeps the median cosine
#   4. early_exit  80  benchmarks/early_exit_batches.py: real early exit, EarlyExitPredictor (and the package in
#                      onnxruntime when its CUDA provider is installed) against the full model at batch 1, 64 and
#                      1024, msdnet_l2w_cifar and resnet18 wrapped as multi_exit_l2w, budgets q = 0.5 / 1 / 1.5:
#                      speed-up, efficiency (speed-up / FLOPs promise), host syncs per batch (JSON and CSV)
#   5. study     rest  the paper's CIFAR recipe on Fashion-MNIST (benchmarks/fidelity.py): msdnet_l2w_cifar,
#                      batch 1024, SGD lr 0.8 with cosine, momentum 0.9, weight decay 1e-4, no warmup, equal
#                      weighting against L2W (eps 0.8, col, q = 0.75, meta interval 1), seeds 0 1 2, all six runs
#                      at once with --device-data (and --cuda-graphs when step 2 measured them faster); as many
#                      whole epochs as fit in the time left (benchmarks/paper_study_plan.py, from step 2's images/s)
#   6. summary     20  fidelity.py --summarize-only (summary.md / .json, plots); then summary.md of the whole run
# Results: benchmarks/results/gpu/paper_study/ (GPU_PAPER_OUT); with $OUT set (the device tool), an archive of
# them (no training runs) and the logs are copied there after every step. Fashion-MNIST is read from
# GPU_PAPER_DATA (default .gpu_data/fashion-mnist, the four IDX files, else Debian's
# /usr/share/datasets/fashion-mnist). GPU_PAPER_ONLY="tests early_exit" runs only the steps named.
# Without CUDA (or with GPU_PAPER_SMOKE=1) every step runs at tiny sizes on the device there is, into
# .../cpu-smoke/, the study on a small random set in Fashion-MNIST's format (these are not GPU results; they
# show that every step runs). The preamble (wheels from .whl/, PYTHONPATH, CUDA, the steps) is steps.sh.
NAME=gpu_paper_study
RESULTS=${GPU_PAPER_OUT:-benchmarks/results/gpu/paper_study}
TOTAL=${GPU_PAPER_SECONDS:-455}
ONLY=${GPU_PAPER_ONLY:-}
SMOKE=${GPU_PAPER_SMOKE:-0}

summarize() {  # summary.md and gpu_paper_study.json from the step table and the results present
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
path = out / "early_exit_batches.json"
if path.is_file():
    result = json.loads(path.read_text())
    lines += ["", f"## early_exit_batches.py: real early exit against the full model ({result['device']}"
              f"{', ' + result['gpu'] if result.get('gpu') else ''}; batch 1: {result['singles']} one-image calls)",
              "", "| model | backend | batch | q | exit fractions | FLOPs promise | full ms | early ms | speed-up | "
              "efficiency | host syncs / batch |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        backend = r["backend"] + (f" ({r['provider']})" if r["provider"] else "")
        syncs = "-" if r["syncs_per_batch"] is None else f"{r['syncs_per_batch']:.1f}"
        fractions = " ".join(f"{f:.2f}" for f in r["exit_fractions"])
        lines.append(f"| {r['model']} | {backend} | {r['batch']} | {r['q']} | {fractions} | {r['promise']:.2f} | "
                     f"{r['time_full_s'] * 1e3:.2f} | {r['time_early_s'] * 1e3:.2f} | {r['speedup']:.2f} | "
                     f"{r['efficiency']:.3f} | {syncs} |")
    lines += [f"onnxruntime for {m}: {info['onnx']}" for m, info in result["models"].items() if info.get("onnx")]
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
}
. "$(dirname "$0")/steps.sh"
DATA=${GPU_PAPER_DATA:-.gpu_data/fashion-mnist}
[ -d "$DATA" ] || DATA=/usr/share/datasets/fashion-mnist

if [ "$SMOKE" = 1 ]; then
    MODEL=msdnet_l2w_cifar_tiny
    step tests 60 "$PY" -m pytest -q -p no:cacheprovider tests/accel/test_cuda_graphs.py
    step throughput 60 "$PY" benchmarks/train_throughput.py --device "$DEVICE" --models $MODEL --sizes 32 \
        --batch 8 --steps 1 --warmup 1 --intervals 1 4 --modes eager graphs --out "$RESULTS/train_throughput.json"
    step tf32 60 "$PY" benchmarks/tf32_precision.py --device "$DEVICE" --model $MODEL --dataset digits --batch 8 \
        --batches 1 --train-steps 0 --rounds 1 --out "$RESULTS/tf32_precision.json"
    step early_exit 90 "$PY" benchmarks/early_exit_batches.py --device "$DEVICE" --models $MODEL resnet18 \
        --onnx resnet18 --batch-sizes 1 8 --singles 2 --repeats 1 --train-seconds 0 --out-dir "$RESULTS"
    # the study on random images in Fashion-MNIST's format (2,000 + 500, brightness by class): seconds to evaluate
    DATA="$RESULTS/fashion-mnist-random"
    "$PY" - "$DATA" <<'EOF'
"""Four IDX files of random 28x28 images whose mean brightness depends on their label."""
import sys
from pathlib import Path

import numpy as np

out, rng = Path(sys.argv[1]), np.random.default_rng(0)
out.mkdir(parents=True, exist_ok=True)
for stem, n in (("train", 2000), ("t10k", 500)):
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    images = np.clip(rng.normal(25.0 * labels[:, None, None], 40.0, (n, 28, 28)), 0, 255).astype(np.uint8)
    head = bytes([0, 0, 8, 3]) + b"".join(v.to_bytes(4, "big") for v in (n, 28, 28))
    (out / f"{stem}-images-idx3-ubyte").write_bytes(head + images.tobytes())
    (out / f"{stem}-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1]) + n.to_bytes(4, "big") + labels.tobytes())
EOF
    # lr 0.8 saturates two steps at batch 8 (every confidence 1.0: no budgeted curves to compare)
    BATCH=8 LR=0.05 SEEDS="0" JOBS=2 STUDY_SECONDS=120
else
    MODEL=msdnet_l2w_cifar
    step tests 90 "$PY" -m pytest -q -p no:cacheprovider tests/accel/test_cuda.py tests/accel/test_cuda_graphs.py
    step throughput 120 "$PY" benchmarks/train_throughput.py --device cuda --models $MODEL msdnet_l2w_cifar_tiny \
        --sizes 32 32 --batch 1024 64 --intervals 1 10 100 --modes eager graphs --steps 10 --warmup 3 \
        --out "$RESULTS/train_throughput.json"
    step tf32 40 "$PY" benchmarks/tf32_precision.py --device cuda --model $MODEL --dataset digits --batch 128 \
        --batches 2 --train-steps 10 --rounds 3 --out "$RESULTS/tf32_precision.json"
    step early_exit 80 "$PY" benchmarks/early_exit_batches.py --device cuda --models $MODEL resnet18 \
        --onnx $MODEL resnet18 --batch-sizes 1 64 1024 --singles 32 --repeats 5 --train-seconds 8 --out-dir "$RESULTS"
    BATCH=1024 LR=0.8 SEEDS="0 1 2" JOBS=6 STUDY_SECONDS=
fi

# 5. the study: its length and mode from the measured throughput, TF32 as measured
TF32=off
"$PY" -c "import json, sys; sys.exit(0 if json.load(open('$RESULTS/tf32_precision.json')).get('tf32_safe') else 1)" \
    2>/dev/null && TF32=on
BUDGET=$(( $(left) - 20 ))  # the summary step after it
[ -n "$STUDY_SECONDS" ] && [ "$BUDGET" -gt "$STUDY_SECONDS" ] && BUDGET=$STUDY_SECONDS
mapfile -t PLAN < <("$PY" benchmarks/paper_study_plan.py "$RESULTS/train_throughput.json" "$BUDGET" \
    --model $MODEL --batch $BATCH)
LENGTH=${PLAN[0]:---steps 1}
GRAPHS=${PLAN[1]:-}
PLAN_JSON=${PLAN[2]:-}
[ -n "$PLAN_JSON" ] || PLAN_JSON='{"error": "paper_study_plan.py gave no plan"}'
printf '%s\n' "$PLAN_JSON" > "$RESULTS/study_plan.json"
[ "$SMOKE" = 1 ] && LENGTH="--steps 2"
echo "$NAME: study plan $LENGTH ${GRAPHS:-(eager)} --tf32 $TF32 in ${BUDGET}s"
STUDY="$RESULTS/study"
step study "$BUDGET" "$PY" benchmarks/fidelity.py --device "$DEVICE" --data-dir "$DATA" --out "$STUDY" \
    --model $MODEL --batch-size $BATCH --lr $LR --warmup-steps 0 --checkpoint-every 0 --seeds $SEEDS \
    --variants uniform l2w --jobs $JOBS $LENGTH \
    --extra --momentum 0.9 --weight-decay 1e-4 --backend func --device-data --tf32 $TF32 $GRAPHS
# (at its limit, timeout signals the study's whole process group: fidelity.py and its runs, nothing else)

# 6. summary (whatever result files exist)
step summary 20 "$PY" benchmarks/fidelity.py --summarize-only --out "$STUDY" --seeds $SEEDS --variants uniform l2w
head -80 "$RESULTS/summary.md"
finish
