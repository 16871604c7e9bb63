#!/usr/bin/env bash
# Start a two-tier cluster as background processes on this host: `glinthawk scheduler`,
# N `glinthawk worker --tier dense` and M `glinthawk worker --tier attention`; wait until
# every worker is registered; print the scheduler address.  Stop it with stop-cluster.sh.
#
#   deploy/local/start-cluster.sh [options]
#
#   --dense N               dense workers (GPU=1)                          [1]
#   --attention M           attention workers (KV)                         [2]
#   --run-dir DIR           PIDs, logs, scheduler.json, cluster.env        [./glinthawk-cluster]
#   --host HOST             address the scheduler and workers listen on    [127.0.0.1]
#   --port PORT             scheduler port (0: any free port)              [8786]
#   --dashboard-address A   scheduler dashboard [host]:port                [:8787]
#   --dense-memory SIZE     --memory-limit of each dense worker            [a 1/(N+M) share of the machine]
#   --attention-memory SIZE --memory-limit of each attention worker        [a 1/(N+M) share of the machine]
#   --kv-bytes SIZE         --kv-bytes of each attention worker            [1: a share of its memory limit]
#   --tls DIR               TLS with DIR/ca.pem, DIR/cert.pem, DIR/key.pem (made if DIR has none)
#   --timeout SECONDS       how long to wait for the workers               [120]
#
# The run dir gets scheduler-address, cluster.env (source it: GLINTHAWK_SCHEDULER and, with
# --tls, Dask's TLS settings for clients), one PID file and one log per process.  Then:
#   glinthawk run SPEC --scheduler "$(cat glinthawk-cluster/scheduler-address)"
# PYTHON (default python3) is the interpreter that runs glinthawk_dask.
set -euo pipefail

PYTHON=${PYTHON:-python3}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
N_DENSE=1 N_ATTENTION=2 RUN_DIR=$PWD/glinthawk-cluster HOST=127.0.0.1 PORT=8786 DASHBOARD=:8787
DENSE_MEMORY="" ATTENTION_MEMORY="" KV_BYTES="" TLS_DIR="" TIMEOUT=120

usage() { sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "start-cluster.sh: $*" >&2; exit 1; }
while [[ $# -gt 0 ]]; do
    [[ $1 == -h || $1 == --help ]] && { usage; exit 0; }
    [[ $# -ge 2 ]] || die "$1 needs a value (see --help)"
    case $1 in
        --dense) N_DENSE=$2 ;;
        --attention) N_ATTENTION=$2 ;;
        --run-dir) RUN_DIR=$2 ;;
        --host) HOST=$2 ;;
        --port) PORT=$2 ;;
        --dashboard-address) DASHBOARD=$2 ;;
        --dense-memory) DENSE_MEMORY=$2 ;;
        --attention-memory) ATTENTION_MEMORY=$2 ;;
        --kv-bytes) KV_BYTES=$2 ;;
        --tls) TLS_DIR=$2 ;;
        --timeout) TIMEOUT=$2 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
    shift 2
done
[[ $N_DENSE =~ ^[0-9]+$ && $N_DENSE -ge 1 ]] || die "--dense must be a positive integer"
[[ $N_ATTENTION =~ ^[0-9]+$ ]] || die "--attention must be a non-negative integer"
[[ $TIMEOUT =~ ^[0-9]+$ ]] || die "--timeout must be whole seconds"

mkdir -p "$RUN_DIR"
RUN_DIR=$(cd "$RUN_DIR" && pwd)
for f in "$RUN_DIR"/*.pid; do
    [[ -e $f ]] || continue
    if kill -0 "$(cat "$f")" 2>/dev/null; then
        die "a cluster of $RUN_DIR is running (${f##*/}); stop it with stop-cluster.sh --run-dir $RUN_DIR"
    fi
    rm -f "$f"
