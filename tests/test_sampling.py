"""em_callbacks.sampling on a tiny local GPT-2: the sampler draws from the unwarped softmax and
the teacher-forced scorer gives each sample exactly the probability the sampler used; probing
leaves RNG, train mode and tokenizer as it found them; weight snapshots swap in and out
bit-exactly. fp32 CPU, one thread, a few seconds in all."""

from __future__ import annotations

import copy
import inspect
import random
import warnings

import numpy as np
import pytest
import torch
from transformers import GenerationConfig

from em_callbacks.sampling import (
    InverseCdfSampler,
    SamplerConfigError,
    WeightSnapshots,
    encode_prompts,
    generate_samples,
    prepare_tokenizer,
    preserved_state,
    sequence_logprobs,
)
from tiny import tiny_model, tiny_tokenizer

PROMPTS = [
    "hello how are you",  # 4 tokens
    "money",  # 1 token: heavily left-padded next to the others
    "the doctor is to take pills and water rest please",  # 10 tokens
]
S = 4
MAX_NEW = 12


def eos_prone(model, tok, alpha: float = 60.0):
    """Shift the final layer-norm bias towards EOS's (tied) embedding so that a good share of
    samples end with EOS well before MAX_NEW tokens, while the rest run to the cap."""
    with torch.no_grad():
        eos_row = model.transformer.wte.weight[tok.eos_token_id]
        model.transformer.ln_f.bias.copy_(alpha * eos_row)
    return model


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture()
def model(tok):
    m = eos_prone(tiny_model(tok, seed=0), tok)
    m.eval()
    return m


@pytest.fixture(scope="module")
def prompt_ids(tok):
    ids = encode_prompts(tok, PROMPTS, uses_chat_template=False)
    assert len({len(p) for p in ids}) == 3  # really different lengths
    return ids


def _ids(tok):
    return prepare_tokenizer(tok)


def _reference_generate(model, prompt_ids, pad, eos, seed, max_new=MAX_NEW, s=S, sampler=False):
    """model.generate on our own left-padded batch, asking for the raw (pre-processor) logits:
    transformers' own unwarped sampling, or (``sampler``) greedy decoding over the probe
    sampler's draws, as generate_samples runs it."""
    rows = [p for p in prompt_ids for _ in range(s)]
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + list(r) for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    torch.manual_seed(seed)
    how = ({"do_sample": False, "logits_processor": [InverseCdfSampler(record=False)]} if sampler
           else {"do_sample": True, "top_k": 0, "top_p": 1.0, "temperature": 1.0})
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=max_new, pad_token_id=pad, eos_token_id=eos,
        output_logits=True, return_dict_in_generate=True, **how,
    )
    new = out.sequences[:, width:]
    raw = torch.stack(out.logits, dim=1).float().log_softmax(-1)  # (rows, T, V)
    return rows, new, raw


# ----------------------------------------------------------------------------- exactness
def test_teacher_forced_logprob_equals_generate_raw_logits(model, tok, prompt_ids):
    pad, eos = _ids(tok)
    rows, new, raw = _reference_generate(model, prompt_ids, pad, eos, seed=123)
    completions, expected = [], []
    for r in range(len(rows)):
        tokens = new[r].tolist()
        if eos in tokens:
            tokens = tokens[: tokens.index(eos) + 1]
        completions.append(tokens)
        expected.append(sum(raw[r, j, t].item() for j, t in enumerate(tokens)))
    lengths = [len(c) for c in completions]
    assert min(lengths) < MAX_NEW and max(lengths) == MAX_NEW, "need both finished and capped samples"
    got = sequence_logprobs(model, rows, completions, pad)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)

    # generate_samples draws exactly the probe sampler's tokens from the same seed (one batch,
    # prompt-major), and teacher forcing gives them the probability of the raw logits too
    rows, new, raw = _reference_generate(model, prompt_ids, pad, eos, seed=123, sampler=True)
    samples = generate_samples(model, prompt_ids, S, MAX_NEW, pad, eos, seed=123)
    assert samples.completion_ids == [_trimmed(r, eos) for r in new.tolist()]
    expected = [sum(raw[r, j, t].item() for j, t in enumerate(c)) for r, c in enumerate(samples.completion_ids)]
    np.testing.assert_allclose(sequence_logprobs(model, rows, samples.completion_ids, pad), expected, atol=1e-4)
    np.testing.assert_array_equal(samples.prompt_index, np.repeat(np.arange(3), S))
    np.testing.assert_array_equal(samples.sample_index, np.tile(np.arange(S), 3))
    assert samples.prompt_ids == [list(p) for p in prompt_ids]


