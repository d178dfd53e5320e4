"""``RunSummary``: the one summary of a run, written by the engine and read by the report.

Built from the run store (so a crashed run gets the same summary a finished one wrote),
optionally with the live detector's state, which wins over a replay of the stored D series.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from . import detect
from ._util import is_finite as _finite
from ._util import json_safe
from ._util import opt_int as _opt_int
from .store import RunStore

logger = logging.getLogger(__name__)

__all__ = ["RunSummary", "summarize", "detection_feasibility", "store_config", "primary_measure", "d_series",
           "order_names", "detector_from_config"]

_Z95 = 1.959963984540054
MEASURE_ORDER = ("tv", "linear", "js")


@dataclass
class RunSummary:
    """What a run found; ``summary.json`` is ``to_dict()``. Same keys for live and offline runs.

    ``transition_detected`` is ``None`` (not ``False``) when the run had too few probes for the
    detector to decide: "could not look" is never reported as "looked and found nothing";
    ``detection_possible`` and ``detection_note`` say why.
    """

    transition_detected: bool | None
    onset_step: int | None
    peak_step: int | None
    peak_value: float | None
    peak_confirmed: bool
    grad_norm_peak_step: int | None
    lag_onset_minus_grad_peak: int | None
    lag_peak_minus_grad_peak: int | None
    last_pre_onset_step: int | None
    stopped_early: bool
    stop_step: int | None
    stop_reason: str | None
    every_n_steps: int | None
    window: int
    primary_measure: str
    cross_scoring: str | None
    probe_steps: list[int]
    final_step: int | None
    detection_possible: bool
    detection_note: str | None
    stop_rule_notes: list[str] = field(default_factory=list)
    faults: list[dict[str, Any]] = field(default_factory=list)
    missing_judgments: dict[str, int] = field(default_factory=dict)
    captured_at_peak: dict[str, Any] = field(default_factory=dict)
    detection_source: str = "live"
    grad_norm_points: int = 0
    rebuilt_from_store: bool = False
    offline: dict[str, Any] | None = None
    schedule: str = "fixed"  # "adaptive": uneven probe steps; onset/peak read D_rate (D per reference_interval)
    reference_interval: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if out["offline"] is None:
            del out["offline"]
        return json_safe(out)

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path


def detection_feasibility(n_probes: int | None, needed: int) -> dict[str, Any]:
    """Whether a run with ``n_probes`` probes can detect an onset at all (``needed`` from
    :meth:`EngineConfig.min_probes_for_detection`); ``None`` probes: unknown, assumed possible."""
    possible = n_probes is None or n_probes >= needed
    why = None
    if not possible:
        why = (f"this run gets {n_probes} probe{'s' if n_probes != 1 else ''} but the detector needs at least {needed} "
               "(D compares consecutive probes, then a baseline of D values must be set before an onset can "
               "stand out), so it cannot detect a transition; probe more often (smaller every_n_steps) or train longer")
    return {"possible": possible, "planned_probes": n_probes, "needed_probes": needed, "why": why}


# ------------------------------------------------------------------------------ store readers
def store_config(store: RunStore) -> dict[str, Any]:
    cfg = store.meta().get("config")
    return cfg if isinstance(cfg, dict) else {}


def primary_measure(store: RunStore, summary: Mapping[str, Any] | None = None) -> str:
    """The measure detection used: the summary's, the config's, else the first one stored."""
    names = set(store.metric_names())
    wanted = [(summary or {}).get("primary_measure"), store_config(store).get("primary_measure"), *MEASURE_ORDER]
    for m in wanted:
        if m and f"D/{m}" in names:
            return str(m)
    return next((str(m) for m in wanted if m), "tv")


def d_series(store: RunStore, measure: str, rate: bool = False) -> dict[str, np.ndarray]:
    """D(t) with finite values only, plus a 95% band (CI columns, else value +- 1.96 se).
    ``rate=True``: the series detection reads, D_rate (D per reference interval; equal to D on
    a fixed grid, see :mod:`em_callbacks.schedule`), or D where a store predates it."""
    names = set(store.metric_names()) if rate else set()
    s = store.metric_series(f"D_rate/{measure}" if f"D_rate/{measure}" in names else f"D/{measure}")
    ok = np.isfinite(s["value"])
    s = {k: v[ok] for k, v in s.items()}
    lo, hi, se = s["ci_low"], s["ci_high"], s["stderr"]
    s["band_low"] = np.where(np.isfinite(lo), lo, s["value"] - _Z95 * se)
    s["band_high"] = np.where(np.isfinite(hi), hi, s["value"] + _Z95 * se)
    return s


def order_names(store: RunStore) -> list[str]:
    """Order parameters of the run: configured ones first, then any seen in metrics/judgments."""
    names: list[str] = []
    for op in store_config(store).get("order_parameters") or []:
        n = op.get("name") if isinstance(op, dict) else op
        if isinstance(n, str) and n not in names:
            names.append(n)
    for m in store.metric_names():
        parts = m.split("/")
        n = parts[1] if (parts[0] in ("order", "captured") and len(parts) >= 2) else None
        if n and n not in names:
            names.append(n)
    for j in store.judgments():
        if j["order_parameter"] not in names:
            names.append(j["order_parameter"])
    return names


def detector_from_config(cfg: Mapping[str, Any]) -> detect.TransitionDetector:
    det_cfg = cfg.get("detector")
    if isinstance(det_cfg, dict):
        try:
            return detect.TransitionDetector(**det_cfg)
        except (TypeError, ValueError) as exc:
            logger.warning("em-callbacks: ignoring stored detector config %r (%s)", det_cfg, exc)
    return detect.TransitionDetector()


def _replayed_state(store: RunStore, d: Mapping[str, np.ndarray]) -> tuple[detect.DetectionState, str]:
    """The detector replayed over the stored D series; a live onset event that differs (a
    custom detector) wins, with the peak re-derived by the same detector's peak rule."""
    det = detector_from_config(store_config(store))
    for s, v, se in zip(d["step"], d["value"], d["stderr"]):
        det.update(int(s), float(v), float(se))
    state = det.state
    onset_events = [e for e in store.events("onset") if e["step"] is not None]
    if not onset_events:
        return state, "replay"
    live_onset = int(onset_events[-1]["step"])
    if live_onset == state.onset_step:
        return state, "replay (agrees with the live onset event)"
    payload = onset_events[-1]["payload"] or {}
    det.continue_from_onset(live_onset, payload.get("baseline_mean", state.baseline_mean),
                            _opt_int(payload.get("last_pre_onset_step")))
    for s, v, se in zip(d["step"], d["value"], d["stderr"]):
        if int(s) >= live_onset:
            det.update(int(s), float(v), float(se))
    return det.state, "onset event (live detector) + replayed peak rule"


