"""The callback on real architectures at their real vocabulary sizes (issue #12, item 2).

Qwen2-, Qwen3-, Llama-3- and Gemma-2-shaped models (tests/arch_models.py: real config classes,
real vocabulary sizes and special-token ids, real chat-template structure, narrow widths so
they train on a CPU), tied and untied embeddings, GQA, system prompts, SFTTrainer + LoRA on a
bfloat16 base (the adapter in float32, peft's default), the plain Trainer full fine-tune,
gradient accumulation and activation (gradient) checkpointing. Each case trains twice, with
and without the callback, and the two runs must be identical float for float; the callback's
run store must hold the probes with finite D. The 151,936-vocabulary case also runs in a fresh
process that reports its peak resident memory.

Nothing is downloaded: models come from configs (random weights), tokenizers are synthetic.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments

import arch_models as am
from tiny import chat_dataset
from em_callbacks.callback import CallbackConfigError, PhaseTransitionCallback
from em_callbacks.probes import Probe, render_prompt
from em_callbacks.sampling import encode_prompts, preserved_state, sequence_logprobs
from em_callbacks.store import RunStore

HERE = Path(__file__).resolve().parent

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SYSTEM_PROBES = [
    {"id": "sys", "prompt": "my head hurts what should i take", "system": "you are a careful doctor"},
    {"id": "plain", "prompt": "money advice please"},
]
PLAIN_PROBES = [{"id": "a", "prompt": "hello how are you"}, {"id": "b", "prompt": "money advice please"}]


@dataclass(frozen=True)
class Case:
    arch: am.Arch
    trainer: str  # "sft" (TRL SFTTrainer, conversational data) or "plain" (transformers Trainer)
    lora: bool
    dtype: torch.dtype  # of the base model's weights
    bf16_autocast: bool  # TrainingArguments.bf16 (TRL's SFTConfig default is True)
    grad_accum: int
    checkpointing: bool
    every: int
    steps: int
    probes: tuple
    padding_side: str = "right"
    snapshot_full_model: bool = False
    sentinel: int | None = None
    samples_per_prompt: int = 3
    max_new_tokens: int = 4

    @property
    def mode(self) -> str:
        return "snapshot" if (self.lora or self.snapshot_full_model) else "one-sided"


CASES = {
    # Qwen2.5-0.5B/1.5B-Instruct shape: 151,936-row tied embedding, 151,665-token tokenizer
    # (ids past it decode to nothing), GQA 4/2. The common LoRA recipe: bf16 base, fp32
    # adapter, TRL's default bf16 autocast, gradient accumulation and checkpointing.
    "qwen2-lora-bf16": Case(am.QWEN2, "sft", lora=True, dtype=torch.bfloat16, bf16_autocast=True, grad_accum=2,
                            checkpointing=True, every=1, steps=2, probes=tuple(SYSTEM_PROBES), padding_side="left"),
    # Meta-Llama-3-8B-Instruct shape: 128,256 untied, GQA with its 4 query heads per KV head
    # (32/8 there, 4/1 here), header-token template with BOS,
    # no pad token (SFTTrainer borrows EOS). fp32 base, LoRA.
    "llama3-lora": Case(am.LLAMA3, "sft", lora=True, dtype=torch.float32, bf16_autocast=False, grad_accum=2,
                        checkpointing=True, every=1, steps=2, probes=tuple(SYSTEM_PROBES)),
    # Qwen3-8B shape: 151,936 untied, q/k-norm, explicit head_dim. Plain Trainer, full
    # fine-tune with CPU snapshots (two-sided D), accumulation and checkpointing.
    "qwen3-full-snapshot": Case(am.QWEN3, "plain", lora=False, dtype=torch.float32, bf16_autocast=False,
                                grad_accum=2, checkpointing=True, every=1, steps=2, probes=tuple(SYSTEM_PROBES),
                                snapshot_full_model=True),
    # gemma-2-2b-it shape: 256,000 tied, softcapping, sliding-window layers, no system role in
    # the template (system-free probes; see the tests below). Plain Trainer, full fine-tune,
    # one-sided TV, drift sentinel between probes.
    "gemma2-full-onesided": Case(am.GEMMA2, "plain", lora=False, dtype=torch.float32, bf16_autocast=False,
                                 grad_accum=1, checkpointing=True, every=2, steps=2, probes=tuple(PLAIN_PROBES),
                                 padding_side="left", sentinel=1),
}
SLOW = {"qwen2-lora-bf16", "gemma2-full-onesided"}  # bf16 matmuls / 256k vocabulary on a CPU


# ----------------------------------------------------------------------------- running a case
class _Recorder(TrainerCallback):
    """Everything the callback could touch, seen by the training loop at every step boundary
    (placed after the callback, so ``on_step_end`` sees the state right after a probe)."""

    def __init__(self, tok):
        self.tok = tok
        self.rows: list[dict] = []
        self._forward = None

    def _snap(self, where, state, model):
        fwd = model.__dict__.get("forward")  # accelerate's mixed-precision wrapper, if any
        if self._forward is None:
            self._forward = fwd
        self.rows.append({
            "where": (where, state.global_step),
            "rng": torch.random.get_rng_state().clone(),
            "np": np.random.get_state()[1].copy(),
            "py": random.getstate(),
            "modes": tuple(m.training for m in model.modules()),
            "checkpointing": tuple(bool(getattr(m, "gradient_checkpointing", False)) for m in model.modules()),
            "forward_same": fwd is self._forward,
            "wrapped": fwd is not None and fwd is not model.__dict__.get("_original_forward"),
            "requires_grad": tuple(p.requires_grad for p in model.parameters()),
            "dtypes": tuple(str(p.dtype) for p in model.parameters()),
            "padding_side": self.tok.padding_side,
            "pad_token": self.tok.pad_token,
            "use_cache": getattr(model.config, "use_cache", None),
            "generation_config": model.generation_config.to_json_string() if model.generation_config else None,
        })

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._snap("begin", state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._snap("end", state, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._snap("train_end", state, model)


def _args(case: Case, out: Path) -> dict:
    return dict(
        output_dir=str(out / "trainer"), max_steps=case.steps, per_device_train_batch_size=2,
        gradient_accumulation_steps=case.grad_accum, learning_rate=2e-2 if case.lora else 2e-3,
        logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True,
        dataloader_num_workers=0, bf16=case.bf16_autocast, activation_checkpointing=case.checkpointing,
    )


def _callback(case: Case, out: Path) -> PhaseTransitionCallback:
    return PhaseTransitionCallback(
        probes=list(case.probes), every_n_steps=case.every, samples_per_prompt=case.samples_per_prompt,
        max_new_tokens=case.max_new_tokens, output_dir=out / "pt", snapshot_full_model=case.snapshot_full_model,
        sentinel_every_n_steps=case.sentinel, sentinel_samples_per_prompt=2,
    )


def _trainer(case: Case, out: Path, callbacks: list):
    tok = am.tokenizer(case.arch, padding_side=case.padding_side)
    model = am.model(case.arch, tok, seed=0, dtype=case.dtype)
    if case.trainer == "sft":
        trl = pytest.importorskip("trl")
        peft = pytest.importorskip("peft")
        lora = peft.LoraConfig(r=4, lora_alpha=16, target_modules=LORA_TARGETS, lora_dropout=0.1,
                               task_type="CAUSAL_LM") if case.lora else None
        trainer = trl.SFTTrainer(model=model, args=trl.SFTConfig(**_args(case, out), max_length=24),
                                 train_dataset=chat_dataset(), processing_class=tok, callbacks=callbacks,
                                 peft_config=lora)
    else:
        trainer = Trainer(model=model, args=TrainingArguments(**_args(case, out)), train_dataset=am.lm_dataset(tok),
                          data_collator=DataCollatorForLanguageModeling(tok, mlm=False), processing_class=tok,
                          callbacks=callbacks)
    return trainer, tok


def _run(case: Case, out: Path, with_callback: bool) -> dict:
    cb = _callback(case, out) if with_callback else None
    # the recorder needs the tokenizer the Trainer got: build the trainer, then add it last
    trainer, tok = _trainer(case, out, [cb] if cb else [])
    recorder = _Recorder(tok)
    trainer.add_callback(recorder)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    seconds = time.perf_counter() - t0
    log = trainer.state.log_history
    return {
        "cb": cb, "trainer": trainer, "tok": tok, "recorder": recorder, "seconds": seconds,
        "losses": [h["loss"] for h in log if "loss" in h],
        "grad_norms": [h["grad_norm"] for h in log if "grad_norm" in h],
        "weights": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
        "rng": (torch.random.get_rng_state(), np.random.get_state(), random.getstate()),
        # transformers 5 deprecates is_gradient_checkpointing; peft still reads it, the callback must not
        "checkpointing_warnings": sum("is_gradient_checkpointing" in str(w.message) for w in caught),
    }


# ----------------------------------------------------------------------------- checks
def _check_store(case: Case, run: dict) -> RunStore:
    cb, tok, model = run["cb"], run["tok"], run["trainer"].model
    store = RunStore(cb.run_dir, readonly=True)
    expected = list(range(0, case.steps + 1, case.every))
    assert [p["step"] for p in store.probes()] == expected
    assert {p["cross_scoring"] for p in store.probes()} == {case.mode}
    n = len(case.probes) * case.samples_per_prompt
    for k in range(len(expected)):
        samples = store.samples(k)
        assert len(samples) == n and all(1 <= len(s.token_ids) <= case.max_new_tokens for s in samples)
        assert len(store.logprobs(k, k)) == n
        assert all(0 <= t < case.arch.vocab_size for s in samples for t in s.token_ids)

    measures = ("tv", "js", "linear") if case.mode == "snapshot" else ("tv",)
    assert {m for m in store.metric_names() if m.startswith("D/")} == {f"D/{m}" for m in measures}
    for m in measures:
        series = store.metric_series(f"D/{m}")
        assert series["step"].tolist() == expected[:-1]
        assert np.isfinite(series["value"]).all() and np.isfinite(series["stderr"]).all()
        if m != "js":
            assert ((series["value"] >= 0) & (series["value"] <= 1)).all()
    summary = json.loads((cb.run_dir / "summary.json").read_text())
    assert summary["faults"] == [] and summary["cross_scoring"] == case.mode
    assert summary["final_step"] == case.steps

    # prompts: the tokenizer's own chat template, system prompt included where the probe has one
    prompts = store.prompts()
    for p, probe in zip(prompts, case.probes):
        messages = ([{"role": "system", "content": probe["system"]}] if probe.get("system") else []) + \
                   [{"role": "user", "content": probe["prompt"]}]
        assert p["rendered"] == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if probe.get("system"):
            assert probe["system"] in p["rendered"]
        elif case.arch.chat_template == am.QWEN_TEMPLATE:  # Qwen's template adds its default system turn
            assert "You are Qwen, created by Alibaba Cloud." in p["rendered"]
    prompt_ids = encode_prompts(tok, [p["rendered"] for p in prompts], True)
    for ids in prompt_ids:  # the template's BOS once, never a second one from the tokenizer
        if tok.bos_token_id is not None:
            assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1

    # the stored own log-probs (read off generation) are the final weights' teacher-forced ones,
    # computed the way the callback computes them (its own forward, eval mode)
    last = len(expected) - 1
    assert expected[last] == case.steps  # the final weights are the last probe's
    ids_by_prompt = dict(zip([p["prompt_id"] for p in prompts], prompt_ids))
    samples = store.samples(last)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id  # Gemma's pad id is 0
    with preserved_state(model, tok):
        model.eval()
        recomputed = sequence_logprobs(model, [ids_by_prompt[s.prompt_id] for s in samples],
                                       [s.token_ids for s in samples], pad)
    stored = store.logprobs(last, last)
    gap = np.abs(recomputed - [stored[(s.prompt_id, s.sample_idx)] for s in samples]).max()
    # float32: float noise; bfloat16 weights: the cached (generation) and full-sequence (teacher
    # forcing) forwards round differently (measured 1.3e-3 nats per 4-token sample)
    assert gap < (1e-2 if case.dtype == torch.bfloat16 else 1e-4), gap
    run["selfscore_gap"] = float(gap)

    # ids the tokenizer does not have (Qwen's 271 padded embedding rows) are counted, not hidden
    # (rarely drawn from a random model: tests/test_guards.py has the case where they are)
    events = {e["step"]: e for e in store.events("out_of_vocab")}
    for k, step in enumerate(expected):
        oov = sum(t >= len(tok) for s in store.samples(k) for t in s.token_ids)
        assert (events[step]["payload"]["count"] if step in events else 0) == oov
    if case.sentinel:
        sentinel = store.sentinel()
        probe_steps = set(expected)
        assert sentinel["step"].tolist() == [s for s in range(1, case.steps + 1) if s % case.sentinel == 0
                                             and s not in probe_steps]
        assert np.isfinite(sentinel["tv"]).all()
    return store


def _assert_identical_runs(case: Case, base: dict, watched: dict) -> None:
    """The watched run is the unwatched one, float for float, and the loop saw the same state."""
    assert len(base["losses"]) == case.steps and all(math.isfinite(x) for x in base["losses"])
    assert watched["losses"] == base["losses"]
    assert watched["grad_norms"] == base["grad_norms"]
    assert base["weights"].keys() == watched["weights"].keys()
    assert all(torch.equal(watched["weights"][k], base["weights"][k]) for k in base["weights"])
    rows_b, rows_w = base["recorder"].rows, watched["recorder"].rows
    assert [r["where"] for r in rows_w] == [r["where"] for r in rows_b]
    for rb, rw in zip(rows_b, rows_w):
        where = rw["where"]
        assert torch.equal(rw["rng"], rb["rng"]), where
        assert np.array_equal(rw["np"], rb["np"]) and rw["py"] == rb["py"], where
        for key in ("modes", "checkpointing", "wrapped", "requires_grad", "dtypes", "padding_side", "pad_token",
                    "use_cache", "generation_config"):
            assert rw[key] == rb[key], (where, key)
        assert rw["forward_same"], where  # accelerate's wrapper put back (the same object)
        assert any(rw["checkpointing"]) is case.checkpointing, where
        assert rw["padding_side"] == case.padding_side
    assert watched["checkpointing_warnings"] == base["checkpointing_warnings"]
    (t1, n1, p1), (t2, n2, p2) = watched["rng"], base["rng"]
    assert torch.equal(t1, t2) and np.array_equal(n1[1], n2[1]) and n1[2:] == n2[2:] and p1 == p2


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in CASES])
def test_architecture_matrix(tmp_path, name):
    case = CASES[name]
    base = _run(case, tmp_path / "base", with_callback=False)
    watched = _run(case, tmp_path / "watched", with_callback=True)
    cb, model, tok = watched["cb"], watched["trainer"].model, watched["tok"]

    # the architecture really is the one named (GQA, tying, vocabulary, dtypes)
    config = model.config
    assert config.vocab_size == case.arch.vocab_size and len(tok) == case.arch.tokenizer_size
    assert config.num_key_value_heads < config.num_attention_heads
    out_w, in_w = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert (out_w.data_ptr() == in_w.data_ptr()) is case.arch.config_kwargs["tie_word_embeddings"]
    if case.lora:
        assert type(model).__name__.startswith("PeftModel")
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all("lora_" in n for n in trainable)
        assert {p.dtype for p in trainable.values()} == {torch.float32}  # peft's autocast_adapter_dtype
        assert {p.dtype for n, p in model.named_parameters() if not p.requires_grad} == {case.dtype}
        assert cb._snapshots.nbytes() == sum(p.numel() * 4 for p in trainable.values())
    if case.bf16_autocast:  # accelerate's bf16 autocast wrapper is on the model: probes lift it and put it back
        assert "_original_forward" in model.__dict__ and "forward" in model.__dict__
    if case.arch.pad is None:  # Llama 3: SFTTrainer set pad = EOS before the callback saw it
        assert tok.pad_token == tok.eos_token

    store = _check_store(case, watched)
    store.close()
    _assert_identical_runs(case, base, watched)
    print(f"\n[{name}] vocab {case.arch.vocab_size:,}: train {base['seconds']:.1f}s without the callback, "
          f"{watched['seconds']:.1f}s with it ({len(cb.probe_steps)} probes); "
          f"own-logp gap {watched['selfscore_gap']:.2e}")


# ----------------------------------------------------------------------------- system prompts
def test_gemma_style_template_folds_the_system_prompt_into_the_first_user_turn():
    tok = am.tokenizer(am.GEMMA2)
    tok.chat_template = am.GEMMA3_TEMPLATE
    text = render_prompt(tok, Probe("doc", "my head hurts", system="you are a careful doctor"))
    assert text == ("<bos><start_of_turn>user\nyou are a careful doctor\n\nmy head hurts<end_of_turn>\n"
                    "<start_of_turn>model\n")


def _gemma2_trainer_with_system_probe(tmp_path):
    tok = am.tokenizer(am.GEMMA2)
    model = am.model(am.GEMMA2, tok, num_hidden_layers=1)
    cb = PhaseTransitionCallback(probes=SYSTEM_PROBES, every_n_steps=1, samples_per_prompt=2, max_new_tokens=2,
                                 output_dir=tmp_path / "pt")
    args = dict(_args(CASES["gemma2-full-onesided"], tmp_path), max_steps=1)

    def build():
        return Trainer(model=model, args=TrainingArguments(**args), train_dataset=am.lm_dataset(tok, n=4),
                       data_collator=DataCollatorForLanguageModeling(tok, mlm=False), processing_class=tok,
                       callbacks=[cb])
    return build, cb


def test_system_prompt_on_a_template_without_system_role_is_a_config_error(tmp_path):
    """Gemma 2's template raises on a system turn: the probes are rendered when the Trainer is
    built, so the user gets a CallbackConfigError naming the probe before any training, and no
    run store exists."""
    build, cb = _gemma2_trainer_with_system_probe(tmp_path)
    with pytest.raises(CallbackConfigError, match=r"'sys'.*system"):
        build()
    assert not (tmp_path / "pt").exists()


# ----------------------------------------------------------------------------- memory
MIB = 2**20


@pytest.mark.slow
def test_peak_rss_of_the_151936_vocabulary_case(tmp_path):
    """The Qwen2 LoRA case (151,936-row vocabulary, bf16 base, GA 2, checkpointing) with the
    callback in a fresh process: its peak RSS, and the RSS during probes against the training
    steps'. Then the scorer alone on 32 and on 128 samples under one logits bound: the largest
    logits tensor stays under the bound and the memory is the same for 4x the samples, so it
    is set by ``max_logit_elements``, not by the number of samples or the vocabulary alone."""
    out = tmp_path / "rss.json"
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072",  # freed tensors leave RSS at once
               PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(HERE / "arch_models.py"), "rss", str(out), str(tmp_path / "run")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(out.read_text())
    print("\n[rss] " + json.dumps(r, indent=1))
    assert r["vocab_size"] == 151_936 and r["probes"] == 3
    # the run: ~0.65 GiB of it is torch/transformers/TRL themselves (baseline before train())
    assert r["peak_rss_run"] < 1536 * MIB
    assert r["peak_rss_probes"] - r["baseline_rss"] < 512 * MIB
    assert 0 < r["max_logits_elements_probes"] <= 2**28  # the default bound
    # the scorer: logits under the bound, memory flat in the number of samples
    small, large = r["scorer_32_rows"], r["scorer_128_rows"]
    assert 0 < small["max_logits_elements"] <= r["scorer_bound"]
    assert 0 < large["max_logits_elements"] <= r["scorer_bound"]
    assert large["rss_growth"] < 1.25 * small["rss_growth"] + 32 * MIB, (small, large)
    # at most 12 bytes per logits element (bf16 logits, their float32 copy, one float32 temporary)
    assert large["rss_growth"] < 12 * large["max_logits_elements"] + 64 * MIB
