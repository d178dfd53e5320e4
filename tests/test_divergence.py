"""Tests for em_callbacks.divergence against exact values on enumerable distributions.

Every stochastic check is seeded; repeated-draw checks assert (a) the mean bias is within
~3 standard errors of the mean and (b) 95% normal CIs cover the exact value in 0.91-0.98 of
draws.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from em_callbacks.divergence import (
    MEASURES,
    ConfidenceInterval,
    DissimilarityResult,
    combine_prompts,
    discrete_dissimilarity,
    dissimilarity,
    mixture_logp,
    one_sided_tv,
    pushforward_dissimilarity,
    pushforward_noise_floor,
    window_dissimilarity,
)

N_DRAWS = 400

# Two categorical distributions over 5 outcomes.
P5 = np.array([0.40, 0.25, 0.15, 0.12, 0.08])
Q5 = np.array([0.20, 0.20, 0.30, 0.10, 0.20])


def _log(a):
    with np.errstate(divide="ignore"):
        return np.log(np.asarray(a, dtype=np.float64))


def _sample(rng, probs, size):
    return rng.choice(len(probs), size=size, p=probs)


def _assert_calibrated(values, stderrs, truth, lo=0.91, hi=0.98):
    values = np.asarray(values)
    stderrs = np.asarray(stderrs)
    r = len(values)
    sem = values.std(ddof=1) / math.sqrt(r)
    bias = values.mean() - truth
    assert abs(bias) <= 3 * sem + 1e-12, f"bias {bias:.4g} exceeds 3 SEM {3 * sem:.4g}"
    z = 1.959963984540054
    covered = np.mean((values - z * stderrs <= truth) & (truth <= values + z * stderrs))
    assert lo <= covered <= hi, f"coverage {covered:.3f} outside [{lo}, {hi}]"


def _draw_categorical(p, q, n_p, n_q, measure, seed, r=N_DRAWS):
    rng = np.random.default_rng(seed)
    lp, lq = _log(p), _log(q)
    vals, ses = [], []
    xs = _sample(rng, p, (r, n_p))
    ys = _sample(rng, q, (r, n_q))
    for x, y in zip(xs, ys):
        res = dissimilarity(lp[x], lq[x], lp[y], lq[y], measure=measure)
        vals.append(res.value)
        ses.append(res.stderr)
    return np.array(vals), np.array(ses)


# --------------------------------------------------------------------------- exact values


def test_discrete_dissimilarity_exact_values():
    assert discrete_dissimilarity(P5, Q5, "tv") == pytest.approx(0.27)
    lin = 0.5 * np.sum((P5 - Q5) ** 2 / (P5 + Q5))
    assert discrete_dissimilarity(P5, Q5, "linear") == pytest.approx(lin)
    m = (P5 + Q5) / 2
    js = 0.5 * np.sum(P5 * np.log(P5 / m)) + 0.5 * np.sum(Q5 * np.log(Q5 / m))
    assert discrete_dissimilarity(P5, Q5, "js") == pytest.approx(js)
    # zeros: 0/0 skipped, 0 log 0 = 0; disjoint supports hit the upper bounds
    a, b = np.array([0.5, 0.5, 0.0, 0.0]), np.array([0.0, 0.0, 0.5, 0.5])
    assert discrete_dissimilarity(a, b, "tv") == 1.0
    assert discrete_dissimilarity(a, b, "linear") == 1.0
    assert discrete_dissimilarity(a, b, "js") == pytest.approx(math.log(2))
    c = np.array([0.5, 0.5, 0.0, 0.0])
    for measure in MEASURES:
        assert discrete_dissimilarity(a, c, measure) == 0.0


def test_confidence_interval():
    res = DissimilarityResult("tv", 0.5, 0.1, 10, "two-sided")
    ci = res.confidence_interval()
    assert isinstance(ci, ConfidenceInterval)
    assert ci.low == pytest.approx(0.5 - 0.1959964, abs=1e-6)
    assert ci.high == pytest.approx(0.5 + 0.1959964, abs=1e-6)
    ci90 = res.confidence_interval(0.90)
    assert ci90.high - ci90.low == pytest.approx(2 * 0.1644854, abs=1e-6)
    for bad in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="confidence_level"):
            res.confidence_interval(bad)


# --------------------------------------------------------------------------- two-sided estimator


@pytest.mark.parametrize("measure", MEASURES)
def test_two_sided_calibrated_on_categorical(measure):
    truth = discrete_dissimilarity(P5, Q5, measure)
    vals, ses = _draw_categorical(P5, Q5, 60, 60, measure, seed=11)
    _assert_calibrated(vals, ses, truth)


@pytest.mark.parametrize("measure", MEASURES)
def test_two_sided_unequal_sample_counts(measure):
    truth = discrete_dissimilarity(P5, Q5, measure)
    vals, ses = _draw_categorical(P5, Q5, 30, 90, measure, seed=12)
    _assert_calibrated(vals, ses, truth)


# 2-token sequences over a 3-word vocabulary: x = (x1, x2), p(x) = p(x1) p(x2 | x1).
P1 = np.array([0.5, 0.3, 0.2])
P2 = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.6, 0.4, 0.0]])  # p((2,2)) = 0
Q1 = np.array([0.3, 0.3, 0.4])
Q2 = np.array([[0.0, 0.5, 0.5], [0.3, 0.3, 0.4], [0.2, 0.3, 0.5]])  # q((0,0)) = 0


def _sample_sequences(rng, first, cond, size):
    x1 = _sample(rng, first, size)
    u = rng.random(size)
    cdf = np.cumsum(cond[x1], axis=-1)
    x2 = np.minimum((cdf < u[..., None]).sum(axis=-1), cond.shape[1] - 1)
    return x1, x2


def _seq_logp(first, cond, x1, x2):
    # teacher forcing: sum of per-token log-probs
    return _log(first)[x1] + _log(cond)[x1, x2]


@pytest.mark.parametrize("measure", MEASURES)
def test_two_sided_calibrated_on_token_sequences(measure):
    joint_p = (P1[:, None] * P2).ravel()
    joint_q = (Q1[:, None] * Q2).ravel()
    truth = discrete_dissimilarity(joint_p, joint_q, measure)
    rng = np.random.default_rng(21)
    vals, ses = [], []
    a1, a2 = _sample_sequences(rng, P1, P2, (N_DRAWS, 60))
    b1, b2 = _sample_sequences(rng, Q1, Q2, (N_DRAWS, 60))
    saw_neg_inf = False
    for i in range(N_DRAWS):
        qp = _seq_logp(Q1, Q2, a1[i], a2[i])
        pq = _seq_logp(P1, P2, b1[i], b2[i])
        saw_neg_inf |= bool(np.isneginf(qp).any() and np.isneginf(pq).any())
        res = dissimilarity(
            _seq_logp(P1, P2, a1[i], a2[i]), qp, pq, _seq_logp(Q1, Q2, b1[i], b2[i]),
            measure=measure,
        )
        vals.append(res.value)
        ses.append(res.stderr)
    assert saw_neg_inf, "test case should exercise q(x) = 0 and p(y) = 0"
    _assert_calibrated(vals, ses, truth)


def test_identical_distributions_give_zero():
    rng = np.random.default_rng(3)
    lp = _log(P5)
    x, y = _sample(rng, P5, 50), _sample(rng, P5, 40)
    for measure in MEASURES:
        res = dissimilarity(lp[x], lp[x], lp[y], lp[y], measure=measure)
        assert res.value == pytest.approx(0.0, abs=1e-15)
        ci = res.confidence_interval()
        assert ci.low <= 0.0 <= ci.high
        assert res.n == 90 and res.estimator == "two-sided" and res.measure == measure


def test_disjoint_supports_give_maximum_exactly():
    p = np.array([0.5, 0.5, 0.0, 0.0])
    q = np.array([0.0, 0.0, 0.3, 0.7])
    rng = np.random.default_rng(4)
    x, y = _sample(rng, p, 20), _sample(rng, q, 25)
    lp, lq = _log(p), _log(q)
    tv = dissimilarity(lp[x], lq[x], lp[y], lq[y], measure="tv")
    assert tv.value == 1.0 and tv.stderr == 0.0
    lin = dissimilarity(lp[x], lq[x], lp[y], lq[y], measure="linear")
    assert lin.value == 1.0 and lin.stderr == 0.0
    js = dissimilarity(lp[x], lq[x], lp[y], lq[y], measure="js")
    assert js.value == pytest.approx(math.log(2), abs=1e-15) and js.stderr == pytest.approx(0.0)
    one = one_sided_tv(lp[x], lq[x])
    assert one.value == 1.0 and one.stderr == 0.0


def test_two_sided_hand_computation():
    # d = log 2 on both P samples, -log 2 on both Q samples: |tanh(d/2)| = 1/3
    lpp = np.log([0.2, 0.4])
    lqp = np.log([0.1, 0.2])
    lpq = np.log([0.1, 0.05])
    lqq = np.log([0.2, 0.1])
    res = dissimilarity(lpp, lqp, lpq, lqq, "tv")
    assert res.value == pytest.approx(1 / 3) and res.stderr == pytest.approx(0.0, abs=1e-15)
    res = dissimilarity(lpp, lqp, lpq, lqq, "linear")
    assert res.value == pytest.approx(1 / 9)
    res = dissimilarity(lpp, lqp, lpq, lqq, "js")
    # P side: log 2 - log(1 + 1/2); Q side: log 2 - log(1 + 1/2)
    assert res.value == pytest.approx(math.log(2) - math.log(1.5))


def test_js_numerically_stable_for_extreme_log_ratios():
    lpp = np.array([0.0, -1.0])
    lqp = np.array([-1e4, -2e4])
    lpq = np.array([-3e4, -1e4])
    lqq = np.array([-1.0, -2.0])
    res = dissimilarity(lpp, lqp, lpq, lqq, "js")
    assert np.isfinite(res.value) and res.value == pytest.approx(math.log(2))


# --------------------------------------------------------------------------- one-sided


def test_one_sided_tv_unbiased_and_calibrated():
    truth = discrete_dissimilarity(P5, Q5, "tv")
    rng = np.random.default_rng(31)
    lp, lq = _log(P5), _log(Q5)
    xs = _sample(rng, P5, (N_DRAWS, 100))
    res = [one_sided_tv(lp[x], lq[x]) for x in xs]
    assert all(r.estimator == "one-sided" and r.n == 100 and r.measure == "tv" for r in res)
    _assert_calibrated([r.value for r in res], [r.stderr for r in res], truth)


def test_one_sided_tv_hand_computation():
    res = one_sided_tv(np.log([0.5, 0.2, 0.1]), np.log([0.25, 0.4, 0.05]))
    f = np.array([0.5, 0.0, 0.5])
    assert res.value == pytest.approx(f.mean())
    assert res.stderr == pytest.approx(f.std(ddof=1) / math.sqrt(3))


# --------------------------------------------------------------------------- mixtures / windows


def test_mixture_logp_hand_computation():
    m = np.array([[math.log(0.2), math.log(0.6)], [math.log(0.5), -np.inf]])
    np.testing.assert_allclose(mixture_logp(m), np.log([0.4, 0.25]), rtol=1e-12)
    one = np.log([0.3, 0.7])
    np.testing.assert_array_equal(mixture_logp(one), one)
    np.testing.assert_array_equal(mixture_logp(one[:, None]), one)
    np.testing.assert_allclose(
        mixture_logp(np.log([[0.1, 0.2, 0.6]])), [math.log(0.3)], rtol=1e-12
    )


A1 = np.array([0.50, 0.20, 0.10, 0.10, 0.10])
A2 = np.array([0.30, 0.30, 0.20, 0.10, 0.10])
B1 = np.array([0.10, 0.20, 0.20, 0.30, 0.20])
B2 = np.array([0.20, 0.10, 0.10, 0.20, 0.40])


def _window_inputs(rng, n_l, n_r):
    left, right = (A1 + A2) / 2, (B1 + B2) / 2
    x, y = _sample(rng, left, n_l), _sample(rng, right, n_r)
    L = _log(np.stack([A1, A2], axis=1))  # (K, w) log-probs per outcome and checkpoint
    R = _log(np.stack([B1, B2], axis=1))
    return L[x], R[x], L[y], R[y], x, y


def test_window_matches_mixture_logps_exactly():
    rng = np.random.default_rng(41)
    ll, rl, lr, rr, x, y = _window_inputs(rng, 30, 30)
    left, right = (A1 + A2) / 2, (B1 + B2) / 2
    np.testing.assert_allclose(mixture_logp(ll), np.log(left[x]), rtol=1e-12)
    for measure in MEASURES:
        w = window_dissimilarity(ll, rl, lr, rr, measure=measure)
        d = dissimilarity(
            np.log(left[x]), np.log(right[x]), np.log(left[y]), np.log(right[y]), measure
        )
        assert w.value == pytest.approx(d.value, rel=1e-12)
        assert w.stderr == pytest.approx(d.stderr, rel=1e-9)
        assert w.n == 60 and w.estimator == "two-sided"


def test_window_w2_calibrated_against_exact_mixture_tv():
    truth = discrete_dissimilarity((A1 + A2) / 2, (B1 + B2) / 2, "tv")
    rng = np.random.default_rng(42)
    vals, ses = [], []
    for _ in range(N_DRAWS):
        ll, rl, lr, rr, _, _ = _window_inputs(rng, 60, 60)
        res = window_dissimilarity(ll, rl, lr, rr, measure="tv")
        vals.append(res.value)
        ses.append(res.stderr)
    _assert_calibrated(vals, ses, truth)


# --------------------------------------------------------------------------- combine_prompts


def test_combine_prompts_arithmetic():
    rs = [
        DissimilarityResult("tv", 0.1, 0.03, 10, "two-sided"),
        DissimilarityResult("tv", 0.2, 0.04, 20, "one-sided"),
        DissimilarityResult("tv", 0.6, 0.12, 30, "two-sided"),
    ]
    c = combine_prompts(rs)
    assert c.value == pytest.approx(0.3)
    assert c.stderr == pytest.approx(0.13 / 3)
    assert c.n == 60 and c.estimator == "combined" and c.measure == "tv"
    single = combine_prompts(rs[:1])
    assert single.value == 0.1 and single.stderr == pytest.approx(0.03)


def test_combine_prompts_calibrated():
    pairs = [(P5, Q5), (A1, B1), (A2, B2)]
    truth = np.mean([discrete_dissimilarity(p, q, "linear") for p, q in pairs])
    rng = np.random.default_rng(51)
    vals, ses = [], []
    for _ in range(N_DRAWS):
        per = []
        for p, q in pairs:
            x, y = _sample(rng, p, 30), _sample(rng, q, 30)
            lp, lq = _log(p), _log(q)
            per.append(dissimilarity(lp[x], lq[x], lp[y], lq[y], "linear"))
        c = combine_prompts(per)
        vals.append(c.value)
        ses.append(c.stderr)
    _assert_calibrated(vals, ses, truth)


def test_combine_prompts_errors():
    with pytest.raises(ValueError, match="at least one"):
        combine_prompts([])
    with pytest.raises(ValueError, match="different measures"):
        combine_prompts(
            [
                DissimilarityResult("tv", 0.1, 0.01, 5, "two-sided"),
                DissimilarityResult("js", 0.1, 0.01, 5, "two-sided"),
            ]
        )


# --------------------------------------------------------------------------- pushforward

# Probabilities in multiples of 1/20 so 20 rows can represent a distribution exactly.
P20 = np.array([8, 5, 3, 2, 2]) / 20
Q20 = np.array([4, 4, 6, 2, 4]) / 20
G = np.array([0, 0, 1, 2, 2])  # deterministic judge: outcome -> score bin
ONEHOT = np.eye(3)[G]  # (5, 3) kernel matrix


@pytest.mark.parametrize("measure", MEASURES)
def test_pushforward_one_hot_equals_exact_pushforward(measure):
    xs = np.repeat(np.arange(5), (P20 * 20).round().astype(int))
    ys = np.repeat(np.arange(5), (Q20 * 20).round().astype(int))
    res = pushforward_dissimilarity(ONEHOT[xs], ONEHOT[ys], measure=measure, rng=0)
    exact = discrete_dissimilarity(P20 @ ONEHOT, Q20 @ ONEHOT, measure)
    assert res.value == pytest.approx(exact, abs=1e-12)
    assert res.estimator == "plug-in" and res.n == 40 and res.stderr > 0


def test_pushforward_one_hot_random_samples_equal_histogram_plug_in():
    rng = np.random.default_rng(61)
    x, y = _sample(rng, P5, 77), _sample(rng, Q5, 50)
    hp = np.bincount(G[x], minlength=3) / 77
    hq = np.bincount(G[y], minlength=3) / 50
    for measure in MEASURES:
        res = pushforward_dissimilarity(ONEHOT[x], ONEHOT[y], measure=measure, rng=1)
        assert res.value == pytest.approx(discrete_dissimilarity(hp, hq, measure), abs=1e-12)


# A stochastic judge over 3 outcomes for each of the 5 responses.
KMAT = np.array(
    [[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.1, 0.3, 0.6], [0.05, 0.15, 0.8]]
)


@pytest.mark.parametrize("measure", MEASURES)
def test_data_processing_inequality(measure):
    full_exact = discrete_dissimilarity(P5, Q5, measure)
    push_exact = discrete_dissimilarity(P5 @ KMAT, Q5 @ KMAT, measure)
    assert push_exact <= full_exact + 1e-15
    assert discrete_dissimilarity(P5 @ ONEHOT, Q5 @ ONEHOT, measure) <= full_exact + 1e-15
    rng = np.random.default_rng(71)
    lp, lq = _log(P5), _log(Q5)
    for _ in range(10):
        x, y = _sample(rng, P5, 200), _sample(rng, Q5, 200)
        full = dissimilarity(lp[x], lq[x], lp[y], lq[y], measure)
        push = pushforward_dissimilarity(KMAT[x], KMAT[y], measure, n_resamples=100, rng=2)
        assert push.value <= full.value + 3 * math.hypot(full.stderr, push.stderr)


def test_pushforward_bootstrap_stderr_matches_sampling_spread():
    truth = discrete_dissimilarity(P5 @ KMAT, Q5 @ KMAT, "tv")
    rng = np.random.default_rng(81)
    vals, ses = [], []
    for i in range(200):
        x, y = _sample(rng, P5, 100), _sample(rng, Q5, 100)
        r = pushforward_dissimilarity(KMAT[x], KMAT[y], "tv", n_resamples=200, rng=i)
        vals.append(r.value)
        ses.append(r.stderr)
    vals, ses = np.array(vals), np.array(ses)
    ratio = ses.mean() / vals.std(ddof=1)
    assert 0.8 <= ratio <= 1.25, ratio
    # plug-in is consistent: mean within a few bootstrap SEs of the exact pushforward TV
    assert abs(vals.mean() - truth) < 2 * ses.mean()


@pytest.mark.parametrize("measure", MEASURES)
def test_noise_floor_equals_the_exact_permutation_mean(measure):
    """3 + 4 rows: all 35 splits enumerated; the Monte-Carlo floor converges to their mean."""
    import itertools

    rng = np.random.default_rng(5)
    rows = KMAT[rng.integers(0, 5, 7)]
    exact = np.mean([
        discrete_dissimilarity(rows[list(a)].mean(0), rows[[i for i in range(7) if i not in a]].mean(0), measure)
        for a in itertools.combinations(range(7), 3)
    ])
    floor = pushforward_noise_floor(rows[:3], rows[3:], measure, n_resamples=40_000, rng=1)
    assert floor == pytest.approx(exact, rel=0.02)


def test_noise_floor_is_the_plug_in_bias_under_no_change():
    """Both sides drawn from one distribution: the plug-in D averages to the floor (the floor
    is what an unchanged order parameter reads), and a binary score's floor follows the
    normal approximation sqrt(2/pi) * sqrt(p (1 - p) (1/n_p + 1/n_q))."""
    rng = np.random.default_rng(17)
    values, floors = [], []
    for i in range(300):
        x, y = _sample(rng, P5, 96), _sample(rng, P5, 96)
        values.append(pushforward_dissimilarity(KMAT[x], KMAT[y], "tv", rng=i).value)
        floors.append(pushforward_noise_floor(KMAT[x], KMAT[y], "tv", rng=i))
    assert np.mean(floors) == pytest.approx(np.mean(values), rel=0.1)
    binary = np.eye(2)[(np.arange(400) < 180).astype(int)]  # rate 0.45 exactly
    approx = math.sqrt(2 / math.pi) * math.sqrt(0.45 * 0.55 * (1 / 200 + 1 / 200))
    assert pushforward_noise_floor(binary[:200], binary[200:], rng=0, n_resamples=2000) == pytest.approx(approx, rel=0.1)


def test_noise_floor_edge_cases():
    same = np.tile([0.2, 0.8], (10, 1))
    assert pushforward_noise_floor(same, same) == pytest.approx(0.0, abs=1e-12)  # every split is identical
    assert math.isnan(pushforward_noise_floor(np.empty((0, 2)), same))
    kp = np.insert(KMAT[:4], 1, np.nan, axis=0)  # NaN rows dropped, like pushforward_dissimilarity
    assert pushforward_noise_floor(kp, KMAT, rng=3) == pushforward_noise_floor(KMAT[:4], KMAT, rng=3)
    with pytest.raises(ValueError, match="same number of outcomes"):
        pushforward_noise_floor(KMAT, np.eye(2))


def test_pushforward_drops_nan_rows_and_is_deterministic():
    rng = np.random.default_rng(91)
    x, y = _sample(rng, P5, 40), _sample(rng, Q5, 30)
    kp, kq = KMAT[x], KMAT[y]
    kp_nan = np.insert(kp, [0, 7, 40], np.nan, axis=0)
    kq_nan = kq.copy()
    kq_nan = np.insert(kq_nan, 3, [np.nan, 0.5, 0.5], axis=0)  # one missing entry = missing row
    for measure in MEASURES:
        a = pushforward_dissimilarity(kp, kq, measure, rng=5)
        b = pushforward_dissimilarity(kp_nan, kq_nan, measure, rng=5)
        assert a == b
        assert a.n == 70
    # determinism: same seed, None -> fixed seed, Generator accepted
    assert pushforward_dissimilarity(kp, kq, rng=7) == pushforward_dissimilarity(kp, kq, rng=7)
    assert pushforward_dissimilarity(kp, kq) == pushforward_dissimilarity(kp, kq)
    g1 = pushforward_dissimilarity(kp, kq, rng=np.random.default_rng(7))
    assert g1 == pushforward_dissimilarity(kp, kq, rng=7)
    assert pushforward_dissimilarity(kp, kq, rng=8).stderr != g1.stderr


def test_pushforward_empty_and_single_row_sides():
    k = KMAT[[0, 1, 2]]
    all_nan = np.full((4, 3), np.nan)
    for measure in MEASURES:
        r = pushforward_dissimilarity(all_nan, k, measure)
        assert math.isnan(r.value) and math.isnan(r.stderr)
        r = pushforward_dissimilarity(k, np.empty((0, 3)), measure)
        assert math.isnan(r.value) and math.isnan(r.stderr)
    r = pushforward_dissimilarity(k, KMAT[[4]], "tv")
    assert r.value == pytest.approx(discrete_dissimilarity(k.mean(axis=0), KMAT[4], "tv"))
    assert math.isnan(r.stderr)


# --------------------------------------------------------------------------- validation

_GOOD = np.log([0.2, 0.3, 0.5])


@pytest.mark.parametrize(
    "call",
    [
        lambda: dissimilarity(_GOOD, _GOOD, _GOOD, _GOOD, measure="kl"),
        lambda: window_dissimilarity(_GOOD, _GOOD, _GOOD, _GOOD, measure="hellinger"),
        lambda: pushforward_dissimilarity(KMAT, KMAT, measure="TV"),
        lambda: discrete_dissimilarity(P5, Q5, "chi2"),
    ],
)
def test_unknown_measure_lists_valid_ones(call):
    with pytest.raises(ValueError, match="unknown measure") as info:
        call()
    for m in MEASURES:
        assert m in str(info.value)


def test_mismatched_lengths():
    with pytest.raises(ValueError, match="mismatched lengths.*logp_q_on_p"):
        dissimilarity(_GOOD, _GOOD[:2], _GOOD, _GOOD)
    with pytest.raises(ValueError, match="mismatched lengths.*logp_q_on_q"):
        dissimilarity(_GOOD, _GOOD, _GOOD, _GOOD[:2])
    with pytest.raises(ValueError, match="mismatched lengths"):
        one_sided_tv(_GOOD, _GOOD[:2])
    m = np.zeros((3, 2))
    with pytest.raises(ValueError, match="mismatched lengths.*right_on_left"):
        window_dissimilarity(m, m[:2], m, m)
    with pytest.raises(ValueError, match="left window width mismatch"):
        window_dissimilarity(m, m, m[:, :1], m)
    with pytest.raises(ValueError, match="right window width mismatch"):
        window_dissimilarity(m, m[:, :1], m, m)


def test_too_few_samples():
    one = np.array([-1.0])
    with pytest.raises(ValueError, match="at least 2 samples"):
        dissimilarity(one, one, _GOOD, _GOOD)
    with pytest.raises(ValueError, match="at least 2 samples"):
        dissimilarity(_GOOD, _GOOD, [], [])
    with pytest.raises(ValueError, match="at least 2 samples"):
        one_sided_tv(one, one)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("pos", range(4))
def test_non_finite_log_probs_rejected(bad, pos):
    args = [_GOOD.copy() for _ in range(4)]
    args[pos][1] = bad
    with pytest.raises(ValueError, match="NaN" if np.isnan(bad) else r"\+inf"):
        dissimilarity(*args)


def test_neg_inf_only_allowed_in_cross_scores():
    ok = _GOOD.copy()
    ninf = _GOOD.copy()
    ninf[0] = -np.inf
    dissimilarity(ok, ninf, ninf, ok)  # q(x) = 0 and p(y) = 0 are legitimate
    one_sided_tv(ok, ninf)
    with pytest.raises(ValueError, match="logp_p_on_p contains -inf"):
        dissimilarity(ninf, ok, ok, ok)
    with pytest.raises(ValueError, match="logp_q_on_q contains -inf"):
        dissimilarity(ok, ok, ok, ninf)
    with pytest.raises(ValueError, match="-inf"):
        one_sided_tv(ninf, ok)
    with pytest.raises(ValueError, match="NaN"):
        one_sided_tv(ok, np.array([np.nan, 0.0, 0.0]))


def test_non_1d_arrays_rejected():
    m = np.zeros((3, 2))
    with pytest.raises(ValueError, match="1-D"):
        dissimilarity(m, m, m, m)
    with pytest.raises(ValueError, match="1-D"):
        dissimilarity(np.float64(0.0), _GOOD, _GOOD, _GOOD)
    with pytest.raises(ValueError, match="1-D"):
        one_sided_tv(m, m)
    with pytest.raises(ValueError, match="1-D or 2-D"):
        mixture_logp(np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="1-D or 2-D"):
        window_dissimilarity(np.zeros((2, 2, 2)), m, m, m)
    with pytest.raises(ValueError, match="1-D probability vector"):
        discrete_dissimilarity(np.eye(2) / 2, np.eye(2) / 2, "tv")


def test_mixture_logp_validation():
    with pytest.raises(ValueError, match="no columns"):
        mixture_logp(np.zeros((3, 0)))
    with pytest.raises(ValueError, match="NaN"):
        mixture_logp(np.array([[0.0, np.nan]]))
    with pytest.raises(ValueError, match=r"\+inf"):
        mixture_logp(np.array([[0.0, np.inf]]))


def test_discrete_and_kernel_validation():
    with pytest.raises(ValueError, match="sum to 1"):
        discrete_dissimilarity([0.5, 0.6], [0.5, 0.5], "tv")
    with pytest.raises(ValueError, match="negative"):
        discrete_dissimilarity([1.2, -0.2], [0.5, 0.5], "tv")
    with pytest.raises(ValueError, match="same length"):
        discrete_dissimilarity([0.5, 0.5], [0.2, 0.3, 0.5], "tv")
    with pytest.raises(ValueError, match="non-finite"):
        discrete_dissimilarity([np.nan, 1.0], [0.5, 0.5], "tv")
    with pytest.raises(ValueError, match="2-D"):
        pushforward_dissimilarity(P5, Q5)
    with pytest.raises(ValueError, match="same number of outcomes"):
        pushforward_dissimilarity(KMAT, KMAT[:, :2] / KMAT[:, :2].sum(1, keepdims=True))
    with pytest.raises(ValueError, match="row 1.*sums to"):
        pushforward_dissimilarity(np.array([[0.5, 0.5], [0.5, 0.6]]), np.eye(2))
    with pytest.raises(ValueError, match="negative"):
        pushforward_dissimilarity(np.array([[1.5, -0.5], [0.5, 0.5]]), np.eye(2))
    with pytest.raises(ValueError, match="infinite"):
        pushforward_dissimilarity(np.array([[np.inf, 0.5], [0.5, 0.5]]), np.eye(2))
    with pytest.raises(ValueError, match="n_resamples"):
        pushforward_dissimilarity(np.eye(2), np.eye(2), n_resamples=1)


def test_no_torch_import():
    import ast
    import pathlib

    import em_callbacks.divergence as mod

    tree = ast.parse(pathlib.Path(mod.__file__).read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    assert "torch" not in names
