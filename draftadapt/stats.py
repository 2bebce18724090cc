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
