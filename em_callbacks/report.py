"""Offline report of one run: plots, example samples and a summary rebuilt from the run store.

Everything here reads the run store (``run.sqlite``) only, so it works on a finished run, on a
run that is still training (the store is opened read-only) and on a crashed run whose
``summary.json`` was never written. Plots are drawn on :class:`matplotlib.figure.Figure`
objects with the Agg canvas: no pyplot, no global backend switch, no figures left open.

Public API::

    plot_overview(store, path, summary=None) -> Path        # D(t) + CI, grad norm, markers
    plot_order_parameters(store, path, summary=None) -> Path
    plot_captured(store, path, step=None, summary=None) -> Path
    example_samples(store, n=3, summary=None, path=None) -> dict
    rebuild_summary(store, offline=True) -> dict
    build_report(run_dir, out_dir=None) -> dict

``store`` is a :class:`~em_callbacks.store.RunStore` or a path (run directory or the
``run.sqlite`` file), opened read-only.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sqlite3
import textwrap
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from ._util import is_finite as _finite
from ._util import json_safe
from .store import STORE_FILENAME, RunStore
from .summary import d_series as _d_series
from .summary import detector_from_config as _detector_from_config
from .summary import order_names as _order_names
from .summary import primary_measure as _primary_measure
from .summary import store_config as _config
from .summary import summarize

logger = logging.getLogger(__name__)

__all__ = [
    "plot_overview",
    "plot_order_parameters",
    "plot_captured",
    "example_samples",
    "write_samples_markdown",
    "rebuild_summary",
    "build_report",
    "find_store",
    "open_store",
    "RunNotFoundError",
    "REPORT_FILES",
    "captured_resolution",
    "judge_label",
    "format_value",
]

REPORT_FILES = ("overview.png", "order_parameters.png", "captured.png", "samples.md", "summary.json", "report.md")
MEASURE_ORDER = ("tv", "linear", "js")
_MEASURE_LABEL = {"tv": "total variation", "js": "Jensen-Shannon (nats)", "linear": "linear f-divergence"}
_ORDER_RE = re.compile(r"^order/(?P<name>[^/]+)/(?P<field>mean|flagged_rate|missing|missing_rate)$")
_Z95 = 1.959963984540054

# Colours (colour-blind friendly, Okabe-Ito) for the markers used across plots.
C_D = "#0072B2"
C_GRAD = "#E69F00"
C_ONSET = "#D55E00"
C_PEAK = "#CC79A7"
C_GPEAK = "#E69F00"
C_STOP = "#555555"
C_FLAG = "#882255"
C_MEAN = "#009E73"


class RunNotFoundError(FileNotFoundError):
    """No run store at the given path."""


# ------------------------------------------------------------------------------------------
# Opening a run
# ------------------------------------------------------------------------------------------


def find_store(run_dir: str | Path) -> Path:
    """The ``run.sqlite`` of a run: ``run_dir`` may be the run directory, the file itself, or
    a Trainer ``output_dir`` holding ``phase_transition/run.sqlite`` (or exactly one
    ``*/run.sqlite``). Raises :class:`RunNotFoundError` naming the path."""
    p = Path(run_dir).expanduser()
    if not p.exists():
        raise RunNotFoundError(f"run directory not found: {p}")
    if p.is_file():
        return p
    direct = p / STORE_FILENAME
    if direct.is_file():
        return direct
    nested = p / "phase_transition" / STORE_FILENAME
    if nested.is_file():
        return nested
    found = sorted(p.glob(f"*/{STORE_FILENAME}"))
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise RunNotFoundError(
            f"several run stores under {p}: " + ", ".join(str(f.parent) for f in found) + "; pass one of them"
        )
    raise RunNotFoundError(f"no run store ({STORE_FILENAME}) in {p}")


def open_store(run_dir: str | Path) -> RunStore:
    """Open a run store read-only (safe while training still writes it)."""
    path = find_store(run_dir)
    try:
        store = RunStore(path, readonly=True)
        store.meta()  # touch the file: fails here on a corrupt / non-SQLite file
        return store
    except sqlite3.DatabaseError as exc:
        raise RunNotFoundError(f"cannot read run store {path}: {exc}") from exc


@contextmanager
def _as_store(store: RunStore | str | Path) -> Iterator[RunStore]:
    if isinstance(store, RunStore):
        yield store
        return
    s = open_store(store)
    try:
        yield s
    finally:
        s.close()


# ------------------------------------------------------------------------------------------
# Reading series
# ------------------------------------------------------------------------------------------


def _statements(store: RunStore) -> dict[str, str]:
    out = {}
    for op in _config(store).get("order_parameters") or []:
        if isinstance(op, dict) and op.get("name"):
            out[op["name"]] = str(op.get("statement") or "")
    return out


def _judgment_stats(store: RunStore, name: str) -> dict[int, dict[str, float]]:
    """Per probe index: n scored judgments, mean score and its standard error."""
    by_probe: dict[int, list[float]] = {}
    for j in store.judgments(order_parameter=name):
        if _finite(j["score"]) and not j["error"]:
            by_probe.setdefault(int(j["probe_index"]), []).append(float(j["score"]))
    out = {}
    for k, xs in by_probe.items():
        a = np.asarray(xs, dtype=float)
        out[k] = {
            "n": float(a.size),
            "mean": float(a.mean()),
            "stderr": float(a.std(ddof=1) / math.sqrt(a.size)) if a.size > 1 else float("nan"),
        }
    return out


# ------------------------------------------------------------------------------------------
# Summary
# ------------------------------------------------------------------------------------------


def rebuild_summary(store: RunStore | str | Path, offline: bool = True) -> dict[str, Any]:
    """The run's ``summary.json`` keys recomputed from the run store alone (see
    :func:`em_callbacks.summary.summarize`); ``offline`` adds ruptures change points of D(t)."""
    with _as_store(store) as st:
        return summarize(st, offline=offline).to_dict()


def _resolve_summary(store: RunStore, summary: Mapping[str, Any] | None) -> dict[str, Any]:
    """``summary`` where it has the detection keys, else recomputed from the store."""
    keys = ("onset_step", "peak_step", "grad_norm_peak_step")
    if summary and all(k in summary for k in keys):
        return dict(summary)
    rebuilt = rebuild_summary(store, offline=False)
    if summary:
        rebuilt.update({k: v for k, v in summary.items() if v is not None or k not in rebuilt})
    return rebuilt


def _load_summary(store: RunStore, store_path: Path) -> dict[str, Any] | None:
    f = store_path.parent / "summary.json"
    if f.is_file():
        try:
            data = json.loads(f.read_text())
            # A summary an earlier `report` rebuilt (e.g. mid-run) is stale: rebuild it again.
            if isinstance(data, dict) and data and not data.get("rebuilt_from_store"):
                return data
        except (OSError, json.JSONDecodeError) as exc:
            logger.warning("em-callbacks report: unreadable %s (%s); rebuilding it", f, exc)
    meta = store.meta().get("summary")
    return meta if isinstance(meta, dict) and meta else None


# ------------------------------------------------------------------------------------------
# Plots
# ------------------------------------------------------------------------------------------


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", facecolor="white")
    return path


def _empty_note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=11, color="#666666",
            bbox={"boxstyle": "round", "fc": "#f4f4f4", "ec": "#cccccc"})


def _markers(summary: Mapping[str, Any]) -> list[tuple[int, str, str, str]]:
    """(step, label, colour, linestyle) for onset, D peak, grad-norm peak, early stop."""
    out = []
    if _finite(summary.get("onset_step")):
        out.append((int(summary["onset_step"]), f"onset (step {int(summary['onset_step'])})", C_ONSET, "--"))
    if _finite(summary.get("peak_step")):
        out.append((int(summary["peak_step"]), f"D peak (step {int(summary['peak_step'])})", C_PEAK, ":"))
    if _finite(summary.get("grad_norm_peak_step")):
        g = int(summary["grad_norm_peak_step"])
        out.append((g, f"grad-norm peak (step {g})", C_GPEAK, "-."))
    if summary.get("stopped_early") and _finite(summary.get("stop_step")):
        out.append((int(summary["stop_step"]), f"early stop (step {int(summary['stop_step'])})", C_STOP, (0, (1, 3))))
    return out


def _lag_text(summary: Mapping[str, Any]) -> str | None:
    parts = []
    if _finite(summary.get("lag_onset_minus_grad_peak")):
        parts.append(f"onset - grad-norm peak = {int(summary['lag_onset_minus_grad_peak']):+d} steps")
    if _finite(summary.get("lag_peak_minus_grad_peak")):
        parts.append(f"D peak - grad-norm peak = {int(summary['lag_peak_minus_grad_peak']):+d} steps")
    return "\n".join(parts) or None


def plot_overview(store: RunStore | str | Path, path: str | Path, summary: Mapping[str, Any] | None = None) -> Path:
    """D(t) of the primary measure with its 95% band, the gradient norm on a twin axis, and
    markers for the onset, the D peak and the grad-norm peak (from ``summary`` when it has
    them, else recomputed with :mod:`em_callbacks.detect`). Works on empty or early stores."""
    with _as_store(store) as st:
        summary = _resolve_summary(st, summary)
        measure = _primary_measure(st, summary)
        d = _d_series(st, measure, rate=True)  # == D on a fixed grid; D per reference interval on an adaptive one
        reference = _config(st).get("reference_interval")
        uneven = _config(st).get("schedule") in ("adaptive", "uneven")
        d_label = f"D(t), {measure}, per {reference} steps" if uneven and reference else f"D(t), {measure}"
        gsteps, gvalues = st.grad_norms()
        gok = np.isfinite(gvalues)
        gsteps, gvalues = gsteps[gok], gvalues[gok]
        probe_steps = [int(p["step"]) for p in st.probes()]
        window = int(summary.get("window") or _config(st).get("window") or 1)

        fig = _figure(11, 5.6)
        ax = fig.add_subplot(1, 1, 1)
        handles = []
        clipped = bool((d["value"] < 0).any())
        if d["value"].size:  # display copies, clipped at 0 (see _clip_d); the store keeps the raw values
            d = {**d, "value": np.clip(d["value"], 0, None), "band_low": np.clip(d["band_low"], 0, None),
                 "band_high": np.clip(d["band_high"], 0, None)}
            band = ax.fill_between(d["step"], d["band_low"], d["band_high"], color=C_D, alpha=0.2, lw=0,
                                   label="95% interval")
            (line,) = ax.plot(d["step"], d["value"], "o-", color=C_D, ms=4, lw=1.8,
                              label=d_label + (f"\n({D_CLIP_NOTE})" if clipped else ""))
            handles += [line, band]
            floor = st.metric_series("D_numerical_floor")  # D from rounding alone (same weights, two numerics)
            fok = np.isfinite(floor["value"])
            if fok.any():
                (fline,) = ax.plot(floor["step"][fok], floor["value"][fok], "--", color="#777777", lw=1.1,
                                   label="numerical noise floor of D")
                handles.append(fline)
            if d["value"].size < 4:  # a band over one or two points is invisible: error bars too
                ax.errorbar(d["step"], d["value"],
                            yerr=np.vstack([d["value"] - d["band_low"], d["band_high"] - d["value"]]).clip(min=0),
                            fmt="none", ecolor=C_D, capsize=5, lw=1.2)
            ymax = float(np.nanmax(np.concatenate([d["band_high"], d["value"], floor["value"][fok]])))
            top = ymax * 1.12 if ymax > 0 else 1.0
            ax.set_ylim(bottom=-0.02 * top, top=top)
            if _finite(summary.get("peak_step")) and int(summary["peak_step"]) in set(d["step"].tolist()):
                i = int(np.where(d["step"] == int(summary["peak_step"]))[0][0])
                ax.plot([d["step"][i]], [d["value"][i]], marker="*", ms=15, color=C_PEAK, mec="black", mew=0.6,
                        zorder=5, ls="none")
        else:
            need = window + 1
            _empty_note(ax, f"D(t) not available yet: {len(probe_steps)} probe(s) recorded,\n"
                            f"D(t_i) needs the {window} probe(s) after t_i (at least {need} in all)")
            ax.set_ylim(0, 1)

        ax2 = ax.twinx()
        if gvalues.size:
            (gline,) = ax2.plot(gsteps, gvalues, "-", color=C_GRAD, lw=1.1, alpha=0.85, label="gradient norm")
            handles.append(gline)
            ax2.set_ylim(bottom=0, top=float(gvalues.max()) * 1.12 if gvalues.max() > 0 else 1.0)
        ax2.set_ylabel("gradient norm (pre-clipping)", color=C_GRAD)
        ax2.tick_params(axis="y", colors=C_GRAD)

        if probe_steps:
            ax.plot(probe_steps, [0] * len(probe_steps), "|", color="#888888", ms=8, transform=ax.get_xaxis_transform(),
                    clip_on=False)
        offline = summary.get("offline") if isinstance(summary.get("offline"), dict) else {}
        cp_label = ("offline change point (ruptures)" if summary.get("transition_detected")
                    else "level shift found offline (ruptures), not a transition")
        for j, cp in enumerate(offline.get("change_points") or []):
            h = ax.axvline(cp, color="#999999", lw=0.8, ls=(0, (2, 2)), zorder=1,
                           label=cp_label if j == 0 else None)
            if j == 0:
                handles.append(h)
        for step, label, colour, ls in _markers(summary):
            handles.append(ax.axvline(step, color=colour, ls=ls, lw=1.8, label=label, zorder=4))

        xs = [*d["step"].tolist(), *gsteps.tolist(), *probe_steps]
        if xs:
            lo, hi = min(xs), max(xs)
            pad = max(1.0, 0.02 * (hi - lo))
            ax.set_xlim(lo - pad, hi + pad)
        ax.set_xlabel("training step")
        unit = " (nats)" if measure == "js" else ""
        ax.set_ylabel(f"D(t): {_MEASURE_LABEL.get(measure, measure)}{unit}", color=C_D)
        ax.tick_params(axis="y", colors=C_D)
        ax.grid(True, alpha=0.3)
        title = "Behavioural change D(t) between consecutive probe checkpoints vs gradient norm"
        n_base = _detector_from_config(_config(st)).baseline_probes
        if summary.get("transition_detected"):
            title += "\ntransition detected"
        elif summary.get("detection_possible") is False and d["value"].size:
            title += "\ntoo early to detect: too few D values for the detector to decide"
        elif d["value"].size > n_base:
            title += "\nno transition detected beyond noise"
        elif d["value"].size:
            title += f"\ntoo early to detect: {d['value'].size} D value(s), the baseline needs {n_base}"
        ax.set_title(title, fontsize=12)
        lag = _lag_text(summary)
        if lag:
            ax.text(0.01, 0.97, lag, transform=ax.transAxes, va="top", ha="left", fontsize=9,
                    bbox={"boxstyle": "round", "fc": "white", "ec": "#bbbbbb", "alpha": 0.9})
        ax.set_zorder(ax2.get_zorder() + 1)  # D and the markers above the grad-norm line
        ax.patch.set_visible(False)
        if handles:
            ax.legend(handles=handles, loc="upper right", fontsize=8.5, framealpha=0.9)
        return _save(fig, path)


def plot_order_parameters(store: RunStore | str | Path, path: str | Path, summary: Mapping[str, Any] | None = None) -> Path:
    """Per order parameter, one panel: mean judge score (with a 95% band from the individual
    judgments) and, on a twin axis, the flagged rate (share of answers past the order
    parameter's threshold, e.g. misaligned), over probe steps, with onset/peak markers."""
    with _as_store(store) as st:
        names = _order_names(st)
        statements = _statements(st)
        have_summary = summary is not None
        summary = _resolve_summary(st, summary) if (names or have_summary) else {}
        steps_of = {int(p["probe_index"]): int(p["step"]) for p in st.probes()}
        n = max(1, len(names))
        fig = _figure(11, 2.2 + 2.6 * n)
        axes = [fig.add_subplot(n, 1, i + 1) for i in range(n)]
        for ax in axes[1:]:
            ax.sharex(axes[0])
        if not names:
            _empty_note(axes[0], "no order parameters / judge scores recorded in this run")
            axes[0].set_xlabel("training step")
            axes[0].set_title(f"Order parameters over training ({judge_label(_config(st))})", fontsize=12)
            return _save(fig, path)
        markers = [m for m in _markers(summary) if "early stop" not in m[1]]
        legend: dict[str, Any] = {}
        for i, (ax, name) in enumerate(zip(axes, names)):
            handles = []
            mean = st.metric_series(f"order/{name}/mean")
            stats = _judgment_stats(st, name)
            if mean["value"].size == 0 and stats:  # judgments stored but no aggregate metric yet
                ks = sorted(stats)
                mean = {"step": np.array([steps_of.get(k, k) for k in ks]),
                        "value": np.array([stats[k]["mean"] for k in ks])}
            ok = np.isfinite(mean["value"])
            msteps, mvals = mean["step"][ok], mean["value"][ok]
            if mvals.size:
                by_step = {steps_of.get(k, k): v for k, v in stats.items()}
                se = np.array([by_step.get(int(s), {}).get("stderr", np.nan) for s in msteps])
                if np.isfinite(se).any():
                    se = np.where(np.isfinite(se), se, 0.0)
                    handles.append(ax.fill_between(msteps, mvals - _Z95 * se, mvals + _Z95 * se, color=C_MEAN,
                                                   alpha=0.18, lw=0, label="95% interval"))
                (h,) = ax.plot(msteps, mvals, "o-", color=C_MEAN, ms=3.5, lw=1.6, label="mean judge score (left axis)")
                handles.insert(0, h)
            else:
                _empty_note(ax, f"no judge scores for '{name}' yet")
            ax.set_ylabel("mean score", color=C_MEAN)
            ax.tick_params(axis="y", colors=C_MEAN)
            flagged = st.metric_series(f"order/{name}/flagged_rate")
            fok = np.isfinite(flagged["value"])
            if fok.any():
                ax2 = ax.twinx()
                fsteps, fvals = flagged["step"][fok], flagged["value"][fok]
                by_step = {steps_of.get(k, k): v for k, v in stats.items()}
                nn = np.array([by_step.get(int(s), {}).get("n", np.nan) for s in fsteps])
                fse = np.sqrt(np.clip(fvals * (1 - fvals), 0, None) / nn)
                if np.isfinite(fse).any():
                    fse = np.where(np.isfinite(fse), fse, 0.0)
                    ax2.fill_between(fsteps, np.clip(fvals - _Z95 * fse, 0, 1), np.clip(fvals + _Z95 * fse, 0, 1),
                                     color=C_FLAG, alpha=0.12, lw=0)
                (h2,) = ax2.plot(fsteps, fvals, "s--", color=C_FLAG, ms=3.5, lw=1.4, label="flagged rate (right axis)")
                handles.append(h2)
                ax2.set_ylim(-0.03, 1.03)
                ax2.set_ylabel("flagged rate", color=C_FLAG)
                ax2.tick_params(axis="y", colors=C_FLAG)
            for step, label, colour, ls in markers:
                handles.append(ax.axvline(step, color=colour, ls=ls, lw=1.4, label=label))
            stmt = statements.get(name)
            ax.set_title(f"{name}" + (f": \u201c{_shorten(stmt, 90)}\u201d" if stmt else ""), fontsize=10.5, loc="left")
            ax.grid(True, alpha=0.3)
            for h in handles:  # one legend for the figure: styles are shared by all panels
                label = h.get_label()
                if label and not label.startswith("_") and label not in legend:
                    legend[label] = h
            if mvals.size:
                lo_, hi_ = _score_range(mvals)
                if lo_ is not None:
                    ax.set_ylim(lo_, hi_)
            if i == n - 1:
                ax.set_xlabel("training step")
            else:
                ax.tick_params(labelbottom=False)
        fig.suptitle(f"Order parameters over training (scores of the probe samples by {judge_label(_config(st))})",
                     fontsize=12)
        if legend:
            fig.legend(list(legend.values()), list(legend), loc="outside lower center", ncol=min(4, len(legend)),
                       fontsize=8.5, frameon=False)
        return _save(fig, path)


def _score_range(values: np.ndarray) -> tuple[float | None, float | None]:
    """Fixed y range for judge scores on common scales (0-100, 0-9, 0-1), so small noise is
    not blown up to full height; None when the values fit none of them."""
    lo, hi = float(np.min(values)), float(np.max(values))
    for top in (1.0, 9.0, 10.0, 100.0):
        if lo >= 0 and hi <= top and (hi > 0.1 * top or top == 1.0):
            pad = 0.04 * top
            return -pad, top + pad
    return None, None


def _d_at(store: RunStore, measure: str, step: int | None) -> tuple[float, float | None] | None:
    """Raw D (and its stderr) of ``measure`` at probe ``step``; None when not measured."""
    if step is None:
        return None
    s = store.metric_series(f"D/{measure}")
    at = np.where((s["step"] == int(step)) & np.isfinite(s["value"]))[0]
    if not at.size:
        return None
    se = s["stderr"][at[0]]
    return float(s["value"][at[0]]), float(se) if np.isfinite(se) else None


def _captured_rows(store: RunStore, step: int) -> dict[str, dict[str, Any]]:
    k = next((int(p["probe_index"]) for p in store.probes() if int(p["step"]) == int(step)), None)
    if k is None:
        return {}
    return {n: m for n, m in store.captured_rows(k).items() if _finite(m["value"])}


def plot_captured(
    store: RunStore | str | Path,
    path: str | Path,
    step: int | None = None,
    summary: Mapping[str, Any] | None = None,
) -> Path:
    """Bars of the fraction r_O of D captured by each order parameter at ``step`` (default:
    the D peak; when the peak probe has no decomposition yet, the nearest probe that has
    one), with 95% error bars and a dashed line at 1 (all of the change). Values are never
    clipped: r_O > 1 is estimation noise and shows as such. A ratio whose full D is within its
    noise (:func:`captured_resolution`) is no share of anything: no bar, "unresolved" and why."""
    with _as_store(store) as st:
        summary = _resolve_summary(st, summary)
        probe_steps = [int(p["step"]) for p in st.probes()]
        with_captured = [s for s in probe_steps if _captured_rows(st, s)]
        note = ""
        chosen = step
        if chosen is None:
            target = summary.get("peak_step")
            if not _finite(target):
                measure = _primary_measure(st, summary)
                d = _d_series(st, measure)
                cand = [(v, s) for s, v in zip(d["step"], d["value"]) if int(s) in with_captured]
                target = int(max(cand)[1]) if cand else None
                note = "largest D among decomposed probes" if target is not None else ""
            else:
                target = int(target)
                note = "D peak"
            if target is not None and target not in with_captured and with_captured:
                nearest = min(with_captured, key=lambda s: (abs(s - target), s))
                note = f"nearest decomposed probe to the D peak at step {target}"
                target = nearest
            chosen = target
        else:
            note = "requested step"
        rows = _captured_rows(st, int(chosen)) if chosen is not None else {}
        measure = _primary_measure(st, summary)
        d_at = _d_at(st, measure, chosen)
        status = {n: captured_resolution(m, *(d_at or (None, None))) for n, m in rows.items()}
        fig = _figure(max(6.5, 1.6 + 1.3 * len(rows)), 4.8)
        ax = fig.add_subplot(1, 1, 1)
        ax.axhline(1.0, color="black", ls="--", lw=1.2, label="1 = all of the change in D")
        ax.axhline(0.0, color="#888888", lw=0.8)
        if rows:
            names = list(rows)
            x = np.arange(len(names))
            # an unresolved ratio (full D within its noise) is no share: no bar, the reason instead
            res = np.array([status[n][0] is not False for n in names])
            vals = np.array([float(rows[n]["value"]) for n in names])
            lo = np.array([rows[n]["ci_low"] if _finite(rows[n]["ci_low"]) else np.nan for n in names], dtype=float)
            hi = np.array([rows[n]["ci_high"] if _finite(rows[n]["ci_high"]) else np.nan for n in names], dtype=float)
            se = np.array([rows[n]["stderr"] if _finite(rows[n]["stderr"]) else np.nan for n in names], dtype=float)
            lo = np.where(np.isfinite(lo), lo, vals - _Z95 * se)
            hi = np.where(np.isfinite(hi), hi, vals + _Z95 * se)
            floors = np.array([(rows[n].get("extra") or {}).get("noise_floor", np.nan) for n in names], dtype=float)
            floors = np.where(res, floors, np.nan)
            if res.any():
                err = np.vstack([np.nan_to_num(vals - lo), np.nan_to_num(hi - vals)]).clip(min=0)
                ax.bar(x[res], vals[res], yerr=err[:, res], color=C_D, alpha=0.8, capsize=6, ecolor="black",
                       width=0.6, label="captured fraction r_O (95% CI)")
            if np.isfinite(floors).any():
                ok = np.isfinite(floors)
                ax.hlines(floors[ok], x[ok] - 0.34, x[ok] + 0.34, colors="#c0392b", linestyles=(0, (2, 1.5)), lw=2,
                          label="noise floor: r_O of an order parameter that did not change")
            for xi, v, h, ok, n in zip(x, vals, hi, res, names):
                if ok:
                    top = h if np.isfinite(h) else v
                    ax.text(xi, max(top, v) + 0.03, f"{v:.2f}", ha="center", va="bottom", fontsize=9)
                else:
                    why = textwrap.fill(status[n][1] or "", width=24, break_on_hyphens=False)
                    ax.text(xi, 0.5, f"unresolved\n{why}", ha="center", va="center", fontsize=7.5, color="#555555",
                            bbox={"boxstyle": "round", "fc": "#f4f4f4", "ec": "#cccccc"})
            ax.set_xticks(x, names)
            ax.set_xlim(-0.6, len(names) - 0.4)  # unresolved columns have no bar to span them
            shown_hi = hi[res & np.isfinite(hi)]
            shown_lo = lo[res & np.isfinite(lo)]
            ymax = float(np.nanmax(np.concatenate([shown_hi, vals[res], floors[np.isfinite(floors)], [1.0]])))
            ymin = float(np.nanmin(np.concatenate([shown_lo, vals[res], [0.0]])))
            ax.set_ylim(min(0.0, ymin - 0.05), max(1.15, ymax + 0.15))
            # below the axes: inside, the legend hides a tall bar's value label
            fig.legend(loc="outside lower center", ncol=2 if len(ax.get_legend_handles_labels()[0]) < 3 else 1,
                       fontsize=8.5, frameon=False)
        else:
            ax.set_ylim(-0.05, 1.2)
            ax.set_xticks([])
            why = f"at step {chosen}" if chosen is not None else "(no D peak yet)"
            _empty_note(ax, f"no captured-fraction estimates {why}")
        ax.set_ylabel("captured fraction r_O = D[order param.] / D")
        ax.set_xlabel("order parameter")
        where = f"step {chosen}" if chosen is not None else "no step"
        if d_at is not None:
            where += f", D_{measure} = {_clip_d(d_at[0]):.3g}"
            if d_at[0] < 0:
                where += " (estimator noise below 0; raw value kept in the store)"
        ax.set_title(f"Share of the distribution change explained by each order parameter\n{where}"
                     + (f" ({note})" if note else ""), fontsize=11)
        ax.grid(True, axis="y", alpha=0.3)
        return _save(fig, path)


# ------------------------------------------------------------------------------------------
# Samples
# ------------------------------------------------------------------------------------------


def _shorten(text: str, n: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1].rstrip() + "\u2026"


def _probe_side(store: RunStore, k: int, prompt_ids: Sequence[str] | None, n: int, prompts: Mapping[str, str]) -> dict[str, Any]:
    samples = store.samples(k)
    scores: dict[tuple[str, int], dict[str, float | None]] = {}
    for j in store.judgments(probe_index=k):
        scores.setdefault((j["prompt_id"], j["sample_idx"]), {})[j["order_parameter"]] = (
            j["score"] if _finite(j["score"]) and not j["error"] else None
        )
    by_prompt: dict[str, list] = {}
    for s in samples:
        by_prompt.setdefault(s.prompt_id, []).append(s)
    order = list(prompt_ids) if prompt_ids else sorted(by_prompt, key=lambda p: list(prompts).index(p) if p in prompts else 1 << 30)
    chosen = []
    for pid in order:
        if pid in by_prompt and len(chosen) < n:
            s = min(by_prompt[pid], key=lambda r: r.sample_idx)
            chosen.append({
                "prompt_id": pid,
                "prompt": prompts.get(pid, ""),
                "sample_idx": int(s.sample_idx),
                "text": s.text,
                "scores": scores.get((pid, s.sample_idx), {}),
            })
    means: dict[str, float] = {}
    for (_, _), sc in scores.items():
        for name, v in sc.items():
            if v is not None:
                means.setdefault(name, []).append(v)  # type: ignore[arg-type]
    return {
        "probe_index": k,
        "samples": chosen,
        "n_samples": len(samples),
        "mean_scores": {name: float(np.mean(v)) for name, v in means.items()},
    }


def example_samples(
    store: RunStore | str | Path,
    n: int = 3,
    summary: Mapping[str, Any] | None = None,
    path: str | Path | None = None,
) -> dict[str, Any]:
    """``n`` samples (text + judge scores) from the last probe before the onset and from the
    probe ``window`` probes after the D peak (the checkpoint on the far side of the change),
    same prompts on both sides. Without a detected transition: first vs last probe.
    With ``path``, also written as markdown (see :func:`write_samples_markdown`)."""
    with _as_store(store) as st:
        summary = _resolve_summary(st, summary)
        probes = st.probes()
        prompts = {p["prompt_id"]: p["prompt"] for p in st.prompts()}
        window = int(summary.get("window") or _config(st).get("window") or 1)
        out: dict[str, Any] = {
            "transition_detected": bool(summary.get("transition_detected")),
            "onset_step": summary.get("onset_step"),
            "peak_step": summary.get("peak_step"),
            "before": None,
            "after": None,
        }
        if not probes:
            if path is not None:
                write_samples_markdown(out, path)
            return out
        steps = [int(p["step"]) for p in probes]
        idx = {int(p["step"]): int(p["probe_index"]) for p in probes}
        pos = {int(p["probe_index"]): i for i, p in enumerate(probes)}
        onset, peak = summary.get("onset_step"), summary.get("peak_step")
        if _finite(onset):
            pre = summary.get("last_pre_onset_step")
            if _finite(pre) and int(pre) in idx:
                before_i = pos[idx[int(pre)]]
            else:
                earlier = [i for i, s in enumerate(steps) if s < int(onset)]
                before_i = earlier[-1] if earlier else 0
            before_label = "last probe before the onset"
        else:
            before_i, before_label = 0, "first probe"
        if _finite(peak) and int(peak) in idx:
            after_i = min(pos[idx[int(peak)]] + window, len(probes) - 1)
            after_label = f"{window} probe(s) after the D peak" if after_i > pos[idx[int(peak)]] else "D peak (last probe)"
        else:
            after_i, after_label = len(probes) - 1, "last probe"
        b_k, a_k = int(probes[before_i]["probe_index"]), int(probes[after_i]["probe_index"])
        before = _probe_side(st, b_k, None, n, prompts)
        after = _probe_side(st, a_k, [s["prompt_id"] for s in before["samples"]] or None, n, prompts)
        if len(after["samples"]) < n:  # prompts of "before" missing on the far side: fill up
            extra = _probe_side(st, a_k, None, n, prompts)["samples"]
            have = {s["prompt_id"] for s in after["samples"]}
            after["samples"] += [s for s in extra if s["prompt_id"] not in have][: n - len(after["samples"])]
        before.update(step=steps[before_i], label=before_label)
        after.update(step=steps[after_i], label=after_label)
        out["before"], out["after"] = before, after
        out = json_safe(out)
        if path is not None:
            write_samples_markdown(out, path)
        return out


def _fence(text: str) -> str:
    ticks = "```"
    while ticks in text:
        ticks += "`"
    return f"{ticks}text\n{text.rstrip()}\n{ticks}"


def write_samples_markdown(examples: Mapping[str, Any], path: str | Path) -> Path:
    """Render :func:`example_samples` output as markdown."""
    lines = ["# Example samples", ""]
    if examples.get("transition_detected"):
        onset, peak = examples.get("onset_step"), examples.get("peak_step")
        lines.append(f"Transition onset at step {format_value(onset)}"
                     + (f", D peak at step {format_value(peak)}." if _finite(peak) else "."))
    else:
        lines.append("No transition onset to compare around: first probe vs last probe.")
    lines.append("")
    for key, title in (("before", "Before"), ("after", "After")):
        side = examples.get(key)
        if not side:
            lines += [f"## {title}", "", "_no probe recorded yet_", ""]
            continue
        lines += [f"## {title}: step {side['step']} ({side['label']})", ""]
        if side.get("mean_scores"):
            lines.append("Mean judge scores over all {} samples of this probe: ".format(side.get("n_samples"))
                         + ", ".join(f"{k} = {v:.1f}" for k, v in sorted(side["mean_scores"].items())))
            lines.append("")
        if not side["samples"]:
            lines += ["_no samples stored for this probe_", ""]
        for s in side["samples"]:
            score_txt = ", ".join(f"{k} = {'n/a' if v is None else f'{v:.1f}'}" for k, v in sorted(s["scores"].items()))
            lines.append(f"### `{s['prompt_id']}` (sample {s['sample_idx']})" + (f" - {score_txt}" if score_txt else ""))
            lines.append("")
            if s.get("prompt"):
                lines += [f"**Prompt:** {_shorten(s['prompt'], 300)}", ""]
            lines += [_fence(s["text"] if s["text"] else "(empty response)"), ""]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


# ------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------


def judge_label(cfg: Mapping[str, Any]) -> str:
    """Who scored the samples, from the stored run config (``config["judge"]``), for titles:
    a rule judge is no LLM, and the reader must know which judge they look at."""
    judge = cfg.get("judge")
    if isinstance(judge, str) and judge:
        return "rule-based judge" if judge == "RuleJudge" else f"judge {judge}"
    if not isinstance(judge, Mapping):
        return "the judge"
    kind, model, name = judge.get("type"), judge.get("model"), judge.get("name")
    if kind == "RuleJudge":
        return f"rule-based judge {name!r}" if name else "rule-based judge"
    if model:
        return f"LLM judge {model}"
    return f"judge {kind}" if kind else "the judge"


def _opt_float(x: Any) -> float | None:
    return float(x) if _finite(x) else None


def captured_resolution(
    entry: Mapping[str, Any], d_full: float | None = None, d_full_stderr: float | None = None
) -> tuple[bool | None, str | None]:
    """``(resolved, why_unresolved)`` of one captured fraction r_O = D_O / D.

    A ratio over a full D that is itself within its noise is noise, whatever number it reads
    (6.57 of "nothing"). ``entry``: a ``captured/<name>`` metrics row (``value``, ``stderr``,
    ``extra``) or a summary entry. The decomposition's own ``resolved`` / ``why_unresolved``
    win; stores written before it recorded them: unresolved when the full D
    (``d_full``/``d_full_stderr``, else ``d_full`` in the entry) is below 2 standard errors,
    or r_O exceeds 1 by more than 2 standard errors. ``(None, None)``: no estimate to judge.
    """
    extra = entry.get("extra") if isinstance(entry.get("extra"), Mapping) else {}
    flag = entry.get("resolved", extra.get("resolved"))
    why = entry.get("why_unresolved", extra.get("why_unresolved"))
    if flag is not None:
        return (True, None) if flag else (False, str(why or "the full D is within its noise"))
    if d_full is None:
        full = entry.get("d_full", extra.get("d_full"))
        if isinstance(full, Mapping):
            d_full, d_full_stderr = _opt_float(full.get("value")), _opt_float(full.get("stderr"))
        else:
            d_full = _opt_float(full)
    d, d_se = _opt_float(d_full), _opt_float(d_full_stderr)
    if d is not None and d_se is not None and d < 2 * d_se:
        return False, f"the full D ({_clip_d(d):.3g} +- {d_se:.2g}) is within noise"
    v, se = _opt_float(entry.get("value")), _opt_float(entry.get("stderr"))
    if v is None:
        return None, None
    if se is not None and v > 1 + 2 * se:
        return False, f"r_O = {v:.3g} +- {se:.2g} is above 1 beyond its noise: the full D is too noisy to divide by"
    return True, None


def _clip_d(x: Any) -> float:
    """D for display: an unbiased estimator can dip below 0 where nothing changed; a
    dissimilarity cannot. The store keeps the raw value."""
    return max(float(x), 0.0)


D_CLIP_NOTE = "values below 0 (estimator noise) shown as 0; raw value kept in the store"


def format_value(x: Any) -> str:
    """A summary value for tables and plots: '-' for missing (None, NaN), yes/no, 4
    significant digits. Never "None" or "nan" in front of a reader."""
    if x is None:
        return "-"
    if isinstance(x, (bool, np.bool_)):
        return "yes" if x else "no"
    if isinstance(x, (float, np.floating)):
        return f"{float(x):.4g}" if math.isfinite(float(x)) else "-"
    return str(x)


def _steps_text(steps: Sequence[Any]) -> str:
    return ", ".join(str(int(c)) for c in steps if _finite(c))


def _verdict_lines(summary: Mapping[str, Any], facts: Mapping[str, Any]) -> list[str]:
    """The report's opening sentences: what was and was not found, in words."""
    onset, peak = summary.get("onset_step"), summary.get("peak_step")
    n_d, n_base = facts.get("n_d"), facts.get("baseline_probes")
    out = []
    if summary.get("transition_detected") and _finite(onset):
        text = f"**A behavioural transition was detected**: D(t) left its baseline at step {int(onset)}"
        if _finite(peak):
            text += f" and peaked at step {int(peak)}"
            if not summary.get("peak_confirmed"):
                text += " (provisional: D had not fallen back by the last probe)"
        out.append(text + ".")
        g, lag = summary.get("grad_norm_peak_step"), summary.get("lag_onset_minus_grad_peak")
        if _finite(g):
            out.append(f"The gradient norm peaked at step {int(g)}"
                       + (f" (onset - grad-norm peak = {int(lag):+d} steps)." if _finite(lag) else "."))
    elif summary.get("detection_possible") is False or (
            "transition_detected" in summary and summary["transition_detected"] is None):
        note = summary.get("detection_note") or "too few D values for the detector to decide"
        out.append(f"**Too early to tell**: {note}.")
    elif _finite(n_d) and _finite(n_base) and int(n_d) <= int(n_base):
        out.append(f"**Too early to tell**: {int(n_d)} D value(s) so far; the detector's baseline needs "
                   f"{int(n_base)} before it can see a rise.")
    else:
        out.append("**No transition detected**: D(t) never rose beyond the noise of its baseline"
                   + (f" over {int(n_d)} D values." if _finite(n_d) else "."))
    if summary.get("stopped_early"):
        stop, reason = summary.get("stop_step"), summary.get("stop_reason")
        out.append("Training stopped early" + (f" at step {int(stop)}" if _finite(stop) else "")
                   + (f": {reason}" if reason else "") + ".")
    for note in summary.get("stop_rule_notes") or []:
        out.append(f"Note: {note}.")
    return out


def _report_markdown(
    summary: Mapping[str, Any],
    files: Mapping[str, str],
    run_dir: Path,
    rebuilt: bool,
    facts: Mapping[str, Any] | None = None,
) -> str:
    """``facts``: what the summary alone does not say, read from the store by
    :func:`build_report` (judge label, negative D values, captured-fraction resolution)."""
    facts = facts or {}
    detected = bool(summary.get("transition_detected"))
    neg = facts.get("d_negative") or (0, None)
    peak_value = summary.get("peak_value")
    peak_text = format_value(peak_value)
    if _finite(peak_value) and float(peak_value) < 0:
        peak_text = f"{_clip_d(peak_value):.4g} \u2020"
    undecided = "transition_detected" in summary and summary["transition_detected"] is None
    rows: list[tuple[str, Any]] = [("Transition detected", "undecided (too few D values)" if undecided else detected)]
    if detected:
        rows += [
            ("Onset step", summary.get("onset_step")),
            ("Last probe before onset", summary.get("last_pre_onset_step")),
            ("D peak step", summary.get("peak_step")),
            ("D peak value", peak_text),
            ("Peak confirmed", summary.get("peak_confirmed")),
        ]
    rows.append(("Grad-norm peak step", summary.get("grad_norm_peak_step")))
    if detected:
        rows += [
            ("Lag: onset - grad-norm peak (steps)", summary.get("lag_onset_minus_grad_peak")),
            ("Lag: D peak - grad-norm peak (steps)", summary.get("lag_peak_minus_grad_peak")),
        ]
    rows.append(("Stopped early", summary.get("stopped_early")))
    if summary.get("stopped_early"):
        rows.append(("Stop step", summary.get("stop_step")))
    rows += [
        ("Primary measure", summary.get("primary_measure")),
        ("Numerical noise floor of D", facts.get("numerical_floor")),
        ("Judge", facts.get("judge")),
        ("Probe every n steps", summary.get("every_n_steps")) if summary.get("schedule") in (None, "fixed") else
        ("Probe schedule", f"{summary.get('schedule')} (longest interval {summary.get('every_n_steps') or '-'} steps); "
                           f"onset and peak read D per {summary.get('reference_interval')} steps"),
        ("Probes", len(summary.get("probe_steps") or [])),
    ]
    if "crossing_step" in summary:
        c = summary.get("crossing_step")
        rows.append(("Crossing step (organism)", c if _finite(c) else "never crossed 50%"))
    lines = [
        "# Phase-transition report",
        "",
        f"Run store: `{run_dir}`" + ("  (summary rebuilt from the store: the run did not write one)" if rebuilt else ""),
        "",
        " ".join(_verdict_lines(summary, facts)),
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {format_value(v)} |" for k, v in rows if k not in ("Judge", "Numerical noise floor of D") or v],
        "",
    ]
    if neg[0]:
        mark = "\u2020 " if peak_text.endswith("\u2020") else ""
        lines += [f"{mark}D(t) ({summary.get('primary_measure')}) read below 0 at {neg[0]} probe(s) (lowest "
                  f"{neg[1]:.2g}): an unbiased estimator dips below zero where nothing changed. Tables and plots "
                  "show 0; the raw value is kept in the store.", ""]
    off = summary.get("offline") or {}
    if off:
        cps = [c for c in off.get("change_points") or [] if _finite(c)]
        method = off.get("method") or "ruptures"
        measure = off.get("measure") or summary.get("primary_measure") or "D"
        lines += ["## Offline change points", ""]
        if detected:
            lines += [f"D(t) ({measure}), {method}: "
                      + (", ".join(f"step {int(c)}" for c in cps) if cps else "none"), ""]
            if off.get("rise_and_fall"):
                lines += ["Two-change-point fit (rise and fall): "
                          + ", ".join(f"step {int(c)}" for c in off["rise_and_fall"] if _finite(c)), ""]
        elif cps:
            lines += [f"Offline, ruptures found level shifts in D(t) ({measure}) at steps {_steps_text(cps)}; "
                      "the online detector found no transition beyond noise, so read them as shifts of a noisy "
                      f"baseline, not as a phase transition (method: {method}).", ""]
        elif not off.get("error"):
            lines += [f"Offline, ruptures found no level shift in D(t) ({measure}) either (method: {method}).", ""]
        if off.get("error"):
            lines += [f"(offline analysis failed: {off['error']})", ""]
    cap = summary.get("captured_at_peak") or {}
    if cap:
        status = facts.get("captured_status") or {}
        lines += ["## Captured fraction at the D peak", "",
                  "The noise floor is what r_O reads for an order parameter that did not change at all. "
                  "A ratio whose full D is within its noise is shown as unresolved: it is no share of anything.",
                  "", "| order parameter | r_O | stderr | noise floor |", "|---|---|---|---|"]
        for k, v in cap.items():
            v = v if isinstance(v, Mapping) else {}
            resolved, why = status.get(k) or captured_resolution(v)
            if resolved is False:
                lines.append(f"| {k} | unresolved: {why} | - | - |")
            else:
                lines.append(f"| {k} | {format_value(v.get('value'))} | {format_value(v.get('stderr'))} | "
                             f"{format_value(v.get('noise_floor'))} |")
        lines.append("")
    judge = facts.get("judge") or "the judge"
    lines += [
        "## Plots",
        "",
        f"![D(t) and gradient norm]({files['overview']})",
        "",
        f"![Order parameters scored by {judge}]({files['order_parameters']})",
        "",
        f"![Captured fraction]({files['captured']})",
        "",
        "## Files",
        "",
        f"- [example samples {'before / after the transition' if detected else 'from the first and last probe'}]"
        f"({files['samples']})",
        f"- [summary.json]({files['summary']})",
        "",
    ]
    faults = summary.get("faults") or []
    if faults:
        lines += ["## Faults recorded during the run", ""]
        for f in faults[:50]:
            if isinstance(f, dict):
                kind = f.get("kind") or f.get("fault") or "fault"
                lines.append(f"- step {int(f['step'])}: {kind}" if _finite(f.get("step")) else f"- {kind}")
        lines.append("")
    return "\n".join(lines)


def _report_facts(store: RunStore, summary: Mapping[str, Any]) -> dict[str, Any]:
    """What the report states beyond the summary, read from the store."""
    cfg = _config(store)
    measure = str(summary.get("primary_measure") or _primary_measure(store, summary))
    d = store.metric_series(f"D/{measure}")["value"]
    d = d[np.isfinite(d)]
    negative = d[d < 0]
    d_at = _d_at(store, measure, summary.get("peak_step") if _finite(summary.get("peak_step")) else None)
    cap = summary.get("captured_at_peak") or {}
    floor = store.metric_series("D_numerical_floor")["value"]
    floor = floor[np.isfinite(floor)]
    return {
        "judge": judge_label(cfg) if cfg.get("judge") else None,
        "numerical_floor": (f"{np.median(floor):.2g} (median of {floor.size} probes, max {floor.max():.2g}; "
                            f"scoring in {cfg.get('scoring_dtype', 'model')})") if floor.size else None,
        "n_d": int(d.size),
        "baseline_probes": _detector_from_config(cfg).baseline_probes,
        "d_negative": (int(negative.size), float(negative.min()) if negative.size else None),
        "captured_status": {k: captured_resolution(v, *(d_at or (None, None)))
                            for k, v in cap.items() if isinstance(v, Mapping)},
    }


def build_report(run_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Write ``overview.png``, ``order_parameters.png``, ``captured.png``, ``samples.md``,
    ``summary.json`` and ``report.md`` for a run.

    ``out_dir`` defaults to the directory holding ``run.sqlite``. ``summary.json``: the run's
    own summary (``summary.json`` next to the store, else the one in the store's meta) with
    the offline analysis added under ``"offline"``; rebuilt from the store when the run never
    wrote one (a crash). Returns ``{"run_dir", "out_dir", "files": {name: path}, "summary",
    "summary_rebuilt"}``.
    """
    store_path = find_store(run_dir)
    out = Path(out_dir) if out_dir is not None else store_path.parent
    out.mkdir(parents=True, exist_ok=True)
    with _as_store(store_path) as st:
        existing = _load_summary(st, store_path)
        rebuilt = rebuild_summary(st, offline=True)
        if existing is None:
            summary = rebuilt
            was_rebuilt = True
        else:
            summary = dict(existing)
            offline = dict(rebuilt.get("offline") or {})
            offline["rebuilt"] = {k: rebuilt.get(k) for k in (
                "onset_step", "peak_step", "grad_norm_peak_step", "lag_onset_minus_grad_peak",
                "lag_peak_minus_grad_peak", "transition_detected", "detection_source")}
            summary["offline"] = offline
            for k, v in rebuilt.items():  # fill keys an older / partial summary lacks
                if k not in summary and k != "offline":
                    summary[k] = v
            was_rebuilt = False
        summary = json_safe(summary)
        files = {
            "overview": plot_overview(st, out / "overview.png", summary=summary),
            "order_parameters": plot_order_parameters(st, out / "order_parameters.png", summary=summary),
            "captured": plot_captured(st, out / "captured.png", summary=summary),
        }
        examples = example_samples(st, n=3, summary=summary, path=out / "samples.md")
        files["samples"] = out / "samples.md"
        files["summary"] = out / "summary.json"
        files["summary"].write_text(json.dumps(summary, indent=2))
        rel = {k: Path(v).name for k, v in files.items()}
        files["report"] = out / "report.md"
        facts = _report_facts(st, summary)
        files["report"].write_text(_report_markdown(summary, rel, store_path, was_rebuilt, facts))
    return {
        "run_dir": str(store_path.parent),
        "out_dir": str(out),
        "files": {k: str(v) for k, v in files.items()},
        "summary": summary,
        "summary_rebuilt": was_rebuilt,
        "examples": examples,
    }
