"""Lossless config guard: refuse vLLM settings under which spec decode no longer samples the policy.

RL trains on what the engine samples, so a speculative sampler that is not exactly the policy's
changes the training signal silently. The installed vLLM (0.32) offers one such setting:

- `speculative_config.rejection_sample_method="synthetic"` (with `synthetic_acceptance_rates` /
  `synthetic_acceptance_length`): drafts are accepted with a calibrated probability regardless
  of the target's distribution - a benchmarking mode. Greedy decoding is affected too.

Refused with an error naming the setting. Not refused: "standard" and "block" (block
verification is lossless by construction; `python -m draftadapt.engine.audit` checks it on an
engine), `draft_sample_method` "greedy" or "probabilistic" (both feed the rejection test the
probabilities the draft used).

Warned about: logprob modes whose values are not log-probabilities of the distribution the
token was sampled from (`raw_logprobs`: before temperature / top-k / top-p; `*_logits`: logits,
not log-probs). Importance ratios computed from them are wrong whenever sampling is not plain
temperature 1.

Works on plain dicts (what `vllm.LLM(**kwargs)` receives), so it imports nothing from vLLM.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

from .methods import METHOD_BY_PATH, switched_by_path  # noqa: F401 (METHOD_BY_PATH re-exported)

log = logging.getLogger("draftadapt.guard")

# speculative_config key -> {lossy value: why}; keys that exist only for a lossy mode map to None
LOSSY_SPEC_SETTINGS: dict[str, dict[Any, str] | None] = {
    "rejection_sample_method": {
        "synthetic": "accepts draft tokens with a calibrated probability, not by the target's distribution "
                     "(a benchmarking mode: the samples are not the policy's, greedy included)"},
    "synthetic_acceptance_rates": None,
    "synthetic_acceptance_length": None,
}
LOGPROBS_MODE_WARNINGS = {
    "raw_logprobs": "log-probs BEFORE temperature / top-k / top-p: not the distribution a token was sampled "
                    "from unless sampling is plain temperature 1",
    "raw_logits": "logits, not log-probabilities (and before temperature / top-k / top-p)",
    "processed_logits": "logits, not log-probabilities",
}
SAFE_LOGPROBS_MODE = "processed_logprobs"


class LossySamplingError(ValueError):
    """A vLLM setting that makes speculative sampling differ from the policy's distribution."""


def lossy_settings(speculative_config: Mapping[str, Any] | None) -> list[str]:
    """The settings in `speculative_config` that make sampling lossy, each with the reason."""
    found = []
    for key, bad in LOSSY_SPEC_SETTINGS.items():
        if not speculative_config or key not in speculative_config:
            continue
        value = speculative_config[key]
        if bad is None and value is not None:
            found.append(f"speculative_config.{key}={value!r} (only meaningful with rejection_sample_method="
                         f"'synthetic')")
        elif bad is not None and value in bad:
            found.append(f"speculative_config.{key}={value!r}: {bad[value]}")
    return found


def check_engine_kwargs(kwargs: Mapping[str, Any]) -> list[str]:
    """Raise LossySamplingError for lossy settings in `vllm.LLM(**kwargs)`; return (and log) warnings."""
    spec = kwargs.get("speculative_config")
    if spec is not None and not isinstance(spec, Mapping):  # a SpeculativeConfig object
        spec = {k: getattr(spec, k) for k in LOSSY_SPEC_SETTINGS if hasattr(spec, k)}
    bad = lossy_settings(spec)
    if bad:
        raise LossySamplingError(
            "refusing a lossy speculative sampler (the engine would not sample the policy): " + "; ".join(bad)
            + ". Fix: use rejection_sample_method='standard' (the default) or 'block', and drop the "
              "synthetic_acceptance_* fields.")
    _check_method_by_path(spec)
    warnings = []
    mode = kwargs.get("logprobs_mode", "raw_logprobs")  # vLLM's default
    if mode in LOGPROBS_MODE_WARNINGS:
        warnings.append(f"logprobs_mode={mode!r} returns {LOGPROBS_MODE_WARNINGS[mode]}; "
                        f"use logprobs_mode={SAFE_LOGPROBS_MODE!r} for importance ratios")
    for w in warnings:
        log.warning("draftadapt: %s", w)
    return warnings


def _check_method_by_path(spec: Mapping[str, Any] | None) -> None:
    """vLLM 0.32 runs a draft with the method a substring of its path names (`methods.METHOD_BY_PATH`):
    method="draft_model" with a draft under ".../x-eagle3-y/" silently runs as EAGLE-3."""
    switched = switched_by_path(spec.get("method"), spec.get("model")) if spec else None
    if switched is not None:
        needle, method = switched
        raise ValueError(f"speculative_config.model={spec['model']!r} contains {needle!r}: vLLM would run it with "
                         f"method={method!r} instead of {spec['method']!r}. Fix: move the draft to a path "
                         f"without {needle!r}")


def check_vllm_config(vllm_config) -> list[str]:
    """The same check on a running engine's `VllmConfig` (an LLM someone else started, e.g. TRL's)."""
    spec = getattr(vllm_config, "speculative_config", None)
    model = getattr(vllm_config, "model_config", None)
    kwargs: dict[str, Any] = {"logprobs_mode": getattr(model, "logprobs_mode", "raw_logprobs")}
    if spec is not None:
        kwargs["speculative_config"] = spec
    return check_engine_kwargs(kwargs)
