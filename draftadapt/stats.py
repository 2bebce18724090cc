"""Two-sample homogeneity tests for token samples: the statistics behind every lossless claim."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Hashable, Sequence


@dataclass(frozen=True)
class Homogeneity:
    statistic: float  # chi-square statistic of the 2 x C contingency table
    dof: int  # degrees of freedom after pooling rare categories
    pvalue: float  # P(statistic this large | both samples from one distribution)
    categories: int  # categories kept (rare ones pooled into one)


def chi2_homogeneity(a: Sequence[Hashable], b: Sequence[Hashable], min_expected: float = 5.0) -> Homogeneity:
    """Chi-square test that samples `a` and `b` come from the same categorical distribution.

    Categories whose expected count falls below `min_expected` in either sample are pooled into
    one "other" category, so the chi-square approximation holds.
    """
    from scipy.stats import chi2

    if not a or not b:
        raise ValueError("chi2_homogeneity needs two non-empty samples")
    ca, cb = Counter(a), Counter(b)
    na, nb = len(a), len(b)
    frac_a = na / (na + nb)
    keep, other_a, other_b = [], 0, 0
    for k in set(ca) | set(cb):
        tot = ca[k] + cb[k]
        if tot * min(frac_a, 1 - frac_a) >= min_expected:
            keep.append((ca[k], cb[k]))
        else:
            other_a, other_b = other_a + ca[k], other_b + cb[k]
    if other_a + other_b > 0:
        keep.append((other_a, other_b))
    if len(keep) < 2:
        return Homogeneity(0.0, 0, 1.0, len(keep))
    stat = 0.0
    for xa, xb in keep:
        tot = xa + xb
        ea, eb = tot * frac_a, tot * (1 - frac_a)
        stat += (xa - ea) ** 2 / ea + (xb - eb) ** 2 / eb
    dof = len(keep) - 1
    return Homogeneity(stat, dof, float(chi2.sf(stat, dof)), len(keep))


def detectable_w(n_a: int, n_b: int, dof: int, alpha: float, power: float = 0.8) -> float:
    """Smallest Cohen's w of the 2 x C table (w^2 = chi^2 / N) that `chi2_homogeneity` at level
    `alpha` detects with probability `power` (non-central chi-square, non-centrality N w^2).

    The power statement every lossless check carries. For equal arms drawn from distributions p
    and q, w^2 = 1/4 * sum_i (p_i - q_i)^2 / m_i with m = (p + q) / 2 (w = 0.1 is "small"; moving
    0.1 of probability from a token at 0.2 to one at 0.2 is w = 0.16). Checked by simulation in tests/test_stats.py.
    """
    from scipy.optimize import brentq
    from scipy.stats import chi2, ncx2

    if dof < 1:
        raise ValueError(f"dof={dof}: a test needs at least two categories")
    crit, n = chi2.isf(alpha, dof), n_a + n_b
    lam = brentq(lambda x: ncx2.sf(crit, dof, x) - power, 1e-9, 1e6)
    return float((lam / n) ** 0.5)


def detectable_shift(n_a: int, n_b: int, p: float, alpha: float, power: float = 0.8) -> float:
    """Smallest difference of a proportion near `p` (accuracy, a style share) between two arms of
    n_a and n_b samples that a two-sided z test at level `alpha` detects with probability `power`."""
    from scipy.stats import norm

    z = norm.isf(alpha / 2) + norm.isf(1 - power)
    return float(z * (p * (1 - p) * (1 / n_a + 1 / n_b)) ** 0.5)


def proportions_pvalue(k_a: int, n_a: int, k_b: int, n_b: int) -> float:
    """Two-sided p-value of the pooled two-proportion z test (k successes out of n per arm)."""
    from scipy.stats import norm

    pooled = (k_a + k_b) / (n_a + n_b)
    se = (pooled * (1 - pooled) * (1 / n_a + 1 / n_b)) ** 0.5
    if se == 0:
        return 1.0
    return float(2 * norm.sf(abs(k_a / n_a - k_b / n_b) / se))
