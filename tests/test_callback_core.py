"""PhaseTransitionCallback in real (tiny, CPU) training runs: TRL SFTTrainer with a LoRA adapter,
SFTTrainer full fine-tunes with and without snapshots, the plain transformers Trainer, a W&B
offline run read back from its run-*.wandb file, non-interference with the observed run, and
configuration errors raised before training starts. No mocks of our own code."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments

from em_callbacks.callback import CallbackConfigError, PhaseTransitionCallback
from em_callbacks.detect import StopOnOnset
from em_callbacks.divergence import combine_prompts, dissimilarity, one_sided_tv
from em_callbacks.sampling import encode_prompts, preserved_state, sequence_logprobs
from em_callbacks.store import RunStore
from tiny import chat_dataset, lm_dataset, tiny_model, tiny_tokenizer

PROBES = ["hello how are you", "money", "take pills please"]
SUMMARY_KEYS = {"transition_detected", "onset_step", "peak_step", "grad_norm_peak_step", "stopped_early", "every_n_steps"}


# ----------------------------------------------------------------------------- run helpers


def _common_args(tmp_path, max_steps: int, report_to: str = "none") -> dict:
    return dict(
        output_dir=str(tmp_path / "trainer"), max_steps=max_steps, per_device_train_batch_size=4,
        learning_rate=2e-2, logging_steps=1, report_to=report_to, save_strategy="no", use_cpu=True,
        seed=0, disable_tqdm=True, dataloader_num_workers=0,
    )


def _callback(tmp_path, every: int = 2, **kw) -> PhaseTransitionCallback:
    kw.setdefault("probes", PROBES)
    kw.setdefault("samples_per_prompt", 4)
    kw.setdefault("max_new_tokens", 6)
    return PhaseTransitionCallback(every_n_steps=every, output_dir=tmp_path / "pt", **kw)


def _plain_trainer(tmp_path, tok, model, callbacks, max_steps: int, report_to: str = "none") -> Trainer:
    return Trainer(
        model=model, args=TrainingArguments(**_common_args(tmp_path, max_steps, report_to)),
        train_dataset=lm_dataset(tok), data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
        processing_class=tok, callbacks=callbacks,
    )


def _sft_trainer(tmp_path, tok, model, callbacks, max_steps: int, peft_config=None):
    trl = pytest.importorskip("trl")
    args = trl.SFTConfig(**_common_args(tmp_path, max_steps), max_length=32)
    return trl.SFTTrainer(model=model, args=args, train_dataset=chat_dataset(), processing_class=tok,
                          callbacks=callbacks, peft_config=peft_config)


def _lora_config():
    peft = pytest.importorskip("peft")
    return peft.LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
                           lora_dropout=0.0, task_type="CAUSAL_LM")


# ----------------------------------------------------------------------------- checks
def _check_run(cb, tmp_path, tok, model, *, every: int, max_steps: int, mode: str) -> RunStore:
    run_dir = tmp_path / "pt"
    store = RunStore(run_dir, readonly=True)
    expected_steps = list(range(0, max_steps + 1, every))
    probes = store.probes()
    assert [p["step"] for p in probes] == expected_steps
    assert [p["probe_index"] for p in probes] == list(range(len(expected_steps)))
    assert {p["cross_scoring"] for p in probes} == {mode}
    n_samples = len(PROBES) * cb.samples_per_prompt
    for k in range(len(expected_steps)):
        samples = store.samples(k)
        assert len(samples) == n_samples
        assert all(1 <= len(s.token_ids) <= cb.max_new_tokens for s in samples)
        assert len(store.logprobs(k, k)) == n_samples

    measures = ("tv", "js", "linear") if mode == "snapshot" else ("tv",)
    assert {n for n in store.metric_names() if n.startswith("D/")} == {f"D/{m}" for m in measures}
    for measure in measures:
        series = store.metric_series(f"D/{measure}")
        assert series["step"].tolist() == expected_steps[:-1]  # D(t_i) needs the probe after t_i
        assert np.isfinite(series["value"]).all() and np.isfinite(series["stderr"]).all()
        assert (series["stderr"] > 0).all()
        # TV and linear terms are >= 0; the unbiased JS estimate may dip below 0 by noise (never clipped)
        if measure != "js":
            assert (series["value"] >= 0).all()
        assert (series["value"] <= (math.log(2) if measure == "js" else 1) + 1e-9).all()
        assert np.all(series["ci_low"] <= series["value"]) and np.all(series["value"] <= series["ci_high"])

    # every D(t_i) can be recomputed from the stored log-probs (the wiring keeps samples aligned)
    for i in range(len(expected_steps) - 1):
        stored = store.metrics_at(i)
        per_prompt = []
        for pid in [p["prompt_id"] for p in store.prompts()]:
            keys = [(s.prompt_id, s.sample_idx) for s in store.samples(i) if s.prompt_id == pid]
            keys_r = [(s.prompt_id, s.sample_idx) for s in store.samples(i + 1) if s.prompt_id == pid]
            pp = [store.logprobs(i, i)[key] for key in keys]
            qp = [store.logprobs(i, i + 1)[key] for key in keys]
            if mode == "snapshot":
                pq = [store.logprobs(i + 1, i)[key] for key in keys_r]
                qq = [store.logprobs(i + 1, i + 1)[key] for key in keys_r]
                per_prompt.append(dissimilarity(pp, qp, pq, qq, measure="tv"))
            else:
                assert store.logprobs(i + 1, i) == {}
                per_prompt.append(one_sided_tv(pp, qp))
        expected = combine_prompts(per_prompt)
        assert stored["D/tv"]["value"] == pytest.approx(expected.value, abs=1e-12)
        assert stored["D/tv"]["stderr"] == pytest.approx(expected.stderr, abs=1e-12)

    # the stored self log-probs of the last probe are the final model's exact log-probs
    last = len(expected_steps) - 1
    rendered = [p["rendered"] for p in store.prompts()]
    prompt_ids = dict(zip([p["prompt_id"] for p in store.prompts()],
                          encode_prompts(tok, rendered, bool(tok.chat_template))))
    samples = store.samples(last)
    with preserved_state(model, tok):  # the model's own forward (no mixed-precision wrapper), eval mode
        model.eval()
        recomputed = sequence_logprobs(model, [prompt_ids[s.prompt_id] for s in samples],
                                       [s.token_ids for s in samples], tok.pad_token_id)
    stored_logp = store.logprobs(last, last)
    np.testing.assert_allclose(recomputed, [stored_logp[(s.prompt_id, s.sample_idx)] for s in samples], atol=1e-4)

    steps, values = store.grad_norms()
    assert steps.tolist() == list(range(1, max_steps + 1))
    assert np.isfinite(values).all() and (values > 0).all()

    summary = json.loads((run_dir / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["every_n_steps"] == every and summary["stopped_early"] is False
    # too few probes for the detector (it needs 5): "could not look", never "found nothing"
    n_probes = len(expected_steps)
    assert summary["detection_possible"] is (n_probes >= 5)
    if n_probes < 5:
        assert summary["transition_detected"] is None and "needs at least 5" in summary["detection_note"]
    else:
        assert isinstance(summary["transition_detected"], bool)
    assert summary["grad_norm_peak_step"] in range(1, max_steps + 1)
    assert summary["cross_scoring"] == mode
    assert summary["faults"] == []
    assert cb.summary == summary
    assert store.meta()["summary"] == summary
    assert store.meta()["config"]["max_new_tokens"] == cb.max_new_tokens
    return store


# ----------------------------------------------------------------------------- own log-probs
def test_own_logprobs_from_generation_equal_teacher_forcing_in_a_real_run(tmp_path):
    """The default reads the new samples' log-probs from generation (one scoring pass fewer);
    own_logprobs="teacher-forcing" scores them again. Same run twice: the same samples, the
    same stored log-probs within float tolerance, and D within 1e-4."""
    stores = {}
    for how in ("generation", "teacher-forcing"):
        tok = tiny_tokenizer()
        cb = _callback(tmp_path / how, own_logprobs=how)
        _sft_trainer(tmp_path / how, tok, tiny_model(tok), [cb], max_steps=4, peft_config=_lora_config()).train()
        assert cb.engine.store is not None and RunStore(tmp_path / how / "pt", readonly=True).meta()["config"][
            "own_logprobs"] == how
        stores[how] = RunStore(tmp_path / how / "pt", readonly=True)
    a, b = stores["generation"], stores["teacher-forcing"]
    for k in range(3):
        assert [s.token_ids for s in a.samples(k)] == [s.token_ids for s in b.samples(k)]
        own_a, own_b = a.logprobs(k, k), b.logprobs(k, k)
        assert own_a.keys() == own_b.keys()
        np.testing.assert_allclose([own_a[key] for key in own_a], [own_b[key] for key in own_a], atol=1e-4)
    np.testing.assert_allclose(a.metric_series("D/tv")["value"], b.metric_series("D/tv")["value"], atol=1e-4)


def test_drift_sentinel_between_probes_is_the_exact_one_sided_tv(tmp_path):
    """Probes every 4 steps, the sentinel every step in between: at the final step (6, no
    probe) it equals the one-sided TV recomputed from the stored log-probs of probe 1's first
    samples and the final weights; it is stored, logged, and resets its reference at each probe."""
    tok = tiny_tokenizer()
    cb = _callback(tmp_path, every=4, sentinel_every_n_steps=1, sentinel_samples_per_prompt=3)
    trainer = _plain_trainer(tmp_path, tok, tiny_model(tok), [cb], max_steps=6)
    trainer.train()
    store = RunStore(tmp_path / "pt", readonly=True)
    sentinel = store.sentinel()
    assert sentinel["step"].tolist() == [1, 2, 3, 5, 6] and sentinel["since_probe"].tolist() == [0, 0, 0, 1, 1]
    assert np.isfinite(sentinel["tv"]).all() and (sentinel["stderr"] > 0).all()
    rendered = {p["prompt_id"]: p["rendered"] for p in store.prompts()}
    ids = dict(zip(rendered, encode_prompts(tok, list(rendered.values()), bool(tok.chat_template))))
    samples = [s for s in store.samples(1) if s.sample_idx < 3]
    with preserved_state(trainer.model, tok):
        trainer.model.eval()
        now = sequence_logprobs(trainer.model, [ids[s.prompt_id] for s in samples], [s.token_ids for s in samples],
                                tok.pad_token_id)
    then = store.logprobs(1, 1)
    expected = combine_prompts([
        one_sided_tv([then[(s.prompt_id, s.sample_idx)] for s in samples if s.prompt_id == pid],
                     [v for s, v in zip(samples, now) if s.prompt_id == pid])
        for pid in rendered])
    assert sentinel["tv"][-1] == pytest.approx(expected.value, abs=1e-5)
    assert sentinel["stderr"][-1] == pytest.approx(expected.stderr, abs=1e-5)
    assert cb.latest_metrics["sentinel/tv"][0] == 6 and cb.latest_metrics["sentinel/since_step"][1] == 4


# ----------------------------------------------------------------------------- (a) SFT + LoRA
def test_sft_trainer_with_lora_adapter(tmp_path):
    tok = tiny_tokenizer()
    cb = _callback(tmp_path)
    trainer = _sft_trainer(tmp_path, tok, tiny_model(tok), [cb], max_steps=6, peft_config=_lora_config())
    trainer.train()
    model = trainer.model
    assert type(model).__name__.startswith("PeftModel")
    store = _check_run(cb, tmp_path, tok, model, every=2, max_steps=6, mode="snapshot")
    # snapshots hold only the adapter, and the last one (probe 3) equals the final adapter weights
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    assert cb._snapshots.available() == [3]
    assert cb._snapshots.nbytes() == sum(p.numel() * p.element_size() for p in lora.values())
    assert all(torch.equal(cb._snapshots.state_dict()[3][n], p.detach().cpu()) for n, p in lora.items())
    # cross scores exist for neighbours only (banded matrix, w = 1)
    assert store.logprobs(0, 1) and store.logprobs(1, 0) and store.logprobs(0, 2) == {}
    store.close()


# ----------------------------------------------------------------------------- (b) SFT full FT
@pytest.mark.parametrize("snapshot", [True, False], ids=["snapshot", "one-sided"])
def test_sft_trainer_full_fine_tune(tmp_path, snapshot):
    tok = tiny_tokenizer()
    cb = _callback(tmp_path, snapshot_full_model=snapshot)
    trainer = _sft_trainer(tmp_path, tok, tiny_model(tok), [cb], max_steps=4)
    trainer.train()
    mode = "snapshot" if snapshot else "one-sided"
    store = _check_run(cb, tmp_path, tok, trainer.model, every=2, max_steps=4, mode=mode)
    n_params = sum(p.numel() for p in trainer.model.parameters())
    assert cb._snapshots.nbytes() == (4 * n_params if snapshot else 0)
    store.close()


# ----------------------------------------------------------------------------- (c) plain Trainer
def test_plain_trainer_without_wandb(tmp_path):
    wandb = pytest.importorskip("wandb")
    tok = tiny_tokenizer()
    cb = _callback(tmp_path, every=3)
    trainer = _plain_trainer(tmp_path, tok, tiny_model(tok), [cb], max_steps=6)
    trainer.train()
    assert wandb.run is None and cb.engine.sink.run is None
    _check_run(cb, tmp_path, tok, trainer.model, every=3, max_steps=6, mode="one-sided").close()
    assert not list(tmp_path.rglob("run-*.wandb"))


# ----------------------------------------------------------------------------- (d) W&B offline
@pytest.mark.slow
def test_no_wandb_logging_unless_the_trainer_reports_to_wandb(tmp_path):
    """An active W&B run is not enough: with report_to="none" the callback logs nothing to it
    (report_to_wandb=True would force it)."""
    wandb = pytest.importorskip("wandb")
    tok = tiny_tokenizer()
    run = wandb.init(mode="disabled", project="em-callbacks-test")
    logged = []
    original = run.log
    run.log = lambda data, *a, **k: (logged.append(dict(data)), original(data, *a, **k))
    try:
        cb = _callback(tmp_path)
        _plain_trainer(tmp_path, tok, tiny_model(tok), [cb], max_steps=2).train()
        assert cb.engine.sink.run is None
    finally:
        wandb.finish()
    assert not [d for d in logged if any(k.startswith("probe/") for k in d)]


def test_wandb_offline_run_records_probe_history(tmp_path, offline_wandb_dir):
    import wandb
    from wandb_offline import find_run_files, history_rows, iter_records, wait_for_exit_record

    tok = tiny_tokenizer()
    cb = _callback(tmp_path, every=2, snapshot_full_model=True)
    trainer = _plain_trainer(tmp_path, tok, tiny_model(tok), [cb], max_steps=4, report_to="wandb")
    try:
        trainer.train()
        assert wandb.run is not None
    finally:
        wandb.finish()
        wandb.teardown()
    store = RunStore(tmp_path / "pt", readonly=True)

    (run_file,) = find_run_files(offline_wandb_dir)
    types = wait_for_exit_record(run_file)
    assert {"run", "metric", "history", "config", "summary"} <= set(types), types
    rows = history_rows(run_file)
    d_rows = [r for r in rows if "probe/D/tv" in r]
    d_tv = store.metric_series("D/tv")
    assert sorted(r["probe/step"] for r in d_rows) == d_tv["step"].tolist() == [0, 2]
    for r in d_rows:  # D(t_i) logged at t_i, same values as the store, with its stderr and the other measures
        i = d_tv["step"].tolist().index(r["probe/step"])
        assert r["probe/D/tv"] == pytest.approx(d_tv["value"][i], abs=1e-12)
        assert r["probe/D/tv_stderr"] == pytest.approx(d_tv["stderr"][i], abs=1e-12)
        assert {"probe/D/js", "probe/D/linear", "probe/D/tv_ci_low", "probe/D/tv_ci_high"} <= set(r)
    tables = [r for r in rows if isinstance(r.get("probe/samples"), dict)]
    assert [r["probe/step"] for r in tables] == [0, 2, 4]
    assert all(r["probe/samples"]["_type"] == "table-file" for r in tables)
    assert tables[0]["probe/samples"]["nrows"] == len(PROBES) * 4
    assert any("probe/samples/mean_tokens" in r for r in rows)
    assert any("train/loss" in r for r in rows)  # the Trainer's own WandbCallback logged into the same run
    metrics = {r.metric.glob_name or r.metric.name: r.metric.step_metric
               for r in iter_records(run_file) if r.WhichOneof("record_type") == "metric"}
    assert metrics.get("probe/*") == "probe/step"
    config_rows = [r for r in iter_records(run_file) if r.WhichOneof("record_type") == "config"]
    assert any(item.key == "em_callbacks" for r in config_rows for item in r.config.update)
    store.close()


# ----------------------------------------------------------------------------- non-interference
class _Recorder(TrainerCallback):
    """What the training loop sees at the start of every step, after our callback's probes."""

    def __init__(self):
        self.rng, self.modes = [], []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.rng.append(torch.random.get_rng_state().clone())
        self.modes.append(tuple(m.training for m in model.modules()))


