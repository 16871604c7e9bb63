#!/usr/bin/env bash
# Stop a cluster started by start-cluster.sh: SIGTERM to the workers (each nanny closes its
# worker and unregisters it), then to the scheduler; SIGKILL to whatever is left after the
# timeout.  Only the PIDs recorded in the run dir are signalled, and only while they still
# run glinthawk_dask.
#
#   deploy/local/stop-cluster.sh [--run-dir DIR] [--timeout SECONDS]   [./glinthawk-cluster] [30]
set -euo pipefail

RUN_DIR=$PWD/glinthawk-cluster TIMEOUT=30
die() { echo "stop-cluster.sh: $*" >&2; exit 1; }
while [[ $# -gt 0 ]]; do
    [[ $1 == -h || $1 == --help ]] && { sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; exit 0; }
    [[ $# -ge 2 ]] || die "$1 needs a value (see --help)"
    case $1 in
        --run-dir) RUN_DIR=$2 ;;
        --timeout) TIMEOUT=$2 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
    shift 2
done
[[ -d $RUN_DIR ]] || die "no run dir $RUN_DIR"
[[ $TIMEOUT =~ ^[0-9]+$ ]] || die "--timeout must be whole seconds"

# the live PID in a pid file, if it is still one of ours
ours() {
    local pid
    pid=$(cat "$1" 2>/dev/null) || return 1
    [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
    ps -o args= -p "$pid" 2>/dev/null | grep -q glinthawk_dask || return 1
    echo "$pid"
}

# $@: pid files; SIGTERM, wait, SIGKILL
stop() {
    local f pid pids=() deadline
    for f in "$@"; do
        [[ -e $f ]] || continue
        if pid=$(ours "$f"); then
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid")
        fi
    done
    deadline=$((SECONDS + TIMEOUT))
    for pid in "${pids[@]}"; do
        while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
        if kill -0 "$pid" 2>/dev/null; then
            echo "stop-cluster.sh: $pid did not stop in ${TIMEOUT}s; killing it" >&2
            pkill -KILL -P "$pid" 2>/dev/null || true  # its worker process, under a nanny
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    rm -f "$@"
}

shopt -s nullglob
stop "$RUN_DIR"/dense-*.pid "$RUN_DIR"/attention-*.pid
stop "$RUN_DIR"/scheduler.pid
rm -f "$RUN_DIR/scheduler-address" "$RUN_DIR/cluster.env"
echo "glinthawk cluster of $RUN_DIR stopped" >&2
