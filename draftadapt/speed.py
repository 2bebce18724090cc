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
  what a forward over b*n tokens costs (`LinearCost`: fixed + per_token * tokens; fixed is the
  weight read that makes batch 1 memory-bound, per_token the compute that makes large batches pay
  for every drafted token).
- a rollout is a list of alive-batch sizes per plain decode step; under speculation each such
  step's worth of tokens costs round(b, k(b)) / E(k(b)).
Time and memory: O(len(trajectory) * k) arithmetic; nothing model-sized.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, field
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
class Costs:
    """Cost of a plain decode step and of a spec round as functions of the batch size b."""

    verify: LinearCost  # target forward over b*n query tokens
    draft: LinearCost = LinearCost(0.0, 0.0)  # one draft step over b sequences (k of them per round)
    overhead: LinearCost = LinearCost(0.0, 0.0)  # per spec round, by b: rejection sampling, n-gram lookup

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
        return k * self.draft(b) + self.verify(b * (n + 1)) + self.overhead(b)

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


def choose_schedule(costs: Costs, acc: Acceptance, max_k: int, max_batch: int, min_gain: float = 0.02) -> Schedule:
    """Per batch size, the k in 0..max_k with the highest predicted speed-up; k=0 (off) unless some
    k beats plain decoding by more than `min_gain`. Consecutive equal ks merge into one range."""
    if max_k < 1 or max_batch < 1:
        raise ValueError(f"max_k={max_k}, max_batch={max_batch}: both must be >= 1")
    best = []
    for b in range(1, max_batch + 1):
        gains = [(costs.speedup(acc, b, k), k) for k in range(1, max_k + 1)]
        s, k = max(gains)
        best.append(k if s > 1.0 + min_gain else 0)
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


def fit_linear(xs: Sequence[float], ys: Sequence[float]) -> LinearCost:
    """Least-squares fixed + per_token * x (the per_token slope clipped at 0)."""
    n = len(xs)
    if n < 2:
        raise ValueError("fit_linear needs >= 2 points")
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = max(0.0, sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx) if sxx else 0.0
    return LinearCost(my - slope * mx, slope)


@dataclass(frozen=True)
class Measured:
    """One measured config: plain step time and spec round time at batch b, draft length k."""

    b: int  # sequences alive throughout
    k: int  # draft length
    plain_step_s: float  # seconds per plain decode step at batch b
    spec_round_s: float  # seconds per spec round (wall / verification rounds)
    rates: tuple[float, ...] = ()  # per-position acceptance measured in this config
    proposed: float | None = None  # draft tokens per sequence and round (None = k)


def calibrate(fit: Sequence[Measured]) -> Costs:
    """Costs from measurements, one non-negative least-squares fit over plain steps and spec rounds
    together, each row weighted by 1/its time (relative errors): plain step = verify(b); spec round =
    k draft(b) + verify(b (k+1)) + overhead(b). Six unknowns: fixed and per-token part of each."""
    a, y = [], []
    for m in {(m.b,): m for m in fit}.values():  # one plain row per batch size
        a.append((1.0, m.b, 0.0, 0.0, 0.0, 0.0))
        y.append(m.plain_step_s)
    for m in fit:
        n = m.k if m.proposed is None else m.proposed
        a.append((1.0, m.b * (n + 1), m.k, m.k * m.b, 1.0, m.b))
        y.append(m.spec_round_s)
    w = [1.0 / max(v, 1e-12) for v in y]
    c = _lstsq([tuple(x * wi for x in r) for r, wi in zip(a, w)], [v * wi for v, wi in zip(y, w)])
    return Costs(LinearCost(c[0], c[1]), LinearCost(c[2], c[3]), LinearCost(c[4], c[5]))


def _lstsq(a: list[tuple], y: list[float]) -> list[float]:
    """Non-negative least squares (a cost has no negative part; unconstrained fits of noisy timings
    extrapolate to nonsense), by projected coordinate descent: a handful of unknowns."""
    n = len(a[0])
    x = [0.0] * n
    for _ in range(2000):
        for j in range(n):
            den = sum(r[j] * r[j] for r in a)
            if den == 0:
                continue
            resid = [yi - sum(r[i] * x[i] for i in range(n) if i != j) for r, yi in zip(a, y)]
            x[j] = max(0.0, sum(r[j] * e for r, e in zip(a, resid)) / den)
    return x


# Published inputs (Qwen3-8B GRPO, DAPO-Math, EAGLE-3; see the issue and DESIGN.md).
PUBLISHED = {
    "rl_zero": {"al_k3": 3.32, "gen_s": (100.0, 56.6), "r_gen": 0.661, "k5": 1.44, "k7": 1.21,
                "ngram_al": 2.47, "ngram": 0.7, "step_bound": 1.86, "step": 1.41},
    "rl_think": {"al_k3": 2.77, "gen_s": (133.6, 87.0), "r_gen": 0.721, "k5": 0.84, "k7": 0.71,
                 "ngram_al": 2.05, "ngram": 0.5, "step_bound": 1.85, "step": 1.35},
    "sim_235b": {"al_k3": 3.0, "rollout": 2.72, "step": 1.70, "async_rollout": 3.5, "async_step": 2.5},
}


