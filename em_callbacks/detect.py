"""Online detection of behavioural phase transitions, grad-norm comparison, stop rules.

Pure numpy (``ruptures`` only for :func:`offline_change_points`, imported lazily). Nothing here
knows about torch, the Trainer or W&B: the callback feeds numbers in probe order and reads
plain dataclasses back. Every stateful object exposes ``state_dict()`` (JSON-serialisable
plain Python types) and ``load_state_dict(d)`` so the callback's state survives
``resume_from_checkpoint``.

Inputs. At probe step ``t_i`` the callback knows ``D(t_i)``, a dissimilarity between the
output distributions of consecutive (windows of) checkpoints, in ``[0, 1]`` (JS: ``[0, ln 2]``)
with a standard error ``se_i``. (With window ``w`` it is only known ``w`` probes later; the
detector does not care, it consumes ``(step, value, stderr)`` in increasing step order.)
Before behaviour changes, ``D`` sits at a noisy baseline; in a transition it rises to a clear
peak and falls back.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "DetectionState",
    "TransitionDetector",
    "grad_norm_peak",
    "TransitionReport",
    "transition_report",
    "offline_change_points",
    "StopRule",
    "StopOnOnset",
    "StopOnOrderParameter",
    "AnyOf",
    "resolve_stop_rule",
]

_STATE_VERSION = 1


def _finite(x: Any) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def _opt_int(x: Any) -> int | None:
    return None if x is None else int(x)


# --------------------------------------------------------------------------------------------
# Online detector
# --------------------------------------------------------------------------------------------


@dataclass
class DetectionState:
    """Snapshot of the online detector (all fields JSON-able plain types).

    ``onset_step``: probe step where D first left its baseline beyond noise (None: not yet).
    ``peak_step`` / ``peak_value``: argmax of D at/after the onset (provisional until
    ``peak_confirmed``; frozen once confirmed).
    ``last_pre_onset_step``: the last probe step with a finite value before the onset.
    ``baseline_mean`` / ``baseline_std``: set once the baseline window is complete.
    ``n_seen``: number of ``update`` calls accepted (NaN probes included).
    Extra (beyond the design brief): ``detected_at_step`` (the probe at which the onset was
    declared; later than ``onset_step`` when ``consecutive > 1``), ``peak_confirmed_at_step``,
    ``threshold`` (excess over ``baseline_mean`` that the last finite probe had to beat),
    ``n_nan`` (probes skipped because value or stderr was unusable), ``detected_at_n``
    (``n_seen`` when the onset was declared).
    """

    onset_step: int | None = None
    peak_step: int | None = None
    peak_value: float | None = None
    peak_confirmed: bool = False
    last_pre_onset_step: int | None = None
    baseline_mean: float | None = None
    baseline_std: float | None = None
    n_seen: int = 0
    detected_at_step: int | None = None
    peak_confirmed_at_step: int | None = None
    threshold: float | None = None
    n_nan: int = 0
    detected_at_n: int | None = None

    @property
    def transition_detected(self) -> bool:
        return self.onset_step is not None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DetectionState":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class TransitionDetector:
    """Online onset / peak detector on the D(t) series.

    Onset rule
    ----------
    1. *Baseline*: the first ``baseline_probes`` probes with a finite value form the baseline
       window. ``baseline_mean`` is their mean; ``baseline_std`` is the larger of their sample
       standard deviation (ddof=1; 0 for a single probe) and their mean reported stderr (the
       spread of two or three numbers is itself very noisy, so it is floored by the stderr).
    2. *Exceedance*: a later probe ``i`` exceeds the baseline when::

           value_i - baseline_mean > max(min_rise, z_threshold * sqrt(baseline_std**2 + se_i**2))

       (``se_i``: the probe's stderr; if it is NaN/negative the baseline's mean stderr is used).
    3. *Onset*: the first run of ``consecutive`` exceeding probes in a row; ``onset_step`` is
       the first probe of that run, ``last_pre_onset_step`` the last finite probe before it.
       Probes whose value (or stderr) is NaN/inf are counted in ``n_seen``/``n_nan`` and
       otherwise skipped: they neither extend nor break a run.

    Peak rule
    ---------
    ``peak_step`` is the argmax of D over finite probes at/after the onset (ties: earliest).
    It is *confirmed* at the first later probe with
    ``value < baseline_mean + fall_fraction * (peak_value - baseline_mean)``; from then on the
    peak is frozen (a second rise does not move it; use a fresh detector for it).

    Measured with ``benchmarks/detection_false_alarms.py`` (defaults: 3 baseline probes, z=3,
    min_rise=0.02, consecutive=1): ~0.5% of stationary-noise runs of 40 probes raise an alarm
    (baseline 0.005-0.03, se 0.005-0.02); peaks of 0.1-0.2 rising over 1-3 probes with se
    <= 0.01 are found on their first (88%) or second (11%) rising probe. ``consecutive=2``
    removes the false alarms but cannot see a transition that lasts a single probe. A
    baseline that drifts upward (e.g. D growing through learning-rate warm-up) is *not*
    modelled: +0.01 over the run gives ~3% false alarms, +0.03 ~32%; start probing after
    warm-up, raise ``min_rise`` or use ``consecutive=2``.

    Steps must increase; an ``update`` with a step not larger than the last one is ignored
    with a warning (this happens when a resumed run replays a probe).
    """

    def __init__(
        self,
        baseline_probes: int = 3,
        z_threshold: float = 3.0,
        min_rise: float = 0.02,
        consecutive: int = 1,
        fall_fraction: float = 0.5,
    ) -> None:
        if int(baseline_probes) < 1:
            raise ValueError(f"baseline_probes must be >= 1, got {baseline_probes!r}")
        if not (_finite(z_threshold) and z_threshold >= 0):
            raise ValueError(f"z_threshold must be a finite number >= 0, got {z_threshold!r}")
        if not (_finite(min_rise) and min_rise >= 0):
            raise ValueError(f"min_rise must be a finite number >= 0, got {min_rise!r}")
        if int(consecutive) < 1:
            raise ValueError(f"consecutive must be >= 1, got {consecutive!r}")
        if not (_finite(fall_fraction) and 0.0 <= fall_fraction < 1.0):
            raise ValueError(f"fall_fraction must be in [0, 1), got {fall_fraction!r}")
        self.baseline_probes = int(baseline_probes)
        self.z_threshold = float(z_threshold)
        self.min_rise = float(min_rise)
        self.consecutive = int(consecutive)
        self.fall_fraction = float(fall_fraction)
        self.reset()

    # ---------------------------------------------------------------- config / state
    def config(self) -> dict:
        return {
            "baseline_probes": self.baseline_probes,
            "z_threshold": self.z_threshold,
            "min_rise": self.min_rise,
            "consecutive": self.consecutive,
            "fall_fraction": self.fall_fraction,
        }

    def reset(self) -> None:
        self._state = DetectionState()
        self._base_values: list[float] = []
        self._base_stderrs: list[float] = []  # finite ones only
        self._base_se_mean: float = 0.0
        self._last_step: int | None = None
        self._last_finite_step: int | None = None
        # current run of exceeding probes (before the onset is declared): [(step, value)]
        self._run: list[tuple[int, float]] = []
        self._run_prev_step: int | None = None

    @property
    def state(self) -> DetectionState:
        return replace(self._state)

    def state_dict(self) -> dict:
        return {
            "version": _STATE_VERSION,
            "config": self.config(),
            "state": self._state.to_dict(),
            "base_values": [float(v) for v in self._base_values],
            "base_stderrs": [float(v) for v in self._base_stderrs],
            "base_se_mean": float(self._base_se_mean),
            "last_step": self._last_step,
            "last_finite_step": self._last_finite_step,
            "run": [[int(s), float(v)] for s, v in self._run],
            "run_prev_step": self._run_prev_step,
        }

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        """Restore the running state. The constructor's configuration is kept; a differing
        saved configuration triggers a warning (the restored baseline was built with it)."""
        if not isinstance(d, Mapping) or "state" not in d:
            raise ValueError("not a TransitionDetector state_dict")
        saved_cfg = dict(d.get("config") or {})
        if saved_cfg and saved_cfg != self.config():
            warnings.warn(
                f"TransitionDetector.load_state_dict: saved config {saved_cfg} differs from "
                f"the current one {self.config()}; keeping the current configuration",
                stacklevel=2,
            )
        self.reset()
        self._state = DetectionState.from_dict(d["state"])
        self._base_values = [float(v) for v in d.get("base_values", [])]
        self._base_stderrs = [float(v) for v in d.get("base_stderrs", [])]
        self._base_se_mean = float(d.get("base_se_mean", 0.0))
        self._last_step = _opt_int(d.get("last_step"))
        self._last_finite_step = _opt_int(d.get("last_finite_step"))
        self._run = [(int(s), float(v)) for s, v in d.get("run", [])]
        self._run_prev_step = _opt_int(d.get("run_prev_step"))

    # ---------------------------------------------------------------- maths
    def threshold_for(self, stderr: float) -> float | None:
        """Excess over ``baseline_mean`` a probe with this stderr must beat (None before the
        baseline is complete)."""
        st = self._state
        if st.baseline_std is None:
            return None
        se = float(stderr) if (_finite(stderr) and stderr >= 0) else self._base_se_mean
        return max(self.min_rise, self.z_threshold * math.sqrt(st.baseline_std**2 + se**2))

    def _finish_baseline(self) -> None:
        vals = np.asarray(self._base_values, dtype=float)
        mean = float(vals.mean())
        spread = float(vals.std(ddof=1)) if vals.size > 1 else 0.0
        se_mean = float(np.mean(self._base_stderrs)) if self._base_stderrs else 0.0
        self._base_se_mean = se_mean
        self._state.baseline_mean = mean
        self._state.baseline_std = max(spread, se_mean)

    def continue_from_onset(self, onset_step: int, baseline_mean: float | None,
                            last_pre_onset_step: int | None = None) -> None:
        """Take a known onset (e.g. a live run's, found by another detector) and track only the
        peak from here on: later ``update`` calls apply this detector's peak rule. Without a
        baseline the peak is never confirmed."""
        self.reset()
        st = self._state
        st.onset_step = int(onset_step)
        st.last_pre_onset_step = None if last_pre_onset_step is None else int(last_pre_onset_step)
        st.baseline_mean = float(baseline_mean) if _finite(baseline_mean) else None
        self._last_step = int(onset_step) - 1

    def _fall_level(self) -> float:
        st = self._state
        assert st.peak_value is not None and st.baseline_mean is not None
        return st.baseline_mean + self.fall_fraction * (st.peak_value - st.baseline_mean)

    def _track_peak(self, step: int, value: float) -> None:
        st = self._state
        if st.peak_confirmed:
            return
        if st.peak_value is None or value > st.peak_value:
            st.peak_step, st.peak_value = int(step), float(value)
            return
        if st.baseline_mean is not None and value < self._fall_level():
            st.peak_confirmed = True
            st.peak_confirmed_at_step = int(step)

    def update(self, step: int, value: float, stderr: float) -> DetectionState:
        """Consume one probe; returns a copy of the new state. NaN/inf values (or an inf
        stderr) are recorded (``n_seen``, ``n_nan``) and skipped."""
        step = int(step)
        st = self._state
        if self._last_step is not None and step <= self._last_step:
            warnings.warn(
                f"TransitionDetector.update: step {step} <= last step {self._last_step}; ignored",
                stacklevel=2,
            )
            return self.state
        self._last_step = step
        st.n_seen += 1

        # unusable: non-finite value, or an infinite / non-numeric stderr. A NaN, None or
        # negative stderr is replaced by the baseline's mean stderr.
        bad_se = stderr is not None and not _finite(stderr) and not _is_nan(stderr)
        if not _finite(value) or bad_se:
            st.n_nan += 1
            return self.state
        value = float(value)
        se = float(stderr) if (_finite(stderr) and float(stderr) >= 0) else float("nan")

        # 1. after the onset: peak tracking only
        if st.onset_step is not None:
            self._track_peak(step, value)
            self._last_finite_step = step
            return self.state

        # 2. baseline window
        if st.baseline_mean is None:
            self._base_values.append(value)
            if math.isfinite(se) and se >= 0:
                self._base_stderrs.append(se)
            if len(self._base_values) >= self.baseline_probes:
                self._finish_baseline()
            self._last_finite_step = step
            return self.state

        # 3. looking for the onset
        thr = self.threshold_for(se)
        assert thr is not None
        st.threshold = float(thr)
        if value - st.baseline_mean > thr:
            if not self._run:
                self._run_prev_step = self._last_finite_step
            self._run.append((step, value))
            if len(self._run) >= self.consecutive:
                st.onset_step = int(self._run[0][0])
                st.last_pre_onset_step = self._run_prev_step
                st.detected_at_step = step
                st.detected_at_n = st.n_seen
                for s, v in self._run:
                    self._track_peak(s, v)
                self._run = []
                self._run_prev_step = None
        else:
            self._run = []
            self._run_prev_step = None
        self._last_finite_step = step
        return self.state

    def __repr__(self) -> str:
        cfg = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"TransitionDetector({cfg})"


def _is_nan(x: Any) -> bool:
    try:
        return math.isnan(float(x))
    except (TypeError, ValueError):
        return False


# --------------------------------------------------------------------------------------------
# Gradient norm and the report
# --------------------------------------------------------------------------------------------


def grad_norm_peak(
    steps: Sequence[int] | np.ndarray,
    values: Sequence[float] | np.ndarray,
    smooth: int = 1,
) -> int | None:
    """Step at which the (optionally smoothed) gradient norm is largest.

    Non-finite values (NaN/inf, e.g. overflowed fp16 steps) and their steps are dropped first;
    points are sorted by step. ``smooth > 1`` applies a centred moving average over that many
    consecutive remaining points (shrinking at the edges) before the argmax. Ties: earliest
    step. Returns None when no finite value is left.
    """
    s = np.asarray(list(steps) if not isinstance(steps, np.ndarray) else steps)
    v = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=float)
    if s.shape[0] != v.shape[0]:
        raise ValueError(f"steps and values differ in length: {s.shape[0]} != {v.shape[0]}")
    smooth = int(smooth)
    if smooth < 1:
        raise ValueError(f"smooth must be >= 1, got {smooth}")
    if v.size == 0:
        return None
    ok = np.isfinite(v)
    s, v = s[ok], v[ok]
    if v.size == 0:
        return None
    order = np.argsort(s, kind="stable")
    s, v = s[order], v[order]
    if smooth > 1 and v.size > 1:
        left, right = (smooth - 1) // 2, smooth // 2
        c = np.concatenate([[0.0], np.cumsum(v)])
        idx = np.arange(v.size)
        lo = np.clip(idx - left, 0, v.size)
        hi = np.clip(idx + right + 1, 0, v.size)
        v = (c[hi] - c[lo]) / (hi - lo)
    return int(s[int(np.argmax(v))])


@dataclass
class TransitionReport:
    """Onset / peak of the behavioural transition next to the grad-norm peak.

    Lags are ``onset_step - grad_norm_peak_step`` and ``peak_step - grad_norm_peak_step``
    (positive: the behaviour changed *after* the gradient norm peaked, as in Arnold & Lörch
    2025); None when either side is missing. ``transition_detected`` means an onset was found;
    ``peak_confirmed`` (extra) says whether ``peak_step`` is final.
    """

    onset_step: int | None
    peak_step: int | None
    grad_norm_peak_step: int | None
    lag_onset_minus_grad_peak: int | None
    lag_peak_minus_grad_peak: int | None
    transition_detected: bool
    peak_confirmed: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def transition_report(
    state: DetectionState,
    grad_steps: Sequence[int] | np.ndarray,
    grad_values: Sequence[float] | np.ndarray,
    smooth: int = 1,
) -> TransitionReport:
    """Combine a :class:`DetectionState` with the grad-norm series (see :func:`grad_norm_peak`)."""
    g = grad_norm_peak(grad_steps, grad_values, smooth=smooth)
    onset = _opt_int(state.onset_step)
    peak = _opt_int(state.peak_step)
    return TransitionReport(
        onset_step=onset,
        peak_step=peak,
        grad_norm_peak_step=g,
        lag_onset_minus_grad_peak=None if (onset is None or g is None) else onset - g,
        lag_peak_minus_grad_peak=None if (peak is None or g is None) else peak - g,
        transition_detected=onset is not None,
        peak_confirmed=bool(state.peak_confirmed),
    )


# --------------------------------------------------------------------------------------------
# Offline re-analysis
# --------------------------------------------------------------------------------------------


def offline_change_points(
    steps: Sequence[int] | np.ndarray,
    values: Sequence[float] | np.ndarray,
    n_bkps: int | None = None,
    pen: float | None = None,
    model: str = "l2",
    min_size: int = 2,
) -> list[int]:
    """Change points of a whole series with ``ruptures``; returns probe steps.

    Each returned step is the *first* step of a new segment. Non-finite values are dropped.
    ``n_bkps`` given: binary segmentation (``ruptures.Binseg``) with exactly that many change
    points (fewer if the series is too short). Otherwise PELT (``ruptures.Pelt``) with penalty
    ``pen``; by default ``pen = 4 * log(n) * sigma**2`` with sigma the noise scale estimated
    from the median absolute first difference (a conservative BIC-type penalty for
    ``model="l2"``: about 2% of 40-60-point pure-noise series get a spurious change point;
    for ``"rbf"`` the default is ``log(n)``). A D-peak typically yields two points: rise and
    fall. ruptures' PELT is pure Python: ~0.1 s for 50 points, it grows quickly beyond a few
    hundred.
    """
    try:
        import ruptures as rpt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("offline_change_points needs `ruptures` (pip install ruptures)") from e
    if n_bkps is not None and pen is not None:
        raise ValueError("give n_bkps or pen, not both")
    s = np.asarray(list(steps) if not isinstance(steps, np.ndarray) else steps)
    v = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=float)
    if s.shape[0] != v.shape[0]:
        raise ValueError(f"steps and values differ in length: {s.shape[0]} != {v.shape[0]}")
    ok = np.isfinite(v)
    s, v = s[ok], v[ok]
    order = np.argsort(s, kind="stable")
    s, v = s[order], v[order]
    n = v.size
    min_size = max(1, int(min_size))
    if n < 2 * min_size:
        return []
    signal = v.reshape(-1, 1)
    if n_bkps is not None:
        k = min(int(n_bkps), n // min_size - 1)
        if k <= 0:
            return []
        algo = rpt.Binseg(model=model, min_size=min_size, jump=1).fit(signal)
        bkps = algo.predict(n_bkps=k)
    else:
        if pen is None:
            if model == "l2":
                d = np.diff(v)
                sigma = float(np.median(np.abs(d - np.median(d)))) / (0.6745 * math.sqrt(2))
                scale = max(sigma**2, 1e-12 * (float(np.var(v)) + 1e-12))
                pen = 4.0 * math.log(n) * scale
            else:
                pen = math.log(n)
        algo = rpt.Pelt(model=model, min_size=min_size, jump=1).fit(signal)
        bkps = algo.predict(pen=float(pen))
    return [int(s[b]) for b in bkps if 0 < b < n]


# --------------------------------------------------------------------------------------------
# Stop rules
# --------------------------------------------------------------------------------------------

OrderSeries = Mapping[str, Sequence[tuple[int, float]]]


class StopRule:
    """Decides whether to stop training. Called by the callback after each probe (calling it
    more often is harmless: rules count probes through ``state.n_seen`` or the order series,
    not calls). Returns a human-readable reason, or None. Once a rule has fired it keeps
    returning its reason, until :meth:`reset` (the callback resets its rule when it is reused
    for another ``train()``)."""

    def reset(self) -> None:
        """Forget everything seen so far (stateless rules: nothing to do)."""

    def notes(self) -> list[str]:
        """Facts about the run worth telling the user even though the rule did not fire
        (e.g. an order parameter already past its threshold before training)."""
        return []

    def should_stop(
        self, state: DetectionState, order_series: OrderSeries, step: int
    ) -> str | None:  # pragma: no cover - interface
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {"type": type(self).__name__}

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        t = d.get("type") if isinstance(d, Mapping) else None
        if t is not None and t != type(self).__name__:
            raise ValueError(f"state_dict of {t} cannot be loaded into {type(self).__name__}")

    def __call__(self, state: DetectionState, order_series: OrderSeries, step: int) -> str | None:
        return self.should_stop(state, order_series, step)


class StopOnOnset(StopRule):
    """Stop once an onset is detected and ``patience`` more probes have passed (probes counted
    by ``DetectionState.n_seen``, NaN probes included)."""

    def __init__(self, patience: int = 0) -> None:
        if int(patience) < 0:
            raise ValueError(f"patience must be >= 0, got {patience!r}")
        self.patience = int(patience)
        self._anchor_n: int | None = None
        self._fired: str | None = None

    def reset(self) -> None:
        self._anchor_n = None
        self._fired = None

    def should_stop(self, state: DetectionState, order_series: OrderSeries, step: int) -> str | None:
        if self._fired is not None:
            return self._fired
        if state.onset_step is None:
            return None
        if self._anchor_n is None:
            self._anchor_n = int(
                state.detected_at_n if getattr(state, "detected_at_n", None) is not None
                else state.n_seen
            )
        if state.n_seen - self._anchor_n >= self.patience:
            extra = f" and {self.patience} more probe(s)" if self.patience else ""
            self._fired = (
                f"behavioural transition onset detected at step {state.onset_step}{extra}; "
                f"stopping at step {int(step)}"
            )
        return self._fired

    def state_dict(self) -> dict:
        return {"type": "StopOnOnset", "patience": self.patience,
                "anchor_n": self._anchor_n, "fired": self._fired}

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        super().load_state_dict(d)
        self._anchor_n = _opt_int(d.get("anchor_n"))
        self._fired = d.get("fired")


class StopOnOrderParameter(StopRule):
    """Stop once order parameter ``name`` is beyond ``threshold`` for ``patience`` consecutive
    probes of its series (sorted by step; NaN points skipped; results that arrive late are
    taken into account). Missing series: no stop.

    ``mode="change"`` (default) compares the change from the *baseline*: the value at the
    series' first finite probe, which is the step-0 probe taken before the first optimizer
    step. That probe is the only measurement of the model before fine-tuning, so what the
    base model already shows (a judge flagging 8% of its answers) cannot stop training by
    itself; averaging later probes would mix in training. ``direction="above"`` fires on
    ``value - baseline > threshold``, ``"below"`` on ``baseline - value > threshold``
    (``threshold >= 0``). A baseline already beyond ``threshold`` read as a level is recorded
    (:attr:`past_threshold_at_baseline`, :meth:`notes`) so the summary can say so.
    The earliest point known is the baseline: a step-0 result that arrives after later ones
    replaces an earlier guess (a stop already fired stays).

    ``mode="absolute"``: the value itself against ``threshold``, step 0 included (the only
    behaviour before ``mode`` existed).
    """

    MODES = ("change", "absolute")

    def __init__(self, name: str, threshold: float, direction: str = "above", patience: int = 1,
                 mode: str = "change"):
        if direction not in ("above", "below"):
            raise ValueError(f"direction must be 'above' or 'below', got {direction!r}")
        if int(patience) < 1:
            raise ValueError(f"patience must be >= 1, got {patience!r}")
        if not _finite(threshold):
            raise ValueError(f"threshold must be a finite number, got {threshold!r}")
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        if mode == "change" and float(threshold) < 0:
            raise ValueError(
                f"threshold is a change from the baseline in mode='change' and must be >= 0, got "
                f"{threshold!r} (use direction='below' for a fall, or mode='absolute' for a level)")
        self.name = str(name)
        self.threshold = float(threshold)
        self.direction = direction
        self.patience = int(patience)
        self.mode = mode
        self.reset()

    def reset(self) -> None:
        self._fired: str | None = None
        self._baseline: tuple[int, float] | None = None

    # ------------------------------------------------------------------ baseline record
    @property
    def baseline_step(self) -> int | None:
        return None if self._baseline is None else self._baseline[0]

    @property
    def baseline_value(self) -> float | None:
        return None if self._baseline is None else self._baseline[1]

    @property
    def past_threshold_at_baseline(self) -> bool | None:
        """Whether the baseline value itself is beyond ``threshold`` (None: no baseline yet)."""
        return None if self._baseline is None else self._beyond_level(self._baseline[1])

    def notes(self) -> list[str]:
        if not self.past_threshold_at_baseline:
            return []
        s, b = self._baseline  # type: ignore[misc]
        when = "at step 0, before training" if s == 0 else f"at its first probe (step {s})"
        text = (f"order parameter {self.name!r} was already {self.direction} {self.threshold:g} "
                f"{when} (value {b:.4g})")
        if self.mode == "change":
            level = b + self.threshold if self.direction == "above" else b - self.threshold
            text += (f"; the stop rule acts on the change from that baseline: it stops once the "
                     f"value goes {self.direction} {level:.4g}")
        return [text]

    # ------------------------------------------------------------------ decision
    def _beyond_level(self, x: float) -> bool:
        return x > self.threshold if self.direction == "above" else x < self.threshold

    def _beyond(self, x: float, base: float) -> bool:
        if self.mode == "absolute":
            return self._beyond_level(x)
        delta = x - base if self.direction == "above" else base - x
        return delta > self.threshold

    def _reason(self, s: int, x: float, step: int) -> str:
        if self.mode == "absolute":
            what = f"{self.direction} {self.threshold:g}"
            value = f"value {x:.4g} at step {s}"
        else:
            bs, b = self._baseline  # type: ignore[misc]
            verb = "rose" if self.direction == "above" else "fell"
            what = f"{verb} by more than {self.threshold:g} from its baseline {b:.4g} (step {bs})"
            value = f"value {x:.4g} at step {s}, change {x - b:+.4g}"
        return (f"order parameter {self.name!r} {what} for {self.patience} consecutive probe(s) "
                f"({value}); stopping at step {int(step)}")

    def should_stop(self, state: DetectionState, order_series: OrderSeries, step: int) -> str | None:
        if self._fired is not None:
            return self._fired
        series = (order_series or {}).get(self.name)
        if not series:
            return None
        pts = sorted(((int(s), float(x)) for s, x in series if _finite(x)), key=lambda p: p[0])
        if not pts:
            return None
        if self._baseline is None or pts[0][0] < self._baseline[0]:
            self._baseline = pts[0]
        base_step, base = self._baseline
        run = 0
        for s, x in pts:
            if self.mode == "change" and s <= base_step:
                continue  # the baseline is no change from itself
            run = run + 1 if self._beyond(x, base) else 0
            if run >= self.patience:
                self._fired = self._reason(s, x, step)
                return self._fired
        return None

    def state_dict(self) -> dict:
        return {"type": "StopOnOrderParameter", "name": self.name, "threshold": self.threshold,
                "direction": self.direction, "patience": self.patience, "mode": self.mode,
                "fired": self._fired,
                "baseline": None if self._baseline is None else list(self._baseline),
                "past_threshold_at_baseline": self.past_threshold_at_baseline}

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        """Restore what was seen; the constructor's configuration is kept (a state saved
        before ``mode`` existed was an absolute rule: warned when this one differs)."""
        super().load_state_dict(d)
        saved_mode = d.get("mode", "absolute")
        if saved_mode != self.mode:
            warnings.warn(
                f"StopOnOrderParameter({self.name!r}).load_state_dict: saved mode {saved_mode!r} "
                f"differs from the current {self.mode!r}; keeping {self.mode!r}", stacklevel=2)
        self._fired = d.get("fired")
        b = d.get("baseline")
        self._baseline = (int(b[0]), float(b[1])) if b is not None and _finite(b[1]) else None


class AnyOf(StopRule):
    """Stop when any of ``rules`` says so. Every rule is evaluated on every call (so their
    patience counters stay current); the reasons of all firing rules are joined by '; '."""

    def __init__(self, rules: Iterable[StopRule]) -> None:
        rules = list(rules)
        for r in rules:
            if not isinstance(r, StopRule):
                raise TypeError(f"AnyOf expects StopRule objects, got {type(r).__name__}")
        self.rules = rules

    def reset(self) -> None:
        for rule in self.rules:
            rule.reset()

    def notes(self) -> list[str]:
        return [n for r in self.rules for n in r.notes()]

    def should_stop(self, state: DetectionState, order_series: OrderSeries, step: int) -> str | None:
        reasons = [r.should_stop(state, order_series, step) for r in self.rules]
        reasons = [x for x in reasons if x]
        return "; ".join(reasons) if reasons else None

    def state_dict(self) -> dict:
        return {"type": "AnyOf", "rules": [r.state_dict() for r in self.rules]}

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        super().load_state_dict(d)
        sub = list(d.get("rules", []))
        if len(sub) != len(self.rules):
            raise ValueError(f"AnyOf state_dict has {len(sub)} rules, this AnyOf has "
                             f"{len(self.rules)}")
        for r, sd in zip(self.rules, sub):
            r.load_state_dict(sd)


def resolve_stop_rule(early_stopping: bool | StopRule | None) -> StopRule | None:
    """``True`` -> ``StopOnOnset()``; ``False``/``None`` -> None; a StopRule -> itself."""
    if early_stopping is None:
        return None
    if isinstance(early_stopping, (bool, np.bool_)):
        return StopOnOnset() if bool(early_stopping) else None
    if isinstance(early_stopping, StopRule):
        return early_stopping
    raise TypeError(
        "early_stopping must be a bool, None or a StopRule, got "
        f"{type(early_stopping).__name__}: {early_stopping!r}"
    )
