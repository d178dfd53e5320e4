"""What the monitor costs a fine-tune: training wall time with and without the callback.

Workload (realistic proportions, see ``_common.py``): GPT-2 of 5.4M parameters (4 layers,
256 dims, vocab 8192), batches of 16 x 256 tokens, the callback with its default probe settings
(em-first-plot: 8 prompts x 16 samples, batch 64) at 64 new tokens and an instant RuleJudge
with two order parameters; full fine-tune (one-sided estimator, the default) and LoRA (r=16 on
every projection, two-sided estimator with adapter snapshots).

Two measurements, each A (no callback) and B (callback) in the same process:

1. Interval accounting (default). A real fine-tune with the callback probing every
   ``--probe-every`` steps (dense, so a few minutes hold several probes) and the same
   fine-tune without it. Per-step training time (``StepClock``) and the wall time of every
   callback hook are recorded, and the callback's internal phases are timed by wrapping
   ``generate_samples``, ``sequence_logprobs``, snapshot capture, the rank-0 bookkeeping and
   the judge. The overhead of the real schedule (a probe every ``--interval`` = 25 steps) is

       steady state:     median probe seconds / (interval x median step seconds without callback)
       N-interval run:   (first probe + N probes + end-of-training drain) / (N x interval x step)

   Probe cost does not depend on how many steps lie between probes (every probe samples once
   and scores the same band), so the dense schedule measures the same per-probe work.
   Checks printed: the training steps of the B run are as fast as those of the A run (the
   callback does not slow the steps it watches), and B's wall time = its steps + its hooks.

2. End-to-end (``--end-to-end``): the same fine-tune of ``--e2e-intervals`` x 25 steps, with
   and without the callback, interleaved ABAB ``--e2e-rounds`` times: the plain wall-time
   ratio. On the reference 2-core CPU machine one 50-step run takes 3-10 minutes, hence opt-in.

3. The model organism (``em-callbacks demo``'s fine-tune: probes every 2 steps of a very
   cheap step, so its overhead is large by design), A/B on the same fine-tune, with the
   phase shares. Skipped with ``--no-organism``; needs the organism cache (pretrained once).

Usage: python benchmarks/overhead.py [--quick] [--modes full,lora] [--end-to-end] [--no-organism]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    LoadSampler,
    PhaseTimer,
    RandomTokens,
    add_lora,
    build_callback,
    build_model,
    build_tokenizer,
    build_trainer,
    machine_header,
    median,
    param_counts,
    probe_prompt_ids,
    quiet,
    set_threads,
    spread,
)

from transformers import TrainerCallback  # noqa: E402

from em_callbacks.schedule import ProbeSchedule  # noqa: E402

TARGET = 0.10
MODEL_KWARGS: dict = {}  # --smoke: a 1-layer, 32-dim model to check the script itself in seconds


class StepClock(TrainerCallback):
    """Wall time of each optimizer step, from ``on_step_begin`` to ``on_step_end``; listed before
    the monitored callback, so its ``on_step_end`` (where probes run) is not included."""

    def __init__(self) -> None:
        self.steps: list[float] = []
        self.steps_cpu: list[float] = []  # process CPU time of the same spans
        self._t0 = self._c0 = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0, self._c0 = time.perf_counter(), time.process_time()

    def on_step_end(self, args, state, control, **kwargs):
        if self._t0 is not None:
            self.steps.append(time.perf_counter() - self._t0)
            self.steps_cpu.append(time.process_time() - self._c0)
            self._t0 = None


HOOKS = ("on_init_end", "on_train_begin", "on_step_end", "on_log", "on_save", "on_train_end")


def instrument(timer: PhaseTimer) -> None:
    """Time the callback's hooks and its internal phases (class/module-level wraps)."""
    import em_callbacks.callback as cbmod
    import em_callbacks.engine as engmod
    from em_callbacks.adapter_signal import AdapterTrajectory
    from em_callbacks.judges import RuleJudge
    from em_callbacks.sampling import WeightSnapshots

    cls, engine = cbmod.PhaseTransitionCallback, engmod.ProbeEngine
    for hook in HOOKS:
        timer.wrap(cls, hook, f"hook:{hook}")
    timer.wrap(cls, "_probe", "probe")
    timer.wrap(engine, "sample_and_score", "sample_and_score")
    timer.wrap(engine, "sentinel_scores", "sentinel")
    timer.wrap(engmod, "generate_samples", "generate")
    timer.wrap(engmod, "sequence_logprobs", "score")
    timer.wrap(WeightSnapshots, "capture", "snapshot_capture")
    timer.wrap(engine, "record", "bookkeeping")
    timer.wrap(engine, "collect_judgments", "collect_judgments")
    timer.wrap(engine, "finish", "finish")
    timer.wrap(AdapterTrajectory, "update", "adapter_signal")
    timer.wrap(RuleJudge, "judge_now", "judge")  # runs on the judge runner's thread


