"""Numerically honest scoring (em_callbacks.precision, sequence_logprobs): float32 scoring of a
bf16 model is bit for bit the scoring of its float32 copy (plain, PEFT with a float32 adapter,
under autocast), the log-probs stay exact at real vocabulary sizes (logits only at completion
positions, soft-capping included), and a real bf16 run records D's numerical noise floor.
CPU, one thread, random weights, well under a minute."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch

import arch_models
from em_callbacks.precision import check_scoring_precision, computed_in
from em_callbacks.sampling import _KEEPS_LOGITS, sequence_logprobs
from tiny import tiny_model, tiny_tokenizer


def _rows(n: int = 6, vocab_low: int = 10, vocab_high: int = 50, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    def row(lo: int, hi: int) -> list[int]:
        length = int(torch.randint(lo, hi, (1,), generator=g))
        return torch.randint(vocab_low, vocab_high, (length,), generator=g).tolist()

    prompts = [row(2, 9) for _ in range(n)]
    completions = [row(1, 12) for _ in range(n)]
    return prompts, completions


def _state(model):
    return {n: (p.dtype, p.detach().clone()) for n, p in model.named_parameters()}


def _unchanged(model, before) -> bool:
    return all(p.dtype == before[n][0] and torch.equal(p.detach(), before[n][1]) for n, p in model.named_parameters())


# ----------------------------------------------------------------------------- exact upcast
@pytest.mark.parametrize("which", ["gpt2", "qwen2"])
def test_float32_scoring_of_a_bf16_model_is_its_float32_copy_bit_for_bit(which):
    if which == "gpt2":
        tok = tiny_tokenizer()
        m16 = tiny_model(tok, seed=1).to(torch.bfloat16).eval()
        prompts, completions = _rows()
    else:
        tok = arch_models.tokenizer(arch_models.QWEN2)
        m16 = arch_models.model(arch_models.QWEN2, tok, attention_dropout=0.0).to(torch.bfloat16).eval()
        prompts, completions = _rows(vocab_low=1000, vocab_high=150_000)
    m32 = copy.deepcopy(m16).float()  # bf16 -> float32 is exact: the same (rounded) weights
    pad = tok.pad_token_id
    before = _state(m16)
    upcast = sequence_logprobs(m16, prompts, completions, pad, scoring_dtype=torch.float32)
    assert _unchanged(m16, before), "scoring must not touch the weights (dtype or values)"
    reference = sequence_logprobs(m32, prompts, completions, pad)
    native = sequence_logprobs(m16, prompts, completions, pad)
    np.testing.assert_array_equal(upcast, reference)
    assert np.abs(native - reference).max() > 1e-4  # bf16 rounding is real: what the upcast removes
    np.testing.assert_array_equal(sequence_logprobs(m16, prompts, completions, pad, scoring_dtype="float32"), reference)
    np.testing.assert_array_equal(sequence_logprobs(m16, prompts, completions, pad, scoring_dtype="model"), native)


def test_float32_scoring_of_a_peft_model_with_bf16_base_and_float32_adapter():
    peft = pytest.importorskip("peft")
    tok = tiny_tokenizer()
    base = tiny_model(tok, seed=2).to(torch.bfloat16)
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
                          lora_dropout=0.0)
    model = peft.get_peft_model(base, cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(0))
    dtypes = {("lora_" in n, p.dtype) for n, p in model.named_parameters()}
    assert dtypes == {(False, torch.bfloat16), (True, torch.float32)}
    reference = copy.deepcopy(model).float()
    prompts, completions = _rows(seed=3)
    pad = tok.pad_token_id
    np.testing.assert_array_equal(sequence_logprobs(model, prompts, completions, pad, scoring_dtype=torch.float32),
                                  sequence_logprobs(reference, prompts, completions, pad))
    precision = check_scoring_precision(model, "float32", prompts[0])
    assert precision.dtype == torch.float32 and precision.changes_numerics
    assert precision.native == "bfloat16/float32" and precision.computed == torch.float32


def test_float32_scoring_switches_autocast_off():
    """accelerate wraps a mixed-precision model's forward in bf16 autocast: float32 weights
    computed in bf16. Float32 scoring turns it off per operation."""
    tok = tiny_tokenizer()
    model = tiny_model(tok, seed=4).eval()
    prompts, completions = _rows(seed=5)
    pad = tok.pad_token_id
    reference = sequence_logprobs(model, prompts, completions, pad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rounded = sequence_logprobs(model, prompts, completions, pad)
        upcast = sequence_logprobs(model, prompts, completions, pad, scoring_dtype=torch.float32)
        precision = check_scoring_precision(model, "float32", prompts[0])
    assert np.abs(rounded - reference).max() > 1e-4
    np.testing.assert_array_equal(upcast, reference)
    assert precision.changes_numerics and precision.native == "float32 under bfloat16 autocast"


def test_scoring_precision_of_float32_models_and_the_model_dtype_option():
    tok = tiny_tokenizer()
    model = tiny_model(tok).eval()
    ids = [5, 6, 7]
    plain = check_scoring_precision(model, "float32", ids)
    assert plain.dtype is None and not plain.changes_numerics and plain.native == "float32"  # nothing to change
    m16 = tiny_model(tok).to(torch.bfloat16).eval()
    as_is = check_scoring_precision(m16, "model", ids)
    assert as_is.dtype is None and as_is.computed == torch.bfloat16 and as_is.native == "bfloat16"
    with computed_in(None) as mode:
        assert mode is None


def test_a_kernel_that_refuses_float32_falls_back_to_the_model_dtype_with_a_warning():
    """E.g. flash-attention takes only bf16/fp16: scoring keeps the model's numerics and says why."""
    tok = tiny_tokenizer()
    model = tiny_model(tok).to(torch.bfloat16).eval()

    def bf16_only(module, args):
        if args[0].dtype != torch.bfloat16:
            raise RuntimeError("FlashAttention only supports fp16 and bf16 data type")

    model.transformer.h[0].attn.register_forward_pre_hook(bf16_only)
    with pytest.warns(UserWarning, match="float32 scoring failed"):
        precision = check_scoring_precision(model, "float32", [5, 6, 7])
    assert precision.dtype is None and "FlashAttention" in precision.note and precision.computed == torch.bfloat16


