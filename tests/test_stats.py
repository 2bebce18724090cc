"""The homogeneity test behind the lossless claims: calibrated under the null, powerful off it."""
import random

from draftadapt.stats import chi2_homogeneity


def _draw(rng, probs, n):
    return rng.choices(range(len(probs)), weights=probs, k=n)


def test_false_alarm_rate_matches_alpha_under_the_null():
    rng, probs = random.Random(0), [0.5, 0.2, 0.1, 0.1, 0.05, 0.03, 0.02]
    trials, alpha = 400, 0.05
    rejections = sum(chi2_homogeneity(_draw(rng, probs, 300), _draw(rng, probs, 300)).pvalue < alpha
                     for _ in range(trials))
    # Binomial(400, 0.05): mean 20, sd 4.4; [6, 36] is a > 99.9% band.
    assert 6 <= rejections <= 36, rejections


def test_detects_a_modest_shift():
    rng = random.Random(1)
    p, q = [0.5, 0.3, 0.2], [0.4, 0.35, 0.25]
    assert chi2_homogeneity(_draw(rng, p, 2000), _draw(rng, q, 2000)).pvalue < 1e-4


def test_rare_categories_are_pooled():
    a = [0] * 100 + [1] * 100 + [7]
    b = [0] * 100 + [1] * 100 + [8]
    res = chi2_homogeneity(a, b)
    assert res.categories == 3 and res.pvalue > 0.5
