"""Tests for em_callbacks.detect: online onset/peak detection, grad-norm peak, report,
offline change points, stop rules. Pure numpy; runs in a few seconds."""

from __future__ import annotations

import json
import math
import os
import sys
import warnings

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from em_callbacks.detect import (  # noqa: E402
    AnyOf,
    DetectionState,
    StopOnOnset,
    StopOnOrderParameter,
    StopRule,
    TransitionDetector,
    TransitionReport,
    grad_norm_peak,
    offline_change_points,
    resolve_stop_rule,
    transition_report,
)

EVERY = 25  # probe every 25 optimizer steps


def make_series(rng, n=40, change=None, height=0.13, up=2, down=None, mu=None, se=None,
                se_jitter=0.3, report_jitter=0.2, se_slope=0.1):
    """A D(t) series: stationary noisy baseline, optionally a triangular peak.

    Probes 0..change sit at the baseline ``mu``; D rises linearly over ``up`` probes to
    ``mu + height`` (at index change + up, the true peak) and falls back over ``down``.
    True per-probe noise ``se_t`` varies around ``se`` and grows with the excess (TV estimates
    are noisier away from 0); the *reported* stderr is off from the true one by up to
    ``report_jitter``. Values are clipped at 0 like a TV estimate.
    Returns (steps, values, reported_stderr, true_change_index, true_peak_index).
    """
    mu = rng.uniform(0.005, 0.03) if mu is None else mu
    se = rng.uniform(0.005, 0.02) if se is None else se
    down = up if down is None else down
    true = np.full(n, mu)
    peak = None
    if change is not None:
        for k in range(1, up + 1):
            true[change + k] = mu + height * k / up
        peak = change + up
        for k in range(1, down + 1):
            if peak + k < n:
                true[peak + k] = mu + height * (1 - k / down)
    se_t = se * rng.uniform(1 - se_jitter, 1 + se_jitter, n) + se_slope * (true - mu)
    values = np.maximum(0.0, true + se_t * rng.standard_normal(n))
    stderr = se_t * rng.uniform(1 - report_jitter, 1 + report_jitter, n)
    steps = np.arange(n) * EVERY
    first_rise = None if change is None else change + 1
    return steps, values, stderr, first_rise, peak


def run_detector(steps, values, stderr, **cfg):
    det = TransitionDetector(**cfg)
    st = None
    for s, v, e in zip(steps, values, stderr):
        st = det.update(int(s), float(v), float(e))
    return det, st


# ----------------------------------------------------------------------------- detector


def test_hand_made_series_example():
    # baseline ~0.01 (se 0.005), transition rises to 0.13 at probe 8, back by probe 11
    vals = [0.010, 0.014, 0.008, 0.012, 0.009, 0.011, 0.060, 0.100, 0.130, 0.090, 0.050, 0.012,
            0.010, 0.011]
    ses = [0.005] * len(vals)
    steps = [i * EVERY for i in range(len(vals))]
    det = TransitionDetector()
    states = [det.update(s, v, e) for s, v, e in zip(steps, vals, ses)]
    st = states[-1]
    assert st.baseline_mean == pytest.approx(np.mean(vals[:3]))
    assert st.baseline_std == pytest.approx(max(np.std(vals[:3], ddof=1), 0.005))
    assert st.onset_step == 6 * EVERY
    assert st.detected_at_step == 6 * EVERY
    assert st.last_pre_onset_step == 5 * EVERY
    assert st.peak_step == 8 * EVERY and st.peak_value == pytest.approx(0.13)
    # fall level = bm + 0.5 * (0.13 - bm) ~ 0.07: first value below is 0.05 at probe 10
    assert st.peak_confirmed and st.peak_confirmed_at_step == 10 * EVERY
    assert not states[8].peak_confirmed and not states[9].peak_confirmed
    assert st.n_seen == len(vals) and st.n_nan == 0
    assert st.transition_detected
    json.dumps(st.to_dict())
    assert DetectionState.from_dict(st.to_dict()) == st