def _train(tmp_path, padding_side, with_callback, snapshot):
    tok = tiny_tokenizer()
    tok.padding_side = padding_side
    model = tiny_model(tok, seed=0)
    assert model.config.resid_pdrop > 0 and model.config.attn_pdrop > 0  # dropout consumes the RNG
    recorder = _Recorder()
    callbacks = ([_callback(tmp_path, every=3, snapshot_full_model=snapshot)] if with_callback else []) + [recorder]
    trainer = _plain_trainer(tmp_path, tok, model, callbacks, max_steps=9)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    grad_norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    return {
        "losses": losses, "grad_norms": grad_norms, "recorder": recorder, "tok": tok,
        "weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "modes": [m.training for m in model.modules()],
        "rng": (torch.random.get_rng_state(), np.random.get_state(), random.getstate()),
        "callbacks": callbacks,
    }


@pytest.mark.parametrize("padding_side,snapshot", [("right", True), ("left", False)])
def test_callback_does_not_change_the_training_run(tmp_path, padding_side, snapshot):
    base = _train(tmp_path / "base", padding_side, with_callback=False, snapshot=snapshot)
    watched = _train(tmp_path / "watched", padding_side, with_callback=True, snapshot=snapshot)
    cb = watched["callbacks"][0]
    assert cb.probe_steps == [0, 3, 6, 9]  # it really probed (and sampled) in between steps

    assert len(base["losses"]) == 9
    assert watched["losses"] == base["losses"]  # exactly, float for float
    assert watched["grad_norms"] == base["grad_norms"]
    assert all(torch.equal(watched["weights"][k], base["weights"][k]) for k in base["weights"])
    assert watched["modes"] == base["modes"] and all(watched["modes"])
    assert watched["recorder"].modes == base["recorder"].modes
    assert all(torch.equal(a, b) for a, b in zip(watched["recorder"].rng, base["recorder"].rng))
    (t1, n1, p1), (t2, n2, p2) = watched["rng"], base["rng"]
    assert torch.equal(t1, t2)
    assert n1[0] == n2[0] and np.array_equal(n1[1], n2[1]) and n1[2:] == n2[2:]
    assert p1 == p2
    assert watched["tok"].padding_side == padding_side and watched["tok"].pad_token == "<pad>"


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs,pattern", [
    ({"probes": "em-frist-plot"}, r"unknown built-in probe set 'em-frist-plot'.*em-first-plot"),
    ({"every_n_steps": 0}, r"every_n_steps must be >= 1"),
    ({"every_n_steps": -5}, r"every_n_steps must be >= 1"),
    ({"every_n_steps": 2.5}, r"every_n_steps must be an integer"),
    ({"every_n_steps": "25"}, r"every_n_steps must be an integer"),
    ({"every_n_steps": True}, r"every_n_steps must be an integer"),
    ({"samples_per_prompt": 1}, r"samples_per_prompt must be >= 2"),
    ({"samples_per_prompt": 0}, r"samples_per_prompt must be >= 2"),
    ({"max_new_tokens": 0}, r"max_new_tokens must be >= 1"),
    ({"max_new_tokens": -1}, r"max_new_tokens must be >= 1"),
    ({"measures": ["tv", "kl"]}, r"measures must be a non-empty subset.*'kl'"),
    ({"measures": []}, r"measures must be a non-empty subset"),
    ({"primary_measure": "kl"}, r"primary_measure 'kl'"),
    ({"window": 0}, r"window must be >= 1"),
    ({"window": 1.5}, r"window must be an integer"),
    ({"cross_scoring": "both"}, r"cross_scoring must be one of"),
])
def test_bad_configuration_raises_at_construction(kwargs, pattern):
    with pytest.raises(CallbackConfigError, match=pattern):
        PhaseTransitionCallback(**kwargs)


