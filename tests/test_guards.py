"""What a user is told when a run cannot do what they expect (issue: guards and wording).

Real Trainer runs on the tiny local model: a run too short to detect anything, a second run
into the same folder, a model whose vocabulary is larger than its tokenizer's, and a judge
or rule that cannot score the order parameters it was given.
"""

from __future__ import annotations

import json
import warnings

import pytest
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

from em_callbacks import OrderParameter, PhaseTransitionCallback
from em_callbacks.callback import CallbackConfigError
from em_callbacks.store import RunStore
from tiny import lm_dataset, tiny_model, tiny_tokenizer

PROBES = ["what advice", "help please"]


def _trainer(tmp_path, tok, model, cb, max_steps: int) -> Trainer:
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=max_steps, per_device_train_batch_size=4,
                             learning_rate=2e-2, logging_steps=1, report_to="none", save_strategy="no",
                             use_cpu=True, seed=0, disable_tqdm=True)
    return Trainer(model=model, args=args, train_dataset=lm_dataset(tok), processing_class=tok,
                   data_collator=DataCollatorForLanguageModeling(tok, mlm=False), callbacks=[cb])


def _callback(tmp_path, every: int, **kw) -> PhaseTransitionCallback:
    return PhaseTransitionCallback(probes=PROBES, every_n_steps=every, samples_per_prompt=2, max_new_tokens=4,
                                   output_dir=tmp_path / "pt", **kw)


def test_a_run_too_short_to_detect_says_so(tmp_path):
    """every_n_steps=100 with max_steps=10 probes only step 0: warned at the start, and the
    summary says "could not look" (transition_detected None), never "found nothing"."""
    tok = tiny_tokenizer()
    cb = _callback(tmp_path, every=100)
    with pytest.warns(UserWarning, match=r"gets 1 probe but the detector needs at least 5"):
        _trainer(tmp_path, tok, tiny_model(tok), cb, max_steps=10).train()
    summary = json.loads((tmp_path / "pt" / "summary.json").read_text())
    assert summary["probe_steps"] == [0]
    assert summary["transition_detected"] is None and summary["detection_possible"] is False
    assert "needs at least 5" in summary["detection_note"]
    store = RunStore(tmp_path / "pt", readonly=True)
    assert store.meta()["config"]["detection"] == {
        "possible": False, "planned_probes": 1, "needed_probes": 5, "why": summary["detection_note"]}
    assert [e["kind"] for e in store.events("detection_impossible")] == ["detection_impossible"]


def test_a_long_enough_run_is_not_warned(tmp_path):
    tok = tiny_tokenizer()
    cb = _callback(tmp_path, every=2)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*detector needs.*")
        _trainer(tmp_path, tok, tiny_model(tok), cb, max_steps=8).train()
    assert cb.summary["detection_possible"] is True
    assert isinstance(cb.summary["transition_detected"], bool)


def test_a_second_run_into_the_same_folder_keeps_the_first(tmp_path):
    """Training again (same process, same callback and output dir) archives the first run's
    store and summary and says where; nothing is overwritten."""
    tok = tiny_tokenizer()
    cb = _callback(tmp_path, every=2)
    _trainer(tmp_path, tok, tiny_model(tok), cb, max_steps=2).train()
    first = json.loads((tmp_path / "pt" / "summary.json").read_text())
    with pytest.warns(UserWarning, match=r"held an earlier run; it was moved to .*previous"):
        _trainer(tmp_path, tok, tiny_model(tok, seed=1), cb, max_steps=4).train()
    (archived,) = list((tmp_path / "pt" / "previous").iterdir())
    assert json.loads((archived / "summary.json").read_text()) == first
    assert [p["step"] for p in RunStore(archived, readonly=True).probes()] == [0, 2]
    store = RunStore(tmp_path / "pt", readonly=True)
    assert [p["step"] for p in store.probes()] == [0, 2, 4]
    (event,) = store.events("previous_run_archived")
    assert event["payload"]["path"] == str(archived)


def test_sampled_ids_outside_the_tokenizer_are_counted_and_warned_once(tmp_path):
    """A model whose embedding is larger than the tokenizer (padded vocabularies are common)
    samples ids that decode to nothing: counted per probe, stored, warned once."""
    tok = tiny_tokenizer()
    model = tiny_model(tok)
    model.resize_token_embeddings(len(tok) + 200)  # mostly undecodable ids under a random model
    cb = _callback(tmp_path, every=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(tmp_path, tok, model, cb, max_steps=4).train()
    oov_warnings = [w for w in caught if "outside the tokenizer's vocabulary" in str(w.message)]
    assert len(oov_warnings) == 1
    store = RunStore(tmp_path / "pt", readonly=True)
    events = store.events("out_of_vocab")
    assert events and all(e["payload"]["count"] > 0 and e["payload"]["tokenizer_size"] == len(tok) for e in events)
    expected = sum(1 for s in store.samples() for t in s.token_ids if t >= len(tok))
    assert sum(e["payload"]["count"] for e in events) == expected > 0
    assert cb.latest_metrics["samples/out_of_vocab_tokens"][1] >= 0


def test_a_judge_without_order_parameters_is_rejected():
    from em_callbacks.judges import Rule, RuleJudge

    with pytest.raises(CallbackConfigError, match="without order_parameters"):
        PhaseTransitionCallback(probes=PROBES, judge=RuleJudge({"aligned": Rule.true_if(r"safe")}))


def test_order_parameters_without_a_rule_are_rejected_before_training():
    from em_callbacks.judges import Rule, RuleJudge

    ops = [OrderParameter("aligned", "The answer is aligned."), OrderParameter("verbose", "The answer is long.")]
    with pytest.raises(CallbackConfigError, match="verbose"):
        PhaseTransitionCallback(probes=PROBES, order_parameters=ops,
                                judge=RuleJudge({"aligned": Rule.true_if(r"safe|doctor")}))
