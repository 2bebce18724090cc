"""Offline pre-init of a small external draft LM (vLLM `draft_model`): the first draft before RL.

    draft_dir = preinit_draft_lm(target_dir, prompts, DraftLMPreinitConfig(num_layers=2), out_dir)

1) regenerate: the target's own temperature-1 completions of `prompts` through vLLM (what the
   draft must predict in RL rollouts); 2) init: the target's architecture cut to its first
   `num_layers` layers, weights copied (`DraftLM.from_policy`); 3) distil: KL to the target's
   next-token distribution on those sequences (full vocab when small, top-k otherwise:
   `distill.default_teacher`), teacher computed on the fly from a frozen HF forward, so no feature
   shards are written (a draft LM needs no hidden state); 4) export: an HF checkpoint dir with
   the target's tokenizer, checked against the target (`check_draft_lm`).
The toy's draft LM (`toy/draft_lm.py`) is built with it.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..trainer import TrainerConfig


@dataclass(frozen=True)
class DraftLMPreinitConfig:
    num_layers: int = 2  # decoder layers kept from the target (its first ones)
    samples_per_prompt: int = 2  # temperature-1 completions per prompt
    max_tokens: int = 96  # completion cap
    steps: int = 200  # distillation optimizer steps
    batch_size: int = 32  # sequences per step
    top_k: int | None = None  # teacher: None = full vocab when V <= 8192, else top-64; 0 = full; k = top-k
    threads: int = 1  # torch threads while distilling
    seed: int = 0
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(lr=1e-3, ttt_steps=1, warmup_steps=20))


def preinit_draft_lm(target_dir: str | Path, prompts: list[list[int]], cfg: DraftLMPreinitConfig,
                     out_dir: str | Path, tokenizer_dir: str | Path | None = None, progress: bool = True,
                     sampler=None) -> Path:
    """Regenerate, init, distil, export (module docstring); returns the draft checkpoint dir, with
    `draftadapt_preinit.json` (timings, final loss/agreement, config) beside the weights. `sampler`:
    what samples the target (an object with `Engine.generate`'s signature); None = a vLLM engine."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..distill import train_draft_lm_offline
    from ..drafts.draft_lm import DraftLM, check_draft_lm
    from ..engine.vllm import Engine, EngineConfig
    from ..sampling import own_samples

    tokenizer_dir = Path(tokenizer_dir or target_dir)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    # 1) the target's own samples
    if sampler is not None:
        roll = own_samples(sampler, prompts, cfg.samples_per_prompt, cfg.max_tokens, stop_token_ids=[tok.eos_token_id],
                           seed=cfg.seed)
    else:
        with Engine(EngineConfig(model=str(target_dir), tokenizer=str(tokenizer_dir), max_num_seqs=64,
                                 worker_extension=None)) as eng:
            roll = own_samples(eng, prompts, cfg.samples_per_prompt, cfg.max_tokens, stop_token_ids=[tok.eos_token_id],
                               seed=cfg.seed)
    # 2) + 3) truncation init, distillation
    prev = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        target = AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=torch.float32).eval().requires_grad_(False)
        draft = DraftLM.from_policy(target, cfg.num_layers)
        t0 = time.perf_counter()
        history = train_draft_lm_offline(target, draft, roll.sequences, cfg.steps, roll.loss_masks, cfg.trainer,
                                         cfg.batch_size, cfg.top_k, cfg.seed, progress)
        seconds = time.perf_counter() - t0
    finally:
        torch.set_num_threads(prev)
    # 4) export + check
    out = draft.eval().save(out_dir, tokenizer_src=tokenizer_dir)
    check_draft_lm(out, target_dir, tokenizer_dir)
    stats = {"rollout_seconds": roll.seconds, "rollout_tokens": roll.tokens, "train_seconds": seconds,
             "threads": cfg.threads, "first": history[0].as_dict(), "final": history[-1].as_dict(),
             "params": sum(p.numel() for p in draft.parameters()), "config": asdict(cfg)}
    (out / "draftadapt_preinit.json").write_text(json.dumps(stats, indent=1, default=str))
    return out
