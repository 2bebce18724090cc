"""The toy policy's draft LM (vLLM `draft_model`): `preinit.draft_lm.preinit_draft_lm` on the toy's own
task prompts, sampled in torch (`build.TorchSampler`) so every CPU builds the same weights; cached beside
the policy under a key of its config, the prompt set and `build.DRAFT_LM_REVISION`.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from ..preinit.draft_lm import DraftLMPreinitConfig, preinit_draft_lm


def toy_draft_lm(policy_dir: str | Path, cfg: DraftLMPreinitConfig = DraftLMPreinitConfig(), prompts: int = 512,
                 seed: int = 100, progress: bool = True) -> Path:
    """A draft LM for the toy policy, distilled on its own samples of toy task prompts; cached."""
    from transformers import AutoTokenizer

    from .build import BUILD_VERSION, DRAFT_LM_REVISION, TorchSampler, build_once, weights_hash
    from .draft import domain_prompts

    key = hashlib.sha256(json.dumps([asdict(cfg), prompts, seed, BUILD_VERSION, DRAFT_LM_REVISION], sort_keys=True,
                                    default=str).encode()).hexdigest()[:10]
    out = Path(policy_dir).parent / f"{Path(policy_dir).name}-draftlm-{key}"
    if (out / "model.safetensors").exists():  # cached: no tokenizer, no prompts (build_once re-checks under its lock)
        return out
    tok = AutoTokenizer.from_pretrained(str(policy_dir))
    # sampled in torch, in a process with pinned kernels: the same draft LM on every CPU (toy.build)
    if build_once(out, _build_toy_draft_lm, policy_dir, domain_prompts(tok, "task", prompts, seed), cfg, out,
                  progress, TorchSampler) and progress:
        print(f"toy draft LM built: {out} (weights {weights_hash(out)})")
    return out


def _build_toy_draft_lm(policy_dir, prompts, cfg, out, progress, sampler_cls) -> Path:
    return preinit_draft_lm(policy_dir, prompts, cfg, out, progress=progress, sampler=sampler_cls(policy_dir))
