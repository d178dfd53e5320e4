"""Dissimilarity estimators between two output distributions (pure numpy/scipy).

Method (Arnold & Loerch 2025): for two distributions P, Q over responses, given samples from
both and every sample's exact log-probability under both, the bounded f-divergences below are
plain sample means, hence unbiased with a normal-approximation confidence interval.
With d = log p(x) - log q(x) and M = (P + Q) / 2:

* total variation  TV    = E_M |tanh(d/2)|       = 1/2 sum |p - q|             in [0, 1]
* linear           D_lin = E_M tanh(d/2)^2       = 1/2 sum (p - q)^2 / (p + q) in [0, 1]
* Jensen-Shannon   JS    = 1/2 E_P[log 2 - softplus(-d)] + 1/2 E_Q[log 2 - softplus(d)]
                                                                      in [0, ln 2] (nats)

Samples from M are the pooled samples of P and Q. Sample counts may differ: the two halves are
weighted 1/2 each and the standard error is the stratified one,
``1/2 sqrt(var_P(f)/n_P + var_Q(f)/n_Q)`` (ddof=1).

No torch here on purpose: this module is imported by the analysis/report path and by tests
that must run without a deep-learning stack.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from scipy.special import logsumexp

from ._util import as_generator, two_sided_z

__all__ = [
    "MEASURES",
    "ConfidenceInterval",
    "DissimilarityResult",
    "dissimilarity",
    "one_sided_tv",
    "mixture_logp",
    "window_dissimilarity",
    "combine_prompts",
    "pushforward_dissimilarity",
    "pushforward_noise_floor",
    "discrete_dissimilarity",
]

MEASURES = ("tv", "js", "linear")
ESTIMATORS = ("two-sided", "one-sided", "plug-in", "combined")

_LOG2 = math.log(2.0)
# Tolerance when checking that probability vectors / kernel rows sum to one. Judge
# probabilities often come from float32 softmaxes, so be lenient and renormalise afterwards.
_SUM_TOL = 1e-4


@dataclass(frozen=True)
class ConfidenceInterval:
    low: float
    high: float


@dataclass(frozen=True)
class DissimilarityResult:
    """One dissimilarity estimate.

    ``n`` is the number of samples used (both sides together for two-sided / plug-in, the
    samples of P for one-sided, all samples of all prompts for combined). ``estimator`` records
    how it was obtained, so a report can tell a one-sided fallback from the two-sided estimate.
    """

    measure: str
    value: float
    stderr: float
    n: int
    estimator: str

    def confidence_interval(self, confidence_level: float = 0.95) -> ConfidenceInterval:
        """Normal-approximation interval ``value +- z * stderr``.

        Deliberately not clipped to the measure's range: clipping would hide noise (the
        design asks never to clip silently). NaN value or stderr gives a NaN interval.
        """
        half = two_sided_z(confidence_level) * self.stderr
        return ConfidenceInterval(low=float(self.value - half), high=float(self.value + half))


# --------------------------------------------------------------------------- validation


def _check_measure(measure: str) -> str:
    if measure not in MEASURES:
        raise ValueError(f"unknown measure {measure!r}; valid measures are {', '.join(MEASURES)}")
    return measure


def _as_logp_1d(x: Any, name: str, allow_neg_inf: bool) -> np.ndarray:
    """Float64 1-D copy of a log-prob array, rejecting NaN / +inf (and -inf unless allowed).

    -inf is allowed only for *cross* scores (a sample of P scored under Q): it means q(x) = 0,
    which is legitimate. A sample drawn from P cannot have p(x) = 0, so -inf there is a bug.
    """
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of log-probabilities, got shape {a.shape}")
    if np.isnan(a).any():
        raise ValueError(f"{name} contains NaN log-probabilities")
    if np.isposinf(a).any():
        raise ValueError(f"{name} contains +inf log-probabilities")
    if not allow_neg_inf and np.isneginf(a).any():
        raise ValueError(
            f"{name} contains -inf: a sample drawn from a distribution must have positive "
            "probability under it"
        )
    return a


def _check_pair(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"mismatched lengths: {name_a} has {a.shape[0]} samples but {name_b} has {b.shape[0]}"
            " (both must score the same samples)"
        )
    if a.shape[0] < 2:
        raise ValueError(
            f"need at least 2 samples per side to estimate a standard error, "
            f"got {a.shape[0]} ({name_a})"
        )


# --------------------------------------------------------------------------- estimators


def _terms(d: np.ndarray, measure: str, side: str) -> np.ndarray:
    """Per-sample terms whose mean over one side gives that side's half of the estimate.

    ``d = log p - log q`` (may be +-inf when one density is zero; then |tanh| = 1 and the
    softplus term is 0 or log 2 exactly, which is the right limit).
    """
    if measure == "tv":
        return np.abs(np.tanh(d / 2.0))
    if measure == "linear":
        return np.tanh(d / 2.0) ** 2
    # js: KL(P||M) = E_P[log 2 - log(1 + q/p)] ; KL(Q||M) = E_Q[log 2 - log(1 + p/q)]
    if side == "p":
        return _LOG2 - np.logaddexp(0.0, -d)
    return _LOG2 - np.logaddexp(0.0, d)


def _var(x: np.ndarray) -> float:
    v = float(np.var(x, ddof=1))
    return max(v, 0.0)


def dissimilarity(
    logp_p_on_p: Any,
    logp_q_on_p: Any,
    logp_p_on_q: Any,
    logp_q_on_q: Any,
    measure: str = "tv",
) -> DissimilarityResult:
    """Two-sided estimate of D(P, Q) from samples of both and their log-probs under both.

    ``logp_q_on_p``: log q(x) for samples x drawn from P (and so on). Unbiased; stderr is the
    stratified standard error over the two independent sample sets.
    """
    _check_measure(measure)
    pp = _as_logp_1d(logp_p_on_p, "logp_p_on_p", allow_neg_inf=False)
    qp = _as_logp_1d(logp_q_on_p, "logp_q_on_p", allow_neg_inf=True)
    pq = _as_logp_1d(logp_p_on_q, "logp_p_on_q", allow_neg_inf=True)
    qq = _as_logp_1d(logp_q_on_q, "logp_q_on_q", allow_neg_inf=False)
    _check_pair(pp, qp, "logp_p_on_p", "logp_q_on_p")
    _check_pair(pq, qq, "logp_p_on_q", "logp_q_on_q")

    f_p = _terms(pp - qp, measure, "p")
    f_q = _terms(pq - qq, measure, "q")
    n_p, n_q = f_p.shape[0], f_q.shape[0]
    value = 0.5 * float(np.mean(f_p)) + 0.5 * float(np.mean(f_q))
    stderr = 0.5 * math.sqrt(_var(f_p) / n_p + _var(f_q) / n_q)
    return DissimilarityResult(measure, value, stderr, n_p + n_q, "two-sided")


def one_sided_tv(logp_p_on_p: Any, logp_q_on_p: Any) -> DissimilarityResult:
    """TV = E_{x~P} max(0, 1 - q(x)/p(x)), from samples of P only.

    Fallback when samples of Q cannot be scored under P (e.g. the old checkpoint of a full
    fine-tune was not kept). Unbiased, but higher variance than the two-sided estimator.
    """
    pp = _as_logp_1d(logp_p_on_p, "logp_p_on_p", allow_neg_inf=False)
    qp = _as_logp_1d(logp_q_on_p, "logp_q_on_p", allow_neg_inf=True)
    _check_pair(pp, qp, "logp_p_on_p", "logp_q_on_p")
    r = np.minimum(qp - pp, 0.0)  # log(q/p) clipped at 0; -inf when q(x) = 0
    f = -np.expm1(r)  # 1 - q/p in [0, 1], exactly 1 when q(x) = 0
    n = f.shape[0]
    return DissimilarityResult(
        "tv", float(np.mean(f)), math.sqrt(_var(f) / n), n, "one-sided"
    )


def mixture_logp(logp_matrix: Any) -> np.ndarray:
    """log of the equal-weight mixture: ``logsumexp(axis=1) - log(w)`` of an (n, w) matrix.

    Column j holds the samples' log-probs under checkpoint j of a window. 1-D input is one
    checkpoint (w = 1) and is returned as a float64 copy. -inf entries are fine.
    """
    a = np.asarray(logp_matrix, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise ValueError(f"logp_matrix must be 1-D or 2-D (n, w), got shape {a.shape}")
    if a.shape[1] < 1:
        raise ValueError("logp_matrix has no columns (window width w must be >= 1)")
    if np.isnan(a).any():
        raise ValueError("logp_matrix contains NaN log-probabilities")
    if np.isposinf(a).any():
        raise ValueError("logp_matrix contains +inf log-probabilities")
    w = a.shape[1]
    if w == 1:
        return a[:, 0].copy()
    return logsumexp(a, axis=1) - math.log(w)


def window_dissimilarity(
    left_on_left: Any,
    right_on_left: Any,
    left_on_right: Any,
    right_on_right: Any,
    measure: str = "tv",
) -> DissimilarityResult:
    """D between the left-window mixture and the right-window mixture of checkpoints.

    ``X_on_Y``: (n_Y, w_X) log-probs of the samples drawn from window Y's mixture, under each
    checkpoint of window X. Samples pooled equally from every checkpoint of a window are a
    (stratified) sample of its mixture; the iid stderr is then slightly conservative.
    """
    _check_measure(measure)
    mats = {}
    for name, x in (
        ("left_on_left", left_on_left),
        ("right_on_left", right_on_left),
        ("left_on_right", left_on_right),
        ("right_on_right", right_on_right),
    ):
        a = np.asarray(x, dtype=np.float64)
        if a.ndim == 1:
            a = a[:, None]
        if a.ndim != 2:
            raise ValueError(f"{name} must be 1-D or 2-D (n_samples, w), got shape {a.shape}")
        mats[name] = a
    if mats["left_on_left"].shape[1] != mats["left_on_right"].shape[1]:
        raise ValueError(
            "left window width mismatch: left_on_left has "
            f"{mats['left_on_left'].shape[1]} checkpoints, left_on_right has "
            f"{mats['left_on_right'].shape[1]}"
        )
    if mats["right_on_left"].shape[1] != mats["right_on_right"].shape[1]:
        raise ValueError(
            "right window width mismatch: right_on_left has "
            f"{mats['right_on_left'].shape[1]} checkpoints, right_on_right has "
            f"{mats['right_on_right'].shape[1]}"
        )
    _check_pair(mats["left_on_left"], mats["right_on_left"], "left_on_left", "right_on_left")
    _check_pair(mats["left_on_right"], mats["right_on_right"], "left_on_right", "right_on_right")
    return dissimilarity(
        mixture_logp(mats["left_on_left"]),
        mixture_logp(mats["right_on_left"]),
        mixture_logp(mats["left_on_right"]),
        mixture_logp(mats["right_on_right"]),
        measure=measure,
    )


def combine_prompts(results: Sequence[DissimilarityResult]) -> DissimilarityResult:
    """Average per-prompt estimates: D = mean_k D_k, stderr = sqrt(sum se_k^2) / k.

    Prompts are sampled independently, so the variances add. NaN entries propagate (filter
    them first if a prompt may legitimately lack data).
    """
    results = list(results)
    if not results:
        raise ValueError("combine_prompts needs at least one result")
    measures = {r.measure for r in results}
    if len(measures) != 1:
        raise ValueError(f"cannot combine results of different measures: {sorted(measures)}")
    k = len(results)
    value = float(np.mean([r.value for r in results]))
    stderr = math.sqrt(sum(float(r.stderr) ** 2 for r in results)) / k
    n = int(sum(r.n for r in results))
    return DissimilarityResult(results[0].measure, value, stderr, n, "combined")


# --------------------------------------------------------------------------- discrete / pushforward


def _discrete_rows(p: np.ndarray, q: np.ndarray, measure: str) -> np.ndarray:
    """Exact f-divergence between probability vectors along the last axis (vectorised)."""
    if measure == "tv":
        return 0.5 * np.abs(p - q).sum(axis=-1)
    s = p + q
    pos = s > 0
    if measure == "linear":
        num = (p - q) ** 2
        ratio = np.divide(num, s, out=np.zeros_like(s), where=pos)  # skip 0/0
        return 0.5 * ratio.sum(axis=-1)
    # js in nats: 1/2 sum p log(2p/(p+q)) + 1/2 sum q log(2q/(p+q)), with 0 log 0 = 0
    def half(a: np.ndarray) -> np.ndarray:
        ok = a > 0
        safe_s = np.where(pos, s, 1.0)
        safe_a = np.where(ok, a, 1.0)
        term = np.where(ok, a * (np.log(2.0 * safe_a) - np.log(safe_s)), 0.0)
        return term.sum(axis=-1)

    return 0.5 * half(p) + 0.5 * half(q)


def _as_prob_vector(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name} must be a 1-D probability vector, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains non-finite entries")
    if (a < 0).any():
        raise ValueError(f"{name} has negative probabilities")
    total = a.sum()
    if abs(total - 1.0) > _SUM_TOL:
        raise ValueError(f"{name} must sum to 1, sums to {total:.6g}")
    return a / total


def discrete_dissimilarity(p: Any, q: Any, measure: str) -> float:
    """Exact D(p, q) for two probability vectors over the same outcomes."""
    _check_measure(measure)
    pa = _as_prob_vector(p, "p")
    qa = _as_prob_vector(q, "q")
    if pa.shape != qa.shape:
        raise ValueError(f"p and q must have the same length, got {pa.shape[0]} and {qa.shape[0]}")
    return float(_discrete_rows(pa, qa, measure))


def _as_kernel(x: Any, name: str) -> np.ndarray:
    """Validate an (n, K) kernel, drop NaN rows (missing judgments), renormalise rows."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (n_samples, n_outcomes), got shape {a.shape}")
    if a.shape[1] < 1:
        raise ValueError(f"{name} has no outcome columns")
    a = a[~np.isnan(a).any(axis=1)]
    if np.isinf(a).any():
        raise ValueError(f"{name} contains infinite probabilities")
    if (a < 0).any():
        raise ValueError(f"{name} has negative probabilities")
    sums = a.sum(axis=1)
    bad = np.abs(sums - 1.0) > _SUM_TOL
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"rows of {name} must sum to 1 (score distributions); row {i} (after dropping NaN "
            f"rows) sums to {sums[i]:.6g}"
        )
    return a / sums[:, None] if a.shape[0] else a


