"""The lossless config guard: lossy vLLM sampling settings are refused, misleading logprob modes warned."""
import json
import logging
from types import SimpleNamespace
from typing import get_args

import pytest

from draftadapt.engine import guard

KNOWN_REJECTION_METHODS = {"standard": "lossless", "block": "lossless", "synthetic": "lossy"}


def test_every_rejection_method_of_the_installed_vllm_is_classified():
    """A vLLM upgrade that adds a sampling mode fails here until the guard knows whether it is lossy."""
    from vllm.config.model import LogprobsMode
    from vllm.config.speculative import DraftSampleMethod, RejectionSampleMethod

    assert set(get_args(RejectionSampleMethod)) == set(KNOWN_REJECTION_METHODS)
    assert set(get_args(DraftSampleMethod)) == {"greedy", "probabilistic"}  # both keep the rejection test exact
    lossy = {m for m, kind in KNOWN_REJECTION_METHODS.items() if kind == "lossy"}
    assert lossy == set(guard.LOSSY_SPEC_SETTINGS["rejection_sample_method"])
    assert set(get_args(LogprobsMode)) == set(guard.LOGPROBS_MODE_WARNINGS) | {guard.SAFE_LOGPROBS_MODE}


@pytest.mark.parametrize("spec, needle", [
    ({"method": "eagle3", "rejection_sample_method": "synthetic", "synthetic_acceptance_length": 2.5},
     "rejection_sample_method='synthetic'"),
    ({"method": "ngram", "synthetic_acceptance_rates": [0.9, 0.5, 0.1]}, "synthetic_acceptance_rates"),
])
def test_lossy_speculative_settings_are_refused_naming_them(spec, needle):
    with pytest.raises(guard.LossySamplingError, match="rejection_sample_method='standard'") as err:
        guard.check_engine_kwargs({"speculative_config": spec, "logprobs_mode": "processed_logprobs"})
    assert needle in str(err.value)


@pytest.mark.parametrize("method", ["standard", "block"])
def test_lossless_settings_pass_without_warnings(method):
    spec = {"method": "eagle3", "rejection_sample_method": method, "draft_sample_method": "probabilistic"}
    assert guard.check_engine_kwargs({"speculative_config": spec, "logprobs_mode": "processed_logprobs"}) == []
    assert guard.check_engine_kwargs({"logprobs_mode": "processed_logprobs"}) == []


@pytest.mark.parametrize("mode", ["raw_logprobs", "raw_logits", "processed_logits"])
def test_logprob_modes_that_are_not_the_sampled_distribution_are_warned(mode, caplog):
    with caplog.at_level(logging.WARNING, logger="draftadapt.guard"):
        warnings = guard.check_engine_kwargs({"logprobs_mode": mode})
    assert len(warnings) == 1 and mode in warnings[0] and "processed_logprobs" in warnings[0]
    assert mode in caplog.text
    assert guard.check_engine_kwargs({})[0].startswith("logprobs_mode='raw_logprobs'"), "vLLM's default is raw"


def test_a_running_engines_config_is_checked_too():
    spec = SimpleNamespace(rejection_sample_method="synthetic", synthetic_acceptance_rates=[0.5],
                           synthetic_acceptance_length=None)
    cfg = SimpleNamespace(speculative_config=spec, model_config=SimpleNamespace(logprobs_mode="processed_logprobs"))
    with pytest.raises(guard.LossySamplingError, match="synthetic"):
        guard.check_vllm_config(cfg)
    ok = SimpleNamespace(speculative_config=None, model_config=SimpleNamespace(logprobs_mode="processed_logprobs"))
    assert guard.check_vllm_config(ok) == []


def test_a_draft_model_under_an_eagle3_path_is_refused_before_vllm_switches_its_method():
    """vLLM 0.32 picks method='eagle3' for any draft whose path contains 'eagle3' (found by the
    audit: a pytest tmp dir named after the test turned a draft_model arm into EAGLE-3)."""
    from vllm.config.speculative import SpeculativeConfig
    import inspect

    assert '"eagle3" in self.draft_model_config.model.lower()' in inspect.getsource(SpeculativeConfig)
    with pytest.raises(ValueError, match="method='eagle3' instead of 'draft_model'.*path without 'eagle3'"):
        guard.check_engine_kwargs({"speculative_config": {"method": "draft_model", "model": "/x/test_eagle3_0/dm"}})
    assert guard.check_engine_kwargs({"speculative_config": {"method": "eagle3", "model": "/x/eagle3"},
                                      "logprobs_mode": "processed_logprobs"}) == []


@pytest.mark.vllm
def test_the_engine_wrapper_refuses_a_lossy_sampler_before_starting(tmp_path):
    from draftadapt.engine import vllm as engine_mod
    from draftadapt.engine.vllm import Engine, EngineConfig

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    lossy = {"method": "ngram", "num_speculative_tokens": 3, "rejection_sample_method": "synthetic",
             "synthetic_acceptance_length": 2.0}
    with pytest.raises(guard.LossySamplingError, match="synthetic"):
        Engine(EngineConfig(model=str(tmp_path), extra={"speculative_config": lossy}))
    assert not engine_mod._live_in_process, "nothing was started"
