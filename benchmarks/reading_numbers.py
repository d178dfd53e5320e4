"""Reading the numbers: the sample sizes at which D, captured fractions and the detector mean
something, measured on synthetic data with known truth (issue #13).

    python benchmarks/reading_numbers.py [--quick] [--reps N] [--seed S] [--parts d,captured,detector]

Pure numpy + the package's pure functions; no model, no torch. Three parts:

1. **D** (``divergence.dissimilarity`` / ``one_sided_tv`` / ``combine_prompts``). Each prompt is
   a pair of categorical distributions P, Q over 48 "sequences" with exact log-probs, shifted
   to a chosen true TV in one of two shapes that bracket real changes:
   *diffuse* (every sequence's log-prob moves: ``logits + eps * g``, the best case: every
   sample carries signal) and *localized* (mass TV moves from one sequence to another that had
   ~0 probability, every other sequence unchanged: the worst case, per-sample terms are 0 or ~1).
   For samples per prompt n (per side) x prompts k it prints the standard error at TV 0.1,
   the smallest true TV whose estimate is > 2 stderr above 0 in >= 80% of draws, how often
   JS reads < 0, and what D reads at zero change (exactly, and with numerical noise in the
   scoring passes). The estimators are evaluated vectorised; the first draw of every cell is
   recomputed with ``em_callbacks.divergence`` and must agree (checked, max difference printed).
2. **Captured fraction** (``order.decompose(..., pool_prompts=True)``, called the way
   ``callback._try_decompositions`` calls it, with per-prompt full D from
   ``divergence.window_dissimilarity`` / ``one_sided_tv``). A binary order parameter that
   fully explains a step change of true TV t (r = 1) and one that is irrelevant (r = 0), judged
   by a deterministic judge; rate of the determining one p -> p + t (p = 0.3, and 0.02 for a
   behaviour that starts from ~0). Prints r, its stderr and noise floor vs n x k x window;
   "meaningful" = r >= noise floor + 3 stderr and stderr <= 0.12. A window of w probes pools
   w x n samples per side; for a step change between windows that is the same as n x w samples
   (checked for w = 2), so the tables give the total N = k x n x w per side.
3. **Detector** (``detect.TransitionDetector`` defaults, driven through ``history.ProbeHistory``
   the way the callback drives it): how many probes before an onset can be declared, and the
   delay (in probes) for a step change of 3-10 x the stderr of D (stderr constant), and for D
   jumping to 1.5-5 x its baseline when the stderr grows with D. The false-alarm rate on pure
   noise is ``benchmarks/detection_false_alarms.py``'s (0.5% per 40-probe run; not rerun here).

Fixed seeds throughout; ``--quick`` runs a reduced grid in well under 30 s.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from em_callbacks.detect import TransitionDetector  # noqa: E402
from em_callbacks.divergence import (  # noqa: E402
    combine_prompts,
    discrete_dissimilarity,
    dissimilarity,
    one_sided_tv,
    window_dissimilarity,
)
from em_callbacks.history import ProbeHistory  # noqa: E402
from em_callbacks.order import OrderParameter, Scale, decompose  # noqa: E402

N_SEQ = 48  # "sequences" per prompt
LOG2 = math.log(2.0)
EST = ("tv", "tv-1s", "js", "linear")  # two-sided TV, one-sided TV (full fine-tune default), JS, linear
RESOLVE_RATE = 0.80


def _softmax(x):
    z = np.exp(x - x.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def _log(a):
    with np.errstate(divide="ignore"):
        return np.log(np.asarray(a, dtype=np.float64))


def _fmt_tv(x):
    if x is None:
        return ">.28"
    return f"{x:.3g}" if x >= 0.001 else "<.001"


# ============================================================================ part 1: D
def _tv_grid(step=1):
    # 0.1 * 2^(j/2): 0.00078 .. 0.283 (step 2: 0.1 * 2^j only), contains 0.1, 0.05, 0.025, ...
    return [0.1 * 2 ** (j / 2) for j in range(-14, 4) if j % step == 0]


def _diffuse_pairs(rng, k, targets):
    """Per prompt: logits ~ N(0, 1.5), direction g ~ N(0, 1); eps by bisection so that
    TV(softmax(l), softmax(l + eps g)) equals each target. Returns {target: [(p, q)] * k}."""
    out = {t: [] for t in targets}
    for _ in range(k):
        logits = rng.normal(0.0, 1.5, N_SEQ)
        g = rng.standard_normal(N_SEQ)
        p = _softmax(logits)
        for t in targets:
            lo, hi = 0.0, 1.0
            while 0.5 * np.abs(_softmax(logits + hi * g) - p).sum() < t:
                hi *= 2.0
            for _ in range(60):
                mid = 0.5 * (lo + hi)
                if 0.5 * np.abs(_softmax(logits + mid * g) - p).sum() < t:
                    lo = mid
                else:
                    hi = mid
            out[t].append((p, _softmax(logits + 0.5 * (lo + hi) * g)))
    return out


def _localized_pairs(rng, k, targets, tiny=1e-4):
    """Per prompt: mass t moves from sequence a (p_a = t + tiny) to sequence b (p_b = tiny);
    the other 46 sequences (a random softmax) are unchanged. TV = t exactly."""
    out = {t: [] for t in targets}
    for _ in range(k):
        rest = _softmax(rng.normal(0.0, 1.5, N_SEQ - 2))
        for t in targets:
            p = np.concatenate([[t + tiny, tiny], (1.0 - t - 2 * tiny) * rest])
            q = np.concatenate([[tiny, t + tiny], (1.0 - t - 2 * tiny) * rest])
            out[t].append((p, q))
    return out


def _term_tables(pairs):
    """Per-sequence terms (k, N_SEQ) of every estimator, for samples of P (side p) and Q."""
    lp = np.stack([_log(p) for p, _ in pairs])
    lq = np.stack([_log(q) for _, q in pairs])
    d = lp - lq  # log p - log q at every sequence (finite: all probabilities > 0 here)
    t = np.abs(np.tanh(d / 2.0))
    return {
        "tv": (t, t),
        "linear": (t**2, t**2),
        "js": (LOG2 - np.logaddexp(0.0, -d), LOG2 - np.logaddexp(0.0, d)),
        "tv-1s": (-np.expm1(np.minimum(-d, 0.0)), None),
    }, lp, lq


def _draw(rng, pairs, n, reps):
    """Sample indices (reps, k, n) from P and from Q of every prompt."""
    x = np.stack([rng.choice(N_SEQ, size=(reps, n), p=p) for p, _ in pairs], axis=1)
    y = np.stack([rng.choice(N_SEQ, size=(reps, n), p=q) for _, q in pairs], axis=1)
    return x, y


def _gather(table, idx):
    k = table.shape[0]
    return table[np.arange(k)[None, :, None], idx]


def _estimates(tables, x, y, noise=None):
    """Vectorised replica of dissimilarity/one_sided_tv + combine_prompts: value, stderr (reps,)."""
    n = x.shape[2]
    out = {}
    for est, (tp, tq) in tables.items():
        fp = _gather(tp, x)
        if est == "tv-1s":
            v_k = fp.mean(axis=2)
            se_k = np.sqrt(np.maximum(fp.var(axis=2, ddof=1), 0.0) / n)
        else:
            fq = _gather(tq, y)
            v_k = 0.5 * fp.mean(axis=2) + 0.5 * fq.mean(axis=2)
            var_p = np.maximum(fp.var(axis=2, ddof=1), 0.0)
            var_q = np.maximum(fq.var(axis=2, ddof=1), 0.0)
            se_k = 0.5 * np.sqrt(var_p / n + var_q / n)
        k = v_k.shape[1]
        out[est] = (v_k.mean(axis=1), np.sqrt((se_k**2).sum(axis=1)) / k)
    return out


def _library_estimates(lp, lq, xs, ys, noise_p=None, noise_q=None):
    """The same numbers from em_callbacks.divergence, for one draw (xs, ys: (k, n))."""
    per = {e: [] for e in EST}
    for j in range(xs.shape[0]):
        pp, qp = lp[j, xs[j]], lq[j, xs[j]]
        pq, qq = lp[j, ys[j]], lq[j, ys[j]]
        if noise_p is not None:
            pp, qp, pq, qq = pp + noise_p[0][j], qp + noise_p[1][j], pq + noise_q[0][j], qq + noise_q[1][j]
        for m in ("tv", "js", "linear"):
            per[m].append(dissimilarity(pp, qp, pq, qq, measure=m))
        per["tv-1s"].append(one_sided_tv(pp, qp))
    return {e: combine_prompts(per[e]) for e in EST}


def part_d(args, rng):
    t0 = time.time()
    reps = args.reps_d
    grid = _tv_grid(args.grid_step)
    ks, ns = args.prompts, args.samples
    print("=" * 100)
    print(f"1. D: {reps} draws per cell; 48-sequence categorical prompts, exact log-probs; "
          f"n = samples per prompt per side")
    print("   tv = two-sided TV (LoRA / snapshots), tv-1s = one-sided TV (full fine-tune default), js, linear")
    results = {}  # (shape, k, n) -> {tv_target: {est: (vals, ses)}}
    truths = {}
    max_diff = 0.0
    checked = 0
    for shape in ("diffuse", "localized"):
        for k in ks:
            srng = np.random.default_rng([args.seed, 11, k, 0 if shape == "diffuse" else 1])
            pairs_by_t = (_diffuse_pairs if shape == "diffuse" else _localized_pairs)(srng, k, grid)
            for t in grid:
                pairs = pairs_by_t[t]
                truths[(shape, k, t)] = {m: float(np.mean([discrete_dissimilarity(p, q, m) for p, q in pairs]))
                                         for m in ("tv", "js", "linear")}
                tables, lp, lq = _term_tables(pairs)
                for n in ns:
                    x, y = _draw(rng, pairs, n, reps)
                    est = _estimates(tables, x, y)
                    lib = _library_estimates(lp, lq, x[0], y[0])
                    for e in EST:
                        max_diff = max(max_diff, abs(lib[e].value - est[e][0][0]),
                                       abs(lib[e].stderr - est[e][1][0]))
                    checked += 1
                    results.setdefault((shape, k, n), {})[t] = est
    if max_diff > 1e-9:
        raise SystemExit(f"vectorised estimators disagree with em_callbacks.divergence by {max_diff:.3g}")

    t_ref = min(grid, key=lambda t: abs(t - 0.1))
    cols = [(s, e) for s in ("diffuse", "localized") for e in EST]
    head = f"{'k':>3} {'n':>3} {'N/side':>6} | " + " ".join(f"{s[:4]}:{e:<7}"[:12].rjust(12) for s, e in cols)
    print(f"\n1a. stderr of D at true TV {t_ref:.2f} (mean reported stderr; in brackets sd across draws / stderr)")
    print("    (JS truth at TV .1: diffuse %.4f, localized %.4f nats; linear: %.4f, %.4f)" % (
        truths[("diffuse", ks[0], t_ref)]["js"], truths[("localized", ks[0], t_ref)]["js"],
        truths[("diffuse", ks[0], t_ref)]["linear"], truths[("localized", ks[0], t_ref)]["linear"]))
    print(head)
    bias_z = {e: [] for e in EST}
    for k in ks:
        for n in ns:
            cells = []
            for s, e in cols:
                vals, ses = results[(s, k, n)][t_ref][e]
                sd = vals.std(ddof=1)
                cells.append(f"{ses.mean():.4f}({sd / ses.mean():.2f})")
            print(f"{k:>3} {n:>3} {k * n:>6} | " + " ".join(c.rjust(12) for c in cells))
            for s, e in cols:  # unbiasedness over the whole grid (exact log-probs)
                for t in grid:
                    vals, _ = results[(s, k, n)][t][e]
                    truth = truths[(s, k, t)]["tv" if e == "tv-1s" else e]
                    sd = vals.std(ddof=1)
                    if sd > 0:
                        bias_z[e].append(abs(vals.mean() - truth) / (sd / math.sqrt(len(vals))))

    print(f"\n1b. smallest true TV (grid x {2 ** (args.grid_step / 2):.3g} from .00078) whose estimate is "
          "> 2 stderr above 0 in "
          f">= {RESOLVE_RATE:.0%} of draws")
    print("    diffuse TV / tv-1s / linear: the z-score of a diffuse change does not depend on its size "
          "(every sample carries signal), so any change resolves: the floor is set by numerical noise (1d)")
    print(head)
    resolvable = {}
    for k in ks:
        for n in ns:
            cells = []
            for s, e in cols:
                found = None
                for t in grid:
                    vals, ses = results[(s, k, n)][t][e]
                    if np.mean(vals > 2 * ses) >= RESOLVE_RATE:
                        found = t
                        break
                resolvable[(s, e, k, n)] = found
                cells.append(_fmt_tv(found))
            print(f"{k:>3} {n:>3} {k * n:>6} | " + " ".join(c.rjust(12) for c in cells))
    print("    localized worst case, rule of thumb: TV resolvable from ~4/(n k) two-sided, ~7/(n k) one-sided "
          "(terms 0 or 1: stderr = sqrt(TV / (2 n k)) two-sided, sqrt(TV / (n k)) one-sided)")

    print("\n1c. JS estimate < 0 (fraction of draws), diffuse change, exact log-probs")
    show = [t for t in grid if any(abs(t - x) < 1e-9 for x in (0.1 * 2 ** -5, 0.1 * 2 ** -3, 0.1 * 2 ** -1, 0.1))]
    print(f"{'k':>3} {'n':>3} | " + " ".join(f"TV={t:.4f}".rjust(11) for t in show))
    neg = {}
    for k in ks:
        for n in ns:
            cells = []
            for t in show:
                vals, _ = results[("diffuse", k, n)][t]["js"]
                neg[(k, n, t)] = float(np.mean(vals < 0))
                cells.append(f"{neg[(k, n, t)]:.1%}")
            print(f"{k:>3} {n:>3} | " + " ".join(c.rjust(11) for c in cells))
    print("    (TV, linear and tv-1s terms are >= 0: those estimators never read < 0)")

    print("\n1d. zero change (P = Q). Exact log-probs: every term is 0, so D = 0 and stderr = 0 exactly",
          end="")
    pairs = _diffuse_pairs(np.random.default_rng([args.seed, 12]), ks[0], [0.05])[0.05]
    pairs0 = [(p, p) for p, _ in pairs]
    _, lp, lq = _term_tables(pairs0)
    x, y = _draw(rng, pairs0, 8, 1)
    lib = _library_estimates(lp, lq, x[0], y[0])
    assert all(lib[e].value == 0.0 and lib[e].stderr == 0.0 for e in EST), lib
    print(" (checked with the library).")
    print("    With numerical noise in the scoring passes (each log-prob + N(0, sigma^2) nats, independent per "
          "pass), D reads a floor that does NOT shrink with samples:")
    print(f"{'sigma':>6} {'k':>3} {'n':>3} | {'tv':>8} {'tv-1s':>8} {'linear':>8} {'js':>9} {'P(js<0)':>8} "
          f"{'tv/stderr':>9}")
    noise_rows = {}
    for sigma in args.sigmas:
        for n in (ns[0], ns[-1]):
            k = ks[0]
            xs, ys = _draw(rng, pairs0, n, reps)
            lpx = _gather(lp, xs) + sigma * rng.standard_normal(xs.shape)
            lqx = _gather(lq, xs) + sigma * rng.standard_normal(xs.shape)
            lpy = _gather(lp, ys) + sigma * rng.standard_normal(ys.shape)
            lqy = _gather(lq, ys) + sigma * rng.standard_normal(ys.shape)
            dp, dq = lpx - lqx, lpy - lqy
            terms = {
                "tv": (np.abs(np.tanh(dp / 2)), np.abs(np.tanh(dq / 2))),
                "linear": (np.tanh(dp / 2) ** 2, np.tanh(dq / 2) ** 2),
                "js": (LOG2 - np.logaddexp(0.0, -dp), LOG2 - np.logaddexp(0.0, dq)),
            }
            res = {}
            for m, (fp, fq) in terms.items():
                v = (0.5 * fp.mean(axis=2) + 0.5 * fq.mean(axis=2)).mean(axis=1)
                se = np.sqrt((0.25 * (fp.var(axis=2, ddof=1) / n + fq.var(axis=2, ddof=1) / n)).sum(axis=1)) / k
                res[m] = (v, se)
            f1 = -np.expm1(np.minimum(lqx - lpx, 0.0))
            res["tv-1s"] = (f1.mean(axis=2).mean(axis=1), None)
            # check the first draw against the library
            lib = _library_estimates(lp, lq, xs[0], ys[0],
                                     noise_p=(lpx[0] - _gather(lp, xs)[0], lqx[0] - _gather(lq, xs)[0]),
                                     noise_q=(lpy[0] - _gather(lp, ys)[0], lqy[0] - _gather(lq, ys)[0]))
            for m in ("tv", "js", "linear"):
                max_diff = max(max_diff, abs(lib[m].value - res[m][0][0]))
            max_diff = max(max_diff, abs(lib["tv-1s"].value - res["tv-1s"][0][0]))
            checked += 1
            noise_rows[(sigma, n)] = {m: float(res[m][0].mean()) for m in res}
            noise_rows[(sigma, n)]["pneg"] = float(np.mean(res["js"][0] < 0))
            print(f"{sigma:>6.3f} {k:>3} {n:>3} | {res['tv'][0].mean():>8.4f} {res['tv-1s'][0].mean():>8.4f} "
                  f"{res['linear'][0].mean():>8.5f} {res['js'][0].mean():>+9.5f} "
                  f"{np.mean(res['js'][0] < 0):>8.1%} {np.mean(res['tv'][0] / res['tv'][1]):>9.1f}")
    print("    (tv and tv-1s floor ~ sigma / sqrt(pi) = 0.56 sigma: it reads as a real, 'significant' D of that "
          "size; JS goes negative in most draws)")
    if max_diff > 1e-9:
        raise SystemExit(f"vectorised estimators disagree with em_callbacks.divergence by {max_diff:.3g}")
    print(f"\n    checked against em_callbacks.divergence on {checked} draws: max |difference| {max_diff:.1e}; "
          "|bias| / its stderr over all cells (k x n x TV x shape) > 2 / > 3 in: " + ", ".join(
              f"{e} {np.mean(np.array(z) > 2):.1%} / {np.mean(np.array(z) > 3):.1%}" for e, z in bias_z.items())
          + " (no bias: ~4.6% / 0.3%)")
    print(f"    ({time.time() - t0:.1f} s)")
    return {"resolvable": resolvable, "results": results, "t_ref": t_ref, "neg": neg, "noise": noise_rows}


# ============================================================================ part 2: captured fraction
def _captured_prompts(rng, k, base, t):
    """Per prompt: 48 sequences in 4 blocks of 12 = (o_det, o_irr). P(o_det = 1) = base under P,
    base + t under Q, within-block shapes unchanged; P(o_irr = 1 | o_det) = 1/2 under both.
    So TV(P, Q) = t, the determining order parameter's pushforward TV = t (r = 1), the
    irrelevant one's = 0 (r = 0)."""
    o_det = np.repeat([0, 0, 1, 1], 12)
    o_irr = np.repeat([0, 1, 0, 1], 12)
    prompts = []
    for _ in range(k):
        w = np.concatenate([_softmax(rng.normal(0, 1.0, 12)) for _ in range(4)])
        p = w * np.where(o_det == 1, base, 1 - base) / 2
        q = w * np.where(o_det == 1, base + t, 1 - base - t) / 2
        prompts.append((p, q))
    return prompts, o_det, o_irr