def _bootstrap_means(
    kernel: np.ndarray, n_resamples: int, rng: np.random.Generator
) -> np.ndarray:
    """(n_resamples, K) means of rows resampled with replacement (via multinomial counts)."""
    n = kernel.shape[0]
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=n_resamples)
    return counts @ kernel / n


def _kernel_pair(kernel_p: Any, kernel_q: Any, measure: str) -> tuple[np.ndarray, np.ndarray]:
    """Both sides' kernels validated (see ``_as_kernel``), with the same number of outcomes."""
    _check_measure(measure)
    kp = _as_kernel(kernel_p, "kernel_p")
    kq = _as_kernel(kernel_q, "kernel_q")
    if kp.shape[1] != kq.shape[1]:
        raise ValueError(
            f"kernel_p and kernel_q must have the same number of outcomes, got {kp.shape[1]} "
            f"and {kq.shape[1]}"
        )
    return kp, kq


def pushforward_noise_floor(
    kernel_p: Any,
    kernel_q: Any,
    measure: str = "tv",
    n_resamples: int = 200,
    rng: Any = None,
) -> float:
    """What :func:`pushforward_dissimilarity` reads when nothing changed: the mean plug-in D
    after the rows of both sides are pooled and split again at random (same sizes).

    The plug-in D of two close distributions is biased upwards by about this much (for a
    binary score with rate p and n rows a side, ~ sqrt(2/pi) * sqrt(2 p (1 - p) / n)); an
    order parameter whose D is near its floor did not measurably change. Same input rules as
    ``pushforward_dissimilarity``; NaN when a side has no rows. ``rng`` None means seed 0.
    """
    kp, kq = _kernel_pair(kernel_p, kernel_q, measure)
    if int(n_resamples) < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    n_p, n_q = kp.shape[0], kq.shape[0]
    if n_p == 0 or n_q == 0:
        return float("nan")
    gen = as_generator(rng)
    pooled = np.concatenate([kp, kq])
    in_p = np.zeros((int(n_resamples), n_p + n_q))
    in_p[:, :n_p] = 1.0
    in_p = gen.permuted(in_p, axis=1)  # each row: a random split into n_p and n_q rows
    means_p = in_p @ pooled / n_p
    means_q = (1.0 - in_p) @ pooled / n_q
    return float(np.mean(_discrete_rows(means_p, means_q, measure)))


