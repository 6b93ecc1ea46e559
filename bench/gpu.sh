#!/usr/bin/env bash
# The prepared GPU check for docs/performance.md: one command, about 6-8 minutes on an H100/H200.
# Needs torch only (no Ray, no checkpoint: random weights are made on the device).
#   bash bench/gpu.sh 2>&1 | tee gpu.log
set -euo pipefail
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
python - <<'PY'
import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())
PY
# full v1 bf16: 64-token captions and caption + questions + grounding, decode step under CUDA graphs
python bench/engine.py --config v1 --device cuda --dtype bf16 --workload caption multi --images 384 \
    --group 16 --in-flight 16 --new-tokens 64 --compile
# the vision tower compiled too (a measured choice: keep it off unless this row is faster)
python bench/engine.py --config v1 --device cuda --dtype bf16 --workload caption --images 192 \
    --group 16 --in-flight 16 --new-tokens 64 --compile --compile-vision || true
# int8 / int4 weights (needs torchao on the GPU machine): full v1 captions per weight format, and
# the logits drift of each format on the small shape on this GPU
python bench/engine.py --config v1 --device cuda --dtype bf16 --workload caption --images 192 \
    --group 16 --in-flight 16 --new-tokens 64 --compile --quantization none int8 int4 || true
python bench/precision.py --config small --device cuda || true