def _missing_judgments(store: RunStore, names: Sequence[str]) -> dict[str, int]:
    n_samples = len(store.samples())
    out = {}
    for name in names:
        ok = sum(1 for j in store.judgments(order_parameter=name) if _finite(j["score"]) and not j["error"])
        out[name] = max(0, n_samples - ok)
    return out


def _captured_at(store: RunStore, step: int | None) -> dict[str, Any]:
    if step is None:
        return {}
    for p in store.probes():
        if int(p["step"]) == int(step):
            return store.captured_at(int(p["probe_index"]))
    return {}


def _fault_entry(event: Mapping[str, Any]) -> dict[str, Any]:
    entry = dict(event.get("payload") or {})
    entry.setdefault("kind", entry.get("fault", "fault"))
    entry.setdefault("step", event.get("step"))
    return entry


def _offline_change_points(store: RunStore, measure: str, transition: bool | None) -> dict[str, Any]:
    d = d_series(store, measure)
    out: dict[str, Any] = {"measure": measure, "n_points": int(d["value"].size)}
    try:
        out["change_points"] = detect.offline_change_points(d["step"], d["value"])
        out["method"] = "ruptures.Pelt(model='l2'), BIC-like penalty from the noise scale"
        out["rise_and_fall"] = detect.offline_change_points(d["step"], d["value"], n_bkps=2)
    except Exception as exc:  # noqa: BLE001 - ruptures missing or a degenerate series
        out["change_points"] = []
        out["error"] = f"{type(exc).__name__}: {exc}"
    if out["change_points"] and not transition:
        out["note"] = ("level shifts of D found offline; the online detector found no rise beyond noise, so they are "
                       "not a transition")
    return out