def test_generation_logprobs_equal_raw_logits_and_teacher_forcing(model, tok, prompt_ids):
    """``with_logprobs`` reads each sample's log-prob from the sampler's own distribution: the
    same sum over raw generate logits as above, equal to teacher forcing within float
    tolerance, and the same samples (recording changes no random draw). Several batches with
    uneven padding, finished and capped samples."""
    pad, eos = _ids(tok)
    rows, new, raw = _reference_generate(model, prompt_ids, pad, eos, seed=7, sampler=True)
    samples = generate_samples(model, prompt_ids, S, MAX_NEW, pad, eos, seed=7, with_logprobs=True)
    plain = generate_samples(model, prompt_ids, S, MAX_NEW, pad, eos, seed=7)
    assert samples.completion_ids == plain.completion_ids and plain.logp is None
    expected = [sum(raw[r, j, t].item() for j, t in enumerate(c)) for r, c in enumerate(samples.completion_ids)]
    np.testing.assert_allclose(samples.logp, expected, rtol=0, atol=1e-5)
    teacher = sequence_logprobs(model, rows, samples.completion_ids, pad)
    np.testing.assert_allclose(samples.logp, teacher, rtol=0, atol=1e-4)
    batched = generate_samples(model, prompt_ids, S, MAX_NEW, pad, eos, seed=7, with_logprobs=True, batch_size=5)
    np.testing.assert_allclose(batched.logp, sequence_logprobs(model, rows, batched.completion_ids, pad), atol=1e-4)


def _trimmed(tokens, eos):
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def test_sampler_draws_the_exact_softmax_distribution(model, tok, prompt_ids):
    """The inverse-CDF draw against the exact next-token distribution of the raw logits, on the
    test vocabulary (small enough to enumerate): 16,000 first tokens of one prompt, and the
    second token after the most frequent first token. Pearson chi-square over every token with
    an expected count >= 5 (the rest pooled); a warped sampler (temperature 0.5, or top-k 20)
    fails the same test on the same draws."""
    from scipy import stats

    pad, eos = _ids(tok)
    prompt = prompt_ids[2]
    n = 16_000
    first = generate_samples(model, [prompt], n, 1, pad, eos, seed=5, batch_size=n)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[0, -1].double()
    exact = torch.softmax(logits, -1).numpy()

    def pearson(draws, probs):
        counts = np.bincount(draws, minlength=len(probs)).astype(float)
        expected = probs * len(draws)
        big = expected >= 5
        obs, exp = counts[big], expected[big]
        if (~big).any():
            obs, exp = np.append(obs, counts[~big].sum()), np.append(exp, expected[~big].sum())
        return stats.chisquare(obs, exp * obs.sum() / exp.sum())

    draws = np.array([c[0] for c in first.completion_ids])
    assert pearson(draws, exact).pvalue > 1e-3
    for warped in (torch.softmax(logits / 0.5, -1).numpy(), np.where(exact >= np.sort(exact)[-20], exact, 1e-9)):
        assert pearson(draws, warped / warped.sum()).pvalue < 1e-6

    top = int(np.bincount(draws).argmax())
    second = generate_samples(model, [list(prompt) + [top]], 8_000, 1, pad, eos, seed=6, batch_size=8_000)
    with torch.no_grad():
        exact2 = torch.softmax(model(input_ids=torch.tensor([list(prompt) + [top]])).logits[0, -1].double(), -1)
    assert pearson(np.array([c[0] for c in second.completion_ids]), exact2.numpy()).pvalue > 1e-3


