"""Discovery of order parameters from a run store (``em-callbacks discover RUN_DIR``).

Given a run's store (``run.sqlite``, written by :class:`~em_callbacks.PhaseTransitionCallback`):

1. pick the D peak: the detector's peak from the run summary when it is a window of
   ``D/<measure>``, else the largest finite ``D/<measure>`` (or the window at ``step=``);
2. take the samples of the two windows compared there (``left`` / ``right`` probe indices, and
   the per-prompt full D, both stored in that metric's ``extra``);
3. ask an LLM (:class:`~em_callbacks.judges.OpenAIProposer`, via :func:`order.apropose`) for
   ``n_candidates`` statements about one answer that tell the two sides apart;
4. score every candidate as an order parameter with an :class:`~em_callbacks.judges.OpenAIJudge`
   on every sample of both sides and rank by the fraction of D it captures
   (:func:`order.score_order_parameters`: judge-score distributions pooled over prompts,
   against the mean of the stored per-prompt D, as the callback does; NaN last);
5. write ``discovery.json`` next to the store and return the ranked list.

Steps 3 and 4 are the library's discovery pipeline (:mod:`em_callbacks.order`); this module
only reads the store and writes the record.

The API key is used for the requests only: it is never written to ``discovery.json`` or printed.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ._util import json_safe, run_blocking
from .divergence import MEASURES, DissimilarityResult
from .order import Proposal, Scale, apropose, candidate_order_parameters, score_order_parameters
from .store import RunStore, scrub_secrets

__all__ = ["run_discovery", "DiscoveryError", "DISCOVERY_FILENAME"]

logger = logging.getLogger(__name__)

DISCOVERY_FILENAME = "discovery.json"
# what run_discovery returns per candidate (discovery.json adds ci_low, ci_high, d_order,
# why_unresolved, name)
_RETURNED = ("rank", "statement", "captured", "stderr", "resolved", "judged", "failed")


class DiscoveryError(RuntimeError):
    """Discovery cannot run on this store (no D series, no samples, proposer failure...)."""


# ------------------------------------------------------------------------------ the window
def _load_summary(store: RunStore, run_dir: Path) -> dict[str, Any]:
    path = run_dir / "summary.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            pass
    summary = store.meta().get("summary")
    return summary if isinstance(summary, dict) else {}


def _choose_window(store: RunStore, run_dir: Path, measure: str, step: int | None) -> dict[str, Any]:
    name = f"D/{measure}"
    series = store.metric_series(name)
    steps = series["step"].tolist()
    values = series["value"]
    finite = [s for s, v in zip(steps, values) if math.isfinite(v)]
    if not finite:
        have = sorted(n for n in store.metric_names() if n.startswith("D/"))
        raise DiscoveryError(
            f"no finite {name} values in {store.path}"
            + (f" (it has {', '.join(have)}; pass measure=...)" if have else
               " (the run has no dissimilarity yet: D(t_i) needs the probe after t_i)")
        )
    summary = _load_summary(store, run_dir)
    source = None
    if step is not None:
        if int(step) not in finite:
            raise DiscoveryError(f"step {step} is not a window of {name}; windows: {finite}")
        chosen, source = int(step), "step argument"
    else:
        peak = summary.get("peak_step")
        same_measure = summary.get("primary_measure", measure) == measure
        if peak is not None and same_measure and int(peak) in finite:
            chosen, source = int(peak), "detected peak (summary)"
        else:
            chosen = int(steps[int(np.nanargmax(values))])
            source = f"largest {name}"
    index = {int(p["step"]): int(p["probe_index"]) for p in store.probes()}
    if chosen not in index:
        raise DiscoveryError(f"no probe at step {chosen} in {store.path}")
    i = index[chosen]
    metric = store.metrics_at(i).get(name) or {}
    extra = metric.get("extra") or {}
    per_prompt = extra.get("per_prompt")
    if not per_prompt:
        raise DiscoveryError(f"{name} at step {chosen} has no per-prompt values (extra.per_prompt); "
                             "the store was written by an older version")
    left = [int(j) for j in extra.get("left", [i])]
    right = [int(j) for j in extra.get("right", [i + 1])]
    step_of = {v: k for k, v in index.items()}
    return {
        "probe_index": i, "step": chosen, "source": source, "measure": measure,
        "value": metric.get("value"), "stderr": metric.get("stderr"),
        "estimator": extra.get("estimator"),
        "left": left, "right": right,
        "left_steps": [step_of.get(j) for j in left], "right_steps": [step_of.get(j) for j in right],
        "per_prompt": {str(pid): (float("nan") if v[0] is None else float(v[0]),
                                  float("nan") if v[1] is None else float(v[1]))
                       for pid, v in per_prompt.items()},
        "summary_peak_step": summary.get("peak_step"),
    }


def _side(store: RunStore, probes: Sequence[int], prompts: Mapping[str, str]) -> dict[str, list[tuple[str, str]]]:
    """(prompt, response) pairs per prompt id, in (probe, sample) order."""
    out: dict[str, list[tuple[str, str]]] = {}
    for k in probes:
        for s in sorted(store.samples(k), key=lambda s: (s.prompt_id, s.sample_idx)):
            out.setdefault(s.prompt_id, []).append((prompts.get(s.prompt_id, ""), s.text))
    return out


# ------------------------------------------------------------------------------ the record
def _finite_or_none(x: Any) -> float | None:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _reference(store: RunStore, i: int) -> dict[str, dict[str, Any]]:
    """Captured fractions of the run's own order parameters at the chosen window."""
    out = {}
    for name, m in store.metrics_at(i).items():
        if name.startswith("captured/"):
            out[name.split("/", 1)[1]] = {"captured": _finite_or_none(m["value"]),
                                          "stderr": _finite_or_none(m["stderr"])}
    return out


