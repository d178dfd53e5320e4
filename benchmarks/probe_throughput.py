"""Throughput of one probe's sampling + scoring pass against the usual ways of sampling.

8 prompts (em-first-plot) x 16 samples x 64 new tokens from the benchmark GPT-2 (4 x 256,
vocab 8192), unwarped sampling, in one process, variants interleaved round by round:

  ours@B        ``generate_samples`` (left-padded batches of B rows, B = 64 or 128) + one
                ``sequence_logprobs`` pass (each sample's exact log-prob), as the callback
                calls them (inside ``preserved_state``, texts decoded)
  floor         ONE ``model.generate`` call for all 128 sequences, no scoring, no decoding
  per-prompt    a loop over prompts, one ``generate`` per prompt with num_return_sequences=16
                (already batched per prompt) + scoring of those 16
  per-sample    a loop over prompts and samples, one ``generate`` per sample + scoring of it
                (the way completion-logging callbacks often do it); expensive, so timed on
                ``--per-sample-prompts`` prompts and scaled to 8 (said so in the output)

Targets: ours within 1.3x of the floor; ours >= 5x faster than the per-prompt loop.
Usage: python benchmarks/probe_throughput.py [--quick] [--rounds N]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    LoadSampler,
    build_model,
    build_tokenizer,
    machine_header,
    median,
    probe_prompt_ids,
    quiet,
    set_threads,
    spread,
)

import torch  # noqa: E402

from em_callbacks.sampling import (  # noqa: E402
    _left_pad,
    _neutral_model_generation_configs,
    _trim_completion,
    _unwarped_generation_config,
    generate_samples,
    preserved_state,
    sequence_logprobs,
)

SAMPLES, NEW = 16, 64


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 round, per-sample loop on 1 prompt")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3, quick 1)")
    ap.add_argument("--per-sample-prompts", type=int, default=None,
                    help="prompts the per-sample loop is timed on (default 2, quick 1); scaled to 8")
    ap.add_argument("--per-sample-rounds", type=int, default=1, help="rounds that include the per-sample loop")
    ap.add_argument("--threads", default="auto")
    args = ap.parse_args()
    rounds = args.rounds or (1 if args.quick else 3)
    ps_prompts = args.per_sample_prompts or (1 if args.quick else 2)
    threads = set_threads(args.threads)
    print(machine_header("probe_throughput: sampling + scoring pass vs per-prompt / per-sample loops"))
    print(f"torch threads: {threads}")

    with quiet():
        tok = build_tokenizer()
        model = build_model(tok)
    model.eval()
    prompts = probe_prompt_ids(tok)
    pad, eos = tok.pad_token_id, tok.eos_token_id
    n_prompts = len(prompts)
    print(f"{n_prompts} prompts ({min(map(len, prompts))}-{max(map(len, prompts))} prompt tokens) x {SAMPLES} samples "
          f"x {NEW} new tokens; model {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    config = _unwarped_generation_config(model, NEW, pad, eos)
    config_per_prompt = copy.deepcopy(config)
    config_per_prompt.num_return_sequences = SAMPLES
    tokens: dict[str, list[int]] = {}

    def ours(batch: int):
        def run():
            with preserved_state(model, tok):
                s = generate_samples(model, prompts, SAMPLES, NEW, pad, eos, seed=1, batch_size=batch, decode=decode)
                sequence_logprobs(model, [prompts[p] for p in s.prompt_index], s.completion_ids, pad,
                                  batch_size=batch)
            tokens[f"ours@{batch}"] = [len(c) for c in s.completion_ids]
        return run

    @torch.no_grad()
    def floor():
        torch.manual_seed(1)
        ids, mask = _left_pad([p for p in prompts for _ in range(SAMPLES)], pad, torch.device("cpu"))
        with _neutral_model_generation_configs(model):
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        tokens["floor"] = [len(_trim_completion(r, eos, pad)[0]) for r in out[:, ids.shape[1]:].tolist()]

    @torch.no_grad()
    def per_prompt():
        torch.manual_seed(1)
        lengths = []
        for p in prompts:
            ids = torch.tensor([p])
            with _neutral_model_generation_configs(model):
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                     generation_config=config_per_prompt)
            comps = [_trim_completion(r, eos, pad)[0] for r in out[:, ids.shape[1]:].tolist()]
            [decode(c) for c in comps]
            sequence_logprobs(model, [p] * SAMPLES, comps, pad, batch_size=SAMPLES)
            lengths += [len(c) for c in comps]
        tokens["per-prompt"] = lengths

    @torch.no_grad()
    def per_sample():
        torch.manual_seed(1)
        lengths = []
        for p in prompts[:ps_prompts]:
            ids = torch.tensor([p])
            for _ in range(SAMPLES):
                with _neutral_model_generation_configs(model):
                    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
                comp = _trim_completion(out[0, ids.shape[1]:].tolist(), eos, pad)[0]
                decode(comp)
                sequence_logprobs(model, [p], [comp], pad, batch_size=1)
                lengths.append(len(comp))
        tokens["per-sample"] = lengths

    variants = {"ours@64": ours(64), "ours@128": ours(128), "floor": floor, "per-prompt": per_prompt}
    times: dict[str, list[float]] = {k: [] for k in list(variants) + ["per-sample"]}
    cpu: dict[str, list[float]] = {k: [] for k in times}  # process CPU time: stable under load
    with LoadSampler() as load, quiet():
        # warm-up (untimed): one small generate + score, so no variant pays first-call costs
        generate_samples(model, prompts[:1], 2, 4, pad, eos, seed=0, batch_size=2)
        names = list(variants)
        for r in range(rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            if r < args.per_sample_rounds:
                order = order[:2] + ["per-sample"] + order[2:]
            for name in order:
                fn = per_sample if name == "per-sample" else variants[name]
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                dt, dc = time.perf_counter() - t0, time.process_time() - c0
                if name == "per-sample":
                    dt *= n_prompts / ps_prompts
                    dc *= n_prompts / ps_prompts
                times[name].append(dt)
                cpu[name].append(dc)
                print(f"  round {r + 1}/{rounds} {name:<11} wall {dt:8.2f} s  CPU {dc:8.2f} s"
                      f"{' (scaled)' if name == 'per-sample' else ''}  load {os.getloadavg()[0]:.2f}", flush=True)

    for clock, table in (("wall", times), ("CPU", cpu)):
        print(f"\n[{clock} time] seconds for {n_prompts} x {SAMPLES} samples (median [min..max] over rounds):")
        for name, ts in table.items():
            mean_tok = sum(tokens.get(name, [0])) / max(1, len(tokens.get(name, [])))
            note = (f"  (timed on {ps_prompts} prompt(s) x {SAMPLES}, scaled x{n_prompts / ps_prompts:g})"
                    if name == "per-sample" else "")
            print(f"  {name:<11} {spread(ts)}   mean new tokens/sample {mean_tok:.1f}{note}")
        fl, pp, ps = median(table["floor"]), median(table["per-prompt"]), median(table["per-sample"])
        for b in (64, 128):
            o = median(table[f"ours@{b}"])
            paired_floor = [x / y for x, y in zip(table[f"ours@{b}"], table["floor"])]
            paired_pp = [y / x for x, y in zip(table[f"ours@{b}"], table["per-prompt"])]
            print(f"  ours@{b}: {o / fl:.2f}x the single-batch floor (paired per round {spread(paired_floor)}; "
                  f"target <= 1.3x: {'MET' if o / fl <= 1.3 else 'MISSED'}); per-prompt loop {pp / o:.2f}x slower "
                  f"(paired {spread(paired_pp)}; target >= 5x: {'MET' if pp / o >= 5 else 'MISSED'}); "
                  f"per-sample loop {ps / o:.1f}x slower")
        print(f"  the scoring pass + decoding on top of generation: ours@64 - floor = "
              f"{median(table['ours@64']) - fl:.1f} s ({median(table['ours@64']) / fl - 1:+.0%})")
    print("\n" + load.summary())


if __name__ == "__main__":
    main()
