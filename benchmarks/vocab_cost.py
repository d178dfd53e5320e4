"""Probe cost at a real vocabulary size: a Qwen2-shaped model with Qwen2.5's 151,936-token
vocabulary (GQA, tied embeddings; 2 layers x 64 dims so it runs on a CPU; tests/arch_models.py).

One probe's work, 8 prompts (em-first-plot, Qwen chat template) x 16 samples x 64 new tokens,
side by side in one process, variants interleaved round by round:

  generate (plain)        ``model.generate`` on the same left-padded batches of 64 rows, the same
                          unwarped sampling config, nothing else: the floor of sampling
  generate_samples        ours, as the engine calls it (``with_logprobs=True``: the sampler's own
                          log-probs, ``own_logprobs="generation"``); and with ``with_logprobs=False``
  forward (plain)         ``model(input_ids, attention_mask).logits`` over the same 128 prompt +
                          completion rows, right-padded, in batches of ``--tf-batch`` rows: one
                          teacher-forced pass, the logits alone, nothing read from them
  sequence_logprobs       ours: every sample's exact log-prob (one teacher-forced pass)

A randomly initialised model almost never samples EOS, so every sample runs to 64 tokens.
Peak memory of each scoring variant is measured in a fresh child process (the peak resident
set above the loaded model and rows, sampled every 2 ms from /proc/self/statm).

    python benchmarks/vocab_cost.py [--rounds 1] [--samples 16] [--no-memory] [--dtypes float32,bfloat16]
                                    [--baseline OLD_SAMPLING.py] [--skip-generate]

``--baseline FILE`` also times (and measures the memory of) the ``sequence_logprobs`` of another
version of ``em_callbacks/sampling.py``, side by side with the current one, e.g.
``git show HEAD:em_callbacks/sampling.py > /tmp/old_sampling.py``. ``--skip-generate`` scores
random 64-token completions instead of sampling (the scoring figures only, in a minute or two).

``--dtypes`` adds the scoring of a bfloat16 copy of the model: in its own dtype and with
``scoring_dtype="float32"`` (exact float32 forward; issue #12 item 1). This CPU has no bf16
matrix units (AVX2 only), so bf16 timings here say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

from _common import machine_header, median, probe_prompt_ids, quiet, set_threads  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

NEW = 64
GEN_BATCH = 64


def build(dtype: str = "float32"):
    import arch_models

    tok = arch_models.tokenizer(arch_models.QWEN2)
    model = arch_models.model(arch_models.QWEN2, tok, seed=0, attention_dropout=0.0).eval()
    if dtype != "float32":
        model = model.to(getattr(torch, dtype))
    return model, tok


def rows_for(prompt_ids, samples: int, completions=None, seed: int = 0):
    rows = [p for p in prompt_ids for _ in range(samples)]
    if completions is None:  # memory children: random completions of the full length
        g = torch.Generator().manual_seed(seed)
        completions = torch.randint(1000, 150_000, (len(rows), NEW), generator=g).tolist()
    return rows, completions


def plain_generate(model, prompt_ids, samples, pad, eos, seed=0):
    from em_callbacks.sampling import _left_pad, _neutral_model_generation_configs, _unwarped_generation_config

    rows = [p for p in prompt_ids for _ in range(samples)]
    config = _unwarped_generation_config(model, NEW, pad, eos)
    torch.manual_seed(seed)
    out = []
    for i in range(0, len(rows), GEN_BATCH):
        ids, mask = _left_pad(rows[i:i + GEN_BATCH], pad, torch.device("cpu"))
        with _neutral_model_generation_configs(model):
            seq = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        out.append(seq[:, ids.shape[1]:])
    return out


@torch.no_grad()
def plain_forward(model, rows, completions, pad, batch: int):
    """One teacher-forced pass over right-padded rows: the model's logits, nothing more."""
    full = [list(r) + list(c) for r, c in zip(rows, completions)]
    for i in range(0, len(full), batch):
        chunk = full[i:i + batch]
        width = max(len(r) for r in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, r in enumerate(chunk):
            ids[j, :len(r)] = torch.tensor(r)
            mask[j, :len(r)] = 1
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        del logits


@functools.lru_cache(maxsize=None)
def baseline_scorer(path: str):
    """``sequence_logprobs`` of another version of em_callbacks/sampling.py (loaded standalone)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("baseline_sampling", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module.sequence_logprobs


def score(model, rows, completions, pad, scoring_dtype=None, baseline: str | None = None):
    if baseline:
        return baseline_scorer(baseline)(model, rows, completions, pad, batch_size=GEN_BATCH)
    from em_callbacks.sampling import sequence_logprobs

    kwargs = {}
    if scoring_dtype is not None and "scoring_dtype" in inspect.signature(sequence_logprobs).parameters:
        kwargs["scoring_dtype"] = scoring_dtype
    return sequence_logprobs(model, rows, completions, pad, batch_size=GEN_BATCH, **kwargs)


class PeakRSS:
    """Peak resident set (bytes) while the block runs, above its value at entry."""

    def __enter__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.start = self._rss()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        self.delta = self.peak - self.start


def child(variant: str, dtype: str, samples: int, tf_batch: int, baseline: str | None) -> None:
    """Measure one scoring variant's peak memory in this fresh process; print JSON."""
    torch.set_num_threads(1)
    model, tok = build(dtype)
    pad = tok.pad_token_id
    prompt_ids = probe_prompt_ids(tok)
    rows, completions = rows_for(prompt_ids, samples)
    with PeakRSS() as mem:
        if variant == "forward":
            plain_forward(model, rows, completions, pad, tf_batch)
        elif variant == "score-baseline":
            score(model, rows, completions, pad, baseline=baseline)
        elif variant == "score-float32":
            score(model, rows, completions, pad, scoring_dtype="float32")
        else:
            score(model, rows, completions, pad, scoring_dtype="model")
    print(json.dumps({"peak_mib": mem.delta / 2**20}))


def child_memory(variant: str, dtype: str, samples: int, tf_batch: int, baseline: str | None) -> float | None:
    cmd = [sys.executable, __file__, "--child", variant, "--child-dtype", dtype, "--samples", str(samples),
           "--tf-batch", str(tf_batch)] + (["--baseline", baseline] if baseline else [])
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    for line in res.stdout.splitlines()[::-1]:
        if line.startswith("{"):
            return json.loads(line)["peak_mib"]
    print(res.stderr[-2000:])
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--tf-batch", type=int, default=16, help="rows per plain teacher-forced forward")
    ap.add_argument("--dtypes", default="float32", help="comma-separated model dtypes for the scoring variants")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--baseline", default=None, help="another sampling.py whose sequence_logprobs to time beside ours")
    ap.add_argument("--skip-generate", action="store_true", help="score random completions; no sampling")
    ap.add_argument("--threads", default="1")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-dtype", default="float32", help=argparse.SUPPRESS)
    opts = ap.parse_args()
    if opts.child:
        with quiet():
            child(opts.child, opts.child_dtype, opts.samples, opts.tf_batch, opts.baseline)
        return

    threads = set_threads(opts.threads)
    print(machine_header("vocab_cost: one probe at a 151,936-token vocabulary"))
    print(f"torch threads: {threads}")
    from em_callbacks.sampling import generate_samples, prepare_tokenizer, preserved_state

    dtypes = opts.dtypes.split(",")
    models = {d: build(d) for d in dtypes}
    model, tok = models["float32"] if "float32" in models else models[dtypes[0]]
    pad, eos = prepare_tokenizer(tok)
    prompt_ids = probe_prompt_ids(tok)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: Qwen2ForCausalLM, vocab {model.config.vocab_size:,}, hidden {model.config.hidden_size}, "
          f"{model.config.num_hidden_layers} layers, {model.config.num_attention_heads} heads / "
          f"{model.config.num_key_value_heads} KV heads, {n_params / 1e6:.1f}M parameters "
          f"({model.get_output_embeddings().weight.numel() / n_params:.0%} in the tied embedding)")
    print(f"probe: {len(prompt_ids)} prompts (lengths {min(map(len, prompt_ids))}-{max(map(len, prompt_ids))} "
          f"tokens) x {opts.samples} samples x {NEW} new tokens, generate batches of {GEN_BATCH}")

    times: dict[str, list[float]] = {}

    def timed(label, fn):
        t0 = time.perf_counter()
        out = fn()
        times.setdefault(label, []).append(time.perf_counter() - t0)
        return out

    samples = comps = None
    checks: list[str] = []
    for r in range(opts.rounds):
        if not opts.skip_generate:
            with quiet():
                timed("generate (plain)", lambda: plain_generate(model, prompt_ids, opts.samples, pad, eos, seed=r))
                has_lp = "with_logprobs" in inspect.signature(generate_samples).parameters

                def ours(with_logprobs):
                    with preserved_state(model, tok):
                        extra = {"with_logprobs": with_logprobs} if has_lp else {}
                        return generate_samples(model, prompt_ids, opts.samples, NEW, pad, eos, seed=r,
                                                batch_size=GEN_BATCH, decode=lambda ids: tok.decode(ids), **extra)

                samples = timed("generate_samples (with_logprobs)" if has_lp else "generate_samples",
                                lambda: ours(True))
                if has_lp:
                    timed("generate_samples (no logprobs)", lambda: ours(False))
            rows = [prompt_ids[p] for p in samples.prompt_index]
            comps = samples.completion_ids
        else:
            rows, comps = rows_for(prompt_ids, opts.samples, seed=r)
        lp = {}
        with quiet():
            for d in dtypes:
                m = models[d][0]
                timed(f"forward (plain) [{d}]", lambda: plain_forward(m, rows, comps, pad, opts.tf_batch))
                if opts.baseline:
                    lp[d, "baseline"] = timed(f"sequence_logprobs, baseline [{d}]",
                                              lambda: score(m, rows, comps, pad, baseline=opts.baseline))
                if d == "float32":
                    lp[d, "model"] = timed(f"sequence_logprobs [{d}]", lambda: score(m, rows, comps, pad))
                else:
                    lp[d, "model"] = timed(f"sequence_logprobs [{d}, scoring_dtype=model]",
                                           lambda: score(m, rows, comps, pad, scoring_dtype="model"))
                    lp[d, "float32"] = timed(f"sequence_logprobs [{d}, scoring_dtype=float32]",
                                             lambda: score(m, rows, comps, pad, scoring_dtype="float32"))
        ref = lp.get(("float32", "model"))
        if samples is not None and samples.logp is not None and ref is not None:
            checks.append(f"round {r}: the sampler's own log-probs vs sequence_logprobs: max |diff| "
                          f"{np.max(np.abs(samples.logp - ref)):.2e}")
        for (d, kind), values in lp.items():
            if kind == "baseline":
                checks.append(f"round {r}: [{d}] ours vs baseline sequence_logprobs: max |diff| "
                              f"{np.max(np.abs(values - lp[d, 'model'])):.2e}")
        if ref is not None and ("bfloat16", "model") in lp:
            checks.append(f"round {r}: bfloat16 copy: mean |logp - float32 model's| in its own dtype "
                          f"{np.mean(np.abs(lp['bfloat16', 'model'] - ref)):.4f}, with scoring_dtype=float32 "
                          f"{np.mean(np.abs(lp['bfloat16', 'float32'] - ref)):.4f} (its rounded weights are "
                          "a slightly different model)")

    n_tokens = sum(map(len, comps))
    print(f"\nwall seconds, median of {opts.rounds} round(s), {len(comps)} samples ({n_tokens} completion tokens"
          f"{', random' if opts.skip_generate else ''}):")
    for label, xs in times.items():
        print(f"  {label:52s} {median(xs):7.2f} s")
    if "generate (plain)" in times:
        gen = median(times["generate (plain)"])
        for label in times:
            if label.startswith("generate_samples"):
                print(f"  {label} / generate (plain) = {median(times[label]) / gen:.2f}")
    for d in dtypes:
        fwd = median(times[f"forward (plain) [{d}]"])
        for label in times:
            if label.startswith("sequence_logprobs") and f"[{d}" in label:
                print(f"  {label} / forward (plain) [{d}] = {median(times[label]) / fwd:.2f}")
    for line in checks:
        print(line)

    if not opts.no_memory:
        print(f"\npeak resident memory above the loaded model (fresh process each, {opts.samples * len(prompt_ids)} "
              f"rows of {NEW} random completion tokens):")
        for d in dtypes:
            variants = ["forward"] + (["score-baseline"] if opts.baseline else []) + ["score-model"]
            variants += ["score-float32"] if d != "float32" else []
            for v in variants:
                mib = child_memory(v, d, opts.samples, opts.tf_batch, opts.baseline)
                label = {"forward": f"forward (plain), batches of {opts.tf_batch}",
                         "score-baseline": "sequence_logprobs, baseline",
                         "score-model": "sequence_logprobs" + (", scoring_dtype=model" if d != "float32" else ""),
                         "score-float32": "sequence_logprobs, scoring_dtype=float32"}[v]
                print(f"  [{d}] {label:52s} {mib:8.0f} MiB" if mib is not None else f"  [{d}] {label}: failed")
    print("load average at end: " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