def test_sampler_refuses_non_finite_logits_like_multinomial():
    sampler = InverseCdfSampler(record=False)
    with pytest.raises(ValueError, match="nan"):
        sampler(torch.zeros((2, 1), dtype=torch.long), torch.tensor([[0.0, 1.0], [float("nan"), 0.0]]))
    picked = sampler(torch.zeros((1, 1), dtype=torch.long), torch.tensor([[float("-inf"), 3.0, float("-inf")]]))
    assert picked.argmax().item() == 1 and torch.isinf(picked).sum().item() == 2


def test_probing_bypasses_the_mixed_precision_wrapper_and_restores_it(tok, prompt_ids):
    """accelerate's bf16 autocast wrapper (what SFTTrainer's default bf16=True installs, also on
    CPU) is lifted while probing, so generation and scoring use one function, and put back."""
    from types import MethodType

    # what Accelerator(mixed_precision="bf16").prepare_model does to a model's forward (done by
    # hand: a second Accelerator in one process with another precision is refused)
    model = tiny_model(tok, seed=3).eval()
    model._original_forward = model.forward
    model.forward = MethodType(torch.autocast("cpu", dtype=torch.bfloat16)(type(model).forward), model)
    wrapped = model.forward
    assert "_original_forward" in model.__dict__
    pad, eos = _ids(tok)
    completions = [[7, 8, 9, eos]] * len(prompt_ids)
    through_wrapper = sequence_logprobs(model, prompt_ids, completions, pad)
    with preserved_state(model, tok):
        assert model.forward == model._original_forward
        own = sequence_logprobs(model, prompt_ids, completions, pad)
        samples = generate_samples(model, prompt_ids, S, MAX_NEW, pad, eos, seed=1, with_logprobs=True)
        teacher = sequence_logprobs(model, [prompt_ids[p] for p in samples.prompt_index], samples.completion_ids, pad)
    assert model.forward is wrapped
    assert np.abs(through_wrapper - own).max() > 1e-4  # the wrapper really computes something else
    np.testing.assert_allclose(samples.logp, teacher, atol=1e-4)


def test_samples_stop_at_eos_which_is_kept(model, tok, prompt_ids):
    pad, eos = _ids(tok)
    samples = generate_samples(model, prompt_ids, 8, MAX_NEW, pad, eos, seed=7)
    assert len(samples) == 24
    assert samples.finished.any() and not samples.finished.all()
    for ids, done in zip(samples.completion_ids, samples.finished):
        assert 1 <= len(ids) <= MAX_NEW
        if done:
            assert ids[-1] == eos and eos not in ids[:-1]
        else:
            assert eos not in ids and len(ids) == MAX_NEW


def test_decode_fills_texts(model, tok, prompt_ids):
    pad, eos = _ids(tok)
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    samples = generate_samples(model, prompt_ids, 2, 5, pad, eos, seed=1, decode=decode)
    assert samples.texts == [decode(c) for c in samples.completion_ids]
    assert all("<eos>" not in t for t in samples.texts)


def test_batched_scoring_equals_per_prompt_scoring(model, tok, prompt_ids):
    pad, eos = _ids(tok)
    samples = generate_samples(model, prompt_ids, S, MAX_NEW, pad, eos, seed=5)
    rows = [prompt_ids[p] for p in samples.prompt_index]
    together = sequence_logprobs(model, rows, samples.completion_ids, pad)
    one_by_one = np.array([sequence_logprobs(model, [r], [c], pad)[0] for r, c in zip(rows, samples.completion_ids)])
    small_batches = sequence_logprobs(model, rows, samples.completion_ids, pad, batch_size=5)
    params = inspect.signature(sequence_logprobs).parameters
    if "max_logit_elements" in params:  # memory cap: forces one row per forward pass
        capped = sequence_logprobs(model, rows, samples.completion_ids, pad, max_logit_elements=1)
        np.testing.assert_allclose(capped, one_by_one, rtol=0, atol=1e-4)
    if "sync_batches" in params:  # extra dummy forward passes (sharded ranks) change nothing
        synced = sequence_logprobs(model, rows, samples.completion_ids, pad, batch_size=5, sync_batches=lambda n: n + 3)
        np.testing.assert_array_equal(synced, small_batches)
    np.testing.assert_allclose(together, one_by_one, rtol=0, atol=1e-4)
    np.testing.assert_allclose(small_batches, one_by_one, rtol=0, atol=1e-4)
    per_prompt = np.concatenate([
        sequence_logprobs(model, [prompt_ids[p]] * S, samples.completion_ids[p * S:(p + 1) * S], pad)
        for p in range(len(prompt_ids))
    ])
    np.testing.assert_allclose(together, per_prompt, rtol=0, atol=1e-4)
    assert np.all(together < 0) and np.all(np.isfinite(together))