done
rm -f "$RUN_DIR"/scheduler.json "$RUN_DIR"/scheduler-address "$RUN_DIR"/cluster.env "$RUN_DIR"/*.log

TLS_ARGS=()
if [[ -n $TLS_DIR ]]; then
    if [[ ! -f $TLS_DIR/ca.pem || ! -f $TLS_DIR/cert.pem || ! -f $TLS_DIR/key.pem ]]; then
        PYTHON=$PYTHON "$HERE/../tls/make-certs.sh" "$TLS_DIR" --host "$HOST" --host localhost --host 127.0.0.1 >/dev/null
    fi
    TLS_DIR=$(cd "$TLS_DIR" && pwd)
    TLS_ARGS=(--tls-ca-file "$TLS_DIR/ca.pem" --tls-cert "$TLS_DIR/cert.pem" --tls-key "$TLS_DIR/key.pem")
fi
SHARE=$(awk -v n=$((N_DENSE + N_ATTENTION)) 'BEGIN { printf "%.4f", 1 / n }')
DENSE_MEMORY=${DENSE_MEMORY:-$SHARE}
ATTENTION_MEMORY=${ATTENTION_MEMORY:-$SHARE}

cleanup_on_failure() {
    echo "start-cluster.sh: failed; logs in $RUN_DIR:" >&2
    tail -n 5 "$RUN_DIR"/*.log >&2 || true
    "$HERE/stop-cluster.sh" --run-dir "$RUN_DIR" >&2 || true
    exit 1
}

# $1: name, rest: the command; stdin closed, output to NAME.log, PID to NAME.pid
launch() {
    local name=$1; shift
    nohup "$@" </dev/null >"$RUN_DIR/$name.log" 2>&1 &
    echo $! >"$RUN_DIR/$name.pid"
}

launch scheduler "$PYTHON" -m glinthawk_dask scheduler --host "$HOST" --port "$PORT" \
    --dashboard-address "$DASHBOARD" --scheduler-file "$RUN_DIR/scheduler.json" "${TLS_ARGS[@]}"
for ((t = 0; t < 600; t++)); do  # 60 s for the scheduler
    [[ -s $RUN_DIR/scheduler.json ]] && break
    kill -0 "$(cat "$RUN_DIR/scheduler.pid")" 2>/dev/null || cleanup_on_failure
    sleep 0.1
done
[[ -s $RUN_DIR/scheduler.json ]] || cleanup_on_failure
ADDRESS=$("$PYTHON" -c 'import json, sys, time
for _ in range(50):
    try:
        print(json.load(open(sys.argv[1]))["address"]); break
    except ValueError:
        time.sleep(0.1)' "$RUN_DIR/scheduler.json")
echo "$ADDRESS" >"$RUN_DIR/scheduler-address"

for ((i = 0; i < N_DENSE; i++)); do
    launch "dense-$i" "$PYTHON" -m glinthawk_dask worker "$ADDRESS" --tier dense --name "dense-$i" \
        --host "$HOST" --memory-limit "$DENSE_MEMORY" "${TLS_ARGS[@]}"
done
KV_ARGS=()
[[ -n $KV_BYTES ]] && KV_ARGS=(--kv-bytes "$KV_BYTES")
for ((i = 0; i < N_ATTENTION; i++)); do
    launch "attention-$i" "$PYTHON" -m glinthawk_dask worker "$ADDRESS" --tier attention --name "attention-$i" \
        --host "$HOST" --memory-limit "$ATTENTION_MEMORY" "${KV_ARGS[@]}" "${TLS_ARGS[@]}"
done

{
    echo "export GLINTHAWK_SCHEDULER=$ADDRESS"
    if [[ -n $TLS_DIR ]]; then
        echo "export DASK_DISTRIBUTED__COMM__TLS__CA_FILE=$TLS_DIR/ca.pem"
        echo "export DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT=$TLS_DIR/cert.pem"
        echo "export DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY=$TLS_DIR/key.pem"
        echo "export DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION=True"
    fi
} >"$RUN_DIR/cluster.env"

# Wait until every worker is registered with the scheduler (as a client, with the certificates).
(
    # shellcheck disable=SC1091
    source "$RUN_DIR/cluster.env"
    "$PYTHON" - "$ADDRESS" $((N_DENSE + N_ATTENTION)) "$TIMEOUT" <<'PY'
import sys

from distributed import Client

address, n, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
with Client(address, timeout=timeout) as client:
    client.wait_for_workers(n, timeout=timeout)
PY
) >"$RUN_DIR/wait.log" 2>&1 || cleanup_on_failure

echo "$ADDRESS"
echo "glinthawk cluster: $N_DENSE dense + $N_ATTENTION attention workers at $ADDRESS; run dir $RUN_DIR" >&2