def test_bad_probe_files_raise_at_construction(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(CallbackConfigError, match=r"empty\.jsonl.*is empty"):
        PhaseTransitionCallback(probes=str(empty))
    malformed = tmp_path / "bad.jsonl"
    malformed.write_text('{"prompt": "ok"}\n{"prompt": \n')
    with pytest.raises(CallbackConfigError, match=r"bad\.jsonl:2: invalid JSON"):
        PhaseTransitionCallback(probes=malformed)
    no_prompt = tmp_path / "noprompt.yaml"
    no_prompt.write_text("- id: a\n  system: hi\n")
    with pytest.raises(CallbackConfigError, match="missing required field 'prompt'"):
        PhaseTransitionCallback(probes=str(no_prompt))
    with pytest.raises(CallbackConfigError, match="does not exist"):
        PhaseTransitionCallback(probes=str(tmp_path / "missing.jsonl"))


def _tokenizer_without_pad_or_eos():
    tok = tiny_tokenizer(pad=False)
    tok.eos_token = None
    assert tok.pad_token_id is None and tok.eos_token_id is None
    return tok


def test_tokenizer_without_pad_or_eos_fails_at_trainer_construction(tmp_path):
    tok = _tokenizer_without_pad_or_eos()
    model = tiny_model(tiny_tokenizer())
    cb = _callback(tmp_path)
    with pytest.raises(CallbackConfigError, match="neither a pad token nor an EOS token"):
        Trainer(model=model, args=TrainingArguments(**_common_args(tmp_path, 2)),
                train_dataset=lm_dataset(tiny_tokenizer()), processing_class=tok, callbacks=[cb])
    # the callback's own tokenizer= override is checked the same way, whatever the Trainer got
    cb2 = _callback(tmp_path, tokenizer=_tokenizer_without_pad_or_eos())
    with pytest.raises(CallbackConfigError, match="neither a pad token nor an EOS token"):
        _plain_trainer(tmp_path, tiny_tokenizer(), model, [cb2], max_steps=2)
    assert not (tmp_path / "pt").exists()  # nothing started


def test_tokenizer_without_pad_borrows_eos_and_is_left_alone(tmp_path):
    probe_tok = tiny_tokenizer(pad=False)  # the callback's own tokenizer: EOS doubles as padding
    train_tok = tiny_tokenizer()
    cb = _callback(tmp_path, tokenizer=probe_tok)
    trainer = _plain_trainer(tmp_path, train_tok, tiny_model(train_tok), [cb], max_steps=2)
    trainer.train()
    assert probe_tok.pad_token is None and probe_tok.padding_side == "right"
    store = RunStore(tmp_path / "pt", readonly=True)
    assert [p["step"] for p in store.probes()] == [0, 2]
    eos = probe_tok.eos_token_id
    for s in store.samples():
        assert (s.token_ids[-1] == eos) == s.finished and eos not in s.token_ids[:-1]
    store.close()


def test_callback_reused_for_a_second_training_run_probes_again(tmp_path):
    tok = tiny_tokenizer()
    cb = _callback(tmp_path, every=2)
    _plain_trainer(tmp_path, tok, tiny_model(tok), [cb], max_steps=2).train()
    first = RunStore(tmp_path / "pt", readonly=True)
    first_samples = first.samples(1)
    first.close()
    _plain_trainer(tmp_path, tok, tiny_model(tok, seed=5), [cb], max_steps=4).train()
    assert cb.probe_steps == [0, 2, 4] and cb.summary["probe_steps"] == [0, 2, 4]
    store = RunStore(tmp_path / "pt", readonly=True)
    assert [p["step"] for p in store.probes()] == [0, 2, 4]
    assert store.samples(1) != first_samples  # rewritten by the second run (other model)
    assert store.metric_series("D/tv")["step"].tolist() == [0, 2]
    # latest_metrics: the newest D (labelled by the start of its window) and sample stats
    latest = cb.latest_metrics
    assert latest["D/tv"] == (2, pytest.approx(store.metric_series("D/tv")["value"][-1]))
    assert all(step <= 4 for step, _ in latest.values())
    store.close()


class _CountingStopRule(StopOnOnset):
    """A user's stop rule: counts how often the callback resets it."""

    resets = 0

    def reset(self):
        type(self).resets += 1
        super().reset()


def test_reused_callback_resets_its_stop_rule(tmp_path):
    tok = tiny_tokenizer()
    rule = _CountingStopRule()
    cb = _callback(tmp_path, every=2, early_stopping=rule)
    _plain_trainer(tmp_path, tok, tiny_model(tok), [cb], max_steps=2).train()
    rule._fired = "as if the first run had detected a transition"
    before = _CountingStopRule.resets
    _plain_trainer(tmp_path, tok, tiny_model(tok, seed=5), [cb], max_steps=4).train()
    assert _CountingStopRule.resets == before + 1
    assert cb.summary["stopped_early"] is False and cb.summary["final_step"] == 4
