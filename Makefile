# The two set-up commands of the README. Each creates or reuses .venv (scripts/setup_env.sh).
PY := .venv/bin/python
export OMP_WAIT_POLICY ?= PASSIVE
# One OpenMP thread per process by default: vLLM pins its own threads, and tests start engines
# in-process; the toy-policy SFT asks for its 2 threads explicitly (SFTConfig.threads).
export OMP_NUM_THREADS ?= 1
export VLLM_ENABLE_V1_MULTIPROCESSING ?= 0
export HF_HUB_OFFLINE ?= 1

.PHONY: setup setup-skyrl demo smoke test test-fast
setup:
	bash scripts/setup_env.sh

# SkyRL 0.4.0 in an environment of its own (.venv-skyrl, Python 3.11, --ignore-requires-python) for
# tests/test_skyrl.py, which skips without it. Not part of `setup`: ~6 min with a warm pip cache; CI
# (.ci/run) builds it in the background while the tests run, and the test waits for it there.
setup-skyrl:
	bash scripts/setup_skyrl.sh

# The main job: toy GRPO with EAGLE-3 spec-decode rollouts and online draft adaptation.
demo: setup
	$(PY) recipes/grpo_toy.py

# The toy smoke run: policy, accuracy, n-gram spec decode on the real engine.
smoke: setup
	$(PY) -m draftadapt.cli demo

test: setup
	$(PY) -m pytest tests -q --durations=15

test-fast: setup
	$(PY) -m pytest tests -q -m "not slow"
