"""A first EAGLE-3 draft for the toy policy, trained on the policy's own temperature-1 samples.

`rollout_sequences` samples completions of a prompt domain through an engine; `toy_draft`
builds (or finds in the cache) a draft trained on them with the training-time-test loss.
"""
from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..sampling import Rollouts, own_samples
from ..trainer import TrainerConfig
from .eval import encode_prompt
from .task import TaskConfig, sample_chat, sample_problem


@dataclass(frozen=True)
class ToyDraftConfig:
    domain: str = "task"  # prompts to sample: "task" (in-domain) or "chat" (generic)
    prompts: int = 1024  # distinct prompts
    samples_per_prompt: int = 2  # temperature-1 completions per prompt
    max_tokens: int = 96  # completion cap
    draft_vocab_size: int = 512  # reduced draft vocab (most frequent tokens of the samples)
    steps: int = 600  # TTT optimizer steps
    batch_size: int = 32  # sequences per step
    seed: int = 100  # prompt stream (eval prompts use other seeds)
    # torch threads while training: TTT's step rounds differently at 2 threads even with MKL pinned (toy.build)
    threads: int = 1
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(lr=2e-3, ttt_steps=3, warmup_steps=30))


def domain_prompts(tok, domain: str, n: int, seed: int, task: TaskConfig = TaskConfig()) -> list[list[int]]:
    rng = random.Random(seed)
    if domain == "task":
        return [encode_prompt(tok, sample_problem(rng, task).prompt) for _ in range(n)]
    if domain == "chat":
        return [encode_prompt(tok, sample_chat(rng).prompt) for _ in range(n)]
    raise ValueError(f"domain={domain!r}; choose 'task' or 'chat'")


def rollout_sequences(engine, tok, prompts: list[list[int]], n: int, max_tokens: int,
                      seed: int | None = None) -> Rollouts:
    """`n` temperature-1 samples per prompt from `engine` (a vLLM `Engine` or a `TorchSampler`), stopped at
    the tokenizer's EOS (`sampling.own_samples`)."""
    return own_samples(engine, prompts, n, max_tokens, stop_token_ids=[tok.eos_token_id], seed=seed)


def toy_draft(policy_dir: str | Path, cfg: ToyDraftConfig = ToyDraftConfig(), progress: bool = True,
              root: str | Path | None = None) -> Path:
    """Directory of an EAGLE-3 draft for the toy policy at `policy_dir`, built when not cached
    (in `root`, default: beside the policy)."""
    from .build import build_once, weights_hash

    out = toy_draft_path(policy_dir, cfg, root)
    if build_once(out, train_toy_draft, policy_dir, out, cfg, progress):
        if progress:
            print(f"toy EAGLE-3 draft built: {out} (weights {weights_hash(out)})")
    return out


def toy_draft_path(policy_dir: str | Path, cfg: ToyDraftConfig = ToyDraftConfig(), root: str | Path | None = None) -> Path:
    """Where `toy_draft(policy_dir, cfg, root=root)` keeps its checkpoint (built or not)."""
    from .build import BUILD_VERSION

    key = hashlib.sha256(json.dumps([asdict(cfg), BUILD_VERSION], sort_keys=True, default=str).encode()).hexdigest()[:10]
    return Path(root or Path(policy_dir).parent) / f"{Path(policy_dir).name}-eagle3-{cfg.domain}-{key}"


def train_toy_draft(policy_dir: str | Path, out_dir: str | Path, cfg: ToyDraftConfig, progress: bool = True) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..offline import train_offline
    from .build import TorchSampler, TorchThreads

    tok = AutoTokenizer.from_pretrained(policy_dir)
    prompts = domain_prompts(tok, cfg.domain, cfg.prompts, cfg.seed)
    # 1) the policy's own samples (what the draft must predict in RL rollouts), drawn in torch so
    #    the build is the same on every CPU (vLLM's CPU kernels choose their instruction set)
    roll = rollout_sequences(TorchSampler(policy_dir), tok, prompts, cfg.samples_per_prompt, cfg.max_tokens,
                             seed=cfg.seed)
    # 2) features from the HF policy + TTT training, then export (the draft's init draws from torch's global generator)
    torch.manual_seed(cfg.seed)
    target = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).eval()
    t0 = time.perf_counter()
    with TorchThreads(cfg.threads):
        train_offline(target, roll.sequences, cfg.steps, draft_vocab_size=cfg.draft_vocab_size, config=cfg.trainer,
                      loss_masks=roll.loss_masks, batch_size=cfg.batch_size, out_dir=out_dir, progress=progress)
    train_s = time.perf_counter() - t0
    n_tok = sum(len(s) for s in roll.sequences)
    stats = {"rollout_seconds": roll.seconds, "rollout_tokens": roll.tokens, "train_seconds": train_s,
             "feature_tokens": n_tok, "train_tokens_per_s": cfg.steps * cfg.batch_size * n_tok / len(roll.sequences) / train_s,
             "config": asdict(cfg)}
    (Path(out_dir) / "draftadapt_train.json").write_text(json.dumps(stats, indent=1))
    return stats
