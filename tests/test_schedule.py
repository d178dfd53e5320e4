"""The probe schedule: pure decisions (schedule.py), and the adaptive schedule in real Trainer
runs: probes where the sentinel says, D_rate exact from the stored D and probe steps,
detection on D_rate, focus sample counts, resume, and the fixed grid unchanged."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

from em_callbacks import detect
from em_callbacks.callback import CallbackConfigError, PhaseTransitionCallback
from em_callbacks.divergence import combine_prompts, one_sided_tv
from em_callbacks.schedule import ProbeSchedule, interval_of, rate
from em_callbacks.store import RunStore
from em_callbacks.summary import d_series, summarize
from tiny import lm_dataset, tiny_model, tiny_tokenizer

PROBES = ["hello how are you", "money", "take pills please"]


# ----------------------------------------------------------------------------- pure decisions
def test_fixed_schedule_probes_on_the_grid_and_reads_the_sentinel_only_as_a_diagnostic():
    s = ProbeSchedule("fixed", 4, sentinel_every_n_steps=2)
    assert s.reference_interval == 4 and s.planned_probes(10) == 3
    assert s.decide(0, []).action == "probe"
    assert [s.decide(t, [0]).action for t in range(1, 5)] == [None, "sentinel", None, "probe"]
    assert s.decide(2, [0], sentinel=(0.9, 0.0)).action is None  # never fires a probe
    assert s.decide(4, [0, 4]).action is None  # already probed at this step
    assert ProbeSchedule("fixed", 4).decide(2, [0]).action is None  # no sentinel unless asked


def test_adaptive_schedule_decisions():
    s = ProbeSchedule("adaptive", 8, min_interval=2, sentinel_every_n_steps=1, baseline_probes=3,
                      trigger_factor=2.0, min_trigger=0.01, z=2.0)
    assert s.reference_interval == 2 and s.planned_probes(40) == 3 + (40 - 4) // 8
    assert s.decide(0, []) == ("probe", "first")
    # baseline: every min_interval until baseline_probes probes exist; nothing in between
    assert s.decide(1, [0]).action is None and s.decide(2, [0]) == ("probe", "baseline")
    assert s.decide(4, [0, 2]) == ("probe", "baseline")
    # quiet: the sentinel every step from min_interval on, and the longest interval
    steps = [0, 2, 4]
    assert s.decide(5, steps).action is None  # closer than min_interval to the last probe
    assert s.decide(6, steps).action == "sentinel"
    assert s.decide(12, steps) == ("probe", "longest interval")
    # early: the sentinel's lower bound tv - 2 se against trigger_factor x onset level
    assert s.trigger(0.03) == pytest.approx(0.06) and s.trigger(None) == 0.01 and s.trigger(0.001) == 0.01
    fired = s.decide(6, steps, onset_level=0.03, sentinel=(0.08, 0.009))  # 0.062 > 0.06 ...
    assert fired.action == "probe" and fired.reason.startswith("sentinel tv 0.080")
    assert s.decide(6, steps, onset_level=0.03, sentinel=(0.08, 0.011)).action is None  # ... 0.058 is not
    assert s.decide(5, steps, onset_level=0.03, sentinel=(0.9, 0.0)).action is None  # never under min_interval


def test_adaptive_defaults_and_validation():
    s = ProbeSchedule("adaptive", 25)
    assert (s.min_interval, s.sentinel_every_n_steps) == (6, 6)
    assert ProbeSchedule("adaptive", 2).min_interval == 1 and ProbeSchedule("adaptive", 2).sentinel_every_n_steps == 1
    with pytest.raises(ValueError, match="min_interval"):
        ProbeSchedule("adaptive", 4, min_interval=5)
    with pytest.raises(ValueError, match="schedule must be one of"):
        ProbeSchedule("sometimes", 4)
    with pytest.raises(CallbackConfigError, match="schedule must be one of"):
        PhaseTransitionCallback(probes=PROBES, schedule="often")
    with pytest.raises(CallbackConfigError, match="min_interval applies"):
        PhaseTransitionCallback(probes=PROBES, min_interval=2)
    with pytest.raises(CallbackConfigError, match="min_interval must lie"):
        PhaseTransitionCallback(probes=PROBES, schedule="adaptive", every_n_steps=4, min_interval=6)
    with pytest.raises(CallbackConfigError, match="needs window=1"):
        PhaseTransitionCallback(probes=PROBES, focus_factor=2, window=2)
    cb = PhaseTransitionCallback(probes=PROBES, schedule="adaptive", every_n_steps=8)
    assert cb.focus_factor == 4 and cb.sentinel_every_n_steps == 2 and cb.schedule.min_interval == 2
    assert PhaseTransitionCallback(probes=PROBES).focus_factor == 1
    assert PhaseTransitionCallback(probes=PROBES, schedule="adaptive", window=2, cross_scoring="snapshot").focus_factor == 1


def test_rate_is_d_per_reference_interval():
    assert interval_of([4], [7]) == 3 and interval_of([2, 4], [6, 10]) == 5
    assert rate(0.3, 0.03, 3, 2) == pytest.approx((0.2, 0.02))
    assert rate(0.123456789, 0.01, 4, 4) == (0.123456789, 0.01)  # a fixed grid: D itself, bit for bit


# ----------------------------------------------------------------------------- real runs
def _train(tmp_path, cb, max_steps, save_steps=0, resume=False, model=None):
    tok = tiny_tokenizer()
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=2e-2,
        logging_steps=1, report_to="none", use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500)
    trainer = Trainer(model=model or tiny_model(tok), args=args, train_dataset=lm_dataset(tok),
                      data_collator=DataCollatorForLanguageModeling(tok, mlm=False), processing_class=tok,
                      callbacks=[cb])
    trainer.train(resume_from_checkpoint=True if resume else None)
    return trainer


def _adaptive(tmp_path, **kw):
    schedule = ProbeSchedule("adaptive", 5, min_interval=1, sentinel_every_n_steps=1, baseline_probes=2,
                             trigger_factor=kw.pop("trigger_factor", 0.5), min_trigger=0.0, z=1.0)
    return PhaseTransitionCallback(probes=PROBES, schedule=schedule, samples_per_prompt=4, max_new_tokens=6,
                                   output_dir=tmp_path / "pt", snapshot_full_model=True, **kw)


def test_adaptive_run_probes_where_the_schedule_says_and_detects_on_d_rate(tmp_path):
    """Replaying the pure schedule over the stored sentinel readings and detector state gives
    the probe steps the run took; D_rate = D x 1 / interval exactly; the live detector's state
    equals a replay over D_rate; focus probes hold focus_factor x the samples."""
    detector = detect.TransitionDetector(baseline_probes=1, z_threshold=0.0, min_rise=0.0)
    cb = _adaptive(tmp_path, detector=detector, focus_factor=2)
    _train(tmp_path, cb, max_steps=14)
    steps = cb.probe_steps
    store = RunStore(tmp_path / "pt", readonly=True)
    gaps = np.diff(steps)
    assert steps[0] == 0 and gaps.min() >= 1 and gaps.max() <= 5 and len(set(gaps.tolist())) > 1, steps

    # the stored sentinel readings explain every early probe
    sentinel = store.sentinel()
    readings = dict(zip(sentinel["step"].tolist(), zip(sentinel["tv"].tolist(), sentinel["stderr"].tolist())))
    scheduled = {e["step"]: e["payload"]["reason"] for e in store.events("probe_scheduled")}
    assert sorted(scheduled) == steps
    for step, reason in scheduled.items():
        if reason.startswith("sentinel"):
            tv, se = readings[step]
            assert reason.startswith(f"sentinel tv {tv:.3f}")
        else:
            assert reason in ("first", "baseline", "longest interval")
    assert any(r.startswith("sentinel") for r in scheduled.values())

    # a probe the sentinel fired reuses the sentinel's rows (same weights, same step) instead of
    # scoring them again: the stored scores of the previous probe's samples under the new
    # weights give back the stored reading, and the event counts them
    payloads = {e["step"]: e["payload"] for e in store.events("probe_scheduled")}
    for k, step in enumerate(steps):
        if not payloads[step]["reason"].startswith("sentinel"):
            assert payloads[step]["reused_sentinel_rows"] == 0
            continue
        own, now = store.logprobs(k - 1, k - 1), store.logprobs(k - 1, k)
        per_prompt = cb.engine.config.sentinel_samples_per_prompt
        assert per_prompt == 2  # the default: a quarter of samples_per_prompt=4, at least 2
        read = sorted(key for key in own if key[1] < per_prompt)
        assert payloads[step]["reused_sentinel_rows"] == len(read) == len(PROBES) * per_prompt
        assert len(now) == len(own)  # the rest of the previous probe's samples were scored
        by_prompt: dict[str, tuple[list[float], list[float]]] = {}
        for key in read:
            by_prompt.setdefault(key[0], ([], []))[0].append(own[key])
            by_prompt[key[0]][1].append(now[key])
        again = combine_prompts([one_sided_tv(a, b) for a, b in by_prompt.values()])
        np.testing.assert_allclose((again.value, again.stderr), readings[step], rtol=1e-12)

    # D_rate = D / interval (reference 1) on every measure, stderr and interval included
    for measure in ("tv", "js", "linear"):
        d, r = store.metric_series(f"D/{measure}"), store.metric_series(f"D_rate/{measure}")
        assert d["step"].tolist() == r["step"].tolist() == steps[:-1]
        intervals = np.diff(steps).astype(float)
        np.testing.assert_allclose(r["value"], d["value"] / intervals, rtol=1e-12)
        np.testing.assert_allclose(r["stderr"], d["stderr"] / intervals, rtol=1e-12)
    # the live detector saw D_rate: a replay over the stored rate series agrees
    replay = detect.TransitionDetector(baseline_probes=1, z_threshold=0.0, min_rise=0.0)
    rates = d_series(store, "tv", rate=True)
    for s, v, se in zip(rates["step"], rates["value"], rates["stderr"]):
        replay.update(int(s), float(v), float(se))
    live = cb.detector.state
    assert (replay.state.onset_step, replay.state.peak_step) == (live.onset_step, live.peak_step)
    assert live.onset_step is not None
    summary = summarize(store)
    assert (summary.onset_step, summary.peak_step) == (live.onset_step, live.peak_step)

    # focus: probes after the onset is known and before the peak is confirmed draw 2 x 4 samples
    counts = [len(store.samples(k)) for k in range(len(steps))]
    assert counts == [len(PROBES) * n for n in cb.engine.probe_samples]
    assert counts[0] == 3 * 4 and 3 * 8 in counts
    store.close()


def test_sentinel_rows_are_reused_once_with_a_wider_band(tmp_path):
    """Window 2 scores the older sample sets under the current weights at every probe, and with
    own_logprobs="teacher-forcing" the new samples too; only the previous probe's, which the
    sentinel read at the same step, reuse its rows."""
    detector = detect.TransitionDetector(baseline_probes=1, z_threshold=0.0, min_rise=0.0)
    cb = _adaptive(tmp_path, detector=detector, window=2, focus_factor=1, own_logprobs="teacher-forcing")
    _train(tmp_path, cb, max_steps=14)
    store = RunStore(tmp_path / "pt", readonly=True)
    per_prompt = cb.engine.config.sentinel_samples_per_prompt
    events = store.events("probe_scheduled")
    fired = [e["payload"] for e in events if e["payload"]["reason"].startswith("sentinel")]
    assert fired and all(p["reused_sentinel_rows"] == len(PROBES) * per_prompt for p in fired)
    assert all(e["payload"]["reused_sentinel_rows"] == 0 for e in events if not e["payload"]["reason"].startswith("sentinel"))
    store.close()


def test_adaptive_schedule_resumes_where_it_left_off(tmp_path):
    """Killed after checkpoint-6 and resumed: the same probe steps, sample counts and D_rate as
    the uninterrupted run (the schedule's inputs are the probe steps and the detector state)."""
    detector = lambda: detect.TransitionDetector(baseline_probes=1, z_threshold=0.0, min_rise=0.0)  # noqa: E731
    full = _adaptive(tmp_path / "full", detector=detector(), focus_factor=2)
    _train(tmp_path / "full", full, max_steps=12, save_steps=6)
    first = _adaptive(tmp_path / "resumed", detector=detector(), focus_factor=2)
    _train(tmp_path / "resumed", first, max_steps=12, save_steps=6)
    shutil.rmtree(tmp_path / "resumed" / "trainer" / "checkpoint-12")  # as if killed between 6 and 12
    again = _adaptive(tmp_path / "resumed", detector=detector(), focus_factor=2)
    _train(tmp_path / "resumed", again, max_steps=12, save_steps=6, resume=True)
    assert again.probe_steps == full.probe_steps
    assert again.engine.probe_samples == full.engine.probe_samples
    a, b = (RunStore(p / "pt", readonly=True) for p in (tmp_path / "full", tmp_path / "resumed"))
    np.testing.assert_allclose(a.metric_series("D_rate/tv")["value"], b.metric_series("D_rate/tv")["value"], atol=1e-5)
    assert [e["step"] for e in b.events("resume")] == [6]


def test_fixed_schedule_d_rate_is_d(tmp_path):
    cb = PhaseTransitionCallback(probes=PROBES, every_n_steps=2, samples_per_prompt=3, max_new_tokens=5,
                                 output_dir=tmp_path / "pt")
    _train(tmp_path, cb, max_steps=6)
    store = RunStore(tmp_path / "pt", readonly=True)
    d, r = store.metric_series("D/tv"), store.metric_series("D_rate/tv")
    assert d["step"].tolist() == [0, 2, 4] and np.array_equal(d["value"], r["value"])
    assert np.array_equal(d["stderr"], r["stderr"])
    assert store.events("probe_scheduled") == [] and cb.engine.probe_samples == [3, 3, 3, 3]