# ----------------------------------------------------------------------------- real vocabularies
def _full_logits_reference(model, prompts, completions, pad):
    """float64 log-softmax of every position's logits, one row at a time (no batching, no mask)."""
    out = []
    with torch.no_grad():
        for p, c in zip(prompts, completions):
            ids = torch.tensor([list(p) + list(c)])
            logits = model(input_ids=ids).logits[0].double()
            lp = torch.log_softmax(logits[:-1], dim=-1)
            out.append(float(sum(lp[len(p) - 1 + j, t] for j, t in enumerate(c))))
    return np.array(out)


class _IgnoresLogitsToKeep(torch.nn.Module):
    """A causal LM that returns every position's logits whatever it is asked (custom code)."""

    def __init__(self, model):
        super().__init__()
        self.inner = model
        self.config = model.config

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        kwargs.pop("logits_to_keep", None)
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


@pytest.mark.parametrize("arch", ["qwen2", "gemma2"])
def test_logprobs_stay_exact_at_real_vocabulary_sizes(arch):
    """151,936 (Qwen2) and 256,000 tokens with final-logit soft-capping (Gemma 2): logits only at
    completion positions, chunked log-softmax, rows batched by completion tokens; the same values
    as a float64 log-softmax of the full logits, also when the model ignores logits_to_keep."""
    spec = arch_models.ARCHS[arch]
    tok = arch_models.tokenizer(spec)
    model = arch_models.model(spec, tok, attention_dropout=0.0).eval()
    if arch == "gemma2":
        assert model.config.final_logit_softcapping
    prompts, completions = _rows(n=5, vocab_low=1000, vocab_high=100_000, seed=6)
    pad = tok.pad_token_id
    expected = _full_logits_reference(model, prompts, completions, pad)
    got = sequence_logprobs(model, prompts, completions, pad)
    assert _KEEPS_LOGITS[model] is True
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-4)
    small = sequence_logprobs(model, prompts, completions, pad, max_logit_elements=12 * spec.vocab_size)
    np.testing.assert_allclose(small, got, rtol=0, atol=2e-4)
    ignoring = _IgnoresLogitsToKeep(model).eval()
    np.testing.assert_allclose(sequence_logprobs(ignoring, prompts, completions, pad), got, rtol=0, atol=2e-4)
    assert _KEEPS_LOGITS[ignoring] is False