def hook_seconds(timer: PhaseTimer, cpu: bool = False) -> float:
    table = timer.cpu_seconds if cpu else timer.seconds
    return sum(v for k, v in table.items() if k.startswith("hook:") and k != "hook:on_init_end")


def phase_table(timer: PhaseTimer, indent: str = "    ") -> list[str]:
    """Shares of the callback's time (hooks during training, i.e. what training waits for)."""
    total = hook_seconds(timer)
    s = timer.seconds
    other_sample_score = s["sample_and_score"] - s["generate"] - s["score"] - s["snapshot_capture"]
    probe_other = s["probe"] - s["sample_and_score"] - s["bookkeeping"] - s["adapter_signal"]
    rows = [
        ("sampling: generate_samples", s["generate"], timer.calls["generate"]),
        ("scoring: sequence_logprobs (all passes)", s["score"], timer.calls["score"]),
        ("snapshots: capture", s["snapshot_capture"], timer.calls["snapshot_capture"]),
        ("snapshot swap + RNG/mode save-restore + rows", other_sample_score, None),
        ("bookkeeping: D, store, judge submit, detect", s["bookkeeping"], timer.calls["bookkeeping"]),
        ("adapter signal (LoRA B norms)", s["adapter_signal"], timer.calls["adapter_signal"]),
        ("other in _probe (gather/broadcast)", probe_other, None),
        ("judge results collection (every step)", s["collect_judgments"], timer.calls["collect_judgments"]),
        ("end of training: drain judges, summary", s["finish"], timer.calls["finish"]),
    ]
    accounted = sum(r[1] for r in rows)
    rows.append(("rest of the hooks (on_log, grad norms, ...)", total - accounted, None))
    out = [f"{indent}{'phase':<48}{'seconds':>9}{'share':>8}  calls"]
    for name, sec, calls in rows:
        share = sec / total if total > 0 else float("nan")
        out.append(f"{indent}{name:<48}{sec:>9.2f}{share:>8.1%}  {'' if calls is None else calls}")
    out.append(f"{indent}{'callback total (hooks, blocking training)':<48}{total:>9.2f}{1:>8.0%}")
    out.append(f"{indent}{'judging (RuleJudge, background thread)':<48}{s['judge']:>9.3f}"
               f"{s['judge'] / total if total else float('nan'):>8.1%}  {timer.calls['judge']} judgments "
               "(concurrent with training, not blocking)")
    return out


