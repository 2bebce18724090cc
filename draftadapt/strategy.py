"""Adaptation strategies as settings: which positions the draft trains on, with which loss, how much.

`StrategyConfig` is consumed by `DraftAdapter(strategy=...)`; the default trains with forward KL on every
completion position alike and sizes each step's training by the acceptance-triggered budget (4 x
train_steps after an acceptance drop, 1/4 while acceptance holds or rises; chosen on the replay lab's
three drifts, benchmarks/results/README.md); `FIXED_BUDGET` is the plain adapter's fixed step count. The
settings:

- loss: "kl" (forward KL to the teacher, the TTT default), "tv" (total variation 1/2 sum |p - q|:
  1 - TV is the acceptance probability of a draft that samples from q, so it targets acceptance
  itself), "kl+tv" (their sum), "top1" (cross-entropy to the teacher's argmax: matched to greedy
  drafting, where a draft token is accepted with the target's probability of the draft's argmax).
- rejected_weight: positions where the CURRENT draft's step-1 top-1 differs from the sampled
  token (where verification would reject a greedy draft) weigh this much, the rest 1 (Draft-OPD's
  "train where you were rejected", as a weight).
- min_advantage: cache only sequences whose GRPO advantage is >= this (the policy moves toward
  them; reward-weighted adaptation as a selection).
- boost_factor / boost_drop / hold_factor: the acceptance-triggered budget. At a boundary where the
  step's acceptance length fell more than boost_drop below the adapter's reference, train
  boost_factor x train_steps; where it held or rose (>= the reference) while the draft's last training of
  >= 2 steps gained less than hold_max_gain step-1 accuracy within itself (its later half vs its earlier
  half: TrainResult.acc_gain), hold_factor x train_steps (< 1: a draft that keeps up costs less; 0:
  nothing); otherwise, and before any of that is known, train_steps. The gain is measured within one
  training, on one cache, because a gain between two trainings also rises when the policy sharpens and
  its samples grow easier to draft - the drift where training buys least.

`StrategyLoss` is that loss, handed to `DraftTrainer` (the one step: non-finite skip, autocast,
clipping); `StrategyDraftWorker` is `LocalDraftWorker` with it; `UntilBoundaryDraftWorker` trains in
a thread until the next step boundary instead of a fixed step count. Time and memory are those of `ttt.ttt_loss` (O(T) attention, the loss
and the teacher in chunks of positions) plus one no-grad step-1 pass when rejected_weight != 1.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass, replace

import torch
from torch import nn

from .batch import DraftBatch
from .head_loss import LOSS_CHUNK_ELEMENTS, LOSSES
from .trainer import TrainerConfig
from .ttt import TTTLoss, TTTResult, shift, ttt_loss, unroll_hidden
from .workers import BackgroundDraftWorker, LocalDraftWorker, TrainResult



@dataclass(frozen=True)
class StrategyConfig:
    loss: str = "kl"  # one of LOSSES, against the teacher renormalised over the draft vocab
    rejected_weight: float = 1.0  # weight of positions the current draft's top-1 gets wrong; 1 = uniform
    min_advantage: float | None = None  # cache only sequences with advantage >= this; None = all
    boost_factor: float = 4.0  # train_steps x this when the step's acceptance length drops (1 = fixed budget)
    boost_drop: float = 0.05  # tokens of acceptance length below the reference that trigger the boost
    hold_factor: float = 0.25  # train_steps x this when the step's acceptance length held or rose (>= the reference)
    hold_max_gain: float = 0.02  # ... and the draft's last training (>= 2 steps) raised its step-1 accuracy less than
    #   this within itself (a draft still learning - a weak start, rows a vocab refresh admitted - keeps its budget)

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"StrategyConfig.loss={self.loss!r}; use one of {LOSSES}")
        if not self.rejected_weight > 0 or not self.boost_factor >= 1 or not self.boost_drop >= 0:
            raise ValueError(f"StrategyConfig needs rejected_weight > 0, boost_factor >= 1, boost_drop >= 0; got {self}")
        if not self.hold_max_gain >= 0:
            raise ValueError(f"StrategyConfig.hold_max_gain={self.hold_max_gain!r}; use an accuracy gain >= 0 "
                             "(0 = never shrink while the training accuracy rises at all)")
        if not 0 <= self.hold_factor <= 1:
            raise ValueError(f"StrategyConfig.hold_factor={self.hold_factor!r}; use a factor in [0, 1] (1 = the fixed "
                             "budget, 0 = no training while the acceptance length holds)")

    @property
    def custom_loss(self) -> bool:
        """True when training differs from the plain TTT loss (a StrategyDraftWorker is needed)."""
        return self.loss != "kl" or self.rejected_weight != 1.0


FIXED_BUDGET = StrategyConfig(boost_factor=1.0, hold_factor=1.0)  # train_steps at every boundary, whatever happens


@torch.no_grad()
def rejected_positions(draft: nn.Module, batch: DraftBatch, embed: nn.Embedding | torch.Tensor) -> torch.Tensor:
    """[B, T] bool: teacher position j whose next token the draft's step-1 top-1 misses.

    Step 1 at base j-1 reads token j and predicts token j+1 (scored against teacher[j]); it is
    "rejected" when its argmax, mapped to a target id, differs from input_ids[j+1]."""
    was_training = draft.training
    draft.eval()
    hidden = unroll_hidden(draft, batch, embed, 1)[0]  # [B, T, H] at base i
    draft.train(was_training)
    rows = max(1, LOSS_CHUNK_ELEMENTS // draft.config.draft_vocab_size)  # positions per [n, Vd] logits chunk
    top = torch.cat([draft.logits(h).argmax(-1) for h in hidden.flatten(0, 1).split(rows)]).view(hidden.shape[:2])
    guess = draft.target_ids().to(top.device)[top]  # [B, T] target id predicted for i+2
    miss = guess != shift(batch.input_ids, 2)  # [B, T] at base i
    return torch.cat([miss.new_zeros(miss.shape[0], 1), miss[:, :-1]], 1)  # base i -> teacher position i+1


def strategy_loss(draft, batch: DraftBatch, embed, steps: int = 3, decay: float = 0.8, loss: str = "kl",
                  weight: torch.Tensor | None = None) -> TTTResult:
    """The TTT loss of `ttt.ttt_loss` with a choice of divergence and per-position weights.

    weight: [B, T] float per teacher position (None = 1). Step k's loss is the weighted mean over
    its scored positions; step k weighs decay^(k-1). Unweighted, it is `ttt.ttt_loss` itself; weighted,
    too (its `weight`): the loss runs in chunks of positions and reads the teacher per chunk."""
    return ttt_loss(draft, batch, embed, steps, decay, loss=loss, weight=weight)


@dataclass(frozen=True)
class StrategyLoss:
    """A strategy's loss as a trainer.LossFn: `ttt` with the strategy's divergence, and positions the
    current draft's step-1 top-1 gets wrong weighted `rejected_weight` (one no-grad step-1 pass)."""

    ttt: TTTLoss  # steps, decay, tv_weight and recompute from the TrainerConfig; its divergence is replaced
    strategy: StrategyConfig

    @classmethod
    def of(cls, config: TrainerConfig, strategy: StrategyConfig) -> "StrategyLoss":
        return cls(replace(TTTLoss.from_config(config), loss=strategy.loss), strategy)

    def __call__(self, draft, batch: DraftBatch, embed, normalizer: torch.Tensor | None = None) -> TTTResult:
        s, weight = self.strategy, None
        if s.rejected_weight != 1.0:
            weight = 1.0 + (s.rejected_weight - 1.0) * rejected_positions(draft, batch, embed).float()
        return self.ttt(draft, batch, embed, normalizer, weight)


