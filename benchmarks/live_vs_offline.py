"""Live callback vs offline analysis of the same run's checkpoints, side by side.

The organism demo's LoRA fine-tune (40 steps, probes every 2 steps) saves its adapter every 2
steps while the callback watches it live; ``analyze_checkpoints`` then probes those
checkpoints with the same probes, samples per prompt and seed. Prints the probe steps, the
largest difference of every D series and its standard error, the onset, peak and grad-norm
peak of both, and the wall time of each.

    python benchmarks/live_vs_offline.py [--seed 0] [--steps 40]      # ~2 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=40)
    opts = ap.parse_args()

    from em_callbacks import PhaseTransitionCallback, analyze_checkpoints
    from em_callbacks.organism import OrganismConfig, World, build_finetune_trainer, finetune_dataset, load_or_pretrain
    from em_callbacks.organism import probe_set
    from em_callbacks.organism.demo import organism_order_parameters
    from em_callbacks.store import RunStore

    config = OrganismConfig()
    world = World(config)
    model, tok = load_or_pretrain(config, progress=False)
    ops, judge = organism_order_parameters(world)
    probe_options = dict(probes=probe_set(world), samples_per_prompt=config.samples_per_prompt,
                         max_new_tokens=config.max_new_tokens, seed=opts.seed, order_parameters=ops, judge=judge)
    work = Path(tempfile.mkdtemp(prefix="live-vs-offline-"))
    cb = PhaseTransitionCallback(every_n_steps=config.probe_every, **probe_options)
    t0 = time.perf_counter()
    build_finetune_trainer(model, tok, finetune_dataset(world), work / "run", seed=opts.seed, steps=opts.steps,
                           callbacks=[cb], save=True, save_steps=config.probe_every).train()
    live_s = time.perf_counter() - t0
    _, judge = organism_order_parameters(world)  # a fresh judge for the second driver
    probe_options["judge"] = judge
    t0 = time.perf_counter()
    offline = analyze_checkpoints(work / "run", work / "offline", progress=False, report=False, **probe_options)
    offline_s = time.perf_counter() - t0

    live = json.loads((work / "run" / "phase_transition" / "summary.json").read_text())
    a, b = RunStore(work / "run" / "phase_transition", readonly=True), RunStore(work / "offline", readonly=True)
    same_samples = all([s.token_ids for s in a.samples(k)] == [s.token_ids for s in b.samples(k)]
                       for k in range(len(live["probe_steps"])))
    print(f"probe steps equal: {live['probe_steps'] == offline.probe_steps} ({len(offline.probe_steps)} probes); "
          f"samples identical token for token: {same_samples}")
    for measure in ("tv", "js", "linear"):
        x, y = a.metric_series(f"D/{measure}"), b.metric_series(f"D/{measure}")
        print(f"D/{measure}: max |live - offline| = {np.max(np.abs(x['value'] - y['value'])):.2e} "
              f"(stderr {np.max(np.abs(x['stderr'] - y['stderr'])):.2e}); largest D {x['value'].max():.4f}")
    for key in ("onset_step", "peak_step", "grad_norm_peak_step", "transition_detected"):
        print(f"{key}: live {live[key]}  offline {getattr(offline, key)}")
    print(f"wall time: live fine-tune with probing {live_s:.1f} s, offline analysis {offline_s:.1f} s "
          f"(work dir {work})")


if __name__ == "__main__":
    main()
