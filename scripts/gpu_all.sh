#!/usr/bin/env bash
# Every GPU check in one command, for a lent CUDA machine with a bare PyTorch image:
# the lmcore checks (flash SDPA, compiled training MFU, the full Trainer, compiled decode, the
# batched engine against a bare step loop, a compiled engine's hot swap, int8 against bf16
# decode), whether seeded sampling
# repeats bit for bit and whether a request alone generates what it generates in a batch, then
# the tests marked `gpu`. Results go under $OUT (default bench/); copy them into bench/.
#
#     OUT=/tmp/gpu bash scripts/gpu_all.sh
set -u
OUT=${OUT:-bench}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$(pwd)
PY=${PYTHON:-python3}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv \
  | tee "$OUT/gpu_device.txt"
$PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' \
  | tee -a "$OUT/gpu_device.txt"

timeout "${CHECKS_TIMEOUT:-420}" $PY scripts/gpu_checks.py --out "$OUT/lmcore_gpu.json" 2>&1 \
  | tee "$OUT/gpu_checks.log" | cut -c1-1500
echo "gpu_checks exit: ${PIPESTATUS[0]}"

timeout "${DETERMINISM_TIMEOUT:-180}" $PY scripts/gpu_determinism.py \
  --out "$OUT/gpu_determinism.json" 2>&1 | grep '^{'
echo "gpu_determinism exit: ${PIPESTATUS[0]}"

timeout "${TESTS_TIMEOUT:-150}" $PY -m pytest -m gpu -q -p no:cacheprovider \
  --junitxml "$OUT/gpu_tests.xml" \
  tests/unit/test_checkpoint.py tests/unit/test_quantize.py tests/unit/test_engine.py \
  tests/unit/test_generate.py tests/unit/test_train.py 2>&1 \
  | tee "$OUT/gpu_tests.log" | tail -40
echo "gpu tests exit: ${PIPESTATUS[0]}"
