"""Shared fixtures: tiny random targets built from configs, the trained toy policy, one engine."""
from __future__ import annotations

import os

import pytest
import torch

# Single-process vLLM engines start in ~3 s; keep tests off the user's home directory.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SLOW_TIMEOUT_S = 1800  # a slow test may wait for the toy policy and drafts (~15-20 min cold on 2 busy cores)


@pytest.hookimpl(trylast=True)  # after -m / -k deselection: `make test-fast` starts no build
def pytest_collection_modifyitems(config, items):
    """Slow tests get SLOW_TIMEOUT_S unless they set their own; the rest keep addopts' --timeout.

    The tests that need no trained toy artefact run first, while a background process builds the artefacts
    (`python -m draftadapt.toy`, ~15-20 min cold): the builds overlap the fast tests instead of adding to them.
    Builds take a file lock per cache dir, so a test asking for an artefact mid-build waits for it."""
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT_S))
    items.sort(key=_needs_toy)  # stable: file order within each group
    if any(_needs_toy(i) for i in items):
        _start_toy_builds(config)


def _needs_toy(item) -> bool:
    return bool(item.get_closest_marker("slow")) or any(f.startswith("toy_") for f in item.fixturenames)


def _start_toy_builds(config) -> None:
    import subprocess
    import sys
    import tempfile

    if os.environ.get("DRAFTADAPT_NO_BACKGROUND_BUILD") or config.option.collectonly:
        return
    log = open(tempfile.mkstemp(prefix="draftadapt-toy-build-", suffix=".log")[1], "w")
    cmd = [sys.executable, "-m", "draftadapt.toy", "--quiet", "--json", log.name + ".json"]
    # its own process group: stopping it at the end of the session stops its pinned build child too
    config._toy_build = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True),
                         log.name)


def pytest_terminal_summary(terminalreporter, config):
    """The background toy build's table (hash and seconds per artefact) or where its log is when it failed."""
    import json
    from pathlib import Path

    build = getattr(config, "_toy_build", None)
    if build is None:
        return
    proc, log = build
    terminalreporter.section("toy artefacts (background build)")
    if proc.poll() is None:  # the run stopped before every artefact was needed (-x, -k, a failure)
        import signal

        os.killpg(proc.pid, signal.SIGTERM)
        terminalreporter.write_line(f"stopped before it finished (builds are atomic; nothing half-written): {log}")
        return
    table = Path(log + ".json")
    if proc.returncode == 0 and table.exists():
        for name, row in json.loads(table.read_text()).items():
            terminalreporter.write_line(f"{name:14s} weights {row['weights']}  {row['seconds']:7.1f} s")
    else:
        terminalreporter.write_line(f"the background build exited {proc.returncode}: see {log}")


def require(module: str):
    """Import a package `make setup` installs; a missing or broken one FAILS the test (a skip would
    hide a broken environment behind a green run)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        pytest.fail(f"{module} is required by the test suite and failed to import ({e}): run `make setup` "
                    f"(pip install -e '.[dev]')", pytrace=False)


def on_cpu_build() -> bool:
    """True when the installed vLLM is a CPU build: facts true only there are skipped elsewhere."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def cpu_only(reason: str) -> None:
    if not on_cpu_build():
        pytest.skip(f"a fact of the vLLM CPU build only: {reason}")


@pytest.fixture(scope="session")
def test_cache_dir():
    """Artefacts only tests build (variant drafts) live here, not beside the shared toy policy, so
    "the toy draft" in the shared cache is always the one the recipes build."""
    from pathlib import Path

    from draftadapt.toy.policy import cache_root

    root = Path(os.environ.get("DRAFTADAPT_TEST_CACHE", cache_root() / "test-artefacts"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def tiny_config(arch: str = "llama", layers: int = 8, hidden: int = 64, vocab: int = 1147):
    """A tiny config of a real architecture (llama, qwen2, qwen3), random weights in seconds."""
    import transformers as tf

    kw = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
              num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=512, tie_word_embeddings=False)
    if arch == "llama":
        return tf.LlamaConfig(**kw)
    if arch == "qwen2":
        return tf.Qwen2Config(**kw)
    if arch == "qwen3":
        return tf.Qwen3Config(head_dim=hidden // 4, **kw)
    raise ValueError(f"unknown arch {arch!r}")


def tiny_model(arch: str = "llama", seed: int = 0, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(arch, **kw)).eval()


@pytest.fixture(params=["llama", "qwen2", "qwen3"])
def tiny_target(request):
    return tiny_model(request.param)


@pytest.fixture(scope="session")
def toy_policy_dir():
    """The trained toy policy (built on first use, ~9-11 min on 2 cores, then cached)."""
    from draftadapt.toy.policy import toy_policy

    return toy_policy(progress=False)


def save_tiny(arch: str, root, seed: int = 0, **kw):
    """Save a tiny random target with the toy tokenizer; returns (model_dir, tokenizer_dir).

    qwen2 trap: a WordLevel tokenizer beside a qwen2 config loads as Qwen2Tokenizer and encodes
    to nothing, so for qwen2 the tokenizer goes to a dir of its own.
    """
    from pathlib import Path

    from draftadapt.toy.tokenizer import save_tokenizer

    root = Path(root)
    model_dir = root / f"tiny-{arch}"
    tok_dir = root / "tokenizer-qwen2" if arch == "qwen2" else model_dir
    tiny_model(arch, seed=seed, **kw).save_pretrained(model_dir, safe_serialization=True)
    save_tokenizer(tok_dir)
    return model_dir, tok_dir


@pytest.fixture(scope="session")
def toy_tokenizer(toy_policy_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(toy_policy_dir)


def plain_outputs(policy_dir, prompts, **gen):
    """Completions from a plain (no spec decode) engine that is shut down before returning:
    in-process engines must not overlap (vLLM's parallel state is process-global)."""
    from draftadapt.engine.vllm import Engine, EngineConfig

    with Engine(EngineConfig(model=str(policy_dir), max_num_seqs=64)) as eng:
        return eng.generate(prompts, **gen)


@pytest.fixture(scope="session")
def toy_draft_dir(toy_policy_dir):
    """An EAGLE-3 draft (3-step TTT, Vd=512) trained on the toy policy's own samples (~4-6 min on 2 busy cores, cached)."""
    from draftadapt.toy.draft import toy_draft

    return toy_draft(toy_policy_dir, progress=False)


@pytest.fixture(scope="session")
def toy_mtp(toy_policy_dir):
    """The toy policy as a MiMo checkpoint with a trained MTP layer (~3-5 min on 2 busy cores on first use, cached):
    a ToyMTP(model_dir, tokenizer_dir)."""
    from draftadapt.toy.mtp import toy_mtp_policy

    return toy_mtp_policy(toy_policy_dir, progress=False)
