"""Parts of the reference GRPO loop: rollouts from an engine, collation, one policy update.

The loop itself lives in `recipes/grpo_toy.py` and reads top to bottom. The policy update runs
the log-prob recompute once, inside the draft adapter's capture, so the draft's features cost
no extra forward; the captured tensors are detached, so the policy gradient is untouched.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import torch

from .objective import grpo_loss, group_advantages, token_logprobs


@dataclass
class Rollouts:
    """G completions for each of P prompts, grouped by prompt (G consecutive rows)."""

    prompts: list[list[int]]  # [P*G] prompt ids (repeated per sample)
    completions: list[list[int]]  # [P*G] sampled ids
    logprobs: list[list[float]]  # [P*G] engine log-probs of the sampled ids (the behaviour policy)
    rewards: torch.Tensor  # [P*G] float
    texts: list[str]  # [P*G] decoded completions
    group_size: int
    policy_version: int  # version of the weights that sampled them
    seconds: float  # generation wall time

    @property
    def num_tokens(self) -> int:
        return sum(len(c) for c in self.completions)


def collect_rollouts(engine, prompts: Sequence[Sequence[int]], reward_fn: Callable[[int, str], float], decode,
                     group_size: int, temperature: float, max_tokens: int, stop_token_ids: Sequence[int],
                     policy_version: int, seed: int | None = None) -> Rollouts:
    """Sample `group_size` completions per prompt; reward_fn(prompt_index, text) scores each."""
    t0 = time.perf_counter()
    outs = engine.generate(prompts, n=group_size, temperature=temperature, max_tokens=max_tokens,
                           logprobs=True, seed=seed, stop_token_ids=stop_token_ids)
    seconds = time.perf_counter() - t0
    p_ids, comps, lps, rewards, texts = [], [], [], [], []
    for i, group in enumerate(outs):
        if len(group) != group_size:
            raise RuntimeError(f"engine returned {len(group)} samples for prompt {i}, expected {group_size}")
        for c in group:
            text = decode(c.token_ids)
            p_ids.append(list(prompts[i]))
            comps.append(list(c.token_ids))
            lps.append(list(c.logprobs))
            rewards.append(reward_fn(i, text))
            texts.append(text)
    return Rollouts(p_ids, comps, lps, torch.tensor(rewards), texts, group_size, policy_version, seconds)


class PolicyBatch(NamedTuple):
    input_ids: torch.Tensor  # [B, T] int64, right-padded prompt + completion
    attention_mask: torch.Tensor  # [B, T] int64
    completion_mask: torch.Tensor  # [B, T] bool: completion tokens
    old_logprobs: torch.Tensor  # [B, T] float: engine log-probs at completion tokens (0 elsewhere)


def collate(r: Rollouts, pad_id: int) -> PolicyBatch:
    lens = [len(p) + len(c) for p, c in zip(r.prompts, r.completions)]
    b, t = len(lens), max(lens)
    ids = torch.full((b, t), pad_id, dtype=torch.long)
    comp = torch.zeros(b, t, dtype=torch.bool)
    old = torch.zeros(b, t)
    for i, (p, c, lp) in enumerate(zip(r.prompts, r.completions, r.logprobs)):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        comp[i, len(p): len(p) + len(c)] = True
        old[i, len(p): len(p) + len(c)] = torch.tensor(lp)
    mask = (torch.arange(t)[None] < torch.tensor(lens)[:, None]).long()
    return PolicyBatch(ids, mask, comp, old)


@dataclass(frozen=True)
class UpdateConfig:
    clip_eps: float = 0.2  # PPO-style ratio clip
    kl_coef: float = 0.0  # weight of the k3 KL to the reference policy (0 = no reference)
    grad_clip: float = 1.0  # max grad norm of the policy
    micro_batch: int = 64  # sequences per forward/backward (gradients accumulate)
    scale_advantages: bool = True  # divide by the group std (GRPO) or only centre (Dr. GRPO)


class UpdateStats(NamedTuple):
    loss: float
    clip_frac: float
    kl: float
    grad_norm: float
    logprob_mismatch: float  # mean |recomputed - engine| log-prob over completion tokens
    seconds: float


def policy_update(policy, optimizer, r: Rollouts, pad_id: int, cfg: UpdateConfig, adapter=None,
                  reference=None, policy_version: int | None = None) -> UpdateStats:
    """One GRPO step on `r`: recompute log-probs (captured for the draft), clipped loss, step.

    The importance ratio is taken against `r.logprobs`, the policy that sampled `r` (one step
    behind `policy` in async mode). policy_version: the version of `policy` itself, which makes
    the captured features (its hidden states and log-probs); default `r.policy_version` (sync).
    """
    t0 = time.perf_counter()
    version = r.policy_version if policy_version is None else policy_version
    adv = group_advantages(r.rewards, r.group_size, scale=cfg.scale_advantages)
    batch = collate(r, pad_id)
    n_tok = batch.completion_mask.sum().clamp(min=1)
    policy.train()
    optimizer.zero_grad(set_to_none=True)
    tot = {"loss": 0.0, "clip": 0.0, "kl": 0.0, "mismatch": 0.0}
    for s in range(0, batch.input_ids.shape[0], cfg.micro_batch):
        sl = slice(s, s + cfg.micro_batch)
        ids, am, cm = batch.input_ids[sl], batch.attention_mask[sl], batch.completion_mask[sl]
        ctx = adapter.capture(policy) if adapter is not None else _null()
        with ctx as cap:
            lp = token_logprobs(policy(input_ids=ids, attention_mask=am).logits, ids)  # [b, T]
        if adapter is not None:
            adapter.on_rollouts(cap.rollout_batch(input_ids=ids, attention_mask=am, completion_mask=cm,
                                                  policy_version=version))
        ref = None
        if reference is not None and cfg.kl_coef > 0:
            with torch.no_grad():
                ref = token_logprobs(reference(input_ids=ids, attention_mask=am).logits, ids)
        out = grpo_loss(lp, batch.old_logprobs[sl], adv[sl], cm, cfg.clip_eps, ref, cfg.kl_coef)
        share = cm.sum() / n_tok  # token-level aggregation across micro-batches
        (out.loss * share).backward()
        tot["loss"] += float(out.loss.detach()) * float(share)
        tot["clip"] += float(out.clip_frac) * float(share)
        tot["kl"] += float(out.kl) * float(share)
        tot["mismatch"] += float(((lp.detach() - batch.old_logprobs[sl]).abs() * cm).sum())
    grad_norm = float(torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip))
    optimizer.step()
    policy.eval()
    return UpdateStats(tot["loss"], tot["clip"], tot["kl"], grad_norm, tot["mismatch"] / float(n_tok),
                       time.perf_counter() - t0)


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
