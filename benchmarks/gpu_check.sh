#!/usr/bin/env bash
# The GPU check of issue 12: one prepared script, at most about 9 minutes on one H100 or H200.
# (On an H200 the precision steps' 100-step L2W training alone took about 50 s: they train 40 steps.)
#
#   bash benchmarks/gpu_check.sh            # writes benchmarks/results/gpu/ (JSON, logs, summary.md)
#
# On a CUDA machine it runs, each under its own time limit (a step that fails or runs out is recorded
# and the next one starts):
#   1. tests     the CUDA tests (tests/accel/test_cuda.py) and the precision / meta-step tests
#   2. meta_step benchmarks/meta_step.py --device cuda, both backends: time ratios and peak memory
#   3. early_exit benchmarks/early_exit_latency.py --device cuda
#   4. precision benchmarks/meta_precision.py --device cuda, bf16 and fp16 (backend higher, then func)
#   5. throughput benchmarks/train_throughput.py: images/s at bf16, equal weighting vs L2W at meta
#                interval 1 and 100, msdnet_l2w_cifar (32 px) and msdnet_l2w (224 px), batch 64
# Without CUDA it says so and runs a CPU-sized smoke of the same steps into benchmarks/results/gpu/cpu-smoke/
# (tiny model, one batch, a step or two each), which tests/benchmarks/test_gpu_check.py runs in the default test suite.
# GPU_CHECK_OUT=DIR writes elsewhere; GPU_CHECK_ONLY="tests throughput" runs only the steps named;
# GPU_CHECK_SMOKE=1 runs the smoke on a GPU machine too; PYTHON=... picks the interpreter (default:
# .venv/bin/python if present). The preamble (wheels from .whl/, PYTHONPATH, CUDA, the steps) is steps.sh.
NAME=gpu_check
RESULTS=${GPU_CHECK_OUT:-benchmarks/results/gpu}
ONLY=${GPU_CHECK_ONLY:-}
TOTAL=
SMOKE=${GPU_CHECK_SMOKE:-0}