def part_captured(args, rng):
    t0 = time.time()
    reps = args.reps_c
    op_det = OrderParameter("determining", "The answer is misaligned.", scale=Scale.binary())
    op_irr = OrderParameter("irrelevant", "The answer mentions a colour.", scale=Scale.binary())
    eye = np.eye(2)
    print("\n" + "=" * 100)
    print(f"2. Captured fraction r = D_O / D (decompose(..., pool_prompts=True), the callback's call); {reps} "
          f"draws per cell; binary order parameter whose rate goes p -> p + TV; deterministic judge")
    print("   det = order parameter that fully explains the change (true r = 1); irr = irrelevant (true r = 0)")
    print("   meaningful: r_det >= floor + 3 stderr and stderr <= 0.12 (on the means over draws: 'ok'; 'pass' = "
          "share of single draws where it holds)")
    rows = {}
    cells = []
    for mode, base, t, ks in args.captured_series:
        for k in ks:
            for n in args.samples:
                two = mode == "two-sided" and n in args.window_ns and t in args.window_tvs and base == args.base
                for w in (1, 2) if two else (1,):
                    cells.append((mode, base, t, k, n, w))
    for mode, base, t, k, n, w in cells:
        prompts, o_det, o_irr = _captured_prompts(
            np.random.default_rng([args.seed, 21, k, int(t * 1000), int(base * 1000)]), k, base, t)
        acc = {key: [] for key in ("r_det", "se_det", "fl_det", "r_irr", "se_irr", "fl_irr", "pass", "irr_fp",
                                   "d", "d_se")}
        for _ in range(reps):
            full, lk_det, rk_det, lk_irr, rk_irr = {}, {}, {}, {}, {}
            for j, (p, q) in enumerate(prompts):
                x = rng.choice(N_SEQ, size=n * w, p=p)  # left window: w probes of n samples, all from P
                y = rng.choice(N_SEQ, size=n * w, p=q)
                lp, lq = _log(p), _log(q)
                if mode == "two-sided":
                    # window mixtures of w identical checkpoints: (n*w, w) log-prob matrices
                    rep = lambda a: np.repeat(a[:, None], w, axis=1)  # noqa: E731
                    full[j] = window_dissimilarity(rep(lp[x]), rep(lq[x]), rep(lp[y]), rep(lq[y]), "tv")
                else:
                    full[j] = one_sided_tv(lp[x], lq[x])
                lk_det[j], rk_det[j] = eye[o_det[x]], eye[o_det[y]]
                lk_irr[j], rk_irr[j] = eye[o_irr[x]], eye[o_irr[y]]
            cd = decompose(op_det, lk_det, rk_det, full, measure="tv", pool_prompts=True)
            ci = decompose(op_irr, lk_irr, rk_irr, full, measure="tv", pool_prompts=True)
            acc["r_det"].append(cd.value)
            acc["se_det"].append(cd.stderr)
            acc["fl_det"].append(cd.noise_floor)
            acc["r_irr"].append(ci.value)
            acc["se_irr"].append(ci.stderr)
            acc["fl_irr"].append(ci.noise_floor)
            acc["pass"].append(cd.value >= cd.noise_floor + 3 * cd.stderr and cd.stderr <= 0.12)
            acc["irr_fp"].append(ci.value >= ci.noise_floor + 3 * ci.stderr and ci.stderr <= 0.12)
            acc["d"].append(cd.d_full.value)
            acc["d_se"].append(cd.d_full.stderr)
        m = {key: float(np.nanmean(v)) for key, v in acc.items()}
        m["sd_det"] = float(np.nanstd(acc["r_det"], ddof=1))
        m["sep"] = m["r_det"] >= m["fl_det"] + 3 * m["se_det"]
        m["ok"] = m["sep"] and m["se_det"] <= 0.12
        rows[(mode, base, t, k, n, w)] = m

    head = (f"{'mode':>9} {'p':>4} {'TV':>4} {'k':>3} {'n':>3} {'w':>2} {'N/side':>6} | {'D':>5} {'D se':>6} | "
            f"{'r_det':>5} {'se':>5} {'sd':>5} {'floor':>5} {'pass':>4} {'ok':>3} | {'r_irr':>5} {'se':>5} "
            f"{'floor':>5} {'fp':>3}")
    print(head)
    last = None
    for (mode, base, t, k, n, w), m in rows.items():
        if last is not None and (mode, base, t, k) != last:
            print()
        last = (mode, base, t, k)
        print(f"{mode:>9} {base:>4.2f} {t:>4.2f} {k:>3} {n:>3} {w:>2} {k * n * w:>6} | {m['d']:>5.3f} "
              f"{m['d_se']:>6.4f} | {m['r_det']:>5.2f} {m['se_det']:>5.2f} {m['sd_det']:>5.2f} {m['fl_det']:>5.2f} "
              f"{m['pass']:>4.0%} {'yes' if m['ok'] else 'no':>3} | {m['r_irr']:>5.2f} {m['se_irr']:>5.2f} "
              f"{m['fl_irr']:>5.2f} {m['irr_fp']:>3.0%}")
    print("   (D: the full D; se: mean reported stderr of r; sd: spread of r across draws; floor: mean noise_floor; "
          "fp: share of draws where the irrelevant one passes the same test)")
    print("\n2b. N = k x n x w per side (all prompts; a window pools w probes): smallest N in the grid where "
          "r_det >= floor + 3 stderr; where stderr <= 0.12 as well; and the N for stderr <= 0.12 extrapolated "
          "from the largest cell with stderr ~ 1/sqrt(N)")
    summary = {}
    for mode, base, t, ks in args.captured_series:
        for k in ks:
            mine = sorted(((k * n * w, m) for (md, b, tt, kk, n, w), m in rows.items()
                           if (md, b, tt, kk) == (mode, base, t, k)), key=lambda x: x[0])
            sep = next((nn for nn, m in mine if m["sep"]), None)
            ok = next((nn for nn, m in mine if m["ok"]), None)
            big_n, big = mine[-1]
            need = big_n * (big["se_det"] / 0.12) ** 2
            summary[(mode, base, t, k)] = (sep, ok, need)
            print(f"   {mode:>9} p {base:.2f} TV {t:.2f} k {k:>2}: 3 stderr above floor from N = "
                  f"{sep if sep else '>' + str(big_n):>5}; meaningful from N = {ok if ok else '>' + str(big_n):>5}; "
                  f"extrapolated N ~ {need:>5.0f} (n x w ~ {need / k:.0f} per prompt)")
    print("   (binary order parameter at rate p: stderr(r) ~ sqrt(2 p (1 - p) / N) / D, so N ~ 2 p (1 - p) / "
          "(0.12 D)^2: it quadruples when D halves)")
    print(f"    ({time.time() - t0:.1f} s)")
    return {"rows": rows, "summary": summary}


