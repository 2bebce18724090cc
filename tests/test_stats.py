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


def test_detectable_w_is_the_effect_detected_with_the_stated_power():
    """Simulate two categorical distributions whose 2 x C table has Cohen's w = detectable_w(...):
    the chi-square test must reject at about the stated power (80%), and at ~alpha when equal."""
    import numpy as np

    from draftadapt.stats import chi2_homogeneity, detectable_w

    n, alpha, c = 300, 0.01, 5
    w = detectable_w(n, n, c - 1, alpha)
    p = np.full(c, 1 / c)
    d = np.array([1, -1, 1, -1, 0.0])
    # equal arms: w^2 = sum_i (p_i - q_i)^2 / (p_i + q_i) / 2 ... solve the scale numerically
    def w_of(s):
        q = p + s * d
        return float(np.sqrt(0.25 * (((p - q) ** 2) / ((p + q) / 2)).sum()))
    s = next(x for x in np.linspace(0, 0.19, 2000) if w_of(x) >= w)
    q = p + s * d
    rng = np.random.default_rng(0)
    reps = 300
    hits = sum(chi2_homogeneity(rng.choice(c, n, p=p).tolist(), rng.choice(c, n, p=q).tolist()).pvalue < alpha
               for _ in range(reps))
    nulls = sum(chi2_homogeneity(rng.choice(c, n, p=p).tolist(), rng.choice(c, n, p=p).tolist()).pvalue < alpha
                for _ in range(reps))
    assert 0.7 <= hits / reps <= 0.9, (w, hits / reps)
    assert nulls / reps <= 0.03, nulls / reps


def test_detectable_shift_matches_a_simulated_two_proportion_test():
    import numpy as np

    from draftadapt.stats import detectable_shift, proportions_pvalue

    n, p, alpha = 2000, 0.7, 0.01
    d = detectable_shift(n, n, p, alpha)
    rng = np.random.default_rng(1)
    hits = sum(proportions_pvalue(int(rng.binomial(n, p)), n, int(rng.binomial(n, p - d)), n) < alpha for _ in range(400))
    assert 0.7 <= hits / 400 <= 0.9, (d, hits / 400)
