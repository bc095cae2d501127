# Shared by the prepared GPU scripts (gpu_check.sh, gpu_paper_study.sh): source it, then
#   timed_step PREFIX LOG STATUS NAME LIMIT COMMAND...
# runs COMMAND under `timeout LIMIT` (SIGINT first, SIGKILL 10 s later, to its whole process group) with its
# output in LOG, appends "NAME<TAB>status<TAB>seconds" to STATUS (ok / timed out after Ns / failed (exit N))
# and says so with PREFIX.
timed_step() {
    local prefix=$1 log=$2 table=$3 name=$4 limit=$5
    shift 5
    local t0 rc status
    t0=$(date +%s)
    echo "$prefix: [$name] (limit ${limit}s) $*"
    timeout -s INT --kill-after=10 "$limit" "$@" > "$log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124|137) status="timed out after ${limit}s" ;;
        *) status="failed (exit $rc)" ;;
    esac
    printf '%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - t0 ))" >> "$table"
    echo "$prefix: [$name] $status in $(( $(date +%s) - t0 ))s (log: $log)"
}