class Check(NamedTuple):
    quantity: str
    published: float
    model: float
    how: str  # fitted / predicted / bound, and the assumption used

    @property
    def error(self) -> float:
        return self.model / self.published - 1.0


def published_checks() -> list[Check]:
    """Reproduce the published figures from published inputs. Fitted on k=3: c per drafted token;
    the acceptance curve is not published, so AL(k) comes from a constant conditional rate."""
    out = []
    for name in ("rl_zero", "rl_think"):
        p = PUBLISHED[name]
        acc, s3 = Acceptance.from_length(p["al_k3"], 3), p["gen_s"][0] / p["gen_s"][1]
        c = (p["al_k3"] / s3 - 1.0) / 3
        costs = Costs.relative(c)
        out.append(Check(f"{name} gen k=3", s3, costs.speedup(acc, 1, 3), f"fitted: c={c:.3f} per drafted token"))
        flat = Acceptance(acc.rates + (0.0,))  # AL stops growing past k=3 (a TTT-3 draft)
        for k in (5, 7):
            implied = (acc.length(3) / p[f"k{k}"] - 1.0) / k
            out.append(Check(f"{name} gen k={k}", p[f"k{k}"], costs.speedup(acc, 1, k),
                             f"predicted: same c, geometric AL({k})={acc.length(k):.2f}"))
            out.append(Check(f"{name} gen k={k} flat AL", p[f"k{k}"], costs.speedup(flat, 1, k),
                             f"predicted: same c, AL({k})=AL(3); published needs c>={implied:.3f}"))
        out.append(Check(f"{name} step bound", p["step_bound"], step_bound(p["al_k3"], p["r_gen"]), "bound formula"))
        out.append(Check(f"{name} step k=3", p["step"], step_speedup(s3, p["r_gen"]).sync, "predicted from gen speed-up, R_gen"))
        ng_acc = Acceptance.from_length(p["ngram_al"], 3)
        out.append(Check(f"{name} n-gram k=3", p["ngram"], costs.speedup(ng_acc, 1, 3),
                         "predicted with EAGLE's c (n-gram k and its CPU cost are not published)"))
    s = PUBLISHED["sim_235b"]
    r_gen = PUBLISHED["rl_zero"]["r_gen"]
    sp = step_speedup(s["rollout"], r_gen)
    out.append(Check("235B sync step", s["step"], sp.sync, f"predicted from rollout 2.72x, R_gen={r_gen} (8B's; not published)"))
    out.append(Check("235B async step", s["async_step"], step_speedup(s["async_rollout"], r_gen).async_vs_sync,
                     "predicted from async rollout 3.5x, R_gen assumed, max(gen, train) overlap"))
    return out


def _parse_rates(text: str) -> Acceptance:
    return Acceptance(tuple(float(x) for x in text.split(",")))


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m draftadapt.speed", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("published", help="reproduce the published figures from published inputs")
    for name in ("predict", "choose"):
        p = sub.add_parser(name, help="rollout/step speed-up" if name == "predict" else "k schedule by batch size")
        p.add_argument("--costs", required=True, help="JSON of Costs (as benchmarks/spec_speed.py writes it)")
        p.add_argument("--rates", required=True, help="per-position acceptance, e.g. 0.8,0.6,0.5")
        p.add_argument("--trajectory", help="JSON list: sequences alive per decode step (default: batch 1..32 flat)")
        p.add_argument("--max-k", type=int, default=7)
        p.add_argument("--max-batch", type=int, default=32)
        p.add_argument("--r-gen", type=float, default=0.661, help="generation share of a sync step")
    args = ap.parse_args(argv)
    if args.cmd == "published":
        print(f"{'quantity':<24} {'published':>9} {'model':>7} {'error':>7}  how")
        for c in published_checks():
            print(f"{c.quantity:<24} {c.published:9.2f} {c.model:7.2f} {c.error:+7.1%}  {c.how}")
        return
    costs = costs_from_dict(json.loads(open(args.costs).read()))
    acc = _parse_rates(args.rates)
    sched = choose_schedule(costs, acc, args.max_k, args.max_batch)
    if args.cmd == "choose":
        print(json.dumps(sched))
        return
    traj = json.loads(open(args.trajectory).read()) if args.trajectory else list(range(args.max_batch, 0, -1))
    for label, k in [(f"k={k}", k) for k in range(1, args.max_k + 1)] + [("chosen", schedule_k(sched))]:
        s = rollout_speedup(costs, acc, traj, k)
        st = step_speedup(s, args.r_gen)
        print(f"{label:>7}: rollout {s:.3f}x  step sync {st.sync:.3f}x  async {st.async_vs_async:.3f}x "
              f"(vs sync baseline {st.async_vs_sync:.3f}x)")
    print("schedule:", sched)


def costs_to_dict(c: Costs) -> dict:
    return asdict(c)


def costs_from_dict(d: dict) -> Costs:
    return Costs(**{k: LinearCost(**v) for k, v in d.items()})


if __name__ == "__main__":
    main()
