"""One command that checks the monitor at realistic size on one GPU (issue #12 item 5).

    python benchmarks/gpu_check.py [--json figures.json]     # one H200: under 5 minutes
    python benchmarks/gpu_check.py --tiny [--json f.json]    # CPU smoke of the same code, < 1 min

Nothing is downloaded: models are built from their configs with random weights, the tokenizer
is a local WordLevel vocabulary as large as the model's (``benchmarks/_common.build_tokenizer``).

What runs (full size):

1. **Overhead.** A Qwen2.5-0.5B-shaped model (``Qwen2Config``: hidden 896, 24 layers, 14 heads,
   2 KV heads, intermediate 4864, vocab 151,936, tied embeddings; 494M parameters) in bf16 with
   a LoRA adapter (r=16 on every projection), fine-tuned by ``transformers.Trainer`` (bf16) on
   random tokens, 16 x 512 per step, ``--steps`` steps (200). Run A without the callback, run B
   with it (probes every 25 steps: 8 prompts x 16 samples x 128 new tokens, one generate batch),
   same process, after an untimed warm-up run. Prints the overhead end to end and by interval
   accounting (median probe / (25 x median step)), peak GPU memory of both runs and what a
   probe adds above the resident memory.
2. **Floor.** On B's trained model: one plain ``generate`` of the same 128 rows plus one
   teacher-forced scoring pass of those samples, against the callback's median probe (a LoRA
   probe draws with its own log-probs, then scores twice: the previous samples under the
   current weights and the new samples under the previous snapshot).
3. **D's numerical noise floor in bf16.** The same samples scored by functions that should
   agree: generation's own log-probs vs bf16 teacher forcing, bf16 teacher forcing in batches
   vs one row at a time, bf16 vs float32 weights. Each as the one-sided TV it would read as D
   (identical weights: the true D is 0), with its stderr and the spread sigma of the per-sample
   log-prob differences (nats).
4. **7B memory.** One probe (generation plus one teacher-forced pass,
   ``own_logprobs="teacher-forcing"``) on a Qwen2.5-7B-shaped model (hidden 3584, 28 layers,
   28 heads, 4 KV heads, intermediate 18944, vocab 152,064; 7.6B parameters) in bf16: weights,
   peak and the probe's extra memory, seconds.

``--tiny`` shrinks every size (tiny widths, a few steps, 2 prompts x 2 samples x 8 tokens) and
runs on the CPU; tests/test_gpu_check.py runs it so the script cannot rot. Figures print as
``figure <key> = <value> <unit>  (<what>)`` lines and go to ``--json`` as
``{"figures": {key: value}, "units": ..., "meta": ...}``; GPU-memory figures are null on the CPU.
The exit status is non-zero when a section failed (the others still print).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import logging
import math
import os
import platform
import sqlite3
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
for _path in (HERE, HERE.parent):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

for _key, _value in {"WANDB_MODE": "disabled", "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1",
                     "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                     "DISABLE_MLFLOW_INTEGRATION": "TRUE"}.items():
    os.environ.setdefault(_key, _value)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from _common import RandomTokens, build_tokenizer  # noqa: E402

GIB = 2**30


# ----------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool

    def config(self, tokenizer: Any):
        from transformers import Qwen2Config

        return Qwen2Config(
            hidden_size=self.hidden, num_hidden_layers=self.layers, num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads, intermediate_size=self.intermediate, vocab_size=self.vocab,
            tie_word_embeddings=self.tied, max_position_embeddings=32768, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
            bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )


QWEN_05B = Shape("Qwen2.5-0.5B-shaped", 896, 24, 14, 2, 4864, 151_936, True)
QWEN_7B = Shape("Qwen2.5-7B-shaped", 3584, 28, 28, 4, 18944, 152_064, False)
TINY_05B = Shape("tiny Qwen2 (0.5B stand-in)", 32, 2, 2, 1, 64, 512, True)
TINY_7B = Shape("tiny Qwen2 (7B stand-in)", 48, 2, 4, 2, 96, 640, False)


@dataclass(frozen=True)
class Plan:
    small: Shape
    big: Shape | None
    device: str
    steps: int
    every: int
    batch: int
    seq_len: int
    prompts: int
    samples: int
    new_tokens: int
    probe_batch: int
    lora_r: int
    warmup_steps: int
    floor_repeats: int


FULL = Plan(QWEN_05B, QWEN_7B, "cuda", steps=200, every=25, batch=16, seq_len=512, prompts=8, samples=16,
            new_tokens=128, probe_batch=128, lora_r=16, warmup_steps=10, floor_repeats=2)
TINY = Plan(TINY_05B, TINY_7B, "cpu", steps=6, every=2, batch=2, seq_len=32, prompts=2, samples=2, new_tokens=8,
            probe_batch=4, lora_r=4, warmup_steps=3, floor_repeats=1)

# every figure the script prints (tests/test_gpu_check.py checks they all appear)
FIGURE_KEYS = (
    "small_params_m", "train_steps",
    "train_s_without", "train_s_with", "overhead_pct",
    "step_s_median_without", "step_s_median_with", "step_slowdown_pct",
    "probes", "probe_s_first", "probe_s_median", "overhead_interval_pct",
    "peak_gib_without", "peak_gib_with", "probe_extra_gib",
    "floor_generate_s", "floor_score_s", "floor_s", "probe_over_floor",
    "noise_tv_gen_vs_tf_bf16", "noise_tv_gen_vs_tf_bf16_stderr", "noise_sigma_gen_vs_tf_bf16",
    "noise_tv_batch_vs_row_bf16", "noise_tv_batch_vs_row_bf16_stderr", "noise_sigma_batch_vs_row_bf16",
    "noise_tv_bf16_vs_fp32", "noise_tv_bf16_vs_fp32_stderr", "noise_sigma_bf16_vs_fp32",
    "big_params_b", "big_build_s", "big_weights_gib", "big_probe_s", "big_probe_peak_gib", "big_probe_extra_gib",
    "total_s",
)


# ----------------------------------------------------------------------------- figures
class Figures:
    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        self.units: dict[str, str] = {}
        self.failed: list[str] = []

    def add(self, key: str, value: Any, unit: str = "", what: str = "") -> None:
        if isinstance(value, (np.floating, np.integer)):
            value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        self.values[key] = value
        self.units[key] = unit
        shown = "null" if value is None else (f"{value:.4g}" if isinstance(value, float) else str(value))
        print(f"figure {key} = {shown}{(' ' + unit) if unit else ''}" + (f"  ({what})" if what else ""), flush=True)

    @contextlib.contextmanager
    def section(self, name: str):
        print(f"\n== {name}", flush=True)
        t0 = time.perf_counter()
        try:
            yield
        except Exception:  # noqa: BLE001 - report, keep going, fail at the end
            traceback.print_exc()
            self.failed.append(name)
            print(f"!! section failed: {name}", flush=True)
        finally:
            print(f"   ({time.perf_counter() - t0:.1f} s)", flush=True)


# ----------------------------------------------------------------------------- device helpers
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def gpu_allocated(device: str) -> float | None:
    return torch.cuda.memory_allocated() / GIB if device == "cuda" else None


def gpu_peak(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / GIB if device == "cuda" else None


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def build_model(shape: Shape, tokenizer: Any, device: str, dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """Random weights from the config, created directly on ``device`` in ``dtype``."""
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2ForCausalLM._from_config(shape.config(tokenizer), dtype=dtype)
    return model


def add_lora(model: Any, r: int):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, task_type="CAUSAL_LM",
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    return get_peft_model(model, config)


def probe_rows(tokenizer: Any, plan: Plan) -> tuple[Any, list[list[int]]]:
    """The probe set (first ``plan.prompts`` of em-first-plot) and its prompt ids, as the engine renders them."""
    from em_callbacks.probes import ProbeSet, render_prompt
    from em_callbacks.sampling import encode_prompts

    full = ProbeSet.builtin("em-first-plot")
    probes = ProbeSet(full.name, tuple(full)[: plan.prompts])
    ids = encode_prompts(tokenizer, [render_prompt(tokenizer, p) for p in probes], uses_chat_template=True)
    return probes, ids


# ----------------------------------------------------------------------------- 1. overhead
class StepClock:
    """Wall time of every optimizer step (synchronised); listed before the probe callback, so
    a probe in ``on_step_end`` is not part of the step it follows."""

    def __init__(self, device: str) -> None:
        from transformers import TrainerCallback

        clock = self

        class _Clock(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                sync(clock.device)
                clock._t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                sync(clock.device)
                clock.steps.append(time.perf_counter() - clock._t0)

        self.device = device
        self.steps: list[float] = []
        self._t0 = 0.0
        self.callback = _Clock()


class ProbeMemory:
    """GPU memory a probe adds above what is resident when it starts: ``before`` runs just
    before the probe callback, ``after`` just after it, at the probe steps (and at step 0)."""

    def __init__(self, device: str, every: int) -> None:
        from transformers import TrainerCallback

        mem = self
        self.device, self.every = device, every
        self.extra: list[float] = []
        self.run_peak = 0.0
        self._base = 0.0

        def before(step: int) -> None:
            if device != "cuda" or step % every:
                return
            torch.cuda.synchronize()
            mem.run_peak = max(mem.run_peak, torch.cuda.max_memory_allocated())
            mem._base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()

        def after(step: int) -> None:
            if device != "cuda" or step % every:
                return
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            mem.extra.append((peak - mem._base) / GIB)
            mem.run_peak = max(mem.run_peak, peak)
            torch.cuda.reset_peak_memory_stats()

        class _Before(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                before(state.global_step)

            def on_step_end(self, args, state, control, **kwargs):
                before(state.global_step)

        class _After(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                after(state.global_step)

            def on_step_end(self, args, state, control, **kwargs):
                after(state.global_step)

        self.before, self.after = _Before(), _After()

    def finish(self) -> float | None:
        if self.device != "cuda":
            return None
        torch.cuda.synchronize()
        return max(self.run_peak, torch.cuda.max_memory_allocated()) / GIB


def train_once(plan: Plan, tokenizer: Any, workdir: Path, steps: int, with_callback: bool,
               keep_model: bool = False) -> dict[str, Any]:
    from transformers import PrinterCallback, Trainer, TrainingArguments, default_data_collator

    from em_callbacks import PhaseTransitionCallback

    free(plan.device)
    model = add_lora(build_model(plan.small, tokenizer, plan.device), plan.lora_r)
    data = RandomTokens(steps * plan.batch, plan.seq_len, plan.small.vocab, seed=0)
    clock = StepClock(plan.device)
    memory = ProbeMemory(plan.device, plan.every)
    callbacks: list[Any] = [clock.callback]
    cb = None
    if with_callback:
        probes, _ = probe_rows(tokenizer, plan)
        cb = PhaseTransitionCallback(
            probes=probes, every_n_steps=plan.every, samples_per_prompt=plan.samples, max_new_tokens=plan.new_tokens,
            batch_size=plan.probe_batch, output_dir=workdir / "phase_transition", report_to_wandb=False,
            log_samples_table=False,
        )
        callbacks += [memory.before, cb, memory.after]
    args = TrainingArguments(
        output_dir=str(workdir), max_steps=steps, per_device_train_batch_size=plan.batch, learning_rate=2e-4,
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0, seed=0, data_seed=0, log_level="error", bf16=True,
        use_cpu=plan.device == "cpu",
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                      data_collator=default_data_collator, callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)
    reset_peak(plan.device)
    sync(plan.device)
    t0 = time.perf_counter()
    trainer.train()
    sync(plan.device)
    seconds = time.perf_counter() - t0
    peak = memory.finish() if with_callback else gpu_peak(plan.device)
    result: dict[str, Any] = {"seconds": seconds, "steps": clock.steps, "peak_gib": peak,
                              "probe_extra_gib": memory.extra, "probe_seconds": []}
    if cb is not None and cb.run_dir is not None:
        con = sqlite3.connect(cb.run_dir / "run.sqlite")
        try:
            result["probe_seconds"] = [s for (s,) in con.execute("SELECT seconds FROM probes ORDER BY probe_index")]
        finally:
            con.close()
    if keep_model:
        result["model"] = trainer.model
    del trainer
    return result


def overhead(plan: Plan, tokenizer: Any, figures: Figures, workdir: Path) -> Any:
    train_once(plan, tokenizer, workdir / "warmup", plan.warmup_steps, with_callback=False)  # kernels, allocator
    a = train_once(plan, tokenizer, workdir / "A", plan.steps, with_callback=False)
    b = train_once(plan, tokenizer, workdir / "B", plan.steps, with_callback=True, keep_model=True)
    med = statistics.median
    figures.add("train_steps", plan.steps, "steps",
                f"batch {plan.batch} x {plan.seq_len} tokens, LoRA r={plan.lora_r}, bf16")
    figures.add("train_s_without", a["seconds"], "s", "run A: Trainer.train() without the callback")
    figures.add("train_s_with", b["seconds"], "s", f"run B: with probes every {plan.every} steps")
    figures.add("overhead_pct", 100 * (b["seconds"] / a["seconds"] - 1), "%", "end to end, B vs A, same process")
    figures.add("step_s_median_without", med(a["steps"]), "s", "optimizer step, A")
    figures.add("step_s_median_with", med(b["steps"]), "s", "optimizer step, B (probes excluded)")
    figures.add("step_slowdown_pct", 100 * (med(b["steps"]) / med(a["steps"]) - 1), "%",
                "does the callback slow the steps it watches")
    probes = b["probe_seconds"]
    later = probes[1:] or probes
    figures.add("probes", len(probes), "",
                f"{plan.prompts} prompts x {plan.samples} samples x {plan.new_tokens} new tokens")
    figures.add("probe_s_first", probes[0] if probes else None, "s",
                "step-0 probe: generation only, first-call warm-up")
    figures.add("probe_s_median", med(later) if later else None, "s", "later probes: generate + 2 scoring passes")
    figures.add("overhead_interval_pct", 100 * med(later) / (plan.every * med(b["steps"])) if later else None, "%",
                f"median probe / ({plan.every} x median step)")
    figures.add("peak_gib_without", a["peak_gib"], "GiB", "peak GPU memory allocated, A")
    figures.add("peak_gib_with", b["peak_gib"], "GiB", "peak GPU memory allocated, B")
    extra = b["probe_extra_gib"]
    figures.add("probe_extra_gib", max(extra) if extra else None, "GiB", "largest probe peak above resident memory")
    return b["model"]


# ----------------------------------------------------------------------------- 2. floor
def floor(plan: Plan, tokenizer: Any, model: Any, figures: Figures, probe_median: float | None) -> None:
    from transformers import GenerationConfig

    from em_callbacks.sampling import sequence_logprobs

    _, prompt_ids = probe_rows(tokenizer, plan)
    rows = [ids for ids in prompt_ids for _ in range(plan.samples)]
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    config = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=plan.new_tokens,
                              pad_token_id=pad, eos_token_id=eos, use_cache=True, num_beams=1)
    device = next(model.parameters()).device
    model.eval()
    gen_s, score_s = [], []
    for r in range(plan.floor_repeats):
        torch.manual_seed(r)
        completions: list[list[int]] = []
        sync(plan.device)
        t0 = time.perf_counter()
        with torch.no_grad():
            for i in range(0, len(rows), plan.probe_batch):
                batch = rows[i: i + plan.probe_batch]
                width = max(len(r) for r in batch)  # left-padded, as the sampler does
                ids = torch.tensor([[pad] * (width - len(r)) + list(r) for r in batch], device=device)
                mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in batch], device=device)
                out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
                for row in out[:, width:].tolist():  # up to and including the first EOS
                    completions.append(row[: row.index(eos) + 1] if eos in row else row)
        sync(plan.device)
        gen_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        sequence_logprobs(model, rows, completions, pad, batch_size=plan.probe_batch)
        sync(plan.device)
        score_s.append(time.perf_counter() - t0)
    g, s = min(gen_s), min(score_s)
    figures.add("floor_generate_s", g, "s", f"one plain generate of {len(rows)} rows (best of {plan.floor_repeats})")
    figures.add("floor_score_s", s, "s", "one teacher-forced scoring pass of those samples")
    figures.add("floor_s", g + s, "s", "the floor: generate + one scoring pass")
    figures.add("probe_over_floor", probe_median / (g + s) if probe_median else None, "x",
                "callback's median probe / floor")


# ----------------------------------------------------------------------------- 3. noise floor
def noise_floor(plan: Plan, tokenizer: Any, figures: Figures) -> None:
    """D between scorers that should agree (same weights): what numerical noise alone reads as D."""
    from em_callbacks.divergence import combine_prompts, one_sided_tv
    from em_callbacks.sampling import generate_samples, sequence_logprobs

    free(plan.device)
    model = build_model(plan.small, tokenizer, plan.device, torch.bfloat16, seed=1).eval()
    _, prompt_ids = probe_rows(tokenizer, plan)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    with torch.no_grad():
        samples = generate_samples(model, prompt_ids, plan.samples, plan.new_tokens, pad, eos, seed=0,
                                   batch_size=plan.probe_batch, with_logprobs=True)
        prompts = [prompt_ids[int(p)] for p in samples.prompt_index]
        tf_batch = sequence_logprobs(model, prompts, samples.completion_ids, pad, batch_size=plan.probe_batch)
        tf_row = sequence_logprobs(model, prompts, samples.completion_ids, pad, batch_size=1)
        model32 = copy.deepcopy(model).float()
        tf_fp32 = sequence_logprobs(model32, prompts, samples.completion_ids, pad, batch_size=plan.probe_batch)
    del model32, model
    free(plan.device)
    n_tokens = float(np.mean([len(c) for c in samples.completion_ids]))

    def report(key: str, p_on_p: np.ndarray, q_on_p: np.ndarray, what: str) -> None:
        per_prompt = [one_sided_tv(p_on_p[samples.prompt_index == i], q_on_p[samples.prompt_index == i])
                      for i in range(len(prompt_ids))]
        d = combine_prompts(per_prompt)
        figures.add(f"noise_tv_{key}", d.value, "", f"D read between {what} (true D = 0)")
        figures.add(f"noise_tv_{key}_stderr", d.stderr, "", f"its stderr at {len(prompt_ids)} x {plan.samples}")
        figures.add(f"noise_sigma_{key}", float(np.std(q_on_p - p_on_p)), "nats",
                    f"spread of per-sample log-prob differences ({n_tokens:.0f} tokens a sample)")

    report("gen_vs_tf_bf16", samples.logp, tf_batch, "generation's own log-probs and bf16 teacher forcing")
    report("batch_vs_row_bf16", tf_batch, tf_row,
           f"bf16 teacher forcing in batches of {plan.probe_batch} and row by row")
    report("bf16_vs_fp32", tf_fp32, tf_batch, "float32 and bf16 weights, teacher forcing")


# ----------------------------------------------------------------------------- 4. 7B probe
def big_probe(plan: Plan, figures: Figures, workdir: Path) -> None:
    from em_callbacks.engine import EngineConfig, ProbeEngine
    from em_callbacks.sampling import WeightSnapshots

    shape = plan.big
    tokenizer = build_tokenizer(vocab_size=shape.vocab)
    free(plan.device)
    reset_peak(plan.device)
    t0 = time.perf_counter()
    model = build_model(shape, tokenizer, plan.device, torch.bfloat16).eval()
    sync(plan.device)
    figures.add("big_params_b", sum(p.numel() for p in model.parameters()) / 1e9, "B params", shape.name)
    figures.add("big_build_s", time.perf_counter() - t0, "s", "random init on the device, bf16")
    weights = gpu_allocated(plan.device)
    figures.add("big_weights_gib", weights, "GiB", "resident after building")
    probes, _ = probe_rows(tokenizer, plan)
    engine = ProbeEngine(EngineConfig(probes=probes, samples_per_prompt=plan.samples, max_new_tokens=plan.new_tokens,
                                      batch_size=plan.probe_batch, own_logprobs="teacher-forcing"))
    engine.begin(tokenizer, workdir / "big", mode="one-sided")
    try:
        reset_peak(plan.device)
        t0 = time.perf_counter()
        k = engine.begin_probe(0)
        shard = engine.sample_and_score(model, k, WeightSnapshots(keep=0))
        sync(plan.device)
        seconds = time.perf_counter() - t0
        assert len(shard.scores) == plan.prompts * plan.samples, len(shard.scores)
        engine.record(k, 0, [shard], seconds)
    finally:
        engine.finish(0)
    peak = gpu_peak(plan.device)
    figures.add("big_probe_s", seconds, "s",
                f"one probe: generate + one teacher-forced pass, {plan.prompts} x {plan.samples} x {plan.new_tokens}")
    figures.add("big_probe_peak_gib", peak, "GiB", "peak GPU memory during the probe")
    figures.add("big_probe_extra_gib", None if peak is None else peak - weights, "GiB", "probe peak above the weights")
    del model
    free(plan.device)


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny shapes, a few steps, on the CPU (a smoke run)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures as JSON here")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda, cpu with --tiny)")
    p.add_argument("--steps", type=int, default=None, help="training steps per run")
    p.add_argument("--no-big", action="store_true", help="skip the 7B-shaped probe")
    opts = p.parse_args(argv)

    plan = TINY if opts.tiny else FULL
    if opts.device:
        plan = replace(plan, device=opts.device)
    if opts.steps:
        plan = replace(plan, steps=opts.steps)
    if plan.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --tiny (CPU) or on a GPU machine", file=sys.stderr)
        return 2
    if opts.no_big:
        plan = replace(plan, big=None)
    if plan.device == "cpu":
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    warnings.filterwarnings("ignore")
    logging.getLogger("em_callbacks").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()

    import transformers

    t_start = time.perf_counter()
    device_name = torch.cuda.get_device_name(0) if plan.device == "cuda" else platform.processor() or "cpu"
    meta = {"device": device_name, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "tiny": opts.tiny, "plan": asdict(plan)}
    print(f"gpu_check: {device_name}; torch {torch.__version__}, transformers {transformers.__version__}; "
          f"{'tiny smoke run' if opts.tiny else 'full size'}", flush=True)
    figures = Figures()
    tokenizer = build_tokenizer(vocab_size=plan.small.vocab)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        workdir = Path(tmp)
        trained = None
        with figures.section(f"1. overhead: {plan.small.name}, LoRA SFT, with and without the callback"):
            with torch.device("meta"):
                from transformers import Qwen2ForCausalLM

                n = sum(p.numel() for p in Qwen2ForCausalLM(plan.small.config(tokenizer)).parameters())
            figures.add("small_params_m", n / 1e6, "M params", plan.small.name)
            trained = overhead(plan, tokenizer, figures, workdir)
        with figures.section("2. probe against the floor (one generate + one scoring pass)"):
            if trained is None:
                raise RuntimeError("no trained model (section 1 failed)")
            floor(plan, tokenizer, trained, figures, figures.values.get("probe_s_median"))
        trained = None
        free(plan.device)
        with figures.section("3. D's numerical noise floor in bf16"):
            noise_floor(plan, tokenizer, figures)
        if plan.big is not None:
            with figures.section(f"4. one probe on a {plan.big.name} model: memory"):
                big_probe(plan, figures, workdir)
    figures.add("total_s", time.perf_counter() - t_start, "s", "this command")
    missing = [k for k in FIGURE_KEYS if k not in figures.values and not (plan.big is None and k.startswith("big_"))]
    if missing:
        print(f"!! figures not produced: {missing}", flush=True)
    if opts.json:
        opts.json.parent.mkdir(parents=True, exist_ok=True)
        opts.json.write_text(json.dumps({"figures": figures.values, "units": figures.units, "meta": meta,
                                         "failed_sections": figures.failed}, indent=2, default=str))
        print(f"figures written to {opts.json}", flush=True)
    return 1 if figures.failed or missing else 0


if __name__ == "__main__":
    sys.exit(main())