def pushforward_dissimilarity(
    kernel_p: Any,
    kernel_q: Any,
    measure: str = "tv",
    n_resamples: int = 200,
    rng: Any = None,
) -> DissimilarityResult:
    """Plug-in D between the judge-pushforwards P^O = mean_x K(.|x) and Q^O.

    ``kernel_*``: (n, K) rows = score distributions of samples of P / Q over K outcomes. Rows
    with NaN (missing judgments) are dropped. stderr is the bootstrap SD (rows resampled within
    each side). ``rng`` is a seed or ``np.random.Generator``; None means seed 0, so the result
    is reproducible. Note the plug-in value is biased upwards when P^O and Q^O are close (the
    bootstrap SD does not include that bias). Returns NaN value and stderr when a side has no
    rows left, NaN stderr when a side has a single row.
    """
    kp, kq = _kernel_pair(kernel_p, kernel_q, measure)
    if int(n_resamples) < 2:
        raise ValueError(f"n_resamples must be >= 2, got {n_resamples}")
    n_p, n_q = kp.shape[0], kq.shape[0]
    nan = float("nan")
    if n_p == 0 or n_q == 0:
        return DissimilarityResult(measure, nan, nan, n_p + n_q, "plug-in")
    value = float(_discrete_rows(kp.mean(axis=0), kq.mean(axis=0), measure))
    if n_p < 2 or n_q < 2:
        return DissimilarityResult(measure, value, nan, n_p + n_q, "plug-in")
    gen = as_generator(rng)
    bp = _bootstrap_means(kp, int(n_resamples), gen)
    bq = _bootstrap_means(kq, int(n_resamples), gen)
    boot = _discrete_rows(bp, bq, measure)
    stderr = float(np.std(boot, ddof=1))
    return DissimilarityResult(measure, value, stderr, n_p + n_q, "plug-in")