# ----------------------------------------------------------------------------- in a real run
def _bf16_lora_run(tmp_path, scoring_dtype: str):
    peft = pytest.importorskip("peft")
    trl = pytest.importorskip("trl")
    from em_callbacks.callback import PhaseTransitionCallback
    from em_callbacks.store import RunStore
    from tiny import chat_dataset

    tok = tiny_tokenizer()
    model = tiny_model(tok, seed=0).to(torch.bfloat16)
    cb = PhaseTransitionCallback(probes=["hello how are you", "money", "take pills please"], every_n_steps=2,
                                 samples_per_prompt=4, max_new_tokens=6, output_dir=tmp_path / "pt",
                                 scoring_dtype=scoring_dtype)
    args = trl.SFTConfig(output_dir=str(tmp_path / "trainer"), max_steps=4, per_device_train_batch_size=4,
                         learning_rate=2e-2, logging_steps=1, report_to="none", save_strategy="no", use_cpu=True,
                         seed=0, disable_tqdm=True, dataloader_num_workers=0, max_length=32, bf16=False)
    lora = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
                           lora_dropout=0.0, task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=chat_dataset(), processing_class=tok,
                                 callbacks=[cb], peft_config=lora)
        trainer.train()
    return cb, RunStore(tmp_path / "pt", readonly=True), trainer.model


def test_a_bf16_run_scores_in_float32_and_records_the_numerical_floor(tmp_path):
    """bf16 base + float32 LoRA adapter (what dtype="auto" and PEFT give): the stored log-probs
    are float32 teacher forcing (the bf16 sampler's own are not used), D_numerical_floor is
    stored at every probe, and scoring in bf16 instead ("model") reads a floor far above it."""
    from em_callbacks.sampling import encode_prompts, preserved_state

    cb, store, model = _bf16_lora_run(tmp_path / "f32", "float32")
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    assert store.meta()["config"]["scoring_dtype"] == "float32"
    (event,) = store.events("scoring_precision")
    assert event["payload"]["scoring_dtype"] == "float32" and event["payload"]["native"] == "bfloat16/float32"
    floor = store.metric_series("D_numerical_floor")
    assert floor["step"].tolist() == [0, 2, 4]
    assert np.isfinite(floor["value"]).all() and (floor["value"] >= 0).all()
    assert store.metrics_at(2)["D_numerical_floor"]["extra"]["floor_reference"] == "float32, one row per pass"
    # the last probe's own log-probs are the final weights' float32 teacher-forced ones
    tok = cb.engine._tok
    ids = dict(zip([p["prompt_id"] for p in store.prompts()],
                   encode_prompts(tok, [p["rendered"] for p in store.prompts()], True)))
    samples = store.samples(2)
    rows, completions = [ids[s.prompt_id] for s in samples], [s.token_ids for s in samples]
    with preserved_state(model, tok):
        model.eval()
        upcast = sequence_logprobs(model, rows, completions, tok.pad_token_id, scoring_dtype=torch.float32)
        native = sequence_logprobs(model, rows, completions, tok.pad_token_id)
    own = store.logprobs(2, 2)
    stored = np.array([own[(s.prompt_id, s.sample_idx)] for s in samples])
    np.testing.assert_allclose(stored, upcast, rtol=0, atol=1e-5)
    assert np.abs(stored - native).max() > 1e-4

    # scoring in the model's own bf16 numerics: the floor is bf16 rounding, far above float32's
    _, store16, _ = _bf16_lora_run(tmp_path / "bf16", "model")
    floor16 = store16.metric_series("D_numerical_floor")
    assert np.isfinite(floor16["value"]).all()
    assert floor16["value"].mean() > 10 * max(floor["value"].mean(), 1e-7)
    extra = store16.metrics_at(0)["D_numerical_floor"]["extra"]
    assert extra["floor_reference"] == "float32" and extra["n"] == 3 * 2 and extra["mean_abs_logp_diff"] > 1e-4