# ============================================================================ part 3: detector
def _probes_needed(window, two_sided):
    """Drive ProbeHistory + TransitionDetector like the callback (D(t_i) computed at probe i + w,
    then detector.update); a large change between probes c and c + 1 on a slowly drifting model.
    Returns (first probe with a D value, probe at which the baseline is complete, smallest c that is
    detected, probe at which it is declared)."""
    rng = np.random.default_rng(5)
    logits = rng.normal(0, 1.5, (2, N_SEQ))
    g = rng.standard_normal((2, N_SEQ))
    jump = rng.normal(0, 3.0, (2, N_SEQ))
    n = 16
    result = None
    for c in range(0, 10):
        def dist(k):
            return _softmax(logits + 0.05 * k * g + (jump if k > c else 0.0))
        hist = ProbeHistory(window=window)
        det = TransitionDetector()
        first_d = base_done = None
        pids = np.repeat(np.array(["a", "b"]), n)
        samples = {}
        for k in range(0, 2 * window + 12):
            pk = dist(k)
            xs = np.concatenate([rng.choice(N_SEQ, n, p=pk[j]) for j in range(2)])
            samples[k] = xs
            hist.add_samples(k, pids)
            lpk = _log(pk)
            for j in list(samples):
                if k - j <= hist.band and j in hist.prompt_ids:
                    hist.add_logp(j, k, lpk[(np.arange(2 * n) >= n).astype(int), samples[j]])
            if two_sided:
                for old in range(max(0, k - hist.band), k):
                    lpo = _log(dist(old))
                    hist.add_logp(k, old, lpo[(np.arange(2 * n) >= n).astype(int), xs])
            i = k - window
            if i >= 0 and hist.computable(i, two_sided):
                res = hist.window_dissimilarity(i, "tv", two_sided=two_sided).combined
                first_d = k if first_d is None else first_d
                st = det.update(i, res.value, res.stderr)
                if base_done is None and st.baseline_mean is not None:
                    base_done = k
                if st.onset_step is not None:
                    if result is None and c - window + 1 <= st.onset_step <= c + window - 1:
                        result = (first_d, base_done, c, k)
                    break
            hist.prune(k)
        if result is not None:
            return result
    return first_d, base_done, None, None