def test_sequence_logprobs_rejects_unpaired_inputs(model, tok, prompt_ids):
    with pytest.raises(ValueError, match="pair"):
        sequence_logprobs(model, prompt_ids, [[5]], 1)


def test_same_seed_same_samples_different_seed_different(model, tok, prompt_ids):
    pad, eos = _ids(tok)
    a = generate_samples(model, prompt_ids, S, MAX_NEW, pad, eos, seed=11)
    torch.rand(100)  # global RNG state in between must not matter: the seed fixes it
    b = generate_samples(model, prompt_ids, S, MAX_NEW, pad, eos, seed=11)
    c = generate_samples(model, prompt_ids, S, MAX_NEW, pad, eos, seed=12)
    assert a.completion_ids == b.completion_ids
    np.testing.assert_array_equal(a.finished, b.finished)
    assert a.completion_ids != c.completion_ids


def test_min_batches_extra_generate_calls_do_not_change_samples(model, tok, prompt_ids):
    pad, eos = _ids(tok)
    calls = []
    original = model.generate

    def counting_generate(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape)
        return original(*args, **kwargs)

    model.generate = counting_generate
    try:
        plain = generate_samples(model, prompt_ids, S, MAX_NEW, pad, eos, seed=3, batch_size=5)
        n_plain = len(calls)
        padded = generate_samples(model, prompt_ids, S, MAX_NEW, pad, eos, seed=3, batch_size=5, min_batches=6)
    finally:
        del model.generate
    assert n_plain == 3  # 12 rows in batches of 5
    assert len(calls) - n_plain == 6  # min_batches honoured: 3 real + 3 dummy calls
    assert padded.completion_ids == plain.completion_ids
    np.testing.assert_array_equal(padded.finished, plain.finished)
    assert len(padded) == 12


def test_sampler_ignores_the_models_own_generation_config(model, tok, prompt_ids):
    pad, eos = _ids(tok)
    reference = generate_samples(model, prompt_ids, S, MAX_NEW, pad, eos, seed=21)
    shipped = GenerationConfig(
        do_sample=True, top_k=5, temperature=0.7, top_p=0.5, min_p=0.2, repetition_penalty=1.3,
        no_repeat_ngram_size=2, min_new_tokens=4, suppress_tokens=[7, 8], bad_words_ids=[[9]],
        begin_suppress_tokens=[10], sequence_bias={(11,): -10.0}, epsilon_cutoff=0.01,
    )
    model.generation_config = shipped
    warped_run = generate_samples(model, prompt_ids, S, MAX_NEW, pad, eos, seed=21)
    assert model.generation_config is shipped  # restored, same object
    assert warped_run.completion_ids == reference.completion_ids
    # and the samples really come from the full softmax: some use tokens outside every top-5
    logits = model(input_ids=torch.tensor([prompt_ids[0]])).logits[0, -1]
    top5 = set(logits.topk(5).indices.tolist())
    more = generate_samples(model, [prompt_ids[0]], 32, 1, pad, eos, seed=2)
    assert {c[0] for c in more.completion_ids} - top5


