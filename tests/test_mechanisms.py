"""The recipe's one switch, rollout.method: validation, the engine spec per mechanism, the suffix refusal."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))


def test_an_unknown_method_is_refused_listing_the_valid_ones():
    from draftadapt.config import load_section
    from grpo_toy import RecipeConfig

    with pytest.raises(ValueError, match=r"rollout.method='medusa'; choose one of \('eagle3', 'mtp', 'draft_model', "
                                         r"'ngram', 'suffix'\)"):
        load_section(RecipeConfig, {"rollout": {"method": "medusa"}})
    assert load_section(RecipeConfig, {"rollout": {"method": "ngram"}}).rollout.method == "ngram"


@pytest.mark.parametrize("method, trainable, model", [("eagle3", True, "d"), ("mtp", True, None),
                                                       ("draft_model", True, "d"), ("ngram", False, None)])
def test_each_mechanism_names_its_vllm_method_and_whether_it_adapts(method, trainable, model, tmp_path):
    from draftadapt.toy.mechanisms import Mechanism

    mech = Mechanism(method, tmp_path, tmp_path, tmp_path / "d" if model else None)
    spec = mech.spec(3)
    assert spec.method == method and spec.num_speculative_tokens == 3 and mech.trainable == trainable
    assert (spec.model is not None) == (model is not None)
    assert mech.spec(0) is None, "k = 0 is plain decoding"
    if not trainable:
        with pytest.raises(ValueError, match="model-free"):
            mech.load_draft(None)


def test_suffix_is_refused_with_the_install_that_makes_it_work_when_arctic_inference_is_missing(monkeypatch):
    import importlib.util

    from draftadapt.engine.vllm import SpecConfig
    from draftadapt.toy.mechanisms import toy_mechanism

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "arctic_inference" else real(name, *a))
    for make in (lambda: SpecConfig("suffix", 3), lambda: toy_mechanism("suffix")):
        with pytest.raises(ImportError, match=r"arctic-inference .*--no-build-isolation arctic-inference==0.3.0"):
            make()


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.parametrize("method", ["draft_model", "ngram"])
def test_the_recipe_runs_each_mechanism_with_the_same_metrics_and_closing_table(method, toy_policy_dir, tmp_path):
    import json
    import subprocess

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "grpo_toy.py"
    cmd = [sys.executable, str(recipe), f"run.out_dir={tmp_path}", f"rollout.method={method}", "run.steps=2",
           "run.checkpoint_every=0", "run.eval_prompts=16", "rollout.prompts_per_step=8", "rollout.group_size=4",
           "adapter.min_tokens=256", "adapter.batch_tokens=1024", "adapter.train_steps=2"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1500)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    res = json.loads((tmp_path / "result.json").read_text())
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert res["method"] == method and res["frozen"]["spec_acceptance_length"] > 1.0
    assert all("spec_acceptance_rate-pos-2" in r and "rollout_tokens_per_s" in r for r in rows)
    if method == "draft_model":  # distilled online, pushed every step, compared with the frozen first draft
        assert res["adapted"]["spec_acceptance_length"] > 1.5
        assert all(r["draft/pushed"] == 1.0 and r["draft/push_bytes"] > 0 for r in rows), rows
    else:  # model-free: nothing adapted, nothing pushed
        assert res["adapted"] is None and not any("draft/pushed" in r for r in rows)