def _step_series(rng, n, c, mu, sigma, jump, rel_se=None):
    """Baseline D mu with stderr sigma; from probe c on, D = mu + jump (a plateau). rel_se given:
    stderr = rel_se * D (grows with D, as for a diffuse change), else constant sigma."""
    true = np.full(n, mu)
    true[c:] += jump
    se = rel_se * true if rel_se is not None else np.full(n, sigma)
    values = true + se * rng.standard_normal(n)
    reported = se * rng.uniform(0.8, 1.2, n)
    return values, reported


def _delay_stats(seeds, n, make):
    """Run the default detector on series from make(rng) -> (values, reported, c)."""
    d_list, fa = [], 0
    for sd in seeds:
        srng = np.random.default_rng(sd)
        values, reported, c = make(srng)
        det = TransitionDetector()
        st = None
        for i in range(n):
            st = det.update(i, float(values[i]), float(reported[i]))
            if st.onset_step is not None:
                break
        if st.onset_step is not None and st.detected_at_step < c:
            fa += 1
            continue
        if st.onset_step is None or st.detected_at_step - c > 20:
            d_list.append(np.inf)
        else:
            d_list.append(st.detected_at_step - c)
    d = np.array(d_list)
    return (float(np.mean(d == 0)), float(np.mean(d <= 2)), float(np.median(d)),
            float(np.mean(~np.isfinite(d))), fa / len(seeds))


