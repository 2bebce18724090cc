"""The GRPO objective: group-normalised advantages and the clipped surrogate, token-level.

Pure tensor code; knows nothing of engines, drafts or data.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """rewards: [P*G] grouped by prompt (G consecutive samples each) -> advantages [P*G].

    A = (r - mean_group) / (std_group + eps); scale=False keeps only the centring (Dr. GRPO).
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.float().view(-1, group_size)
    adv = r - r.mean(1, keepdim=True)
    if scale:
        adv = adv / (r.std(1, keepdim=True, unbiased=False) + eps)
    return adv.view(-1)


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """logits: [B, T, V], input_ids: [B, T] -> log p(input_ids[t] | < t) at [B, T] (t = 0 gets 0)."""
    lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return torch.cat([lp.new_zeros(lp.shape[0], 1), lp], dim=1)


class GRPOLoss(NamedTuple):
    loss: torch.Tensor  # []: differentiable
    clip_frac: torch.Tensor  # []: share of tokens whose ratio was clipped
    kl: torch.Tensor  # []: mean k3 KL to the reference (0 without one)
    ratio_mean: torch.Tensor  # []: mean importance ratio


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              clip_eps: float = 0.2, ref_logprobs: torch.Tensor | None = None, kl_coef: float = 0.0) -> GRPOLoss:
    """Clipped surrogate with the importance ratio against the rollout log-probs.

    logprobs/old_logprobs/ref_logprobs/mask: [B, T] over completion tokens; advantages: [B].
    Token-level aggregation: every completion token of the batch weighs the same.
    """
    m = mask.float()
    n = m.sum().clamp(min=1)
    ratio = torch.exp(logprobs - old_logprobs)
    adv = advantages[:, None]
    surrogate = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv)
    loss = -(surrogate * m).sum() / n
    kl = torch.zeros((), device=logprobs.device)
    if ref_logprobs is not None:
        d = ref_logprobs - logprobs
        kl = ((torch.exp(d) - d - 1) * m).sum() / n  # k3 estimator, >= 0
        loss = loss + kl_coef * kl
    clipped = ((ratio - 1).abs() > clip_eps).float()
    return GRPOLoss(loss, ((clipped * m).sum() / n).detach(), kl.detach(), ((ratio * m).sum() / n).detach())