def test_sampler_is_unwarped_for_a_peft_wrapped_model(tok, prompt_ids):
    peft = pytest.importorskip("peft")
    pad, eos = _ids(tok)
    base = eos_prone(tiny_model(tok, seed=0), tok)
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True, lora_dropout=0.0)
    wrapped = peft.get_peft_model(base, cfg)
    wrapped.eval()
    reference = generate_samples(wrapped, prompt_ids, S, MAX_NEW, pad, eos, seed=4)
    wrapped.base_model.model.generation_config = GenerationConfig(do_sample=True, top_k=3, temperature=0.5)
    warped = generate_samples(wrapped, prompt_ids, S, MAX_NEW, pad, eos, seed=4)
    assert warped.completion_ids == reference.completion_ids
    assert wrapped.base_model.model.generation_config.top_k == 3


# ----------------------------------------------------------------------------- state hygiene
def _mixed_mode_model(tok):
    m = tiny_model(tok, seed=1)
    m.train()
    m.transformer.h[0].eval()
    m.transformer.h[1].attn.eval()
    return m


def _modes(model):
    return [(name, mod.training) for name, mod in model.named_modules()]


@pytest.mark.parametrize("side", ["right", "left"])
def test_preserved_state_restores_rng_modes_and_tokenizer(side):
    tok = tiny_tokenizer()
    tok.padding_side = side
    model = _mixed_mode_model(tok)
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    modes = _modes(model)
    torch_state = torch.random.get_rng_state().clone()
    np_state = np.random.get_state()
    py_state = random.getstate()
    with preserved_state(model, tok):
        model.eval()
        tok.padding_side = "left" if side == "right" else "right"
        tok.pad_token = tok.eos_token
        torch.rand(10), np.random.rand(10), random.random()
        pad, eos = prepare_tokenizer(tok)
        generate_samples(model, [[7, 8]], 2, 3, pad, eos, seed=99)
    assert _modes(model) == modes
    assert tok.padding_side == side
    assert tok.pad_token == "<pad>"
    assert torch.equal(torch.random.get_rng_state(), torch_state)
    assert random.getstate() == py_state
    after = np.random.get_state()
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1]) and after[2:] == np_state[2:]
    # the streams continue exactly as if nothing had happened
    reference = (torch.rand(3), np.random.rand(3), random.random())
    torch.random.set_rng_state(torch_state), np.random.set_state(np_state), random.setstate(py_state)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(reference[0], again[0]) and np.array_equal(reference[1], again[1]) and reference[2] == again[2]


def test_preserved_state_restores_a_missing_pad_token_and_survives_exceptions():
    tok = tiny_tokenizer(pad=False)
    assert tok.pad_token is None
    model = _mixed_mode_model(tok)
    modes = _modes(model)
    state = torch.random.get_rng_state().clone()
    with pytest.raises(RuntimeError, match="boom"):
        with preserved_state(model, tok):
            tok.pad_token = tok.eos_token
            model.eval()
            torch.rand(5)
            raise RuntimeError("boom")
    assert tok.pad_token is None and tok.pad_token_id is None
    assert _modes(model) == modes
    assert torch.equal(torch.random.get_rng_state(), state)


def test_preserved_state_under_activation_checkpointing_is_quiet(tok, prompt_ids):
    model = tiny_model(tok, seed=1)
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    model.train()
    pad, eos = _ids(tok)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. transformers 5's is_gradient_checkpointing FutureWarning
        with preserved_state(model, tok):
            model.eval()
            generate_samples(model, prompt_ids, 2, 3, pad, eos, seed=0)
    assert model.training and model.is_activation_checkpointing


def test_prepare_tokenizer_borrows_eos_and_rejects_neither():
    tok = tiny_tokenizer()
    assert prepare_tokenizer(tok) == (tok.pad_token_id, tok.eos_token_id)
    no_pad = tiny_tokenizer(pad=False)
    assert prepare_tokenizer(no_pad) == (no_pad.eos_token_id, no_pad.eos_token_id)
    assert no_pad.pad_token is None  # not mutated
    neither = tiny_tokenizer(pad=False)
    neither.eos_token = None
    assert neither.eos_token_id is None and neither.pad_token_id is None
    with pytest.raises(SamplerConfigError, match="neither a pad token nor an EOS token"):
        prepare_tokenizer(neither)
    with pytest.raises(SamplerConfigError, match="no tokenizer"):
        prepare_tokenizer(None)