def run_once(mode: str, with_callback: bool, steps: int, probe_every: int, workdir: Path, tokenizer,
             timer: PhaseTimer, max_new_tokens: int, seed: int = 0) -> dict:
    with quiet():
        model = build_model(tokenizer, seed=seed, **MODEL_KWARGS)
        if mode == "lora":
            model = add_lora(model)
        dataset = RandomTokens(steps * 16 + 16, 256, len(tokenizer), seed=seed)
        clock = StepClock()
        callbacks: list = [clock]
        cb = None
        if with_callback:
            # the drift sentinel on every step between probes: its cost per reading, for the adaptive projection
            cb = build_callback(workdir / "pt", every_n_steps=probe_every, max_new_tokens=max_new_tokens,
                                sentinel_every_n_steps=1)
            callbacks.append(cb)
        trainer = build_trainer(model, tokenizer, dataset, workdir / "trainer", steps=steps, callbacks=callbacks,
                                seed=seed)
        timer.reset()
        t0, c0 = time.perf_counter(), time.process_time()
        trainer.train()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    store_seconds = []
    if cb is not None and cb.store is not None:
        from em_callbacks.store import RunStore

        with quiet():
            store = RunStore(workdir / "pt", readonly=True)
            store_seconds = [p["seconds"] for p in store.probes()]
            store.close()
    result = {
        "mode": mode, "with": with_callback, "wall": wall, "cpu": cpu, "steps": list(clock.steps),
        "steps_cpu": list(clock.steps_cpu), "hooks": hook_seconds(timer), "hooks_cpu": hook_seconds(timer, cpu=True),
        "probes": list(timer.durations.get("probe", [])), "probes_cpu": list(timer.cpu_durations.get("probe", [])),
        "sentinels": list(timer.durations.get("sentinel", [])),
        "sentinels_cpu": list(timer.cpu_durations.get("sentinel", [])),
        "store_seconds": store_seconds, "timer_seconds": dict(timer.seconds), "timer_calls": dict(timer.calls),
        "params": param_counts(model),
    }
    return result


def selected_modes(args) -> list[str]:
    modes = [m.strip() for m in args.modes.split(",") if m.strip() and m.strip() != "none"]
    unknown = [m for m in modes if m not in ("full", "lora")]
    if unknown:
        raise SystemExit(f"unknown mode(s) {unknown}: use full, lora or none")
    return modes


def accounting(args, tokenizer, timer: PhaseTimer, log) -> dict[str, dict]:
    results: dict[str, dict] = {}
    modes = selected_modes(args)
    for rnd in range(args.rounds):
        for mode in modes:
            order = (False, True) if rnd % 2 == 0 else (True, False)  # ABBA across rounds
            for with_cb in order:
                workdir = Path(tempfile.mkdtemp(prefix=f"overhead-{mode}-"))
                try:
                    res = run_once(mode, with_cb, args.steps, args.probe_every, workdir, tokenizer, timer,
                                   args.max_new_tokens)
                finally:
                    shutil.rmtree(workdir, ignore_errors=True)
                key = f"{mode}/{'B' if with_cb else 'A'}"
                agg = results.setdefault(key, {"wall": [], "cpu": [], "steps": [], "steps_cpu": [], "hooks": [],
                                               "hooks_cpu": [], "probes": [], "probes_cpu": [], "first": [],
                                               "sentinels": [], "sentinels_cpu": [],
                                               "first_cpu": [], "store_seconds": [], "timer": PhaseTimer(),
                                               "params": res["params"]})
                for k in ("wall", "cpu", "hooks", "hooks_cpu"):
                    agg[k].append(res[k])
                agg["steps"] += res["steps"]
                agg["steps_cpu"] += res["steps_cpu"]
                agg["sentinels"] += res["sentinels"]
                agg["sentinels_cpu"] += res["sentinels_cpu"]
                if res["probes"]:
                    agg["first"].append(res["probes"][0])
                    agg["first_cpu"].append(res["probes_cpu"][0])
                    agg["probes"] += res["probes"][1:]
                    agg["probes_cpu"] += res["probes_cpu"][1:]
                    agg["store_seconds"] += res["store_seconds"][1:]
                    agg["finish"] = agg.get("finish", []) + [res["timer_seconds"].get("finish", 0.0)]
                    for k, v in res["timer_seconds"].items():
                        agg["timer"].seconds[k] += v
                    for k, v in res["timer_calls"].items():
                        agg["timer"].calls[k] += v
                log(f"  [{mode} {'with' if with_cb else 'without'} callback] wall {res['wall']:.1f} s, "
                    f"median step {median(res['steps']):.2f} s, callback hooks {res['hooks']:.1f} s, "
                    f"probes {[round(p, 1) for p in res['probes']]} s (load {os.getloadavg()[0]:.2f})")
    return results


