"""`DraftBatch`: the padded training batch every draft trainer consumes.

It is the contract between the feature side (capture, cache) and the training side (TTT loss,
trainer). Nothing here imports a model or an engine.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DraftBatch:
    """Target features for B sequences, right-padded to T positions.

    Position t describes the target after reading tokens 0..t: its aux hidden states there and
    its distribution over token t+1.
    """

    input_ids: torch.Tensor  # [B, T] int64: target token ids (pad anywhere valid is False)
    aux_hidden: torch.Tensor  # [B, T, 3*H_t] float: target aux hidden states (low, mid, high)
    teacher_logprobs: torch.Tensor  # [B, T, Vd] float: target log p(token t+1 = draft id d),
    #   the full-vocab log-probs gathered at the draft vocab (not renormalised)
    loss_mask: torch.Tensor  # [B, T] bool: the teacher at t is a training target
    #   (a completion position, not padding, the target's top token is in the draft vocab)
    valid: torch.Tensor  # [B, T] bool: real (non-pad) positions; attention never crosses them
    final_hidden: torch.Tensor | None = None  # [B, T, H_t] float: target last hidden state
    #   (post-norm), for native MTP heads; None when not captured
    policy_version: int = 0  # version of the policy that produced these features

    def __post_init__(self) -> None:
        b, t = self.input_ids.shape
        for name in ("aux_hidden", "teacher_logprobs", "loss_mask", "valid"):
            got = tuple(getattr(self, name).shape[:2])
            if got != (b, t):
                raise ValueError(f"DraftBatch.{name} has leading shape {got}, input_ids has {(b, t)}")
        if self.final_hidden is not None and tuple(self.final_hidden.shape[:2]) != (b, t):
            raise ValueError(
                f"DraftBatch.final_hidden has leading shape {tuple(self.final_hidden.shape[:2])},"
                f" input_ids has {(b, t)}"
            )

    @property
    def num_tokens(self) -> int:
        return int(self.valid.sum())

    def to(self, device: torch.device | str) -> "DraftBatch":
        fields = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(self).items()}
        return DraftBatch(**fields)