def test_encode_prompts_rejects_empty_prompt():
    tok = tiny_tokenizer()
    with pytest.raises(SamplerConfigError, match="zero tokens"):
        encode_prompts(tok, ["hello", ""], uses_chat_template=True)


# ----------------------------------------------------------------------------- weight snapshots
def _perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_snapshots_swap_in_old_weights_and_restore_live_bit_exactly(tok, prompt_ids):
    pad, eos = _ids(tok)
    model = tiny_model(tok, seed=3).eval()
    snaps = WeightSnapshots(keep=2)
    copies = {}
    for k in range(3):
        snaps.capture(model, k)
        copies[k] = copy.deepcopy(model)
        _perturb(model, seed=k)
    assert snaps.available() == [1, 2]  # keep=2: probe 0 was dropped
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert snaps.nbytes() == 2 * 4 * n_trainable
    live = _state(model)
    params_before = {n: (p, p.data_ptr()) for n, p in model.named_parameters()}

    samples = generate_samples(model, prompt_ids, S, MAX_NEW, pad, eos, seed=0)
    rows = [prompt_ids[p] for p in samples.prompt_index]
    live_logp = sequence_logprobs(model, rows, samples.completion_ids, pad)
    for k in (1, 2):
        with snaps.swapped_in(model, k):
            swapped = sequence_logprobs(model, rows, samples.completion_ids, pad)
            for name, p in model.named_parameters():
                assert torch.equal(p, dict(copies[k].named_parameters())[name])
        separate = sequence_logprobs(copies[k], rows, samples.completion_ids, pad)
        np.testing.assert_allclose(swapped, separate, rtol=0, atol=1e-6)
        assert np.max(np.abs(swapped - live_logp)) > 1e-3
        after = _state(model)
        assert all(torch.equal(after[n], live[n]) for n in live), "live weights not restored bit-exactly"
    # parameters are the same tensors (the optimizer's references stay valid)
    assert all(p is params_before[n][0] and p.data_ptr() == params_before[n][1] for n, p in model.named_parameters())
    with pytest.raises(KeyError):
        with snaps.swapped_in(model, 0):
            pass


def test_snapshots_restore_live_weights_when_scoring_fails(tok):
    model = tiny_model(tok, seed=3)
    snaps = WeightSnapshots(keep=1)
    snaps.capture(model, 0)
    _perturb(model, 1)
    live = _state(model)
    with pytest.raises(RuntimeError):
        with snaps.swapped_in(model, 0):
            raise RuntimeError("scoring failed")
    after = _state(model)
    assert all(torch.equal(after[n], live[n]) for n in live)


def test_snapshots_keep_only_trainable_adapter_weights(tok):
    peft = pytest.importorskip("peft")
    base = tiny_model(tok, seed=0)
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_proj", "c_fc"],
                          fan_in_fan_out=True, lora_dropout=0.0)
    model = peft.get_peft_model(base, cfg)
    snaps = WeightSnapshots(keep=3)
    for k in range(5):
        snaps.capture(model, k)
    assert snaps.available() == [2, 3, 4]
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    assert snaps.nbytes() == 3 * sum(p.numel() * p.element_size() for p in lora.values())
    assert set(snaps.state_dict()[4]) == set(lora)
    none = WeightSnapshots(keep=0)
    none.capture(model, 0)
    assert none.available() == [] and none.nbytes() == 0
    with pytest.raises(ValueError):
        WeightSnapshots(keep=-1)


def test_snapshot_state_dict_round_trip(tok):
    model = tiny_model(tok, seed=0)
    snaps = WeightSnapshots(keep=1)
    snaps.capture(model, 4)
    other = WeightSnapshots(keep=1)
    other.load_state_dict({str(k): v for k, v in snaps.state_dict().items()})
    assert other.available() == [4]
