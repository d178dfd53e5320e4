"""Bias and 95%-CI coverage of the dissimilarity estimators over many repeated draws.

For distributions small enough to enumerate, draws samples from P and Q (seeded), computes each
estimator with exact log-probs, and compares with the exact value from
``discrete_dissimilarity``. Prints one row per (scenario, samples per side, estimator):

    truth     exact value
    bias      mean(estimate) - truth
    z         bias / standard error of that mean (|z| > 3 means a real bias)
    sd        standard deviation of the estimate across draws
    se/sd     mean reported stderr / sd (1 = honest error bars)
    cover     fraction of draws whose 95% normal CI contains the truth (0.95 is ideal)

The second table does the same for the plug-in pushforward estimator (judge kernel) with its
bootstrap stderr; the plug-in is biased upwards when the pushforwards are close.

Usage: python benchmarks/estimator_coverage.py [--reps 2000] [--seed 0] [--quick]
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from em_callbacks.divergence import (  # noqa: E402
    MEASURES,
    combine_prompts,
    discrete_dissimilarity,
    dissimilarity,
    one_sided_tv,
    pushforward_dissimilarity,
)

Z95 = 1.959963984540054


def _log(a):
    with np.errstate(divide="ignore"):
        return np.log(np.asarray(a, dtype=np.float64))


def _scenarios(rng):
    """(name, list of (p, q) pairs); several pairs = several prompts, combined."""
    p5 = np.array([0.40, 0.25, 0.15, 0.12, 0.08])
    q5 = np.array([0.20, 0.20, 0.30, 0.10, 0.20])
    near = 0.9 * p5 + 0.1 * q5
    # 2-token sequences over a 3-word vocabulary, with a zero in each model
    p1, p2 = np.array([0.5, 0.3, 0.2]), np.array([[.6, .3, .1], [.2, .5, .3], [.6, .4, 0.]])
    q1, q2 = np.array([0.3, 0.3, 0.4]), np.array([[0., .5, .5], [.3, .3, .4], [.2, .3, .5]])
    seq_p, seq_q = (p1[:, None] * p2).ravel(), (q1[:, None] * q2).ravel()
    # heavy-tailed, LLM-like: Zipf over 1000 "responses", Q re-weights by a random tilt
    k = 1000
    zipf = 1.0 / np.arange(1, k + 1) ** 1.1
    zipf /= zipf.sum()
    tilt = zipf * np.exp(0.8 * rng.standard_normal(k))
    tilt /= tilt.sum()
    # 8 prompts, each its own pair of Dirichlet distributions over 30 outcomes
    prompts = []
    for _ in range(8):
        a = rng.dirichlet(np.full(30, 0.5))
        b = 0.6 * a + 0.4 * rng.dirichlet(np.full(30, 0.5))
        prompts.append((a, b))
    return [
        ("cat5", [(p5, q5)]),
        ("cat5-near", [(p5, near)]),
        ("seq-3x3", [(seq_p, seq_q)]),
        ("zipf-1000", [(zipf, tilt)]),
        ("8 prompts", prompts),
    ]


def _run(pairs, n, reps, rng):
    """Estimates for every estimator: dict name -> (values, stderrs), plus truths."""
    names = list(MEASURES) + ["tv-1sided"]
    out = {m: ([], []) for m in names}
    truth = {m: float(np.mean([discrete_dissimilarity(p, q, m) for p, q in pairs]))
             for m in MEASURES}
    truth["tv-1sided"] = truth["tv"]
    draws = []
    for p, q in pairs:
        x = rng.choice(len(p), size=(reps, n), p=p)
        y = rng.choice(len(q), size=(reps, n), p=q)
        draws.append((_log(p), _log(q), x, y))
    for r in range(reps):
        per = {m: [] for m in names}
        for lp, lq, x, y in draws:
            xs, ys = x[r], y[r]
            for m in MEASURES:
                per[m].append(dissimilarity(lp[xs], lq[xs], lp[ys], lq[ys], measure=m))
            per["tv-1sided"].append(one_sided_tv(lp[xs], lq[xs]))
        for m in names:
            res = per[m][0] if len(per[m]) == 1 else combine_prompts(per[m])
            out[m][0].append(res.value)
            out[m][1].append(res.stderr)
    return truth, {m: (np.array(v), np.array(s)) for m, (v, s) in out.items()}


def _row(name, n, est, truth, vals, ses):
    reps = len(vals)
    sd = float(vals.std(ddof=1))
    bias = float(vals.mean() - truth)
    z = bias / (sd / math.sqrt(reps)) if sd > 0 else float("nan")
    cover = float(np.mean((vals - Z95 * ses <= truth) & (truth <= vals + Z95 * ses)))
    ratio = float(np.nanmean(ses) / sd) if sd > 0 else float("nan")
    return (f"{name:<11} {n:>5} {est:<11} {truth:>8.4f} {bias:>+9.5f} {z:>+6.2f} "
            f"{sd:>8.4f} {ratio:>6.3f} {cover:>6.3f}")


HEADER = (f"{'scenario':<11} {'n/side':>5} {'estimator':<11} {'truth':>8} {'bias':>9} {'z':>6} "
          f"{'sd':>8} {'se/sd':>6} {'cover':>6}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=2000, help="repeated draws per row")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="400 reps, fewer sizes")
    args = ap.parse_args(argv)
    reps = 400 if args.quick else args.reps
    sizes = (16, 64) if args.quick else (16, 64, 256)
    rng = np.random.default_rng(args.seed)
    t0 = time.time()

    print(f"Two-sided / one-sided estimators: {reps} draws per row, seed {args.seed}")
    print(HEADER)
    print("-" * len(HEADER))
    for name, pairs in _scenarios(rng):
        for n in sizes:
            truth, res = _run(pairs, n, reps, rng)
            for est, (vals, ses) in res.items():
                print(_row(name, n, est, truth[est], vals, ses))
        print()

    # Pushforward through a stochastic 3-outcome judge on cat5 (plug-in + bootstrap stderr).
    p5 = np.array([0.40, 0.25, 0.15, 0.12, 0.08])
    q5 = np.array([0.20, 0.20, 0.30, 0.10, 0.20])
    kmat = np.array([[.7, .2, .1], [.6, .3, .1], [.2, .5, .3], [.1, .3, .6], [.05, .15, .8]])
    preps = max(100, reps // 5)
    print(f"Pushforward plug-in (judge kernel, bootstrap 200): {preps} draws per row")
    print(HEADER)
    print("-" * len(HEADER))
    for label, q in (("cat5", q5), ("cat5-near", 0.9 * p5 + 0.1 * q5)):
        for n in sizes:
            for m in MEASURES:
                truth = discrete_dissimilarity(p5 @ kmat, q @ kmat, m)
                vals, ses = [], []
                for r in range(preps):
                    x = rng.choice(5, size=n, p=p5)
                    y = rng.choice(5, size=n, p=q)
                    res = pushforward_dissimilarity(kmat[x], kmat[y], m, n_resamples=200, rng=r)
                    vals.append(res.value)
                    ses.append(res.stderr)
                print(_row(label, n, "push-" + m, truth, np.array(vals), np.array(ses)))
        print()
    print(f"({time.time() - t0:.1f} s)")


if __name__ == "__main__":
    main()
