"""Numerically honest scoring on the organism: what a bf16 model does to D, what must run in
float32 to undo it, what that costs, and whether D's reported numerical floor is honest.

Part 1, two nearby checkpoints (issue #12 item 1's measurement): the organism's LoRA fine-tune in
float32, adapters taken at steps ``--ckpts`` (default 10 and 12). Samples are drawn from the
float32 model at the later one (``--samples`` per prompt), then scored under both checkpoints
with the same batch layout by the same weights held in bf16 (base rounded to bf16, adapter
float32, as PEFT keeps it), computing in:

  bf16 (model dtype)          the model as it is (log-softmax in float32, as always)
  float32 head                only the LM head (and the log-softmax) in float32
  float32 ln_f + head         the final layer norm and the head
  float32 last block + head   the last transformer block, ln_f and the head
  float32 all blocks          everything after the embedding sum
  float32 whole forward       ``scoring_dtype="float32"``: every operation (em_callbacks.precision)

For each: mean |log p - exact| of a sample (exact = the whole forward in float32, which equals a
float32 copy of the rounded weights bit for bit), the one-sided TV between the checkpoints with
its standard error, the TV between that variant and the exact scoring of the same samples under
the same weights (what rounding alone reads), and the time of one scoring pass. The float32
model itself (unrounded weights) is the reference the TV should match.

Part 2, runs of the callback (``--steps`` optimizer steps, a probe every 2): the float32
organism; the same organism with its base in bf16 and the adapter in float32, scored with
``scoring_dtype="float32"`` (default) and ``"model"``. The two bf16 runs train identically (the
callback leaves the run as it found it) and sample identically: they differ only in the
numerics of scoring. Printed: D/tv per probe, the baseline (mean of the first ``--baseline``
D values) and its ratio to the float32 run's, the numerical floor each run reported, and the
mean probe time.

    python benchmarks/precision.py [--steps 12] [--samples 32] [--ckpts 10 12] [--seed 0]   # ~4 min here
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from _common import machine_header, quiet  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402


# ----------------------------------------------------------------------------- partial float32
@contextlib.contextmanager
def float32_from(model, first_module):
    """Every operation from ``first_module``'s forward to the end of the LM head's in float32 (the
    same exact upcast as ``scoring_dtype="float32"``, switched on by hooks mid-forward)."""
    from em_callbacks.precision import _Upcast

    head = model.get_output_embeddings()
    mode = _Upcast(torch.float32, "cpu")
    active = []

    def enter(*_):
        if not active:
            mode.__enter__()
            active.append(True)

    def leave(*_):
        if active:
            active.pop()
            mode.__exit__(None, None, None)

    hooks = [first_module.register_forward_pre_hook(enter), head.register_forward_hook(leave)]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
        leave()


def variants(model):
    """name -> context manager factory for one scoring pass of the PEFT-wrapped GPT-2 organism."""
    from em_callbacks.precision import computed_in

    gpt2 = model.get_base_model()
    blocks, ln_f, head = gpt2.transformer.h, gpt2.transformer.ln_f, gpt2.get_output_embeddings()
    return {
        "bf16 (model dtype)": contextlib.nullcontext,
        "float32 head": lambda: float32_from(gpt2, head),
        "float32 ln_f + head": lambda: float32_from(gpt2, ln_f),
        "float32 last block + head": lambda: float32_from(gpt2, blocks[-1]),
        "float32 all blocks": lambda: float32_from(gpt2, blocks[0]),
        "float32 whole forward": lambda: computed_in(torch.float32, "cpu"),
    }


# ----------------------------------------------------------------------------- helpers
def organism_peft(config, dtype):
    """A fresh organism with the demo's LoRA (rank 1, all linear layers) around it; its base in
    ``dtype``, the adapter float32 (PEFT upcasts a bf16 adapter)."""
    import peft

    from em_callbacks.organism import load_or_pretrain
    from em_callbacks.organism.finetune import lora_config

    base, tok = load_or_pretrain(config, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(base.to(dtype), lora_config(config.lora_r, config.lora_alpha))
    return model.eval(), tok


def load_adapter(model, adapter):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in adapter:
                p.copy_(adapter[name].to(p.dtype))


def run(kind, opts, work, capture_steps=()):
    """One organism fine-tune with the callback; returns (store, adapters captured at steps)."""
    from transformers import TrainerCallback

    from em_callbacks import PhaseTransitionCallback
    from em_callbacks.organism import OrganismConfig, World, build_finetune_trainer, finetune_dataset, load_or_pretrain
    from em_callbacks.organism import probe_set
    from em_callbacks.store import RunStore

    config = OrganismConfig()
    world = World(config)
    model, tok = load_or_pretrain(config, progress=False)
    if kind != "float32":
        model = model.to(torch.bfloat16)
    adapters = {}

    class Capture(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step in capture_steps:
                adapters[state.global_step] = {n: p.detach().clone() for n, p in model.named_parameters()
                                               if p.requires_grad}

    slug = "".join(c if c.isalnum() else "-" for c in kind)
    cb = PhaseTransitionCallback(
        probes=probe_set(world), every_n_steps=config.probe_every, samples_per_prompt=config.samples_per_prompt,
        max_new_tokens=config.max_new_tokens, seed=opts.seed, batch_size=256, output_dir=work / slug,
        scoring_dtype="model" if kind == "bf16, scoring_dtype=model" else "float32", log_samples_table=False,
    )
    trainer = build_finetune_trainer(model, tok, finetune_dataset(world), work / f"trainer-{slug}",
                                     seed=opts.seed, steps=opts.steps, callbacks=[cb, Capture()])
    lora = sorted({str(p.dtype).replace("torch.", "") for n, p in trainer.model.named_parameters() if "lora_" in n})
    base = sorted({str(p.dtype).replace("torch.", "") for n, p in trainer.model.named_parameters() if "lora_" not in n})
    t0 = time.perf_counter()
    trainer.train()
    return RunStore(work / slug, readonly=True), adapters, time.perf_counter() - t0, base, lora


def one_sided(p_on_p, q_on_p):
    from em_callbacks.divergence import one_sided_tv

    return one_sided_tv(p_on_p, q_on_p)


# ----------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--samples", type=int, default=32, help="samples per prompt in part 1")
    ap.add_argument("--ckpts", type=int, nargs=2, default=(10, 12))
    ap.add_argument("--baseline", type=int, default=3, help="D values that form the baseline (the detector's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    opts = ap.parse_args()
    torch.set_num_threads(opts.threads)
    os.environ.setdefault("WANDB_MODE", "disabled")
    print(machine_header("precision: bf16 scoring vs float32 scoring on the organism"))

    from em_callbacks.organism import OrganismConfig, World, probe_set
    from em_callbacks.probes import render_prompt
    from em_callbacks.sampling import encode_prompts, generate_samples, prepare_tokenizer, sequence_logprobs

    work = Path(tempfile.mkdtemp(prefix="precision-"))
    config = OrganismConfig()
    a, b = opts.ckpts
    with quiet():
        runs = {"float32": run("float32", opts, work, capture_steps=(a, b))}

    # ------------------------------------------------------------------ part 1
    adapters = runs["float32"][1]
    m32, tok = organism_peft(config, torch.float32)
    m16, _ = organism_peft(config, torch.bfloat16)
    pad, eos = prepare_tokenizer(tok)
    probes = probe_set(World(config))
    prompts = encode_prompts(tok, [render_prompt(tok, p) for p in probes], True)
    load_adapter(m32, adapters[b])
    with quiet():
        samples = generate_samples(m32, prompts, opts.samples, config.max_new_tokens, pad, eos, seed=opts.seed,
                                   batch_size=256)
    rows = [prompts[p] for p in samples.prompt_index]
    comps = samples.completion_ids
    n_tok = sum(map(len, comps))
    print(f"\n== part 1: checkpoints at steps {a} and {b} of the float32 LoRA fine-tune; {len(comps)} samples "
          f"({len(prompts)} prompts x {opts.samples}, {n_tok / len(comps):.1f} tokens on average) drawn in float32 "
          f"at step {b}, each scored under both checkpoints (same batch layout)")

    def score(model, adapter, ctx=contextlib.nullcontext, **kw):
        load_adapter(model, adapter)
        with ctx():
            return sequence_logprobs(model, rows, comps, pad, **{"batch_size": 256, **kw})

    ref = {k: score(m32, adapters[k]) for k in (a, b)}
    tv_ref = one_sided(ref[b], ref[a])
    results = {}
    for name, ctx in variants(m16).items():
        t0 = time.perf_counter()
        lp = {k: score(m16, adapters[k], ctx) for k in (a, b)}
        results[name] = (lp, (time.perf_counter() - t0) / 2)
    exact = results["float32 whole forward"][0]
    layout = score(m16, adapters[b], batch_size=1, scoring_dtype=torch.float32)  # another batch layout
    print(f"{'scoring of the bf16-base model':28s} {'mean|dlogp|':>11s} {'TV(b->a) +- se':>18s} {'vs fp32 model':>14s} "
          f"{'rounding TV':>12s} {'s/pass':>7s}")
    for name, (lp, sec) in results.items():
        tv = one_sided(lp[b], lp[a])
        diff = np.abs(lp[b] - exact[b])
        floor = one_sided(lp[b], exact[b])
        print(f"{name:28s} {diff.mean():11.5f} {tv.value:9.4f} +- {tv.stderr:.4f} {tv.value / tv_ref.value - 1:+13.1%} "
              f"{floor.value:12.5f} {sec:7.2f}")
    print(f"{'float32 model (unrounded)':28s} {'':11s} {tv_ref.value:9.4f} +- {tv_ref.stderr:.4f}")
    tv_exact = one_sided(exact[b], exact[a])
    paired = one_sided(exact[b], exact[a]).value - tv_ref.value
    print(f"whole-forward float32 of the bf16 model vs the float32 model: TV {tv_exact.value:.4f} vs "
          f"{tv_ref.value:.4f}, difference {paired:+.4f} (stderr of either {tv_ref.stderr:.4f}): "
          f"{'within' if abs(paired) <= tv_ref.stderr else 'OUTSIDE'} its error")
    same = one_sided(exact[b], layout)
    print(f"numerical floor of the float32 scoring (one row per pass vs batches of 256, same weights): TV "
          f"{same.value:.2e}, max |dlogp| {np.abs(exact[b] - layout).max():.1e}; of bf16 scoring (vs float32): "
          f"TV {one_sided(results['bf16 (model dtype)'][0][b], exact[b]).value:.4f}")
    print("(mean |dlogp| and rounding TV: the variant vs the whole-forward float32 scoring of the same samples "
          "under the same weights)")

    # ------------------------------------------------------------------ part 2
    with quiet():
        for kind in ("bf16, scoring_dtype=float32", "bf16, scoring_dtype=model"):
            runs[kind] = run(kind, opts, work)
    print(f"\n== part 2: callback runs, {opts.steps} steps, a probe every {config.probe_every} "
          f"({len(probes)} prompts x {config.samples_per_prompt} samples x <= {config.max_new_tokens} tokens)")
    base_d = {}
    for kind, (store, _, seconds, base, lora) in runs.items():
        d = store.metric_series("D/tv")
        floor = store.metric_series("D_numerical_floor")
        probe_s = [p["seconds"] for p in store.probes() if p["seconds"] is not None]
        event = store.events("scoring_precision")
        info = event[0]["payload"] if event else {}
        base_d[kind] = float(np.mean(d["value"][: opts.baseline]))
        print(f"-- {kind}: base {'/'.join(base)}, adapter {'/'.join(lora)}; scoring computes in "
              f"{info.get('computed')} (native {info.get('native')}); train {seconds:.0f} s, "
              f"probe {np.mean(probe_s):.2f} s on average")
        print("   D/tv:      " + " ".join(f"{v:.4f}" for v in d["value"]))
        print("   stderr:    " + " ".join(f"{v:.4f}" for v in d["stderr"]))
        print("   num floor: " + " ".join(f"{v:.1e}" for v in floor["value"])
              + f"   ({floor['value'].mean():.1e} on average; reference: "
              f"{store.metrics_at(0)['D_numerical_floor']['extra']['floor_reference']})")
    ref_base = base_d["float32"]
    print(f"\nbaseline D (mean of the first {opts.baseline} D/tv values):")
    for kind, value in base_d.items():
        floor = runs[kind][0].metric_series("D_numerical_floor")["value"].mean()
        print(f"  {kind:28s} {value:.4f}  ratio to float32 {value / ref_base:.2f}"
              + ("" if kind == "float32" else f"   (difference {value - ref_base:+.4f}, reported floor {floor:.4f})"))
    ok = base_d["bf16, scoring_dtype=float32"] / ref_base
    print(f"check: bf16 model scored in float32, baseline within 1.5x of the float32 run's: {ok:.2f}x "
          f"-> {'yes' if ok <= 1.5 else 'NO'}")
    s32, s16 = runs["bf16, scoring_dtype=float32"][0], runs["bf16, scoring_dtype=model"][0]
    same_samples = all([x.token_ids for x in s32.samples(k)] == [x.token_ids for x in s16.samples(k)]
                       for k in range(len(s32.probes())))
    print(f"the two bf16 runs drew the same samples at every probe: {same_samples} (so their D differ only by "
          "the numerics of scoring)")
    print(f"(work dir {work}); load average at end: " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
