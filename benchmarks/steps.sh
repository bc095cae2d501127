# The preamble of the prepared GPU scripts (gpu_paper_study.sh, gpu_check.sh), in one place.
# A script sets
#   NAME     its name (the prefix of its messages)
#   RESULTS  its results folder (the smoke writes to RESULTS/cpu-smoke)
#   TOTAL    its whole budget in seconds (every step's limit is cut to the time left; empty: no budget)
#   ONLY     the names of the steps to run (empty: all)
#   SMOKE    1: the CPU-sized smoke even where CUDA is (without CUDA it always runs the smoke)
# defines summarize (writes RESULTS/summary.md and its JSON from the files present), then sources this file:
#   . "$(dirname "$0")/steps.sh"
# which goes to the repository root, picks PY ($PYTHON, else .venv/bin/python, else python3), installs the
# wheels in .whl/ to /tmp/site (put first on PYTHONPATH, then the tree), detects CUDA (DEVICE cuda / cpu,
# GPU_NAME), sets SMOKE and RESULTS, makes RESULTS with an empty step table RESULTS/steps.tsv (STATUS), and gives
#   left                    seconds left of TOTAL
#   step NAME LIMIT CMD...  CMD under `timeout LIMIT` (SIGINT to its process group, SIGKILL 10 s later) with its
#                           output in RESULTS/NAME.log; "NAME<TAB>status<TAB>seconds" appended to STATUS (ok /
#                           timed out after Ns / failed (exit N) / not run (...)); then summarize, and with $OUT set
#                           (the device tool) an archive of RESULTS (no training runs) and the logs copied to $OUT
#   finish                  the closing line; returns 0 only when every step that ran was ok
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
[ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python
COPY=${OUT:-}
TOTAL=${TOTAL:-}
ONLY=${ONLY:-}
SMOKE=${SMOKE:-0}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "$NAME: wheel install failed"; exit 2; }
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    DEVICE=cuda
    GPU_NAME=$("$PY" -c "import torch; print(torch.cuda.get_device_name())")
else
    DEVICE=cpu
    GPU_NAME=
    SMOKE=1
    echo "$NAME: no CUDA device visible to torch"
fi
if [ "$SMOKE" = 1 ]; then
    RESULTS=$RESULTS/cpu-smoke
    echo "$NAME: smoke run on $DEVICE at tiny sizes (these are not GPU results; they only show that every step runs) -> $RESULTS"
fi
echo "$NAME: device $DEVICE${GPU_NAME:+ ($GPU_NAME)}, $("$PY" -c 'import sys, torch, timm; print("python", sys.version.split()[0], "torch", torch.__version__, "timm", timm.__version__)')"
mkdir -p "$RESULTS"
STATUS="$RESULTS/steps.tsv"
: > "$STATUS"
T0=$(date +%s)

left() {
    if [ -n "$TOTAL" ]; then echo $(( TOTAL - ($(date +%s) - T0) )); else echo 100000; fi
}

save() {  # the summary so far, then (device tool) the results and logs into $OUT
    summarize > "$RESULTS/summarize.log" 2>&1 || echo "$NAME: summarize failed (see $RESULTS/summarize.log)"
    if [ -n "$COPY" ]; then
        tar czf "$COPY/$NAME.tar.gz" --exclude=runs -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")" 2>/dev/null
        cp "$RESULTS"/*.log "$RESULTS"/summary.md "$COPY/" 2>/dev/null
    fi
    return 0
}

step() {
    local name=$1 limit=$2
    shift 2
    if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then
        printf '%s\t%s\t0\n' "$name" "not run (only: $ONLY)" >> "$STATUS"
        return
    fi
    [ "$limit" -gt "$(left)" ] && limit=$(left)
    if [ "$limit" -lt 5 ]; then
        printf '%s\t%s\t0\n' "$name" "not run (no time left)" >> "$STATUS"
        save
        return
    fi
    local t0 rc status log="$RESULTS/$name.log"
    t0=$(date +%s)
    echo "$NAME: [$name] (limit ${limit}s) $*"
    timeout -s INT --kill-after=10 "$limit" "$@" > "$log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124|137) status="timed out after ${limit}s" ;;
        *) status="failed (exit $rc)" ;;
    esac
    printf '%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - t0 ))" >> "$STATUS"
    echo "$NAME: [$name] $status in $(( $(date +%s) - t0 ))s (log: $log)${TOTAL:+, $(left)s left}"
    tail -3 "$log"
    save
}

finish() {
    local failed
    failed=$(awk -F'\t' '$2 != "ok" && $2 !~ /^not run \(only/' "$STATUS" | wc -l)
    echo "$NAME: done in $(( $(date +%s) - T0 ))s, $failed step(s) not ok; summary: $RESULTS/summary.md"
    [ "$failed" -eq 0 ]
}