def test_no_detection_during_baseline_and_threshold_formula():
    det = TransitionDetector(baseline_probes=3, z_threshold=3.0, min_rise=0.02)
    for i, v in enumerate([0.01, 0.02, 0.03]):
        st = det.update(i, v, 0.004)
        assert st.onset_step is None
    assert st.baseline_mean == pytest.approx(0.02)
    assert st.baseline_std == pytest.approx(0.01)  # spread (0.01) > mean stderr (0.004)
    thr = det.threshold_for(0.01)
    assert thr == pytest.approx(3 * math.sqrt(0.01**2 + 0.01**2))
    assert det.threshold_for(0.0) == pytest.approx(0.03)
    # min_rise floor dominates for tiny noise
    det2 = TransitionDetector(min_rise=0.05)
    for i, v in enumerate([0.01, 0.0101, 0.0099]):
        det2.update(i, v, 0.0001)
    assert det2.threshold_for(0.0001) == pytest.approx(0.05)
    st = det2.update(3, 0.055, 0.0001)  # +0.045 < min_rise
    assert st.onset_step is None
    st = det2.update(4, 0.065, 0.0001)
    assert st.onset_step == 4 and st.last_pre_onset_step == 3


def _transition_trials(seeds, height, se, ups, seed_offset):
    out = []
    for sd in seeds:
        rng = np.random.default_rng(seed_offset + sd)
        change = int(rng.integers(8, 20))
        up = int(rng.choice(ups))
        steps, v, e, first_rise, peak = make_series(
            rng, 40, change=change, height=rng.uniform(*height), up=up,
            se=rng.uniform(*se))
        det, st = run_detector(steps, v, e)
        out.append((st, first_rise, peak, steps, v))
    return out


def test_onset_within_one_probe_and_peak_at_true_peak_clear_transitions():
    # sharp transitions well above the noise: heights 0.12-0.2, baseline se 0.003-0.006
    trials = _transition_trials(range(100), (0.12, 0.2), (0.003, 0.006), (1, 2), 1000)
    onset_ok = peak_ok = 0
    for st, first_rise, peak, steps, v in trials:
        assert st.onset_step is not None
        k = st.onset_step // EVERY
        onset_ok += abs(k - first_rise) <= 1
        peak_ok += st.peak_step == steps[peak] and st.peak_confirmed
        # peak is the argmax of D at/after the onset, last_pre_onset is the probe before
        assert st.peak_value == pytest.approx(v[k: peak + 4].max())
        assert st.last_pre_onset_step == st.onset_step - EVERY
    # measured over 5000 seeds: ~99.6% of onsets within one probe, ~99.5% peaks exact
    assert onset_ok >= 97, onset_ok
    assert peak_ok >= 97, peak_ok


