"""The examples run as a user runs them (their own process), and do what they say."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # ~40 s on an idle 2-core machine (two engine starts, a policy and a draft trained)
@pytest.mark.vllm
def test_own_model_example_trains_serves_adapts_and_exports_a_draft(tmp_path):
    import torch
    from transformers import AutoConfig

    from draftadapt.checkpoint import draft_state_for_push, load_eagle3

    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "own_model.py"), "--out", str(tmp_path),
                           "--steps", "3"], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["first_draft_loss"][-1] < 0.5 * s["first_draft_loss"][0], "offline training must learn"
    assert len(s["acceptance_lengths"]) == 3 and min(s["acceptance_lengths"]) > 1.2, \
        f"the served draft must get tokens accepted on the tied policy: {s['acceptance_lengths']}"
    config = AutoConfig.from_pretrained(s["policy_dir"])
    assert config.tie_word_embeddings, "the example must exercise a tied policy"
    first = load_eagle3(s["draft_dir"], target_config=config)
    adapted = load_eagle3(s["adapted_dir"], target_config=config)
    assert torch.equal(first.d2t, adapted.d2t) and first.config.draft_vocab_size == 64
    a, b = draft_state_for_push(first), draft_state_for_push(adapted)
    assert any(not torch.equal(a[k], b[k]) for k in a), "online adaptation must change the exported draft"