def _fmt_delay(st):
    med = "inf" if not math.isfinite(st[2]) else f"{st[2]:.0f}"
    return f"{st[0]:>4.0%}/{st[1]:>4.0%}/{med:>3}/{st[3]:>4.0%}/{st[4]:>4.1%}"


def part_detector(args, rng):
    t0 = time.time()
    print("\n" + "=" * 100)
    print("3. Detector (TransitionDetector defaults: baseline_probes=3, z=3, min_rise=0.02, consecutive=1)")
    print("3a. probes needed (ProbeHistory + TransitionDetector driven like the callback; probe 0 = step 0):")
    print(f"{'window':>6} {'estimator':>9} | {'first D at probe':>16} {'baseline done at':>16} "
          f"{'earliest change c->c+1':>22} {'declared at probe':>17}")
    needed = {}
    for w, two in ((1, False), (1, True), (2, True), (3, True)):
        first_d, base_done, c, k = _probes_needed(w, two)
        needed[(w, two)] = (first_d, base_done, c, k)
        print(f"{w:>6} {'two-sided' if two else 'one-sided':>9} | {first_d:>16} {base_done:>16} "
              f"{('c = %s' % c):>22} {k:>17}")
    print("    probe k = step k x every_n_steps; D(t_i) for window w is known at probe i + w, so a change is "
          "seen w probes after it happened")

    reps = args.reps_det
    n = 40
    mu = 0.03
    print(f"\n3b. delay to declare a step of h x stderr in D, stderr constant ({reps} series of {n} probes per "
          f"cell; baseline D {mu}; change at probe 6-20, then a plateau; reported stderr off by up to 20%)")
    print("    delay 0 = declared on the first D value after the change; cells: P(delay 0) / P(delay <= 2) / "
          "median delay / missed within 20 probes / false alarm before the change")
    print(f"{'stderr':>7} | " + " ".join(f"h={h:<2}".center(30) for h in args.heights))
    delays = {}
    for sigma in args.det_sigmas:
        cells = []
        for h in args.heights:
            def make(srng, sigma=sigma, h=h):
                c = int(srng.integers(6, 21))
                return (*_step_series(srng, n, c, mu, sigma, h * sigma), c)
            st = _delay_stats([[args.seed, 31, int(sigma * 1e4), h, r] for r in range(reps)], n, make)
            delays[("const", sigma, h)] = st
            cells.append(_fmt_delay(st))
        print(f"{sigma:>7.3f} | " + " ".join(c.center(30) for c in cells))
    print("    the threshold is max(min_rise, 3 sqrt(baseline_std^2 + se^2)): >= 4.2 stderr above the baseline "
          "mean and >= 0.02; with stderr 0.002 a 10-stderr step is just min_rise")

    mu = 0.05
    print(f"\n3c. the same when stderr grows with D (stderr = rel x D: diffuse changes, 1a), baseline D {mu}, "
          "D jumps to f x baseline")
    print(f"{'rel':>7} | " + " ".join(f"f={f:g}".center(30) for f in args.factors))
    for rel in args.rels:
        cells = []
        for f in args.factors:
            def make(srng, rel=rel, f=f):
                c = int(srng.integers(6, 21))
                return (*_step_series(srng, n, c, mu, None, (f - 1) * mu, rel_se=rel), c)
            st = _delay_stats([[args.seed, 32, int(rel * 1e3), int(f * 10), r] for r in range(reps)], n, make)
            delays[("rel", rel, f)] = st
            cells.append(_fmt_delay(st))
        print(f"{rel:>7.2f} | " + " ".join(c.center(30) for c in cells))
    print("    rel = stderr / D at 8 x 16 and TV 0.1 (1a): diffuse 0.05 two-sided / 0.11 one-sided; localized "
          "0.19 / 0.27 (it grows as 1 / sqrt(TV) there)")
    print(f"    ({time.time() - t0:.1f} s)")
    return {"needed": needed, "delays": delays}