def test_onset_delay_broad_conditions():
    # wider range: heights 0.1-0.2, se 0.003-0.01, rises over 1-3 probes
    trials = _transition_trials(range(200), (0.1, 0.2), (0.003, 0.01), (1, 2, 3), 5000)
    delays = [None if st.onset_step is None else st.onset_step // EVERY - fr
              for st, fr, *_ in trials]
    within = sum(d is not None and abs(d) <= 1 for d in delays)
    early = sum(d is not None and d < -1 for d in delays)
    assert within >= 0.93 * len(trials), (within, delays)
    assert early <= 2
    # peaks of transitions detected in time: within one probe of the truth
    peak_err = [abs(st.peak_step // EVERY - pk) for st, fr, pk, *_ in trials
                if st.onset_step is not None and st.onset_step // EVERY >= fr - 1]
    assert np.mean([e <= 1 for e in peak_err]) >= 0.97
    assert np.mean([e == 0 for e in peak_err]) >= 0.9


def test_false_alarm_rate_on_pure_noise():
    n_seeds, n_probes = 200, 40
    alarms = 0
    for sd in range(n_seeds):
        rng = np.random.default_rng(20_000 + sd)
        steps, v, e, _, _ = make_series(rng, n_probes, change=None)
        _, st = run_detector(steps, v, e)
        alarms += st.onset_step is not None
    assert alarms / n_seeds <= 0.02, alarms
    # requiring two probes in a row removes practically all alarms
    alarms2 = 0
    for sd in range(n_seeds):
        rng = np.random.default_rng(20_000 + sd)
        steps, v, e, _, _ = make_series(rng, n_probes, change=None, se_jitter=0.5,
                                        report_jitter=0.4)
        _, st = run_detector(steps, v, e, consecutive=2)
        alarms2 += st.onset_step is not None
    assert alarms2 / n_seeds <= 0.01, alarms2


def test_consecutive_onset_is_first_of_run_and_single_spike_ignored():
    base = [0.01, 0.012, 0.011, 0.010]
    det = TransitionDetector(consecutive=2)
    for i, v in enumerate(base + [0.2, 0.011, 0.012]):  # isolated spike at 4
        st = det.update(i, v, 0.003)
    assert st.onset_step is None
    for i, v in enumerate([0.09, 0.15, 0.05], start=7):
        st = det.update(i, v, 0.003)
    assert st.onset_step == 7 and st.detected_at_step == 8 and st.last_pre_onset_step == 6
    assert st.peak_step == 8 and st.peak_confirmed and st.peak_confirmed_at_step == 9
    # a run that already fell back when it is declared confirms the peak at once
    det = TransitionDetector(consecutive=3)
    for i, v in enumerate(base + [0.2, 0.09, 0.08]):
        st = det.update(i, v, 0.003)
    assert st.onset_step == 4 and st.peak_step == 4 and st.peak_confirmed
    assert st.peak_confirmed_at_step == 5


def test_peak_frozen_after_confirmation():
    det = TransitionDetector()
    for i, v in enumerate([0.01, 0.01, 0.012, 0.1, 0.2, 0.05, 0.3]):
        st = det.update(i, v, 0.003)
    assert st.peak_step == 4 and st.peak_confirmed and st.peak_value == pytest.approx(0.2)


def test_nan_values_are_recorded_and_skipped():
    rng = np.random.default_rng(7)
    steps, v, e, first_rise, peak = make_series(rng, 40, change=15, height=0.15, up=2,
                                                se=0.004)
    v = v.copy()
    e = e.copy()
    v[[1, 5, 12, 30]] = np.nan
    v[20] = np.inf
    e[8] = np.nan  # NaN stderr: the baseline mean stderr is used instead
    e[9] = np.inf  # infinite stderr: the probe is unusable
    det = TransitionDetector()
    for s, x, se in zip(steps, v, e):
        st = det.update(int(s), x, se)
    assert st.n_seen == 40 and st.n_nan == 6
    assert st.baseline_mean == pytest.approx(np.mean(v[[0, 2, 3]]))
    assert abs(st.onset_step // EVERY - first_rise) <= 1
    assert st.peak_step == steps[peak] and st.peak_confirmed
    # only NaN: nothing happens, nothing crashes
    det = TransitionDetector()
    for i in range(5):
        st = det.update(i, float("nan"), float("nan"))
    assert st.n_seen == 5 and st.n_nan == 5 and st.baseline_mean is None
    st = det.update(5, None, None)  # None value counts as missing too
    assert st.n_nan == 6


def test_nan_does_not_break_consecutive_run_and_last_pre_onset_skips_nan():
    det = TransitionDetector(consecutive=2)
    for i, v in enumerate([0.01, 0.011, 0.012, 0.01, float("nan"), 0.1, float("nan"), 0.12]):
        st = det.update(i, v, 0.003)
    assert st.onset_step == 5 and st.detected_at_step == 7
    assert st.last_pre_onset_step == 3


def test_non_increasing_step_is_ignored_with_warning():
    det = TransitionDetector()
    det.update(0, 0.01, 0.003)
    det.update(25, 0.01, 0.003)
    with pytest.warns(UserWarning, match="ignored"):
        st = det.update(25, 0.5, 0.003)
    assert st.n_seen == 2


def test_state_dict_round_trip_continues_identically():
    rng = np.random.default_rng(3)
    steps, v, e, _, _ = make_series(rng, 40, change=12, height=0.14, up=3, se=0.006)
    v[[2, 17]] = np.nan
    cfg = dict(consecutive=2, baseline_probes=4)
    ref = TransitionDetector(**cfg)
    ref_states = [ref.update(int(s), x, se) for s, x, se in zip(steps, v, e)]
    assert ref_states[-1].onset_step is not None and ref_states[-1].peak_confirmed
    for cut in (0, 1, 3, 5, 13, 14, 16, 18, 25, 39):
        det = TransitionDetector(**cfg)
        for s, x, se in zip(steps[:cut], v[:cut], e[:cut]):
            det.update(int(s), x, se)
        blob = json.loads(json.dumps(det.state_dict()))
        resumed = TransitionDetector(**cfg)
        resumed.load_state_dict(blob)
        assert resumed.state == (ref_states[cut - 1] if cut else DetectionState())
        for i in range(cut, 40):
            assert resumed.update(int(steps[i]), v[i], e[i]) == ref_states[i]
        assert resumed.state_dict() == ref.state_dict()


def test_load_state_dict_config_mismatch_warns_and_bad_input_raises():
    det = TransitionDetector(z_threshold=3.0)
    det.update(0, 0.01, 0.01)
    sd = det.state_dict()
    other = TransitionDetector(z_threshold=4.0)
    with pytest.warns(UserWarning, match="config"):
        other.load_state_dict(sd)
    assert other.z_threshold == 4.0 and other.state.n_seen == 1
    with pytest.raises(ValueError):
        other.load_state_dict({"nope": 1})


@pytest.mark.parametrize("kw", [dict(baseline_probes=0), dict(z_threshold=-1),
                                dict(min_rise=float("nan")), dict(consecutive=0),
                                dict(fall_fraction=1.0), dict(fall_fraction=-0.1)])
def test_detector_rejects_bad_config(kw):
    with pytest.raises(ValueError):
        TransitionDetector(**kw)


def test_state_is_a_copy():
    det = TransitionDetector()
    st = det.update(0, 0.01, 0.01)
    st.n_seen = 99
    assert det.state.n_seen == 1


# ----------------------------------------------------------------------------- grad norm


def test_grad_norm_peak_basic_nan_inf_and_smoothing():
    steps = list(range(1, 11))
    vals = [1.0, 2.0, float("nan"), 3.0, float("inf"), 2.5, 9.0, 1.0, 1.2, 1.1]
    assert grad_norm_peak(steps, vals) == 7  # single spike wins unsmoothed
    # broad hump around steps 4-6 beats the isolated spike once smoothed
    vals2 = [1.0, 2.0, 4.0, 5.0, 5.0, 4.5, 9.0, 1.0, 1.0, 1.0]
    assert grad_norm_peak(steps, vals2) == 7
    assert grad_norm_peak(steps, vals2, smooth=5) == 5
    # unsorted input, numpy arrays, ties -> earliest
    assert grad_norm_peak(np.array([30, 10, 20]), np.array([1.0, 5.0, 5.0])) == 10
    assert grad_norm_peak([], []) is None
    assert grad_norm_peak([1, 2], [float("nan"), float("-inf")]) is None
    assert isinstance(grad_norm_peak(np.array([1, 2]), np.array([0.1, 0.2])), int)
    with pytest.raises(ValueError):
        grad_norm_peak([1, 2], [1.0])
    with pytest.raises(ValueError):
        grad_norm_peak([1, 2], [1.0, 2.0], smooth=0)


def test_transition_report_lags():
    st = DetectionState(onset_step=300, peak_step=375, peak_value=0.13, peak_confirmed=True,
                        last_pre_onset_step=275, baseline_mean=0.01, baseline_std=0.005,
                        n_seen=20)
    gsteps = list(range(0, 500, 5))
    gvals = [1.0 + 4.0 * math.exp(-((s - 120) / 30) ** 2) for s in gsteps]
    gvals[3] = float("nan")
    rep = transition_report(st, gsteps, gvals)
    assert isinstance(rep, TransitionReport)
    assert rep.grad_norm_peak_step == 120
    assert rep.lag_onset_minus_grad_peak == 180 and rep.lag_peak_minus_grad_peak == 255
    assert rep.transition_detected and rep.peak_confirmed
    d = rep.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert set(d) >= {"onset_step", "peak_step", "grad_norm_peak_step",
                      "lag_onset_minus_grad_peak", "lag_peak_minus_grad_peak",
                      "transition_detected"}
    # nothing detected / no grad norms
    rep = transition_report(DetectionState(), gsteps, gvals)
    assert not rep.transition_detected and rep.lag_onset_minus_grad_peak is None
    assert rep.grad_norm_peak_step == 120
    rep = transition_report(st, [], [])
    assert rep.grad_norm_peak_step is None and rep.lag_peak_minus_grad_peak is None
    assert rep.onset_step == 300


# ----------------------------------------------------------------------------- offline


def test_offline_change_points_step_change():
    rng = np.random.default_rng(0)
    steps = np.arange(60) * EVERY
    vals = np.where(np.arange(60) < 33, 0.02, 0.12) + 0.008 * rng.standard_normal(60)
    vals[5] = np.nan
    cps = offline_change_points(steps, vals)
    assert len(cps) == 1 and abs(cps[0] - 33 * EVERY) <= EVERY
    cps = offline_change_points(steps, vals, n_bkps=1)
    assert len(cps) == 1 and abs(cps[0] - 33 * EVERY) <= EVERY
    assert all(isinstance(c, int) for c in cps)
    # a peak: rise and fall
    rng = np.random.default_rng(1)
    _, v, _, first_rise, peak = make_series(rng, 50, change=20, height=0.15, up=1, down=6,
                                            se=0.004, se_slope=0.0)
    cps = offline_change_points(steps[:50], v, n_bkps=2)
    assert abs(cps[0] - first_rise * EVERY) <= EVERY
    assert offline_change_points([0, 1], [0.1, 0.2]) == []
    assert offline_change_points(steps[:20], np.full(20, 0.01)) == []
    with pytest.raises(ValueError):
        offline_change_points(steps, vals, n_bkps=1, pen=1.0)


# ----------------------------------------------------------------------------- stop rules


def _st(n_seen, onset=None):
    return DetectionState(onset_step=onset, n_seen=n_seen,
                          detected_at_n=None if onset is None else n_seen)


def test_stop_on_onset_patience():
    r = StopOnOnset()
    assert r.should_stop(_st(5), {}, 125) is None
    assert "onset" in r.should_stop(_st(6, onset=150), {}, 150)
    r = StopOnOnset(patience=2)
    det = TransitionDetector()
    reasons = []
    for i, v in enumerate([0.01, 0.012, 0.011, 0.013, 0.15, 0.2, 0.1, 0.02]):
        st = det.update(i * EVERY, v, 0.004)
        reasons.append(r.should_stop(st, {}, i * EVERY))
        reasons.append(r.should_stop(st, {}, i * EVERY))  # repeated calls do not count
    assert reasons[:12] == [None] * 12  # onset at probe 4, patience 2 -> fires at probe 6
    assert reasons[12] and "step 100" in reasons[12] and "step 150" in reasons[12]
    assert reasons[-1] == reasons[12]  # sticky
    # resume mid-patience
    r1 = StopOnOnset(patience=3)
    assert r1.should_stop(_st(10, onset=250), {}, 250) is None
    r2 = StopOnOnset(patience=3)
    r2.load_state_dict(json.loads(json.dumps(r1.state_dict())))
    later = DetectionState(onset_step=250, n_seen=12, detected_at_n=10)
    assert r2.should_stop(later, {}, 300) is None
    later.n_seen = 13
    assert r2.should_stop(later, {}, 325) is not None
    with pytest.raises(ValueError):
        StopOnOnset(patience=-1)


def test_stop_on_order_parameter_absolute_direction_patience_nan_and_late_results():
    rule = StopOnOrderParameter("misaligned", threshold=0.3, patience=2, mode="absolute")
    series = {"misaligned": [(0, 0.1), (25, 0.35), (50, 0.2), (75, 0.4)]}
    assert rule.should_stop(_st(4), series, 75) is None
    series["misaligned"].append((100, float("nan")))  # judge failure: skipped
    assert rule.should_stop(_st(5), series, 100) is None
    series["misaligned"].append((125, 0.5))
    reason = rule.should_stop(_st(6), series, 125)
    assert reason and "misaligned" in reason and "above" in reason
    assert rule.should_stop(_st(7), {"misaligned": []}, 150) == reason  # sticky
    # results arriving out of order are sorted by step
    rule = StopOnOrderParameter("aligned", threshold=50, direction="below", patience=2, mode="absolute")
    assert rule.should_stop(_st(3), {"aligned": [(50, 40.0), (0, 90.0)]}, 50) is None
    assert rule.should_stop(_st(3), {"aligned": [(50, 40.0), (0, 90.0), (25, 45.0)]}, 50)
    # missing series, exact threshold is not beyond it
    rule = StopOnOrderParameter("x", threshold=0.5, patience=1, mode="absolute")
    assert rule.should_stop(_st(1), {}, 0) is None
    assert rule.should_stop(_st(1), {"x": [(0, 0.5)]}, 0) is None
    assert rule.should_stop(_st(1), {"x": [(0, 0.51)]}, 0)
    sd = json.loads(json.dumps(rule.state_dict()))
    fresh = StopOnOrderParameter("x", threshold=0.5, patience=1, mode="absolute")
    fresh.load_state_dict(sd)
    assert fresh.should_stop(_st(2), {}, 25)
    with pytest.raises(ValueError):
        StopOnOrderParameter("x", 0.5, direction="sideways")
    with pytest.raises(ValueError):
        StopOnOrderParameter("x", 0.5, patience=0)


def test_stop_on_order_parameter_acts_on_the_change_from_the_step0_baseline():
    """Issue #13: a judge flagging 7.8% of the base model's answers at step 0 must not stop a
    rule of 0.05 at the first probe; the change from that baseline must."""
    rule = StopOnOrderParameter("aligned/flagged_rate", 0.05)
    assert rule.mode == "change"
    series = {"aligned/flagged_rate": [(0, 0.078)]}
    assert rule.should_stop(_st(1), series, 0) is None
    assert rule.baseline_step == 0 and rule.baseline_value == 0.078
    assert rule.past_threshold_at_baseline is True
    (note,) = rule.notes()
    assert "already above 0.05 at step 0" in note and "0.078" in note and "0.128" in note
    series["aligned/flagged_rate"] += [(5, 0.1), (10, 0.125)]  # +0.022, +0.047: within 0.05
    assert rule.should_stop(_st(3), series, 10) is None
    series["aligned/flagged_rate"].append((15, 0.25))  # +0.172
    reason = rule.should_stop(_st(4), series, 15)
    assert reason == ("order parameter 'aligned/flagged_rate' rose by more than 0.05 from its baseline 0.078 "
                      "(step 0) for 1 consecutive probe(s) (value 0.25 at step 15, change +0.172); "
                      "stopping at step 15")
    # the old behaviour, explicitly: fires on the measurement before training
    old = StopOnOrderParameter("aligned/flagged_rate", 0.05, mode="absolute")
    assert "value 0.078 at step 0" in old.should_stop(_st(1), {"aligned/flagged_rate": [(0, 0.078)]}, 5)
    assert old.past_threshold_at_baseline is True and "acts on the change" not in old.notes()[0]


def test_stop_on_order_parameter_change_below_patience_nan_baseline_and_late_step0():
    # a fall of more than 20 points, twice in a row; NaN points are skipped
    rule = StopOnOrderParameter("aligned", 20, direction="below", patience=2)
    series = {"aligned": [(0, 90.0), (10, 75.0), (20, 65.0), (30, float("nan"))]}
    assert rule.should_stop(_st(4), series, 30) is None  # -15, -25: one probe beyond
    assert rule.past_threshold_at_baseline is False and rule.notes() == []
    series["aligned"].append((40, 60.0))  # -30: second in a row (the NaN does not break it)
    assert "fell by more than 20 from its baseline 90" in rule.should_stop(_st(5), series, 40)
    # a NaN first probe: the first finite one is the baseline
    rule = StopOnOrderParameter("x", 0.1)
    assert rule.should_stop(_st(2), {"x": [(0, float("nan")), (10, 0.3)]}, 10) is None
    assert rule.baseline_step == 10
    # a step-0 result arriving after later ones replaces the provisional baseline
    rule = StopOnOrderParameter("x", 0.1)
    assert rule.should_stop(_st(2), {"x": [(10, 0.3), (20, 0.35)]}, 20) is None  # baseline 0.3 (step 10)
    assert rule.baseline_step == 10
    assert rule.should_stop(_st(2), {"x": [(10, 0.3), (20, 0.35), (0, 0.3)]}, 20) is None
    assert rule.baseline_step == 0
    assert rule.should_stop(_st(3), {"x": [(0, 0.3), (10, 0.3), (20, 0.35), (30, 0.45)]}, 30)
    # the change threshold is a magnitude
    with pytest.raises(ValueError, match="change"):
        StopOnOrderParameter("x", -0.1)
    StopOnOrderParameter("x", -0.1, mode="absolute")
    with pytest.raises(ValueError, match="mode"):
        StopOnOrderParameter("x", 0.1, mode="relative")


def test_stop_on_order_parameter_state_dict_keeps_the_baseline():
    rule = StopOnOrderParameter("x", 0.1)
    assert rule.should_stop(_st(2), {"x": [(0, 0.2), (10, 0.25)]}, 10) is None
    sd = json.loads(json.dumps(rule.state_dict()))
    assert sd["baseline"] == [0, 0.2] and sd["mode"] == "change" and sd["past_threshold_at_baseline"] is True
    fresh = StopOnOrderParameter("x", 0.1)
    fresh.load_state_dict(sd)
    assert fresh.baseline_step == 0 and fresh.baseline_value == 0.2
    # a series that lost its head (e.g. restored without step 0) still compares with step 0's value
    assert fresh.should_stop(_st(3), {"x": [(10, 0.25), (20, 0.29)]}, 20) is None
    assert "+0.11" in fresh.should_stop(_st(4), {"x": [(10, 0.25), (20, 0.29), (30, 0.31)]}, 30)
    # a state saved before `mode` existed was an absolute rule: warned, the current mode kept
    old_sd = {"type": "StopOnOrderParameter", "name": "x", "threshold": 0.1, "direction": "above",
              "patience": 1, "fired": None}
    with pytest.warns(UserWarning, match="mode"):
        StopOnOrderParameter("x", 0.1).load_state_dict(old_sd)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        StopOnOrderParameter("x", 0.1, mode="absolute").load_state_dict(old_sd)
    assert AnyOf([StopOnOnset(), rule]).notes() == rule.notes() and len(rule.notes()) == 1


def test_stop_rules_reset_forgets_a_fired_stop():
    onset, order = StopOnOnset(), StopOnOrderParameter("verbose", threshold=0.8)
    rule = AnyOf([onset, order])
    reason = rule.should_stop(_st(6, onset=125), {"verbose": [(0, 0.05), (150, 0.9)]}, 150)
    assert "onset" in reason and "verbose" in reason
    rule.reset()
    assert order.baseline_step is None
    assert onset.should_stop(_st(1), {}, 0) is None and order.should_stop(_st(1), {}, 0) is None
    assert rule.state_dict() == AnyOf([StopOnOnset(), StopOnOrderParameter("verbose", threshold=0.8)]).state_dict()


def test_any_of_and_state_dict():
    a = StopOnOnset(patience=1)
    b = StopOnOrderParameter("verbose", threshold=0.8, patience=1)
    rule = AnyOf([a, b])
    assert rule.should_stop(_st(5), {"verbose": [(0, 0.1)]}, 0) is None
    # onset seen (starts a's patience) while b does not fire
    assert rule.should_stop(_st(6, onset=125), {"verbose": [(0, 0.1)]}, 125) is None
    sd = json.loads(json.dumps(rule.state_dict()))
    rule2 = AnyOf([StopOnOnset(patience=1),
                   StopOnOrderParameter("verbose", threshold=0.8, patience=1)])
    rule2.load_state_dict(sd)
    st = DetectionState(onset_step=125, n_seen=7, detected_at_n=6)
    reason = rule2.should_stop(st, {"verbose": [(0, 0.1), (150, 0.95)]}, 150)
    assert "onset" in reason and "verbose" in reason and ";" in reason
    with pytest.raises(ValueError):
        AnyOf([StopOnOnset()]).load_state_dict(sd)
    with pytest.raises(ValueError):
        StopOnOnset().load_state_dict(b.state_dict())
    with pytest.raises(TypeError):
        AnyOf([StopOnOnset(), "onset"])


def test_resolve_stop_rule():
    assert isinstance(resolve_stop_rule(True), StopOnOnset)
    assert resolve_stop_rule(True).patience == 0
    assert resolve_stop_rule(np.bool_(True)) is not None
    assert resolve_stop_rule(False) is None and resolve_stop_rule(None) is None
    rule = StopOnOrderParameter("x", 0.5)
    assert resolve_stop_rule(rule) is rule
    for bad in ("onset", 1, 0.5, [StopOnOnset()]):
        with pytest.raises(TypeError, match=type(bad).__name__):
            resolve_stop_rule(bad)

    class Custom(StopRule):
        def should_stop(self, state, order_series, step):
            return "always"

    assert resolve_stop_rule(Custom()).should_stop(DetectionState(), {}, 0) == "always"
    assert Custom().state_dict() == {"type": "Custom"}


def test_detector_never_warns_on_normal_use():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rng = np.random.default_rng(11)
        steps, v, e, _, _ = make_series(rng, 40, change=10, height=0.15)
        run_detector(steps, v, e)
