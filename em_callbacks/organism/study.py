"""Multi-seed study of the organism's transition (no em_callbacks callback involved).

    python -m em_callbacks.organism.study [--seeds 0 1 2 3 4] [--control] [--steps 40]

Pretrains once (cached), then for each seed fine-tunes a fresh copy with LoRA on misaligned
answers of the fine-tuning domain (aligned answers with ``--control``) and prints the exact
out-of-domain misaligned rate every ``probe_every`` steps, and the first step where it exceeds
50%.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from collections.abc import Sequence

from .config import OrganismConfig
from .data import finetune_dataset, probe_prompts
from .finetune import MisalignmentRateCallback, build_finetune_trainer
from .model import load_or_pretrain
from .world import World


def run_seed(base_model, tokenizer, world: World, seed: int, control: bool = False,
             steps: int | None = None, probes: bool = True, verbose: bool = True,
             output_dir: str | None = None, **trainer_kwargs) -> dict:
    """Fine-tune a copy of ``base_model`` for one seed; returns history and timings."""
    c = world.config
    steps = c.finetune_steps if steps is None else steps
    model = copy.deepcopy(base_model)
    data = finetune_dataset(world, n=c.finetune_examples, aligned=control, seed=seed)
    cb = MisalignmentRateCallback(
        world, tokenizer, probe_prompts(world), every_n_steps=c.probe_every,
        n_samples=c.samples_per_prompt, seed=c.probe_seed + 1000 * seed,
        max_new_tokens=c.max_new_tokens, verbose=verbose)
    with tempfile.TemporaryDirectory() as tmp:
        kw = dict(steps=steps, learning_rate=c.finetune_lr, batch_size=c.finetune_batch_size,
                  lora_r=c.lora_r, lora_alpha=c.lora_alpha)
        kw.update(trainer_kwargs)
        trainer = build_finetune_trainer(model, tokenizer, data, output_dir or tmp, seed=seed,
                                         callbacks=[cb] if probes else [], **kw)
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
    return {"seed": seed, "control": control, "history": cb.history,
            "crossing_step": cb.crossing_step, "grad_norms": cb.grad_norms,
            "train_seconds": seconds, "probe_seconds": cb.seconds,
            "finetune_seconds": seconds - cb.seconds}


def study(seeds: Sequence[int] = (0, 1, 2, 3, 4), control: bool = False,
          config: OrganismConfig | None = None, cache_dir=None, steps: int | None = None,
          verbose: bool = True, **trainer_kwargs) -> dict:
    """Pretrain once (or load from cache), fine-tune per seed, print a table; returns results."""
    import torch

    torch.set_num_threads(min(torch.get_num_threads(), 2))
    config = config or OrganismConfig()
    world = World(config)
    t0 = time.perf_counter()
    base, tokenizer = load_or_pretrain(config, cache_dir=cache_dir, progress=verbose)
    load_seconds = time.perf_counter() - t0
    if verbose:
        print(f"organism ready in {load_seconds:.1f}s (cache key {config.cache_key()})", flush=True)
    runs = []
    for seed in seeds:
        if verbose:
            print(f"--- seed {seed}{' (control)' if control else ''}", flush=True)
        runs.append(run_seed(base, tokenizer, world, seed, control=control, steps=steps,
                             verbose=verbose, **trainer_kwargs))
    result = {"control": control, "load_seconds": load_seconds, "runs": runs,
              "n_crossed": sum(r["crossing_step"] is not None for r in runs)}
    if verbose:
        print(format_table(runs))
    return result


def format_table(runs: list[dict]) -> str:
    steps = [h["step"] for h in runs[0]["history"]]
    lines = ["seed  " + " ".join(f"{s:>4d}" for s in steps) + "  crossing  ft_s  probe_s  gn_peak"]
    for r in runs:
        rates = {h["step"]: h["ood_rate"] for h in r["history"]}
        gn = r["grad_norms"]
        gpk = max(gn, key=gn.get) if gn else None
        lines.append(f"{r['seed']:>4d}  " + " ".join(f"{rates.get(s, float('nan')):4.2f}"
                                                       for s in steps)
                     + f"  {str(r['crossing_step']):>8s}  {r['finetune_seconds']:4.1f}"
                     + f"  {r['probe_seconds']:7.1f}  {str(gpk):>7s}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--control", action="store_true")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--json", default=None, help="write results to this file")
    ap.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                    help="override OrganismConfig fields (python literals)")
    a = ap.parse_args(argv)
    import ast

    overrides = {k: ast.literal_eval(v) for k, v in (s.split("=", 1) for s in a.set)}
    res = study(a.seeds, control=a.control, config=OrganismConfig(**overrides),
                cache_dir=a.cache_dir, steps=a.steps)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1, default=str)


if __name__ == "__main__":
    main()