# ============================================================================ main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="reduced grid, < 30 s")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--parts", default="d,captured,detector")
    ap.add_argument("--base", type=float, default=0.3, help="order parameter rate before the change")
    args = ap.parse_args(argv)
    if args.quick:
        args.reps_d, args.reps_c, args.reps_det, args.grid_step = 200, 12, 200, 2
        args.samples, args.prompts = [4, 16, 64], [8, 24]
        args.sigmas = [0.05]
        args.captured_series = [("two-sided", args.base, 0.1, [8, 24])]
        args.window_ns, args.window_tvs = [8], [0.1]
        args.det_sigmas, args.heights = [0.005], [3, 5, 10]
        args.rels, args.factors = [0.1], [1.5, 2, 3]
        cap_samples = [8, 16, 32]
    else:
        args.reps_d, args.reps_c, args.reps_det, args.grid_step = 400, 40, 500, 1
        args.samples, args.prompts = [4, 8, 16, 32, 64], [8, 24]
        args.sigmas = [0.01, 0.05, 0.2]
        args.captured_series = [("two-sided", args.base, t, [8, 24]) for t in (0.05, 0.1, 0.2)] + [
            ("one-sided", args.base, 0.1, [8, 24]), ("two-sided", 0.02, 0.1, [24])]
        args.window_ns, args.window_tvs = [8, 64], [0.1]
        args.det_sigmas, args.heights = [0.002, 0.005, 0.01, 0.02], [3, 5, 7, 10]
        args.rels, args.factors = [0.05, 0.1, 0.2, 0.3], [1.5, 2, 3, 5]
        cap_samples = args.samples
    parts = set(args.parts.split(","))
    rng = np.random.default_rng(args.seed)
    t0 = time.time()
    print(f"reading_numbers.py {'--quick ' if args.quick else ''}seed {args.seed}")
    if "d" in parts:
        part_d(args, rng)
    if "captured" in parts:
        d_samples = args.samples
        args.samples = cap_samples
        part_captured(args, rng)
        args.samples = d_samples
    if "detector" in parts:
        part_detector(args, rng)
    print(f"\ntotal {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
