"""Where speculation pays: a speed-up model for speculative decoding in RL rollouts, and a k chooser.

Inputs are plain numbers - per-position acceptance, the draft's and verifier's cost as functions
of batch size, a rollout's batch-size trajectory (sequences alive per decode step) and the step's
time split R_gen - and the output is rollout and step speed-up for sync and async RL, or a
`[(lo, hi, k), ...]` schedule of draft lengths by batch size. It knows nothing of vLLM: the engine
module turns a schedule into engine settings; benchmarks measure the inputs.

The model (chain drafting, expected values):
- E(k) = 1 + sum_{i<k} p_i, p_i = P(drafts 0..i all accepted) (vLLM's acceptance_rate-pos-i).
- one plain decode step at batch b costs verify(b); a spec round at k costs
  k * draft(b) + verify(b * (k + 1)) + overhead(b): a verify of b sequences x n query tokens costs
  what a forward over b*n tokens costs. Two forms of a cost: `LinearCost` (fixed + per_token *
  tokens; fixed is the weight read that makes batch 1 memory-bound, per_token the compute that
  makes large batches pay for every drafted token) and `TableCost` (measured points, piecewise
  linear between them). A forward's time is NOT linear in its tokens on real hardware (GEMM
  efficiency steps with the token count), so `calibrate_table` takes verify(T) from plain decode
  steps measured at batch T itself - up to the largest b * (k + 1) the chooser may use - and fits
  only the draft's part, linear in k per batch size.
- a rollout is a list of alive-batch sizes per plain decode step; under speculation each such
  step's worth of tokens costs round(b, k(b)) / E(k(b)).
Time and memory: O(len(trajectory) * k) arithmetic; nothing model-sized.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, NamedTuple, Sequence

Schedule = list[tuple[int, int, int]]  # vLLM num_speculative_tokens_per_batch_size: inclusive (lo, hi, k)


@dataclass(frozen=True)
class Acceptance:
    """Per-position acceptance of a chain drafter, as vLLM reports it."""

    rates: tuple[float, ...]  # [k_measured] P(draft positions 0..i all accepted), non-increasing

    def __post_init__(self) -> None:
        r = self.rates
        if not r or any(not 0.0 <= x <= 1.0 for x in r) or any(b > a + 1e-9 for a, b in zip(r, r[1:])):
            raise ValueError(f"Acceptance.rates={r}: need a non-empty, non-increasing list in [0, 1] "
                             "(vLLM's spec_acceptance_rate-pos-i, i = 0..k-1)")

    @classmethod
    def from_length(cls, acceptance_length: float, k: int) -> "Acceptance":
        """Constant conditional rate a with 1 + a + ... + a^k = AL (when only AL is published)."""
        if not 1.0 <= acceptance_length <= k + 1:
            raise ValueError(f"acceptance_length={acceptance_length} must lie in [1, k+1={k + 1}]")
        lo, hi = 0.0, 1.0
        for _ in range(60):
            a = (lo + hi) / 2
            lo, hi = (a, hi) if sum(a ** i for i in range(k + 1)) < acceptance_length else (lo, a)
        return cls(tuple(lo ** (i + 1) for i in range(k)))

    def conditional(self) -> list[float]:
        """P(position i accepted | 0..i-1 accepted)."""
        prev, out = 1.0, []
        for r in self.rates:
            out.append(r / prev if prev > 0 else 0.0)
            prev = r
        return out

    def extended(self, k: int) -> list[float]:
        """Unconditional rates for k positions; past the measured ones the LAST conditional rate
        repeats (a geometric tail: an assumption, reported wherever k exceeds what was measured)."""
        out = list(self.rates[:k])
        tail = self.conditional()[-1]
        while len(out) < k:
            out.append(out[-1] * tail)
        return out

    def length(self, k: int) -> float:
        """Expected tokens per verification (bonus included) when drafting k tokens."""
        return 1.0 + sum(self.extended(k)) if k > 0 else 1.0


@dataclass(frozen=True)
class LinearCost:
    """Seconds (or any unit) as fixed + per_token * tokens."""

    fixed: float  # weight read / launch cost of one forward
    per_token: float  # compute per token in the forward

    def __call__(self, tokens: float) -> float:
        return self.fixed + self.per_token * tokens


@dataclass(frozen=True)
class TableCost:
    """Seconds measured at sizes xs, piecewise linear between them and along the last segment past
    the ends (clipped at 0): a measured curve, whatever shape the hardware gives it."""

    xs: tuple[float, ...]  # increasing sizes (tokens or batch sizes)
    ys: tuple[float, ...]  # seconds at each size

    def __post_init__(self) -> None:
        if len(self.xs) != len(self.ys) or not self.xs or any(b <= a for a, b in zip(self.xs, self.xs[1:])):
            raise ValueError(f"TableCost needs equally many xs and ys, xs strictly increasing: xs={self.xs}")

    def __call__(self, x: float) -> float:
        xs, ys = self.xs, self.ys
        if len(xs) == 1:
            return ys[0]
        i = max(1, min(len(xs) - 1, sum(v <= x for v in xs)))  # segment [i-1, i], the end ones extended
        t = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
        return max(0.0, ys[i - 1] + t * (ys[i] - ys[i - 1]))


Cost = LinearCost | TableCost


@dataclass(frozen=True)
class Costs:
    """Cost of a plain decode step and of a spec round as functions of the batch size b."""

    verify: Cost  # target forward over b*n query tokens
    draft: Cost = LinearCost(0.0, 0.0)  # one draft step over b sequences (k of them per round)
    overhead: Cost = LinearCost(0.0, 0.0)  # per spec round, by b: rejection sampling, n-gram lookup

    @classmethod
    def relative(cls, c: float) -> "Costs":
        """Published-figure form: plain step = 1, a round at k costs 1 + k*c (c per drafted token)."""
        return cls(verify=LinearCost(1.0 - c, c))

    def plain(self, b: int) -> float:
        return self.verify(b)

    def round(self, b: int, k: int, proposed: float | None = None) -> float:
        """proposed: tokens actually drafted per sequence and round (a model drafter: k; n-gram
        proposes fewer when its match is short), which sets the verify length."""
        if k == 0:
            return self.plain(b)
        n = k if proposed is None else proposed
        return max(k * self.draft(b) + self.verify(b * (n + 1)) + self.overhead(b), 1e-12)

    def speedup(self, acc: Acceptance, b: int, k: int, proposed: float | None = None) -> float:
        """Tokens/s with speculation over tokens/s without, at a constant batch b."""
        return self.plain(b) * acc.length(k) / self.round(b, k, proposed)


def rollout_time(costs: Costs, acc: Acceptance, trajectory: Sequence[int], k: int | Callable[[int], int]) -> float:
    """Time of a rollout whose plain decode step t runs trajectory[t] sequences; k fixed or k(b)."""
    k_of = k if callable(k) else (lambda b: k)
    return sum(costs.round(b, k_of(b)) / acc.length(k_of(b)) for b in trajectory if b > 0)


def rollout_speedup(costs: Costs, acc: Acceptance, trajectory: Sequence[int], k: int | Callable[[int], int]) -> float:
    return rollout_time(costs, acc, trajectory, 0) / rollout_time(costs, acc, trajectory, k)


class StepSpeedup(NamedTuple):
    sync: float  # synchronous RL: generation then training, 1 / (R_gen / S + 1 - R_gen)
    async_vs_async: float  # async (lag >= 1) with spec vs async without: the bottleneck stage shrinks
    async_vs_sync: float  # async with spec vs the sync loop without spec


def step_speedup(rollout: float, r_gen: float) -> StepSpeedup:
    """Step speed-up from a rollout speed-up and the generation share R_gen of a sync step.

    Async with policy lag >= 1 overlaps generation of step t+1 with training of step t: a step
    takes max(generation, training) in steady state (the lag sets staleness, not throughput)."""
    if not 0.0 < r_gen < 1.0:
        raise ValueError(f"r_gen={r_gen}: the generation share of a step lies in (0, 1)")
    sync = 1.0 / (r_gen / rollout + 1.0 - r_gen)
    spec_async = max(r_gen / rollout, 1.0 - r_gen)
    return StepSpeedup(sync, max(r_gen, 1.0 - r_gen) / spec_async, 1.0 / spec_async)


def step_bound(acceptance_length: float, r_gen: float) -> float:
    """Upper bound on the sync step speed-up: speculation free of cost, 1 / (R_gen / AL + 1 - R_gen)."""
    return 1.0 / (r_gen / acceptance_length + 1.0 - r_gen)


def trajectory_from_lengths(lengths: Sequence[int], max_num_seqs: int | None = None) -> list[int]:
    """Sequences alive at each plain decode step when requests of these output lengths start
    together and a freed slot takes the next waiting request (vLLM's continuous batching)."""
    cap = max_num_seqs or len(lengths)
    if cap < 1:
        raise ValueError(f"max_num_seqs={max_num_seqs} must be >= 1")
    waiting, running, out = list(lengths), [], []
    while waiting or running:
        while waiting and len(running) < cap:
            running.append(waiting.pop(0))
        out.append(len(running))
        running = [r - 1 for r in running if r > 1]
    return out


def costs_to_dict(c: Costs) -> dict:
    return asdict(c)


def costs_from_dict(d: dict) -> Costs:
    """Inverse of costs_to_dict: {"fixed", "per_token"} is a LinearCost, {"xs", "ys"} a TableCost."""
    def one(name: str, v: dict) -> Cost:
        if set(v) == {"fixed", "per_token"}:
            return LinearCost(**v)
        if set(v) == {"xs", "ys"}:
            return TableCost(tuple(v["xs"]), tuple(v["ys"]))
        raise ValueError(f"costs[{name!r}] = {v}: expected {{'fixed', 'per_token'}} or {{'xs', 'ys'}} "
                         "(as benchmarks/spec_speed.py writes them)")
    return Costs(**{k: one(k, v) for k, v in d.items()})