# ------------------------------------------------------------------------------ entry point
def run_discovery(
    run_dir: str | Path,
    judge_model: str,
    base_url: str | None = None,
    n_candidates: int = 8,
    api_key: str | None = None,
    measure: str = "tv",
    *,
    step: int | None = None,
    proposer_model: str | None = None,
    scale: Scale | None = None,
    judge: Any = None,
    proposer: Any = None,
    max_samples: int = 20,
    n_resamples: int = 200,
    seed: int = 0,
    out: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Propose order parameters that explain the run's D peak and rank them by captured fraction.

    Args:
        run_dir: the run directory (holding ``run.sqlite``), the file, or a Trainer output_dir.
        judge_model: the model that scores candidates (and proposes them, unless
            ``proposer_model`` is given), served at ``base_url`` (None: OpenAI).
        n_candidates: statements to ask the proposer for.
        api_key: the key (else ``OPENAI_API_KEY``; not needed with ``base_url``). Never stored.
        measure: which stored dissimilarity (``D/<measure>``) to pick the peak from and decompose.
        step: analyse the window at this probe step instead of the peak.
        scale: scale the candidates are judged on (default 0-100, one judge token).
        judge / proposer: ready-made objects instead of OpenAIJudge / OpenAIProposer (any
            :class:`~em_callbacks.judges.Judge`; any ``(prompt) -> str`` callable).
        max_samples: samples per side shown to the proposer (a seeded subsample).
        out: where to write ``discovery.json`` (default: the run directory).

    Returns:
        One dict per candidate, largest captured fraction first: ``rank``, ``statement``,
        ``captured`` (r_O, never clipped), ``stderr``, ``resolved`` (False when the number says
        nothing, see :attr:`~em_callbacks.order.CapturedFraction.resolved`), ``judged`` /
        ``failed`` (judgments with and without a score). Undefined values (no judgments on a
        side) are None. ``discovery.json`` holds the same list with ``ci_low``, ``ci_high``,
        ``d_order``, ``why_unresolved`` and the candidate's ``name``, plus the window, per-prompt D, judge errors by kind, the raw
        proposer answer and the run's own order parameters' captured fractions there.

    Raises:
        DiscoveryError: no D series / per-prompt values in the store, no samples, the proposer
            failed or proposed nothing usable.
        ValueError: a bad ``measure`` / ``n_candidates``, or a ``judge`` that cannot score the
            candidates (its ``check_order_parameters``), before any judging.
    """
    from .report import find_store, open_store

    if measure not in MEASURES:
        raise ValueError(f"measure must be one of {MEASURES}, got {measure!r}")
    if int(n_candidates) < 1:
        raise ValueError("n_candidates must be >= 1")
    store_path = find_store(run_dir)
    run_path = store_path.parent
    t0 = time.monotonic()
    store = open_store(run_dir)
    try:
        window = _choose_window(store, run_path, measure, step)
        prompts = {p["prompt_id"]: p["prompt"] for p in store.prompts()}
        left = _side(store, window["left"], prompts)
        right = _side(store, window["right"], prompts)
        reference = _reference(store, window["probe_index"])
    finally:
        store.close()
    keys = [pid for pid, (v, _) in window["per_prompt"].items()
            if math.isfinite(v) and left.get(pid) and right.get(pid)]
    if not keys:
        raise DiscoveryError(f"no prompt has samples on both sides of the window at step {window['step']}")
    full = {pid: DissimilarityResult(measure, window["per_prompt"][pid][0], window["per_prompt"][pid][1],
                                     len(left[pid]) + len(right[pid]), window.get("estimator") or "window")
            for pid in keys}

    # 1. propose
    from .judges import OpenAIJudge, OpenAIProposer

    own_proposer = proposer is None
    if proposer is None:
        proposer = OpenAIProposer(proposer_model or judge_model, base_url=base_url, api_key=api_key)
    left_pairs = [pair for pid in keys for pair in left[pid]]
    right_pairs = [pair for pid in keys for pair in right[pid]]
    try:
        proposal: Proposal = run_blocking(lambda: apropose(
            left_pairs, right_pairs, proposer, int(n_candidates), max_samples=max_samples, seed=seed))
    except Exception as exc:  # noqa: BLE001 - network / server errors of the proposer
        raise DiscoveryError(f"the proposer failed: {type(exc).__name__}: {_short(exc)}") from None
    finally:
        if own_proposer:
            proposer.close()
    if not proposal.statements:
        raise DiscoveryError(f"the proposer returned no usable statements (answer: {_short(proposal.answer)!r})")
    candidates = candidate_order_parameters(proposal.statements, scale=scale)

    # 2. judge every sample of both sides with every candidate, decompose, rank
    if judge is None:
        judge = OpenAIJudge(judge_model, base_url=base_url, api_key=api_key)
    scores = score_order_parameters(candidates, judge, {pid: left[pid] for pid in keys},
                                    {pid: right[pid] for pid in keys}, full, measure,
                                    n_resamples=n_resamples, rng=seed, pool_prompts=True)
    detailed, errors = [], {}
    for rank, score in enumerate(scores, 1):
        captured = score.captured
        ci = captured.confidence_interval(0.95)
        detailed.append({
            "rank": rank,
            "statement": score.order_parameter.statement,
            "captured": _finite_or_none(captured.value),
            "stderr": _finite_or_none(captured.stderr),
            "resolved": captured.resolved,
            "ci_low": _finite_or_none(ci.low),
            "ci_high": _finite_or_none(ci.high),
            "d_order": _finite_or_none(captured.d_order.value),
            "judged": score.judged,
            "failed": score.failed,
            "why_unresolved": captured.why_unresolved,
            "name": score.order_parameter.name,
        })
        errors[score.order_parameter.name] = dict(score.errors)
    ranked = [{k: r[k] for k in _RETURNED} for r in detailed]

    # 3. write discovery.json (no secrets: configs never hold the key; scrubbed anyway)
    out_dir = Path(out) if out is not None else run_path
    out_dir.mkdir(parents=True, exist_ok=True)
    judge_config = judge.config() if hasattr(judge, "config") else {"type": type(judge).__name__}
    proposer_config = proposer.config() if hasattr(proposer, "config") else {"type": type(proposer).__name__}
    payload = {
        "run_dir": str(run_path),
        "measure": measure,
        "window": {k: window[k] for k in ("probe_index", "step", "source", "value", "stderr", "estimator",
                                          "left", "right", "left_steps", "right_steps", "summary_peak_step")},
        "per_prompt_d": {pid: {"value": full[pid].value, "stderr": full[pid].stderr, "n": full[pid].n}
                         for pid in keys},
        "n_samples": {"left": len(left_pairs), "right": len(right_pairs)},
        "n_candidates_requested": int(n_candidates),
        "judge": judge_config,
        "proposer": proposer_config,
        "proposer_answer": proposal.answer,
        "candidates": detailed,
        "judge_errors": errors,
        "reference": reference,
        "seconds": round(time.monotonic() - t0, 3),
        "created_at": time.time(),
    }
    path = out_dir / DISCOVERY_FILENAME
    path.write_text(json.dumps(json_safe(scrub_secrets(payload)), indent=2, allow_nan=False))
    logger.info("em-callbacks: discovery wrote %s (%d candidates)", path, len(ranked))
    return ranked


def _short(x: Any, n: int = 200) -> str:
    s = str(x)
    return s if len(s) <= n else s[: n - 3] + "..."
