#!/usr/bin/env bash
# One prepared check for a single lent GPU (an H200): runs in well under 8 minutes, writes JSON to $OUT.
#
#   OUT=/tmp/gpu_out bash benchmarks/gpu_check.sh            # on the GPU machine
#   bash benchmarks/gpu_check.sh --dry-run                   # the same script on CPU, tiny (a test runs it)
#
# 1. correctness: ResNet-50, 224px, bf16 autocast, channels_last, batch 256, 3 steps at lr 0.1 per
#    variant (SGD, SAM-local, RW-SAM fd, RW-SAM last_layer): finite loss, finite weights that moved;
# 2. throughput: img/s per variant (median of 20 interleaved steps after warm-up), peak CUDA memory,
#    ratios SAM-local/SGD, RW-SAM/SAM-local;
# 3. DALI: mixed (nvJPEG) decode throughput of the library's loader on generated JPEGs.
# Output: $OUT/gpu_check.json (rewritten after each section), $OUT/gpu_check.log, $OUT/nvidia-smi.txt.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$REPO/benchmarks/results/gpu}"
PYTHON="${PYTHON:-python3}"
LIMIT_S="${GPU_CHECK_LIMIT_S:-420}"   # hard stop for the Python part; leaves margin inside 8 minutes
mkdir -p "$OUT"
cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # dist_sam and benchmarks from this checkout
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"

if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.max.sm --format=csv > "$OUT/nvidia-smi.txt" 2>&1 || true
fi
"$PYTHON" -c "import torch, torchvision; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())" \
  | tee "$OUT/gpu_check.log"

status=0
timeout --signal=TERM --kill-after=15 "$LIMIT_S" "$PYTHON" -m benchmarks.gpu_check --out "$OUT" "$@" 2>&1 \
  | tee -a "$OUT/gpu_check.log" || status=$?
if [ "$status" -eq 124 ]; then
  echo "gpu_check: stopped after ${LIMIT_S}s; $OUT/gpu_check.json holds the sections that finished" | tee -a "$OUT/gpu_check.log"
fi
exit "$status"
