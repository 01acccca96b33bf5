#!/usr/bin/env bash
# Every GPU figure the issues ask for, in one call on a lent GPU machine (see docs/benchmarks.md).
#
#   bash bench/gpu_session.sh            # I-GOS++ variants and seeds, SAG, CAMs, compiled I-GOS++
#                                        # (about 9 minutes on an H200 on 2026-11-26; a task's device
#                                        # budget is 15 minutes, machine start included)
#   QUICK=1 bash bench/gpu_session.sh    # smoke run of the same steps (also works on a CPU)
#   STEPS="igos cams" bash bench/gpu_session.sh   # some of the steps (igos, igos_tuned, profile, sag,
#                                                 # sag_incremental, cams, cams_transformers, quirks,
#                                                 # variants, variants_compile)
#
# Python packages missing on the machine travel as wheels in .whl/ (installed to /tmp/site).
# Each benchmark runs under its own time limit so that one hang cannot eat the others; logs
# and the updated docs/benchmarks.md land in $OUT.
set -u
OUT=${OUT:-/tmp/unbox-gpu}
mkdir -p "$OUT"
if [ -z "${NO_WHEELS:-}" ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
quick=()
[ -n "${QUICK:-}" ] && quick=(--quick)

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv 2>/dev/null
    $PY -c "import torch, torchvision, timm; print(torch.__version__, torchvision.__version__, timm.__version__, \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no cuda')"
} 2>&1 | tee "$OUT/env.log"

step() {  # step NAME SECONDS COMMAND...: run with a limit, keep the log, show its end
    local name=$1 limit=$2
    shift 2
    local started=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "== $name: rc=$? in $((SECONDS - started)) s"
    tail -n "${TAIL:-22}" "$OUT/$name.log"
}

for name in ${STEPS:-variants quirks sag cams cams_transformers variants_compile}; do
    case $name in
        igos) step igos "${IGOS_LIMIT:-200}" $PY -m bench.igos --repeats 3 --speed-models convnext_tiny "${quick[@]}" ;;
        igos_tuned) step igos_tuned "${IGOS_LIMIT:-200}" $PY -m bench.igos --repeats 3 --speed-models convnext_tiny \
            --cudnn-benchmark --images chelsea coffee --no-docs "${quick[@]}" ;;
        profile) step profile 120 $PY -m bench.profile_igos "${quick[@]}" ;;
        variants) step variants "${VARIANTS_LIMIT:-150}" $PY -m bench.igos_variants --repeats 3 \
            --variants as_loaded default fp16 "${quick[@]}" ;;
        variants_compile) step variants_compile "${COMPILE_LIMIT:-200}" $PY -m bench.igos_variants --repeats 3 \
            --variants default compile "${quick[@]}" ;;
        sag) step sag "${SAG_LIMIT:-120}" $PY -m bench.sag --repeats 3 "${quick[@]}" ;;
        sag_incremental)  # the CPU's incremental scoring on CUDA, beside whole forwards (not yet measured there)
            step sag_incremental "${SAG_LIMIT:-120}" $PY -m bench.sag --repeats 3 --no-unbatched --incremental on \
                --images chelsea coffee --no-append "${quick[@]}" ;;
        cams) step cams "${CAMS_LIMIT:-200}" $PY -m bench.cams "${quick[@]}" ;;
        cams_transformers) step cams_transformers "${CAMS_TF_LIMIT:-240}" $PY -m bench.cams_transformers \
            "${quick[@]}" ;;
        quirks)  # I-GOS++ at the reference settings over 5 seeds: ours, then the reference's habits
            step quirks_ours "${QUIRKS_LIMIT:-150}" $PY -m bench.igos_quirks --preset reference --seeds 0 1 2 3 4
            step quirks_all "${QUIRKS_LIMIT:-150}" $PY -m bench.igos_quirks --preset reference --seeds 0 1 2 3 4 --all ;;
        *) echo "unknown step $name" ;;
    esac
done
cp docs/benchmarks.md "$OUT/benchmarks.md"
