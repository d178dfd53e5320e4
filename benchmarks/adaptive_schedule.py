"""The adaptive probe schedule against a fixed grid on the model organism, side by side.

    python benchmarks/adaptive_schedule.py [--seeds 0 1 2 3 4] [--longest 8] [--min-interval 2]
                                           [--no-focus-run] [--no-control] [--json out.json]

For each seed, real runs of ``em_callbacks.organism.demo.run_demo`` (W&B and the report off):

- ``fixed``: a probe every 2 steps (the demo's grid), 8 samples per prompt;
- ``adaptive``: ``schedule="adaptive"``, longest interval ``--longest``, ``focus_factor=1``
  (the schedule alone: same samples per probe as ``fixed``);
- ``focus``: the same with the default focus (4x samples per prompt while a transition is
  under way): the captured fractions at the D peak;
- ``control``: ``adaptive`` on the aligned control data with early stopping on.

Probe compute is measured three ways, in the same process: the callback's CPU seconds and wall
seconds in its schedule step (probes and sentinel readings; CPU time is the figure that does not
depend on what else runs on the machine), and model tokens it processed (generated tokens, plus
prompt + completion tokens of every teacher-forced row, sentinel readings included and reported
as a share).

The issue's targets: adaptive onset <= fixed onset + 2 steps with <= half the probe compute;
the D peak within one probe interval of the 50% crossing in >= 4/5 seeds (intervals as on the
grid: the peak's interval ends at the next probe, the crossing's starts at the probe before
it); controls: no onset and no stop in 5/5; with focus, "misaligned" captured at the peak with
stderr <= 0.12 and >= 3 stderr above its noise floor, "closer" within 2 stderr of its floor.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import em_callbacks.engine as engine_module  # noqa: E402
from em_callbacks.callback import PhaseTransitionCallback  # noqa: E402
from em_callbacks.organism.config import OrganismConfig  # noqa: E402
from em_callbacks.organism.demo import run_demo  # noqa: E402
from em_callbacks.store import RunStore  # noqa: E402


class Meter:
    """Seconds inside the callback's schedule step and tokens through the model's forward."""

    def __init__(self) -> None:
        self.seconds = self.cpu_seconds = 0.0
        self.tokens = 0
        self.sentinel_tokens = 0
        follow, score, generate, sentinel = (PhaseTransitionCallback._follow_schedule, engine_module.sequence_logprobs,
                                             engine_module.generate_samples, engine_module.ProbeEngine.sentinel_scores)
        meter = self
        inside_sentinel = []

        def timed_follow(cb, *args, **kwargs):
            t, c = time.perf_counter(), time.process_time()
            try:
                return follow(cb, *args, **kwargs)
            finally:
                meter.seconds += time.perf_counter() - t
                meter.cpu_seconds += time.process_time() - c

        def counted_sentinel(engine, *args, **kwargs):
            inside_sentinel.append(True)
            try:
                return sentinel(engine, *args, **kwargs)
            finally:
                inside_sentinel.pop()

        def counted_score(model, prompts, completions, *args, **kwargs):
            tokens = sum(len(p) + len(c) for p, c in zip(prompts, completions))
            meter.tokens += tokens
            meter.sentinel_tokens += tokens if inside_sentinel else 0
            return score(model, prompts, completions, *args, **kwargs)

        def counted_generate(*args, **kwargs):
            samples = generate(*args, **kwargs)
            meter.tokens += sum(len(c) for c in samples.completion_ids)
            return samples

        self._patches = [(PhaseTransitionCallback, "_follow_schedule", follow, timed_follow),
                         (engine_module.ProbeEngine, "sentinel_scores", sentinel, counted_sentinel),
                         (engine_module, "sequence_logprobs", score, counted_score),
                         (engine_module, "generate_samples", generate, counted_generate)]

    def __enter__(self) -> "Meter":
        for owner, name, _, new in self._patches:
            setattr(owner, name, new)
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, old, _ in self._patches:
            setattr(owner, name, old)


def run(seed: int, out: Path, config: OrganismConfig, **kwargs) -> dict:
    with Meter() as meter:
        t = time.perf_counter()
        summary = run_demo(seed=seed, out=out, wandb_mode="disabled", config=config, progress=False,
                           make_report=False, **kwargs)
        wall = time.perf_counter() - t
    store = RunStore(out, readonly=True)
    try:
        sentinels = int(store.sentinel()["step"].size)
        onset_events = store.events("onset")
        detected_at = (onset_events[0]["payload"] or {}).get("detected_at_step") if onset_events else None
    finally:
        store.close()
    steps = summary["probe_steps"]
    crossing, peak = summary.get("crossing_step"), summary.get("peak_step")
    crossing_interval, lag = summary.get("crossing_interval"), summary.get("peak_to_crossing_lag")
    return {
        "probes": len(steps), "probe_steps": steps, "sentinels": sentinels,
        "onset": summary.get("onset_step"), "detected_at": detected_at, "peak": peak, "crossing": crossing,
        "grad_peak": summary.get("grad_norm_peak_step"), "lag": lag, "crossing_interval": crossing_interval,
        "peak_ok": lag is not None and crossing_interval is not None and abs(lag) <= crossing_interval,
        "detected": bool(summary.get("transition_detected")), "stopped": bool(summary.get("stopped_early")),
        "callback_seconds": round(meter.seconds, 2), "callback_cpu_seconds": round(meter.cpu_seconds, 2),
        "tokens": meter.tokens, "sentinel_tokens": meter.sentinel_tokens, "wall": round(wall, 1),
        "captured": summary.get("captured_at_peak") or {},
    }


def captured_checks(captured: dict) -> dict:
    mis, closer = captured.get("misaligned") or {}, captured.get("closer") or {}

    def fine(entry: dict) -> bool:
        return all(isinstance(entry.get(k), (int, float)) for k in ("value", "stderr", "noise_floor"))

    out = {"misaligned": None, "closer": None, "misaligned_ok": False, "closer_ok": False}
    if fine(mis):
        out["misaligned"] = [round(mis["value"], 3), round(mis["stderr"], 3), round(mis["noise_floor"], 3)]
        out["misaligned_ok"] = mis["stderr"] <= 0.12 and mis["value"] - mis["noise_floor"] >= 3 * mis["stderr"]
    if fine(closer):
        out["closer"] = [round(closer["value"], 3), round(closer["stderr"], 3), round(closer["noise_floor"], 3)]
        out["closer_ok"] = abs(closer["value"] - closer["noise_floor"]) <= 2 * closer["stderr"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--fixed-every", type=int, default=2)
    ap.add_argument("--longest", type=int, default=8)
    ap.add_argument("--min-interval", type=int, default=2)
    ap.add_argument("--no-focus-run", action="store_true")
    ap.add_argument("--no-control", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    fixed = OrganismConfig(probe_every=args.fixed_every, probe_schedule="fixed")
    adaptive = OrganismConfig(probe_every=args.min_interval, probe_longest_interval=args.longest,
                              probe_schedule="adaptive", focus_factor=1)
    focus = adaptive.replace(focus_factor=None)
    print(f"organism {fixed.cache_key()}  fixed every {args.fixed_every}  adaptive longest {args.longest}, "
          f"min {args.min_interval}  load {os.getloadavg()[0]:.2f}  cpus {os.cpu_count()}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="em-adaptive-") as tmp:
        for seed in args.seeds:
            row: dict = {"seed": seed}
            row["fixed"] = run(seed, Path(tmp) / f"fixed-{seed}", fixed)
            row["adaptive"] = run(seed, Path(tmp) / f"adaptive-{seed}", adaptive)
            f, a = row["fixed"], row["adaptive"]
            row["seconds_ratio"] = round(a["callback_seconds"] / f["callback_seconds"], 3)
            row["cpu_ratio"] = round(a["callback_cpu_seconds"] / f["callback_cpu_seconds"], 3)
            row["tokens_ratio"] = round(a["tokens"] / f["tokens"], 3)
            row["onset_ok"] = a["onset"] is not None and f["onset"] is not None and a["onset"] <= f["onset"] + 2
            row["compute_ok"] = row["cpu_ratio"] <= 0.5
            if not args.no_focus_run:
                row["focus"] = run(seed, Path(tmp) / f"focus-{seed}", focus)
                row.update(captured_checks(row["focus"]["captured"]))
                row["focus_tokens_ratio"] = round(row["focus"]["tokens"] / f["tokens"], 3)
            if not args.no_control:
                row["control"] = run(seed, Path(tmp) / f"control-{seed}", adaptive, control=True, early_stop=True)
                row["control_ok"] = not row["control"]["detected"] and not row["control"]["stopped"]
            rows.append(row)
            print(json.dumps(row, default=str), flush=True)

    print()
    header = ("seed", "onset f/a", "detected f/a", "peak a", "cross a", "lag/int a", "probes f/a", "sent.",
              "tokens a/f (sentinel share)", "CPU s a/f", "wall s a/f", "control", "misaligned (r, se, floor)",
              "closer (r, se, floor)")
    print(" | ".join(header))
    for r in rows:
        f, a = r["fixed"], r["adaptive"]
        print(" | ".join(str(x) for x in (
            r["seed"], f"{f['onset']}/{a['onset']}", f"{f['detected_at']}/{a['detected_at']}", a["peak"], a["crossing"],
            f"{a['lag']}/{a['crossing_interval']}", f"{f['probes']}/{a['probes']}", a["sentinels"],
            f"{r['tokens_ratio']} ({a['sentinel_tokens'] / max(a['tokens'], 1):.0%})", r["cpu_ratio"],
            r["seconds_ratio"], r.get("control_ok", "-"), r.get("misaligned", "-"),
            r.get("closer", "-"))))
    n = len(rows)

    def count(key: str, sub: str | None = None) -> int:
        return sum(bool((r[sub] if sub else r).get(key)) for r in rows if sub is None or sub in r)

    print(f"\nonset <= fixed + 2:            {count('onset_ok')}/{n}")
    print(f"compute <= half (CPU seconds of the callback): {count('compute_ok')}/{n}")
    print(f"peak within one interval:      {count('peak_ok', 'adaptive')}/{n}  (target >= 4/5)")
    if not args.no_control:
        print(f"controls quiet:                {count('control_ok')}/{n}  (target 5/5)")
    if not args.no_focus_run:
        print(f"focus: misaligned resolves:    {count('misaligned_ok')}/{n}  closer at its floor: {count('closer_ok')}/{n}"
              "  (target >= 4/5)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
