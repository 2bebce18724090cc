# The two set-up commands of the README. Each creates or reuses .venv (scripts/setup_env.sh).
PY := .venv/bin/python
export OMP_WAIT_POLICY ?= PASSIVE
export VLLM_ENABLE_V1_MULTIPROCESSING ?= 0
export HF_HUB_OFFLINE ?= 1

.PHONY: setup demo test test-fast
setup:
	bash scripts/setup_env.sh

demo: setup
	$(PY) -m draftadapt.cli demo

test: setup
	$(PY) -m pytest tests -q --durations=15

test-fast: setup
	$(PY) -m pytest tests -q -m "not slow"
