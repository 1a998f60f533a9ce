#!/usr/bin/env bash
# The CUDA path end to end in a few minutes (issue 17): engine defaults (autocast, pinned memory),
# float32 on the GPU, OOM-adaptive tiles under a memory cap, a 3D model; each against CPU float32.
# Run it on any machine with a GPU (without one it checks the CPU fallback and says so):
#   bash benchmarks/gpu_check.sh [--size 2048] [--quick]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
else
  echo "nvidia-smi not found: checking the CPU fallback"
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'available', torch.cuda.is_available())"
exec timeout "${GPU_CHECK_TIMEOUT:-900}" "$PY" benchmarks/gpu_check.py "$@"
