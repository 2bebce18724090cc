#!/usr/bin/env bash
# One command for a machine with a CUDA GPU: the TTT scaling sweep at the Qwen3-8B draft shape
# (hidden 4096, draft vocab 32k) in bf16 autocast up to 32k tokens, old vs new, peak CUDA memory
# added by one TTT-3 step and train tokens/s. Writes benchmarks/results/ttt_scaling_cuda.{json,png}.
#   bash scripts/gpu_checks.sh            (PYTHON=... to pick the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device: this script is for a GPU machine'"
"$PYTHON" -m pytest -q tests/test_ttt.py -k "dense_oracle or chunked_loss"  # parity on CPU first (~20 s)
"$PYTHON" benchmarks/ttt_scaling.py --device cuda --hidden 4096 --tokens 2048,8192,16384,32768 \
    --dtypes bf16 --impls new,old --old-max-gb 100 --timeout 600 --ab 0 --name ttt_scaling_cuda