summarize() {  # summary.md and gpu_check.json from the step table, the logs and the benchmarks' JSON files
    "$PY" - "$RESULTS" "$MODE" "${GPU_NAME:-cpu}" "$(( $(date +%s) - T0 ))" <<'EOF'
"""summary.md and gpu_check.json from the step table, the logs and the benchmarks' JSON files."""
import json
import sys
from pathlib import Path

out, mode, device, seconds = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
steps = [dict(zip(("step", "status", "seconds"), line.split("\t"))) for line in
         (out / "steps.tsv").read_text().splitlines() if line]
lines = [f"# GPU check ({mode}, {device}), {seconds} s", "",
         "| step | status | seconds |", "|---|---|---|"]
lines += [f"| {s['step']} | {s['status']} | {s['seconds']} |" for s in steps]


def tail(name, n=3):
    log = out / f"{name}.log"
    return log.read_text().strip().splitlines()[-n:] if log.is_file() else []


lines += ["", "## tests", *[f"    {t}" for t in tail("tests", 1)]]
lines += ["", "## meta_step.py", *[f"    {t}" for t in tail("meta_step", 4)]]
lines += ["", "## early_exit_latency.py", *[f"    {t}" for t in tail("early_exit", 1)]]
for backend in ("higher", "func"):
    path = out / f"meta_precision_{backend}.json"
    if path.is_file():
        result = json.loads(path.read_text())
        lines += ["", f"## meta_precision.py (backend {backend}): cosine with float64 (min / median / max over batches)",
                  "| state | precision | policy | cos min | cos median | cos max | rel median | non-finite |",
                  "|---|---|---|---|---|---|---|---|"]
        for state, by_prec in result["summary"].items():
            for prec, by_pol in by_prec.items():
                for pol, s in by_pol.items():
                    nums = " | ".join(f"{s[k]:.4f}" if k in s else "-"
                                      for k in ("cos_min", "cos_median", "cos_max", "rel_median"))
                    lines.append(f"| {state} | {prec} | {pol} | {nums} | {s['nonfinite']}/{s['batches']} |")
        if result.get("timing"):
            t = result["timing"]
            lines.append("")
            lines.append("ms per L2W loader batch: " + ", ".join(f"{k} {v:.1f}" for k, v in
                                                                 t["ms_per_loader_batch"].items()))
path = out / "train_throughput.json"
if path.is_file():
    result = json.loads(path.read_text())
    lines += ["", f"## train_throughput.py ({result['precision']}, meta step {result['meta_precision']})",
              "| model | px | weighting | meta interval | images/s | time / equal weighting | peak MiB |",
              "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        memory = f"{r['peak_memory_mib']:.0f}" if "peak_memory_mib" in r else "-"
        lines.append(f"| {r['model']} | {r['size']} | {r['weighting']} | {r['meta_interval'] or '-'} | "
                     f"{r['images_per_s']:.1f} | {r.get('time_over_uniform', 1.0):.2f} | {memory} |")
(out / "summary.md").write_text("\n".join(lines) + "\n")
(out / "gpu_check.json").write_text(json.dumps({"mode": mode, "device": device, "seconds": seconds,
                                                "steps": steps}, indent=2) + "\n")
EOF
}
. "$(dirname "$0")/steps.sh"
MODE=cuda
[ "$SMOKE" = 1 ] && MODE=cpu-smoke
DATASET=digits
[ -d /usr/share/datasets/fashion-mnist ] && DATASET=fashion-mnist

if [ "$MODE" = cuda ]; then
    step tests 80 "$PY" -m pytest -q -p no:cacheprovider tests/accel/test_cuda.py tests/meta/test_precision.py tests/meta/test_meta.py
    step meta_step 60 "$PY" benchmarks/meta_step.py --device cuda --backend func --compare --rounds 5
    step early_exit 60 "$PY" benchmarks/early_exit_latency.py --device cuda --train-seconds 15 --out-dir "$RESULTS"
    step precision_higher 120 "$PY" benchmarks/meta_precision.py --device cuda --dataset "$DATASET" \
        --precisions bf16 fp16 --batches 5 --train-steps 40 --rounds 5 --backend higher \
        --out "$RESULTS/meta_precision_higher.json"
    step precision_func 100 "$PY" benchmarks/meta_precision.py --device cuda --dataset "$DATASET" \
        --precisions bf16 fp16 --batches 5 --train-steps 40 --rounds 5 --backend func \
        --out "$RESULTS/meta_precision_func.json"
    step throughput 100 "$PY" benchmarks/train_throughput.py --device cuda --precision bf16 \
        --models msdnet_l2w_cifar msdnet_l2w --sizes 32 224 --batch 64 --steps 50 --intervals 1 100 \
        --out "$RESULTS/train_throughput.json"
else
    step tests 60 "$PY" -m pytest -q -p no:cacheprovider tests/accel/test_cuda.py
    step meta_step 120 "$PY" benchmarks/meta_step.py --device cpu --backend func --compare --rounds 1 --batch 4 \
        --no-memory
    step early_exit 120 "$PY" benchmarks/early_exit_latency.py --device cpu --model msdnet_l2w_cifar_tiny \
        --train-seconds 1 --repeats 1 --qs 0.5 1.0 --batch-size 32 --out-dir "$RESULTS"
    step precision_higher 150 "$PY" benchmarks/meta_precision.py --device cpu --dataset digits \
        --precisions bf16 fp16 --batches 1 --batch 8 --train-steps 1 --rounds 0 --backend higher \
        --out "$RESULTS/meta_precision_higher.json"
    step precision_func 120 "$PY" benchmarks/meta_precision.py --device cpu --dataset digits \
        --precisions bf16 --states init --batches 1 --batch 8 --rounds 1 --backend func \
        --out "$RESULTS/meta_precision_func.json"
    step throughput 120 "$PY" benchmarks/train_throughput.py --device cpu --precision bf16 \
        --models msdnet_l2w_cifar_tiny --sizes 32 --batch 4 --steps 1 --warmup 1 --intervals 1 100 \
        --out "$RESULTS/train_throughput.json"
fi

cat "$RESULTS/summary.md"
finish
