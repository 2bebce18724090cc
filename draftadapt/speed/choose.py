"""The k chooser: per batch size, the draft length with the highest predicted speed-up, from the last
steps' per-position acceptance and calibrated costs; a schedule vLLM's num_speculative_tokens_per_batch_size takes."""
from __future__ import annotations

from typing import Callable, Sequence

from .model import Acceptance, Costs, Schedule


def choose_schedule(costs: Costs, acc: Acceptance, max_k: int, max_batch: int, min_gain: float = 0.02,
                    extrapolate: bool = False) -> Schedule:
    """Per batch size, the k in 0..max_k with the highest predicted speed-up; k=0 (off) unless some
    k beats plain decoding by more than `min_gain`. Consecutive equal ks merge into one range.

    k never exceeds the positions whose acceptance was measured (len(acc.rates)) unless
    `extrapolate`: the geometric tail past them over-predicts a TTT-trained draft (its acceptance
    falls faster past the steps it was trained for), and a chooser that trusts it picks a k that
    loses to the best fixed one (measured: benchmarks/results/spec_speed_heavy_eagle3.json)."""
    if max_k < 1 or max_batch < 1:
        raise ValueError(f"max_k={max_k}, max_batch={max_batch}: both must be >= 1")
    top = max_k if extrapolate else min(max_k, len(acc.rates))
    best = []
    for b in range(1, max_batch + 1):
        gains = [(costs.speedup(acc, b, k), -k) for k in range(1, top + 1)]  # ties: the smaller k
        s, k = max(gains)
        best.append(-k if s > 1.0 + min_gain else 0)
    sched: Schedule = []
    for b, k in enumerate(best, start=1):
        if sched and sched[-1][2] == k:
            sched[-1] = (sched[-1][0], b, k)
        else:
            sched.append((b, b, k))
    return sched


def schedule_k(schedule: Schedule) -> Callable[[int], int]:
    """k(b) of a schedule (the last range carries on past its end, as vLLM does)."""
    def k_of(b: int) -> int:
        for lo, hi, k in schedule:
            if lo <= b <= hi:
                return k
        return schedule[-1][2]
    return k_of


def acceptance_from_counts(accepted_per_pos: Sequence[int], drafts: int, k_min: int) -> Acceptance | None:
    """Per-position acceptance from counter deltas of steps that ran a k schedule. Every draft had
    positions 0..k_min-1 (k_min = the smallest k > 0 in use), so only those are unbiased; later
    positions come from the geometric tail of `Acceptance.extended`. None when nothing was drafted."""
    if drafts <= 0 or k_min < 1 or len(accepted_per_pos) < k_min:
        return None
    rates = [min(1.0, a / drafts) for a in accepted_per_pos[:k_min]]
    rates = [max(min(rates[: i + 1]), 1e-6) for i in range(len(rates))]
    return Acceptance(tuple(rates))


def merge_acceptance(new: Acceptance | None, old: Acceptance | None) -> Acceptance | None:
    """Fresh rates for the positions just measured, the older estimate for positions past them (a
    schedule that drafts fewer tokens at some batch sizes measures fewer positions: without this the
    chooser's horizon would ratchet down to the smallest k ever chosen)."""
    if new is None or old is None or len(old.rates) <= len(new.rates):
        return new or old
    rates = list(new.rates)
    for i in range(len(new.rates), len(old.rates)):  # old conditional rates continue the new chain
        rates.append(rates[-1] * old.conditional()[i])
    return Acceptance(tuple(rates))
