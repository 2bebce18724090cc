"""Costs from measured timings: `calibrate` (linear in tokens, six numbers) and `calibrate_table`
(verify(T) measured at every token count, the draft's part linear in k per batch size)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .model import Costs, LinearCost, TableCost


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


def calibrate_table(plain: dict[int, float], fit: Sequence[Measured]) -> Costs:
    """Costs from measurements, non-linear in the token count: verify(T) = the plain decode step
    measured at batch T (`plain`: batch -> seconds, covering the b * (k + 1) the model will be asked
    about; past the largest it extends the last segment), and per measured batch size b the rest of
    a spec round, round - verify(b (n + 1)) = overhead(b) + k * draft(b), by least squares over the
    ks measured at b (>= 2 distinct ks). Between measured batch sizes draft and overhead interpolate.
    The rest is linear in k and may be negative (a plain step at batch b(k+1) carries per-sequence
    costs that a verify of b sequences does not)."""
    if len(plain) < 2:
        raise ValueError("calibrate_table needs plain decode steps at >= 2 batch sizes")
    plain = {int(b): t for b, t in plain.items()}  # JSON keys are strings
    verify = TableCost(tuple(float(b) for b in sorted(plain)), tuple(plain[b] for b in sorted(plain)))
    by_b: dict[int, list[tuple[float, float]]] = {}
    for m in fit:
        n = m.k if m.proposed is None else m.proposed
        by_b.setdefault(m.b, []).append((float(m.k), m.spec_round_s - verify(m.b * (n + 1))))
    bs, ds, os_ = [], [], []
    for b in sorted(by_b):
        pts = by_b[b]
        if len({k for k, _ in pts}) < 2:
            raise ValueError(f"calibrate_table: batch {b} has spec rounds at one k only; measure >= 2 ks per batch")
        line = _ols([k for k, _ in pts], [r for _, r in pts])
        bs.append(float(b))
        ds.append(line.per_token)
        os_.append(line.fixed)
    return Costs(verify, TableCost(tuple(bs), tuple(ds)), TableCost(tuple(bs), tuple(os_)))


def _ols(xs: Sequence[float], ys: Sequence[float]) -> LinearCost:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return LinearCost(my - slope * mx, slope)


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