def report_accounting(results: dict[str, dict], args, log) -> dict[str, float]:
    """Per mode: step and probe costs, overhead of the real schedule, phase shares.

    Two clocks: wall time (what a user waits for) and process CPU time (with one torch thread,
    nearly independent of other processes' load; the stable figure on a shared machine).
    Denominator of the overhead: the B run's own training steps, which alternate with its probes
    in one process (the finest A/B interleaving there is); A's steps ran minutes apart.
    """
    verdicts = {}
    for mode in selected_modes(args):
        a, b = results.get(f"{mode}/A"), results.get(f"{mode}/B")
        if not a or not b:
            continue
        total, trainable = b["params"]
        n = args.project_intervals
        finish = median(b.get("finish", [0.0]))
        log("")
        log(f"-- {mode} fine-tune: {total / 1e6:.2f}M parameters, {trainable / 1e6:.3f}M trainable "
            f"({'one-sided estimator' if mode == 'full' else 'two-sided, adapter snapshots'})")
        figures = {}
        for clock, sfx in (("wall", ""), ("cpu", "_cpu")):
            step_a, step_b = median(a["steps" + sfx]), median(b["steps" + sfx])
            probes = b["probes" + sfx] or b["first" + sfx]
            probe, first = median(probes), median(b["first" + sfx])
            steady = probe / (args.interval * step_b)
            run_n = (first + n * probe + finish) / (n * args.interval * step_b)
            figures[clock] = (steady, run_n)
            log(f"  [{clock} time]")
            log(f"    training step, A (no callback):         {spread(a['steps' + sfx])} s")
            log(f"    training step, B (callback attached):   {spread(b['steps' + sfx])} s   B/A = {step_b / step_a:.3f}")
            log(f"    first probe (step 0, one scoring pass): {spread(b['first' + sfx])} s")
            log(f"    steady-state probe:                     {spread(probes)} s = {probe / step_b:.2f} training steps")
            log(f"    overhead, probe every {args.interval} steps: steady state {steady:.1%} "
                f"(A's step time as denominator: {probe / (args.interval * step_a):.1%}); "
                f"a {n * args.interval}-step run ({n + 1} probes): {run_n:.1%}")
            if b["sentinels" + sfx]:
                sentinel = median(b["sentinels" + sfx])
                quiet = ProbeSchedule("adaptive", args.interval)
                readings = args.interval // quiet.sentinel_every_n_steps - 1
                adaptive = (probe + readings * sentinel) / (args.interval * step_b)
                log(f"    drift sentinel reading:                 {spread(b['sentinels' + sfx])} s = "
                    f"{sentinel / step_b:.2f} training steps")
                log(f"    adaptive schedule (longest interval {args.interval}), quiet stretch: one probe + "
                    f"{readings} sentinel readings (every {quiet.sentinel_every_n_steps} steps) per interval: "
                    f"{adaptive:.1%}")
                figures[clock] += (adaptive,)
                longer = ProbeSchedule("adaptive", 4 * args.interval, min_interval=args.interval)
                readings = longer.every_n_steps // longer.sentinel_every_n_steps - 1
                log(f"    adaptive schedule, longest interval {longer.every_n_steps} (min_interval {args.interval}: the "
                    f"fixed grid's resolution at the baseline and in a transition), quiet stretch: one probe + "
                    f"{readings} sentinel readings per interval: "
                    f"{(probe + readings * sentinel) / (longer.every_n_steps * step_b):.1%}")
        if b["store_seconds"]:
            log(f"  store probes.seconds (sample+score, wall):  {spread(b['store_seconds'])} s")
        log(f"  end-of-training drain + summary (wall):     {finish:.2f} s")
        dense = median(b["wall"]) / median(a["wall"]) - 1
        log(f"  measured runs ({args.steps} steps, probe every {args.probe_every}, dense, not the target figure): "
            f"wall A {spread(a['wall'])} s, B {spread(b['wall'])} s (B/A - 1 = {dense:+.0%}); "
            f"CPU A {spread(a['cpu'])} s, B {spread(b['cpu'])} s")
        train_b = [w - h for w, h in zip(b["cpu"], b["hooks_cpu"])]
        log(f"  consistency (CPU): B total - B hooks = {spread(train_b)} s vs A total {spread(a['cpu'])} s "
            f"(ratio {median(train_b) / median(a['cpu']):.3f}; 1 = the callback adds nothing outside its hooks)")
        steady_wall, steady_cpu = figures["wall"][0], figures["cpu"][0]
        worst = max(steady_wall, steady_cpu)
        log(f"  => OVERHEAD {mode}: steady state {steady_wall:.1%} wall / {steady_cpu:.1%} CPU; "
            f"{n * args.interval}-step run {figures['wall'][1]:.1%} wall / {figures['cpu'][1]:.1%} CPU   "
            f"target <= {TARGET:.0%}: {'MET' if worst <= TARGET else 'MISSED'}")
        log("  where the callback's time goes (all B runs, wall time):")
        for line in phase_table(b["timer"]):
            log(line)
        verdicts[mode] = worst
    return verdicts


