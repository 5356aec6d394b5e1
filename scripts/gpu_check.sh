#!/usr/bin/env bash
# Build the MoETop2 kernels for this machine's GPU only (the Python build step, one -gencode),
# then check them against the PyTorch reference and time them (scripts/gpu_check.py).
# Needs nvcc and PyTorch with CUDA; MIXTRAL_TRT_KERNELS_LIB=<.so> skips the build.
# The opt-in sm_90a prefill path (MOE_FLAG_PREFILL_SM90) needs CUTLASS's headers at build time:
# the nvidia-cutlass package (a 6 MB wheel of headers; `pip install --no-deps nvidia-cutlass==4.2.0.0`
# is enough) or MIXTRAL_TRT_CUTLASS_INCLUDE=<dir with cutlass/ and cute/>. Without them the library
# is built without that path and the script says so in its sm90 section.
# On a GPU machine without CUTLASS (or to save its time), build for sm_90a where CUTLASS is and
# bring the library along:
#   python -m mixtral_trt.plugins.build --arch 90a --out-dir build/gpu      # about a minute on 2 cores
#   MIXTRAL_TRT_KERNELS_LIB=build/gpu/libmixtral_moe_top2.so bash scripts/gpu_check.sh
# With $OUT set (the device machine), the log and a JSON of the results land there too; the JSON
# is rewritten after every section. The plain run (check + speed table) keeps to 5 minutes, the
# build included; --extended adds the opt-in options and a per-launch profile and keeps to 9
# minutes (one 10-minute device call). Sections that no longer fit are skipped and named, and the
# verdict is INCOMPLETE. Arguments are passed to scripts/gpu_check.py (--extended, --skip NAME,
# --deadline S, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
MIXTRAL_GPU_CHECK_STARTED=$(date +%s)  # the deadline counts the build too
export MIXTRAL_GPU_CHECK_STARTED
nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader || true
if [ -z "${MIXTRAL_TRT_KERNELS_LIB:-}" ]; then
    start=$(date +%s)
    MIXTRAL_TRT_KERNELS_LIB=$(python3 scripts/gpu_check.py --build-only)
    export MIXTRAL_TRT_KERNELS_LIB
    echo "built $MIXTRAL_TRT_KERNELS_LIB in $(( $(date +%s) - start )) s"
fi
if [ -n "${OUT:-}" ]; then
    python3 scripts/gpu_check.py "$@" 2>&1 | tee "$OUT/gpu_check.log"
else
    python3 scripts/gpu_check.py "$@"
fi
