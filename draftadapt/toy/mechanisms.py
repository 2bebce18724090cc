"""Every speculation mechanism on the toy policy: what the engine serves, the first draft, the
draft the adapter trains, and the engine of the closing comparison, per `rollout.method`.

    eagle3       EAGLE-3 head over three aux states (toy/draft.py), trained online (TTT)
    mtp          the policy's own MTP layer: the toy policy as a MiMo checkpoint (toy/mtp.py), trained online
    draft_model  a 2-layer draft LM cut from the policy and distilled (preinit/draft_lm.py), distilled online
    ngram        prompt lookup (model-free, nothing to adapt)
    suffix       suffix decoding over the prompt and earlier outputs (model-free; needs arctic-inference)

All start from the same toy policy weights (MiMo is the Llama converted exactly), so runs with the
same seeds start from the same policy. It knows nothing of the GRPO loop.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..engine.vllm import EngineConfig, SpecConfig

METHODS = ("eagle3", "mtp", "draft_model", "ngram", "suffix")
TRAINABLE = ("eagle3", "mtp", "draft_model")


@dataclass(frozen=True)
class Mechanism:
    method: str  # one of METHODS
    policy_dir: Path  # the checkpoint the engine serves and the loop starts from (MTP: MiMo with its MTP layer)
    tokenizer_dir: Path
    initial_draft: Path | None  # checkpoint of the first draft (eagle3, draft_model); None otherwise

    @property
    def trainable(self) -> bool:
        return self.method in TRAINABLE

    def spec(self, k: int, draft_dir: Path | None = None) -> SpecConfig | None:
        """The engine's speculative config (k = 0: plain decoding); `draft_dir` overrides the first draft."""
        if k == 0:
            return None
        if self.method in ("eagle3", "draft_model"):
            return SpecConfig(self.method, k, model=str(draft_dir or self.initial_draft))
        return SpecConfig(self.method, k)

    def load_draft(self, policy: nn.Module) -> nn.Module:
        """The first draft as the module the adapter trains (policy: the live HF policy)."""
        if self.method == "eagle3":
            from ..checkpoint import load_eagle3

            return load_eagle3(self.initial_draft)
        if self.method == "mtp":
            from ..drafts.mtp import MTPDraft, load_mtp_state
            from ..engine.payload import read_safetensors_dir

            return load_mtp_state(MTPDraft.from_target(policy.config, policy.get_output_embeddings()),
                                  read_safetensors_dir(self.policy_dir))
        if self.method == "draft_model":
            from ..drafts.draft_lm import DraftLM

            return DraftLM.from_pretrained(self.initial_draft)
        raise ValueError(f"rollout.method={self.method!r} is model-free: there is no draft to adapt; set run.adapt=false")

    def final_engine(self, policy_dir: Path, draft: nn.Module | None, out_dir: Path, k: int,
                     **engine_kw) -> EngineConfig:
        """An engine serving the HF policy saved at `policy_dir` with `draft` (None = the first
        draft); writes what it needs under `out_dir`."""
        if self.method == "mtp":  # the MTP layer lives in the policy checkpoint: write trunk + MTP layer
            return EngineConfig(model=str(self._mimo(policy_dir, draft, out_dir)), tokenizer=str(self.tokenizer_dir),
                                spec=self.spec(k), **engine_kw)
        draft_dir = None
        if draft is not None and self.method == "eagle3":
            from ..checkpoint import save_eagle3

            draft_dir = save_eagle3(draft, out_dir, None)
        elif draft is not None and self.method == "draft_model":
            draft_dir = draft.save(out_dir, tokenizer_src=self.tokenizer_dir)
        return EngineConfig(model=str(policy_dir), tokenizer=str(self.tokenizer_dir), spec=self.spec(k, draft_dir),
                            **engine_kw)

    def _mimo(self, policy_dir: Path, draft: nn.Module | None, out_dir: Path) -> Path:
        from ..drafts.mtp import mtp_state_for_push
        from ..engine.swap import MTP_PREFIX, read_safetensors_dir
        from .mtp import write_mimo

        trunk = {k: v for k, v in read_safetensors_dir(policy_dir).items() if not k.startswith(MTP_PREFIX)}
        first = read_safetensors_dir(self.policy_dir)
        mtp = mtp_state_for_push(draft) if draft is not None else {k: v for k, v in first.items()
                                                                    if k.startswith(MTP_PREFIX)}
        config = json.loads((self.policy_dir / "config.json").read_text())
        return write_mimo(out_dir, config, trunk, mtp, self.tokenizer_dir).model_dir


def toy_mechanism(method: str, draft_cfg=None, progress: bool = True) -> Mechanism:
    """Build (or find cached) what `method` needs on the toy policy; refuses an unknown method
    and "suffix" without arctic-inference, naming the fix."""
    from .policy import toy_policy

    if method not in METHODS:
        raise ValueError(f"rollout.method={method!r}; choose one of {METHODS}")
    if method == "suffix":
        SpecConfig("suffix", 3)  # raises ImportError naming the install when arctic-inference is missing
    policy_dir = Path(toy_policy(progress=progress))
    if method == "eagle3":
        from .draft import ToyDraftConfig, toy_draft

        return Mechanism(method, policy_dir, policy_dir, toy_draft(policy_dir, draft_cfg or ToyDraftConfig(), progress))
    if method == "mtp":
        from .mtp import toy_mtp_policy

        mtp = toy_mtp_policy(policy_dir, progress=progress)
        return Mechanism(method, mtp.model_dir, mtp.tokenizer_dir, None)
    if method == "draft_model":
        from .draft_lm import toy_draft_lm

        return Mechanism(method, policy_dir, policy_dir, toy_draft_lm(policy_dir, progress=progress))
    return Mechanism(method, policy_dir, policy_dir, None)