def end_to_end(args, tokenizer, timer: PhaseTimer, log) -> None:
    steps = args.e2e_intervals * args.interval
    modes = selected_modes(args)
    for mode in modes:
        walls = {"A": [], "B": []}
        for rnd in range(args.e2e_rounds):
            order = ("A", "B") if rnd % 2 == 0 else ("B", "A")
            for v in order:
                workdir = Path(tempfile.mkdtemp(prefix=f"overhead-e2e-{mode}-"))
                try:
                    res = run_once(mode, v == "B", steps, args.interval, workdir, tokenizer, timer, args.max_new_tokens)
                finally:
                    shutil.rmtree(workdir, ignore_errors=True)
                walls[v].append(res["wall"])
                log(f"  [e2e {mode} {v}] {steps} steps: {res['wall']:.1f} s (load {os.getloadavg()[0]:.2f})")
        ratios = [b / a - 1 for a, b in zip(walls["A"], walls["B"])]
        log(f"-- end-to-end {mode}, {steps} steps, probe every {args.interval}: A {spread(walls['A'])} s, "
            f"B {spread(walls['B'])} s, paired overhead {spread(ratios)}  target <= {TARGET:.0%}: "
            f"{'MET' if median(ratios) <= TARGET else 'MISSED'}")


def workload_floor(args, tokenizer, log) -> None:
    """What a probe cannot go below on this workload, in training steps: one teacher-forced pass
    over the probe's rows, one generation of them, and one plain training step (forward,
    backward, AdamW), timed interleaved on the same model (median of rounds 2-4). A probe is
    generation + 1 pass (full fine-tune) or + 2 passes (LoRA, two-sided); its floor assumes
    generation no dearer than one pass (decoding as cheap as a parallel forward)."""
    import torch

    from em_callbacks.sampling import generate_samples, sequence_logprobs

    prompts = probe_prompt_ids(tokenizer)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    data = RandomTokens(16, 256, len(tokenizer))
    batch = {key: torch.stack([data[i][key] for i in range(16)]) for key in data[0]}
    for mode in selected_modes(args):
        with quiet():
            model = build_model(tokenizer, **MODEL_KWARGS)
            model = add_lora(model) if mode == "lora" else model
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        gen, score, step = [], [], []
        for r in range(4):
            model.eval()
            t = time.perf_counter()
            samples = generate_samples(model, prompts, 16, args.max_new_tokens, pad, eos, seed=r, with_logprobs=True)
            gen.append(time.perf_counter() - t)
            t = time.perf_counter()
            sequence_logprobs(model, [prompts[i] for i in samples.prompt_index], samples.completion_ids, pad)
            score.append(time.perf_counter() - t)
            model.train()
            t = time.perf_counter()
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            step.append(time.perf_counter() - t)
        g, p, q = median(gen[1:]), median(score[1:]), median(step[1:])
        passes = 2 if mode == "lora" else 1
        floor = (1 + passes) * p / q
        log(f"-- floor, {mode}: one pass {p:.2f} s = {p / q:.2f} training steps ({q:.2f} s); generation {g:.2f} s = "
            f"{g / p:.2f} passes. Probe = generation + {passes} pass(es): >= {floor:.2f} steps with generation at "
            f"one pass = {floor / args.interval:.1%} at every {args.interval} steps (with today's generation "
            f"{(g + passes * p) / q / args.interval:.1%}, before the floor pass and bookkeeping)")