def summarize(
    store: RunStore,
    *,
    live_state: detect.DetectionState | None = None,
    final_step: int | None = None,
    feasibility: Mapping[str, Any] | None = None,
    offline: bool = False,
) -> RunSummary:
    """The run's summary from its store (and the live detector state when the run is live)."""
    cfg = store_config(store)
    measure = primary_measure(store)
    d = d_series(store, measure, rate=True)
    if live_state is not None:
        state, source = live_state, "live"
    else:
        state, source = _replayed_state(store, d)
    gsteps, gvalues = store.grad_norms()
    report = detect.transition_report(state, gsteps, gvalues)
    probes = store.probes()
    probe_steps = [int(p["step"]) for p in probes]
    stops = store.events("early_stop")
    stop = stops[0] if stops else None
    finite_g = gsteps[np.isfinite(gvalues)] if gvalues.size else gsteps
    if final_step is None:
        final_step = max([*probe_steps, *(int(x) for x in gsteps)], default=None)
    det_cfg = detector_from_config(cfg)
    needed_d = det_cfg.baseline_probes + det_cfg.consecutive
    n_d = int(d["value"].size)
    detected: bool | None = report.transition_detected
    note = None
    possible = True
    if not detected and n_d < needed_d:
        possible, detected = False, None
        planned = (feasibility or {}).get("why") or (cfg.get("detection") or {}).get("why")
        note = planned or (f"only {n_d} finite D value{'s' if n_d != 1 else ''} (from {len(probe_steps)} probes); "
                           f"the detector needs {needed_d} to decide, so no transition could be detected or ruled out")
    summary = RunSummary(
        transition_detected=detected,
        onset_step=report.onset_step,
        peak_step=report.peak_step,
        peak_value=state.peak_value,
        peak_confirmed=report.peak_confirmed,
        grad_norm_peak_step=report.grad_norm_peak_step,
        lag_onset_minus_grad_peak=report.lag_onset_minus_grad_peak,
        lag_peak_minus_grad_peak=report.lag_peak_minus_grad_peak,
        last_pre_onset_step=_opt_int(state.last_pre_onset_step),
        stopped_early=bool(stops),
        stop_step=_opt_int(stop["step"]) if stop else None,
        stop_reason=(stop["payload"] or {}).get("reason") if stop else None,
        every_n_steps=_opt_int(cfg.get("every_n_steps")),
        window=_opt_int(cfg.get("window")) or 1,
        primary_measure=measure,
        cross_scoring=cfg.get("cross_scoring") or (probes[-1]["cross_scoring"] if probes else None),
        probe_steps=probe_steps,
        final_step=_opt_int(final_step),
        detection_possible=possible,
        detection_note=note,
        faults=[_fault_entry(e) for e in store.events("fault")],
        missing_judgments=_missing_judgments(store, order_names(store)),
        captured_at_peak=_captured_at(store, report.peak_step),
        detection_source=source,
        grad_norm_points=int(finite_g.size),
        rebuilt_from_store=live_state is None,
        schedule=str(cfg.get("schedule") or "fixed"),
        reference_interval=_opt_int(cfg.get("reference_interval")),
    )
    if offline:
        summary.offline = _offline_change_points(store, measure, detected)
    return summary
