#!/usr/bin/env bash
# One prepared check for a single lent GPU (an H200): runs in well under 8 minutes, writes JSON to $OUT.
#
#   OUT=/tmp/gpu_out bash benchmarks/gpu_check.sh            # on the GPU machine
#   bash benchmarks/gpu_check.sh --dry-run                   # the same script on CPU, tiny (a test runs it)
#
# Sections (benchmarks/gpu/check.py SECTIONS; ResNet-50, 224px, bf16 autocast, channels_last, b = 256):
# 1. correctness: SGD, SAM-local, RW-SAM fd / last_layer, m-SAM m=b/4 sequential and batched (vmap):
#    3 steps at lr 0.1 each, finite loss and weights, weights moved;
# 2. throughput_eager: img/s of the same six, interleaved, median of 20 steps, peak CUDA memory;
#    looksam, look_msam, msam_vmap: LookSAM (k = 5, and its off step alone), look-m-SAM and batched
#    m-SAM against SAM-local at per-device batch 128, m = 16 (benchmarks/gpu/cheap.py);
# 3. fp16_scaler: SAM-local under fp16 + GradScaler, an inf batch skips the step;
# 4. ddp_dali_trainer: the trainer, DDP at world size 1 over NCCL, 2 short epochs on synthetic JPEGs,
#    DALI mixed (nvJPEG) decode;
# 5. dali: the loader's decode img/s;
#    fsdp2: benchmarks/gpu/fsdp.py (world size 1, resident and lean);
# 6. throughput_compiled(_rwsam): SGD, SAM-local, m-SAM b/4, then RW-SAM fd / last_layer, through
#    torch.compile (inductor; compilation inside the warm-up, counted in wall_s).
# First, in its own process (DeepSpeed owns its process group and accelerator): DeepSpeed fp16 under
# ZeRO 0-3 with dynamic loss scaling, rho = 0 against DeepSpeed's own step, an inf batch
# (benchmarks/gpu/deepspeed_fp16.py -> $OUT/deepspeed_fp16_gpu_check.json), at most 90 s.
# No section starts after GPU_CHECK_BUDGET_S (280 s); the whole Python part stops at GPU_CHECK_LIMIT_S.
# Output: $OUT/gpu_check.json (rewritten after each section), $OUT/gpu_check.log, $OUT/nvidia-smi.txt.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$REPO/benchmarks/results/gpu}"
PYTHON="${PYTHON:-python3}"
LIMIT_S="${GPU_CHECK_LIMIT_S:-370}"   # hard stop for the main Python part; with DeepSpeed's 90 s, inside 8 minutes
export GPU_CHECK_BUDGET_S="${GPU_CHECK_BUDGET_S:-280}"  # no section starts after this
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
dry=""
for arg in "$@"; do [ "$arg" = "--dry-run" ] && dry="--dry-run"; done
timeout --signal=TERM --kill-after=10 90 "$PYTHON" -m benchmarks.gpu.deepspeed_fp16 --out "$OUT" $dry 2>&1 \
  | tee -a "$OUT/gpu_check.log" || status=$?
timeout --signal=TERM --kill-after=15 "$LIMIT_S" "$PYTHON" -m benchmarks.gpu.check --out "$OUT" "$@" 2>&1 \
  | tee -a "$OUT/gpu_check.log" || status=$?
if [ "$status" -eq 124 ]; then
  echo "gpu_check: stopped after ${LIMIT_S}s; $OUT/gpu_check.json holds the sections that finished" | tee -a "$OUT/gpu_check.log"
fi
exit "$status"
