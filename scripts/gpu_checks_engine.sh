#!/usr/bin/env bash
# Issue 17's GPU checks: vLLM's native CUDA IPC draft transfer (versioned, verified per rank), the
# real sleep(level=2) / wake_up() lifecycle, and TP = 2 when two GPUs are visible. Needs a venv with
# the CUDA build vllm==0.32.0 (scripts/setup_env.sh on a GPU machine). Skips cleanly without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$PY" -c "import torch, vllm; print('[gpu-checks] vllm', vllm.__version__, 'torch', torch.__version__,
      'cuda', torch.cuda.is_available(), 'gpus', torch.cuda.device_count())"
exec "$PY" -m pytest tests/test_gpu_engine.py -m gpu -v -s "$@"