class StrategyDraftWorker(LocalDraftWorker):
    """LocalDraftWorker whose trainer steps with the strategy's loss (same cache, sampling and state format)."""

    def __init__(self, draft, embed, trainer_config, cache_config, batch_tokens: int, seed: int = 0,
                 target_head: nn.Module | None = None, strategy: StrategyConfig = StrategyConfig()):
        super().__init__(draft, embed, trainer_config, cache_config, batch_tokens, seed, target_head,
                         loss=StrategyLoss.of(trainer_config, strategy))


def train_budget(train_steps: int, strategy: StrategyConfig, acceptance: float | None, reference: float | None,
                 acc_gain: float | None = 0.0) -> int:
    """Optimizer steps for this boundary: boost_factor x train_steps when acceptance fell more than boost_drop
    below the reference; hold_factor x (at least 1 unless it is 0) when it held or rose (>= the reference) and the
    draft's last training gained less than hold_max_gain step-1 accuracy within itself (`acc_gain`,
    TrainResult.acc_gain; None = not known yet, no shrinking); else train_steps."""
    if acceptance is None or reference is None:
        return train_steps
    if acceptance < reference - strategy.boost_drop:
        return int(round(train_steps * strategy.boost_factor))
    if acceptance >= reference and acc_gain is not None and acc_gain < strategy.hold_max_gain:
        # at least one step unless hold_factor is 0 (train_steps=2 at 0.25 would round to none)
        return max(int(strategy.hold_factor > 0 and train_steps > 0), int(round(train_steps * strategy.hold_factor)))
    return train_steps


class UntilBoundaryDraftWorker(BackgroundDraftWorker):
    """A BackgroundDraftWorker whose run does not stop after a fixed count: started at boundary v,
    it trains at least `num_steps` and then keeps going, one optimizer step at a time, until the
    next boundary asks for its weights (or `max_steps`). The draft compute then follows the step's
    length (generation + policy update) instead of a number chosen ahead. Its pushes depend on
    thread timing, so it is not bit-reproducible (the replay lab measures fixed budgets instead)."""

    def __init__(self, inner: LocalDraftWorker, max_steps: int = 10_000):
        super().__init__(inner)
        self.max_steps = max_steps
        self._stop = threading.Event()
        self._train_fixed = inner.train

    def train(self, num_steps: int) -> TrainResult:
        stop = threading.Event()  # the new run's flag; the next boundary sets it
        self.inner.train = lambda n: self._until_boundary(n, stop)
        result = super().train(num_steps)  # stops and collects the run in flight, starts the new one
        self._stop = stop
        return result

    def _collect(self) -> None:
        self._stop.set()  # every wait for the run in flight (train, state_dict, close) ends it first
        super()._collect()

    def _until_boundary(self, min_steps: int, stop: threading.Event) -> TrainResult:
        parts = [self._train_fixed(min_steps)] if min_steps else []
        while not stop.is_set() and sum(p.steps for p in parts) < self.max_steps:
            parts.append(self._train_fixed(1))
        n = max(1, sum(p.steps for p in parts))
        k = max((len(p.step_acc) for p in parts), default=0)
        return TrainResult(steps=sum(p.steps for p in parts), loss=sum(p.loss * p.steps for p in parts) / n,
                           step_acc=tuple(sum(p.step_acc[i] * p.steps for p in parts if p.step_acc) / n for i in range(k)),
                           tokens=sum(p.tokens for p in parts), grad_norm=sum(p.grad_norm * p.steps for p in parts) / n,
                           seconds=sum(p.seconds for p in parts),
                           acc_gain=parts[0].acc_gain if parts else math.nan)  # the fixed run's (steps 1..min)
