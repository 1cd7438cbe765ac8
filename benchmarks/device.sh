#!/usr/bin/env bash
# Every GPU check and timing pez wants, as one prepared run for a lent GPU machine (README,
# Performance: "One image on a GPU"). Such a machine has python3 with torch, typer, rich,
# pillow, timm and transformers, no network, and none of open_clip, ftfy or diffusers: those
# travel as wheels in .whl/ (ignored by git; name .whl in the device tool's `carry`).
#
#   benchmarks/device.sh fetch     # here, with pip's registry: download the wheels into .whl/
#   benchmarks/device.sh run       # there, in the repository root: install them, run the checks
#   benchmarks/device.sh run latency restarts    # only some of: gpu_check latency restarts lm
#   benchmarks/device.sh run gpu_check=cuda_graph latency   # gpu_check=NAMES: only those checks (--only)
#
# `run` writes gpu_check.json, latency.json, restarts.json, lm.json and a log of each into $OUT (default
# ./device-out), and exits non-zero if a check failed. On an H200 (2026-11-27) gpu_check took
# about 6 minutes and latency about 3, so one 10-minute call cannot hold all three: run
# `run gpu_check` and `run latency restarts` as two calls.
set -u -o pipefail

WHEELS=(open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 diffusers==0.42.1 importlib_metadata==10.2.0
        lazy-importer==0.1.0)

fetch() {
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
}

run() {
    local out="${OUT:-./device-out}" failed=0 parts=("$@") part
    [ ${#parts[@]} -gt 0 ] || parts=(gpu_check latency restarts lm)
    for part in "${parts[@]}"; do
        case "$part" in gpu_check|gpu_check=?*|latency|restarts|lm) ;; *) echo "device.sh: unknown part $part" >&2; exit 2 ;; esac
    done
    mkdir -p "$out"
    if compgen -G ".whl/*.whl" >/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
            || { echo "device.sh: installing the wheels in .whl failed" >&2; exit 1; }
        export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
    python3 -c "import torch, open_clip, pez_cli; print('torch', torch.__version__, 'open_clip', open_clip.__version__)" \
        || { echo "device.sh: pez cannot be imported here" >&2; exit 1; }
    for part in "${parts[@]}"; do
        case "$part" in
            gpu_check) python3 benchmarks/gpu_check.py --json "$out/gpu_check.json" ;;
            gpu_check=*) python3 benchmarks/gpu_check.py --only "${part#gpu_check=}" --json "$out/gpu_check.json" ;;
            latency) python3 benchmarks/speed.py --device cuda --latency --json "$out/latency.json" ;;
            restarts) python3 benchmarks/speed.py --device cuda --restarts 1,4,8 --images 8 --steps 100 \
                          --json "$out/restarts.json" ;;
            lm) python3 benchmarks/speed.py --device cuda --lm-timing --json "$out/lm.json" ;;
        esac 2>&1 | tee "$out/${part%%=*}.log" || failed=1
    done
    exit "$failed"
}

case "${1:-}" in
    fetch) fetch ;;
    run) shift; run "$@" ;;
    *) echo "usage: benchmarks/device.sh fetch|run [gpu_check[=NAMES]|latency|restarts|lm]..." >&2; exit 2 ;;
esac