def organism(args, timer: PhaseTimer, log) -> None:
    """The CPU demo's fine-tune, with and without the callback (settings of ``run_demo``)."""
    try:
        from em_callbacks.callback import PhaseTransitionCallback
        from em_callbacks.organism.config import OrganismConfig
        from em_callbacks.organism.data import finetune_dataset, probe_set
        from em_callbacks.organism.demo import organism_order_parameters
        from em_callbacks.organism.finetune import build_finetune_trainer
        from em_callbacks.organism.model import cache_path, load_or_pretrain
        from em_callbacks.organism.world import World
    except Exception as exc:  # noqa: BLE001 - the organism is developed concurrently
        log(f"-- organism demo: not available ({type(exc).__name__}: {exc})")
        return
    config = OrganismConfig()
    if not (cache_path(config) / "organism.json").exists() and not args.pretrain_organism:
        log("-- organism demo: skipped (no pretrained organism in the cache; run `em-callbacks demo` once "
            "or pass --pretrain-organism)")
        return
    with quiet():
        base, tokenizer = load_or_pretrain(config, progress=False)
        world = World(config)
        probes = probe_set(world)
        dataset = finetune_dataset(world, aligned=False, seed=0)
    walls = {"A": [], "B": []}
    cpus = {"A": [], "B": []}
    steps = {"A": [], "B": []}
    agg = PhaseTimer()
    probe_times = []
    for rnd in range(args.organism_rounds):
        for v in (("A", "B") if rnd % 2 == 0 else ("B", "A")):
            workdir = Path(tempfile.mkdtemp(prefix="overhead-organism-"))
            try:
                with quiet():
                    model = type(base).from_pretrained(cache_path(config))
                    clock = StepClock()
                    callbacks = [clock]
                    if v == "B":
                        ops, judge = organism_order_parameters(world)
                        callbacks.append(PhaseTransitionCallback(
                            probes=probes, every_n_steps=config.probe_every,
                            samples_per_prompt=config.samples_per_prompt, max_new_tokens=config.max_new_tokens,
                            order_parameters=ops, judge=judge, output_dir=workdir / "pt", seed=0, batch_size=256,
                            report_to_wandb=False,
                        ))
                    trainer = build_finetune_trainer(model, tokenizer, dataset, output_dir=str(workdir / "tr"),
                                                     seed=0, steps=config.finetune_steps, callbacks=callbacks)
                    timer.reset()
                    t0, c0 = time.perf_counter(), time.process_time()
                    trainer.train()
                    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
            walls[v].append(wall)
            cpus[v].append(cpu)
            steps[v] += clock.steps
            if v == "B":
                probe_times += timer.durations.get("probe", [])
                for k, val in timer.seconds.items():
                    agg.seconds[k] += val
                for k, val in timer.calls.items():
                    agg.calls[k] += val
            log(f"  [organism {v}] {config.finetune_steps} steps: {wall:.1f} s (load {os.getloadavg()[0]:.2f})")
    a, b = median(walls["A"]), median(walls["B"])
    log("")
    log(f"-- organism demo fine-tune ({config.finetune_steps} LoRA steps of a {config.n_layer}-layer "
        f"{config.n_embd}-dim GPT-2, batch {config.finetune_batch_size}; probe every {config.probe_every} steps: "
        f"{len(probes)} prompts x {config.samples_per_prompt} samples x {config.max_new_tokens} tokens)")
    log(f"  training step A {spread(steps['A'])} s, B {spread(steps['B'])} s; probe {spread(probe_times)} s "
        f"= {median(probe_times) / median(steps['A']):.1f} steps")
    log(f"  wall A {spread(walls['A'])} s, B {spread(walls['B'])} s: overhead {b / a - 1:+.0%}; "
        f"CPU A {spread(cpus['A'])} s, B {spread(cpus['B'])} s: overhead {median(cpus['B']) / median(cpus['A']) - 1:+.0%} "
        "(large by design: a probe every 2 steps of a ~0.5M-parameter model)")
    for line in phase_table(agg):
        log(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer steps, one round, no organism A/B repeat")
    ap.add_argument("--modes", default="full,lora", help="comma-separated: full, lora (none: organism only)")
    ap.add_argument("--steps", type=int, default=None, help="steps per accounting run (default 4, quick 2)")
    ap.add_argument("--probe-every", type=int, default=2, help="dense probe cadence of the accounting runs")
    ap.add_argument("--interval", type=int, default=25, help="the real probe interval (every_n_steps)")
    ap.add_argument("--project-intervals", type=int, default=2, help="N of the 'N-interval run' projection")
    ap.add_argument("--rounds", type=int, default=1, help="A/B rounds of the accounting runs (ABBA)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--end-to-end", action="store_true", help="also run the plain A/B of the real schedule")
    ap.add_argument("--e2e-intervals", type=int, default=2)
    ap.add_argument("--e2e-rounds", type=int, default=1)
    ap.add_argument("--no-organism", action="store_true")
    ap.add_argument("--no-floor", action="store_true", help="skip the workload-floor timing (~1 min)")
    ap.add_argument("--pretrain-organism", action="store_true", help="pretrain the organism if not cached")
    ap.add_argument("--organism-rounds", type=int, default=None, help="default 2, quick 1")
    ap.add_argument("--threads", default="auto", help="torch threads: auto (1 on a loaded machine) or N")
    ap.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.smoke:  # exercise every code path in seconds; the figures mean nothing
        MODEL_KWARGS.update(n_layer=1, n_embd=32, n_head=2)
        args.max_new_tokens = 4
    if args.steps is None:
        args.steps = 2 if args.quick else 4
    if args.organism_rounds is None:
        args.organism_rounds = 1 if args.quick else 2
    threads = set_threads(args.threads)
    t_start = time.perf_counter()

    def log(line: str) -> None:
        print(line, flush=True)

    log(machine_header("overhead: fine-tune wall time with vs without PhaseTransitionCallback"))
    log(f"torch threads: {threads}")
    log(f"workload: GPT-2 4x256, vocab 8192, batch 16 x 256 tokens; probes: em-first-plot 8 prompts x 16 samples "
        f"x {args.max_new_tokens} new tokens, batch 64, RuleJudge with 2 order parameters; real interval "
        f"{args.interval} steps")
    tokenizer = build_tokenizer()
    timer = PhaseTimer()
    instrument(timer)
    with LoadSampler() as load:
        if selected_modes(args):
            log(f"\n[1] interval accounting: {args.steps} steps per run, probe every {args.probe_every} "
                f"(A = without, B = with), modes {args.modes}")
            results = accounting(args, tokenizer, timer, log)
            report_accounting(results, args, log)
        if args.end_to_end:
            log(f"\n[2] end-to-end A/B: {args.e2e_intervals} x {args.interval} steps")
            end_to_end(args, tokenizer, timer, log)
        if not args.no_organism:
            log("\n[3] organism demo")
            organism(args, timer, log)
        timer.restore()
        if not args.no_floor and selected_modes(args):
            log("\n[4] the floor of this workload")
            workload_floor(args, tokenizer, log)
    log("")
    log(load.summary())
    log(f"total benchmark time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
