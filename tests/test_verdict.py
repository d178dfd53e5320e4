"""The demo's printed verdict (issue #13): plain words for what did and did not happen, never
"None" or "nan" standing in for "never" / "unknown". Pure function: no model, no torch run."""

from __future__ import annotations

import re

from em_callbacks.organism.demo import verdict

_NO_NONE = re.compile(r"\b(None|nan|NaN|null)\b")


def test_verdict_without_transition_or_crossing():
    text = verdict({
        "ood_misaligned_rate": [[0, 0.05], [20, 0.1], [40, 0.12]],
        "crossing_step": None, "peak_to_crossing_lag": None,
        "transition_detected": False, "onset_step": None, "peak_step": None, "grad_norm_peak_step": 31,
        "lag_onset_minus_grad_peak": None, "stopped_early": False, "stop_step": None, "every_n_steps": 20,
        "captured_at_peak": {}, "seconds_total": 12.5,
    })
    assert not _NO_NONE.search(text), text
    assert "Out-of-domain misaligned rate: 0.05 at step 0 -> 0.12 at step 40 (never crossed 50%)." in text
    assert "No transition detected" in text and "Wall time 12.5 s." in text


def test_verdict_with_transition_unresolved_capture_and_missing_pieces():
    text = verdict({
        "ood_misaligned_rate": [[0, 0.0], [20, float("nan")], [40, 0.9]],
        "crossing_step": 40, "peak_to_crossing_lag": 0,
        "transition_detected": True, "onset_step": 20, "peak_step": 20, "grad_norm_peak_step": None,
        "lag_onset_minus_grad_peak": None, "stopped_early": True, "stop_step": 40, "stop_reason": None,
        "every_n_steps": 20, "seconds_total": None,
        "captured_at_peak": {
            "misaligned": {"value": 0.92, "stderr": 0.05, "noise_floor": 0.03, "resolved": True},
            "closer": {"value": 6.57, "stderr": 3.1, "noise_floor": None, "resolved": False,
                       "why_unresolved": "the full D (0.004 +- 0.003) is within noise"},
        },
    })
    assert not _NO_NONE.search(text), text
    assert "crossed 50% at step 40" in text
    assert "Transition detected: onset at step 20, D peak at step 20." in text  # no grad-norm peak: not named
    assert "Largest behavioural change: steps 20->40, the interval in which the misaligned rate crossed 50%." in text
    assert "Training stopped early at step 40." in text
    assert "misaligned: 0.92 ± 0.05 (noise floor 0.03)" in text
    assert "closer: unresolved (the full D (0.004 +- 0.003) is within noise)" in text and "6.57" not in text
    assert "Wall time" not in text


def test_verdict_on_an_empty_or_undecidable_summary():
    assert not _NO_NONE.search(verdict({}))
    assert "No out-of-domain misaligned rate was recorded." in verdict({})
    text = verdict({"transition_detected": None, "detection_note": "only 2 finite D values"})
    assert "Too few probes to tell whether a transition happened: only 2 finite D values." in text
