#!/usr/bin/env bash
# The prepared GPU check for docs/performance.md: one command, about 5 minutes on an H100/H200.
# Needs torch only (no Ray, no checkpoint: random weights are made on the device).
#   bash bench/gpu.sh 2>&1 | tee gpu.log
set -euo pipefail
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
python - <<'PY'
import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())
PY
python bench/engine.py --config small --device cuda --dtype bf16 --workload caption multi --images 64 --batch-size 16 --no-share
python bench/engine.py --config v1 --device cuda --dtype bf16 --workload caption multi --images 64 --batch-size 16 --no-share
python bench/engine.py --config v1 --device cuda --dtype bf16 --workload caption --images 64 --batch-size 32 --compile
python bench/engine.py --config v2 --device cuda --dtype bf16 --workload caption --images 16 --batch-size 8 || true
