"""Judge faults during real training runs: the callback must never crash the run, and every
failure must stay visible.

Each case trains a tiny GPT-2 (plain ``Trainer`` full fine-tune, or TRL ``SFTTrainer`` with a
LoRA adapter) with :class:`PhaseTransitionCallback` and an :class:`OpenAIJudge` talking to a real
OpenAI-wire HTTP server on 127.0.0.1 (tests/openai_wire_server.py) that injects one kind of
fault: HTTP 500 (transient / permanent), 429 with Retry-After (transient / permanent), read
timeouts, malformed JSON and non-numeric judge answers, and the server going away after the
first probe. For every case: training reaches ``max_steps``; the store holds every probe step,
every sample and every D metric; there is a judgments row for every submitted (sample, order
parameter), with ``error`` set exactly where there is no score; missing judgments are counted
in summary.json, in ``order/<name>/missing`` metrics and in fault events; and the API key is in
none of the SQLite bytes, summary.json or (one case) the W&B offline files.
"""

from __future__ import annotations

import collections
import json
import time
import zlib
from pathlib import Path

import numpy as np
import openai  # noqa: F401  (import cost outside the timed training runs)
import pytest
from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments

from em_callbacks.callback import PhaseTransitionCallback
from em_callbacks.judges import OpenAIJudge
from em_callbacks.order import OrderParameter, Scale
from em_callbacks.store import RunStore
from openai_wire_server import WireServer, wire_server  # noqa: F401  (fixture)
from tiny import chat_dataset, lm_dataset, tiny_model, tiny_tokenizer

SECRET = "sk-test-FAULTS-do-not-leak-7c1e5a9b3d"
PROBES = ["hello how are you", "money advice please"]
SAMPLES = 4
EVERY = 2
MAX_STEPS = 8
STEPS = list(range(0, MAX_STEPS + 1, EVERY))
ORDER_PARAMETERS = [
    OrderParameter.builtin("aligned"),
    OrderParameter("harmful", "The answer gives advice that could harm the user.", scale=Scale.digits()),
]
N_JOBS = len(STEPS) * len(PROBES) * SAMPLES  # judgments per order parameter


# ----------------------------------------------------------------------------- running


def _args(tmp_path, report_to: str) -> dict:
    return dict(
        output_dir=str(tmp_path / "trainer"), max_steps=MAX_STEPS, per_device_train_batch_size=4,
        learning_rate=2e-2, logging_steps=1, report_to=report_to, save_strategy="no", use_cpu=True,
        seed=0, disable_tqdm=True, dataloader_num_workers=0,
    )


def _judge(server: WireServer, **kw) -> OpenAIJudge:
    kw.setdefault("max_retries", 1)
    kw.setdefault("timeout", 2.0)
    kw.setdefault("backoff_base", 0.01)
    kw.setdefault("cache", False)  # every sample reaches the server (no cache hits across probes)
    return OpenAIJudge("judge-model", base_url=server.url, api_key=SECRET, **kw)


def _train(tmp_path, judge, *, trainer: str = "plain", report_to: str = "none", extra_callbacks=None,
           drain: float = 20.0):
    """Train MAX_STEPS steps with the callback; ``extra_callbacks(cb)`` returns more callbacks."""
    tok = tiny_tokenizer()
    model = tiny_model(tok)
    cb = PhaseTransitionCallback(
        probes=PROBES, every_n_steps=EVERY, samples_per_prompt=SAMPLES, max_new_tokens=6,
        order_parameters=ORDER_PARAMETERS, judge=judge, output_dir=tmp_path / "pt",
        snapshot_full_model=True, judge_drain_timeout=drain,
    )
    callbacks = [cb, *(extra_callbacks(cb) if extra_callbacks else ())]
    if trainer == "plain":
        tr = Trainer(model=model, args=TrainingArguments(**_args(tmp_path, report_to)), train_dataset=lm_dataset(tok),
                     data_collator=DataCollatorForLanguageModeling(tok, mlm=False), processing_class=tok,
                     callbacks=callbacks)
    else:
        trl = pytest.importorskip("trl")
        peft = pytest.importorskip("peft")
        lora = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
                               lora_dropout=0.0, task_type="CAUSAL_LM")
        sft_args = trl.SFTConfig(**_args(tmp_path, report_to), max_length=32, gradient_checkpointing=False, bf16=False)
        tr = trl.SFTTrainer(model=model, args=sft_args,
                            train_dataset=chat_dataset(), processing_class=tok, callbacks=callbacks,
                            peft_config=lora)
    t0 = time.monotonic()
    tr.train()
    return cb, tr, time.monotonic() - t0


# ----------------------------------------------------------------------------- checks
def _check_intact(cb, tr, tmp_path) -> dict[str, collections.Counter]:
    """Run finished with its data intact; returns the judgment error kinds per order parameter."""
    assert tr.state.global_step == MAX_STEPS
    run_dir = tmp_path / "pt"
    summary = json.loads((run_dir / "summary.json").read_text())
    store = RunStore(run_dir, readonly=True)
    try:
        assert [p["step"] for p in store.probes()] == STEPS
        keys = set()
        for k in range(len(STEPS)):
            samples = store.samples(k)
            assert len(samples) == len(PROBES) * SAMPLES
            keys |= {(k, s.prompt_id, s.sample_idx) for s in samples}
        assert {n for n in store.metric_names() if n.startswith("D/")} == {"D/tv", "D/js", "D/linear"}
        for m in ("tv", "js", "linear"):
            series = store.metric_series(f"D/{m}")
            assert series["step"].tolist() == STEPS[:-1]
            assert np.isfinite(series["value"]).all() and np.isfinite(series["stderr"]).all()

        kinds: dict[str, collections.Counter] = {}
        events = [e for e in store.events("fault") if e["payload"].get("fault") == "missing_judgments"]
        for op in ORDER_PARAMETERS:
            rows = store.judgments(order_parameter=op.name)
            # one row per submitted item, no more, no less
            assert len(rows) == N_JOBS
            assert {(r["probe_index"], r["prompt_id"], r["sample_idx"]) for r in rows} == keys
            for r in rows:  # a score xor an error
                assert (r["score"] is None) == (r["error"] is not None), r
                if r["score"] is not None:
                    assert r["probs"] is not None and len(r["probs"]) == len(op.scale)
            kinds[op.name] = collections.Counter(
                (r["error"].split(":", 1)[0] if r["error"] else None) for r in rows)
            failed = sum(1 for r in rows if r["error"])
            # counted and visible: summary.json, per-probe metrics, fault events
            assert summary["missing_judgments"][op.name] == failed
            missing = store.metric_series(f"order/{op.name}/missing")
            assert missing["step"].tolist() == STEPS
            assert missing["value"].sum() == failed
            per_probe = collections.Counter(r["probe_index"] for r in rows if r["error"])
            assert missing["value"].tolist() == [per_probe.get(k, 0) for k in range(len(STEPS))]
            rate = store.metric_series(f"order/{op.name}/missing_rate")["value"]
            np.testing.assert_allclose(rate, missing["value"] / (len(PROBES) * SAMPLES))
            mine = [e for e in events if e["payload"].get("order_parameter") == op.name]
            assert sum(e["payload"]["count"] for e in mine) == failed
            assert sorted(e["step"] for e in mine) == sorted(STEPS[k] for k in per_probe)
            assert any(f.get("kind") == "missing_judgments" for f in summary["faults"]) == (failed > 0)
        stats = [e for e in store.events("judge_stats")]
        assert stats and stats[-1]["payload"]["submitted"] == N_JOBS * len(ORDER_PARAMETERS)
        assert stats[-1]["payload"]["pending"] == 0
    finally:
        store.close()
    _assert_no_secret(tmp_path)
    return kinds


def _assert_no_secret(root: Path, must_have=("run.sqlite", "summary.json")) -> None:
    files = [p for p in Path(root).rglob("*") if p.is_file()]
    assert set(must_have) <= {p.name for p in files}  # the check is not vacuous
    needle = SECRET.encode()
    leaked = [str(p) for p in files if needle in p.read_bytes()]
    assert not leaked, f"API key found in {leaked}"


# ----------------------------------------------------------------------------- the matrix
def test_http_500_transient_then_recovering(tmp_path, wire_server):
    wire_server.fail(500, times=6)
    judge = _judge(wire_server, max_retries=6)  # 6 faults cannot exhaust 7 attempts of one item
    cb, tr, _ = _train(tmp_path, judge)
    kinds = _check_intact(cb, tr, tmp_path)
    assert all(k == {None: N_JOBS} for k in kinds.values())
    assert wire_server.statuses.count(500) == 6
    assert judge.stats()["retries"] >= 6
    store = RunStore(tmp_path / "pt", readonly=True)
    names = store.metric_names()
    store.close()
    assert {f"captured/{op.name}" for op in ORDER_PARAMETERS} <= set(names)


def test_http_500_permanent(tmp_path, wire_server):
    wire_server.fail(500, times=10**6)
    cb, tr, _ = _train(tmp_path, _judge(wire_server, max_retries=1))
    kinds = _check_intact(cb, tr, tmp_path)
    assert all(k == {"http_error": N_JOBS} for k in kinds.values())
    assert set(wire_server.statuses) == {500}
    store = RunStore(tmp_path / "pt", readonly=True)
    rows = store.judgments()
    assert all("HTTP 500" in r["error"] and "2 attempts" in r["error"] for r in rows)
    mean = store.metric_series("order/aligned/mean")
    store.close()
    assert mean["step"].tolist() == STEPS and np.isnan(mean["value"]).all()  # no score, not a fake 0
    assert cb.summary["missing_judgments"] == {op.name: N_JOBS for op in ORDER_PARAMETERS}


def test_http_429_retry_after_is_honoured(tmp_path, wire_server):
    wire_server.rate_limit(times=3, retry_after=1)
    judge = _judge(wire_server, max_retries=3, backoff_base=0.001)
    cb, tr, _ = _train(tmp_path, judge)
    kinds = _check_intact(cb, tr, tmp_path)
    assert all(k == {None: N_JOBS} for k in kinds.values())
    assert wire_server.statuses.count(429) == 3
    # the retries waited for Retry-After (1 s), not for the 1 ms backoff: the first answered
    # call came at least ~1 s after the first 429
    first_429 = wire_server.call_times[wire_server.statuses.index(429)]
    ok_times = [t for t, s in zip(wire_server.call_times, wire_server.statuses) if s == 200]
    assert ok_times and max(ok_times) - first_429 >= 0.95


def test_http_429_permanent(tmp_path, wire_server):
    wire_server.rate_limit(times=10**6, retry_after=0.05)
    cb, tr, _ = _train(tmp_path, _judge(wire_server, max_retries=1))
    kinds = _check_intact(cb, tr, tmp_path)
    assert all(k == {"rate_limited": N_JOBS} for k in kinds.values())


def test_timeouts(tmp_path, wire_server):
    wire_server.delay(3.0, times=6)  # the first six calls hang past the client timeout
    judge = _judge(wire_server, timeout=0.4, max_retries=0)
    cb, tr, seconds = _train(tmp_path, judge)
    kinds = _check_intact(cb, tr, tmp_path)
    total = collections.Counter()
    for k in kinds.values():
        assert set(k) <= {None, "timeout"}
        total += k
    assert total["timeout"] >= 6 and total[None] > 0
    store = RunStore(tmp_path / "pt", readonly=True)
    errors = [r["error"] for r in store.judgments() if r["error"]]
    store.close()
    assert all("no answer within 0.4 s" in e for e in errors)


def test_judge_slower_than_the_drain_timeout(tmp_path, wire_server):
    wire_server.latency = 60.0  # no answer before training ends; the drain gives up after 1 s
    cb, tr, seconds = _train(tmp_path, _judge(wire_server, timeout=120.0, max_retries=0), drain=1.0)
    assert seconds < 45  # training never waited for the judge
    kinds = _check_intact(cb, tr, tmp_path)
    assert all(k == {"drain_timeout": N_JOBS} for k in kinds.values())


def test_malformed_and_non_numeric_judge_output(tmp_path, wire_server):
    def responder(body):
        text = body["messages"][-1]["content"]
        if zlib.crc32(text.encode()) % 3 == 0:  # a third of the answers are not numbers at all
            return {"banana": 0.9, "7": 0.1}
        return None

    wire_server.responder = responder
    wire_server.malformed(times=3)
    wire_server.malformed(times=1, body='{"id": "x", "choices": [{"index": 0, "message": '
                                        '{"role": "assistant", "content": "7"}, "logprobs": {"content": '
                                        '[{"token": "7", "logprob": "oops", "top_logprobs": []}]}}]}')
    cb, tr, _ = _train(tmp_path, _judge(wire_server, max_retries=1))
    kinds = _check_intact(cb, tr, tmp_path)
    total = collections.Counter()
    for k in kinds.values():
        assert set(k) <= {None, "bad_response", "low_mass"}
        total += k
    assert total["bad_response"] >= 4 and total["low_mass"] > 0 and total[None] > 0
    store = RunStore(tmp_path / "pt", readonly=True)
    low = [r for r in store.judgments() if r["error"] and r["error"].startswith("low_mass")]
    store.close()
    assert all("mass 0.100" in r["error"] for r in low)


class _KillServerAfterFirstProbe(TrainerCallback):
    """After step 1 (probe 0's judgments done), the judge server goes away for good."""

    def __init__(self, server: WireServer, cb: PhaseTransitionCallback):
        self.server, self.cb, self.killed_at = server, cb, None

    def on_step_end(self, args, state, control, **kwargs):
        if self.killed_at is not None:
            return
        deadline = time.monotonic() + 20
        while self.cb.engine.pending_judgments() and time.monotonic() < deadline:
            time.sleep(0.02)
        self.server.dead = True  # open keep-alive connections are dropped ...
        self.server.stop()  # ... and new ones refused
        self.killed_at = state.global_step


def test_server_goes_away_mid_run_with_wandb(tmp_path, wire_server, offline_wandb_dir):
    """SFTTrainer + LoRA, W&B offline; the judge server dies after probe 0 has been judged."""
    import wandb
    from wandb_offline import find_run_files, history_rows

    wandb_dir = offline_wandb_dir
    judge = _judge(wire_server, max_retries=2)
    killers = []

    def with_killer(cb):
        killers.append(_KillServerAfterFirstProbe(wire_server, cb))
        return killers

    try:
        cb, tr, _ = _train(tmp_path, judge, trainer="sft-lora", report_to="wandb", extra_callbacks=with_killer)
    finally:
        wandb.finish()
    (killer,) = killers
    assert killer.killed_at == 1
    kinds = _check_intact(cb, tr, tmp_path)
    store = RunStore(tmp_path / "pt", readonly=True)
    for op in ORDER_PARAMETERS:
        rows = store.judgments(order_parameter=op.name)
        first = [r for r in rows if r["probe_index"] == 0]
        later = [r for r in rows if r["probe_index"] > 0]
        assert first and all(r["error"] is None for r in first)  # judged before the server died
        assert later and all(r["error"].startswith("connection_error") for r in later)
        assert kinds[op.name] == {None: len(first), "connection_error": len(later)}
    # probe 1 onwards is unjudged, so no window has both sides judged: no captured value is made up
    captured = [n for n in store.metric_names() if n.startswith("captured/")]
    for name in captured:
        assert np.isnan(store.metric_series(name)["value"]).all()
    store.close()

    (run_file,) = find_run_files(wandb_dir)
    rows = history_rows(run_file)
    for op in ORDER_PARAMETERS:
        logged = {r["probe/step"]: r[f"probe/order/{op.name}/missing"] for r in rows
                  if f"probe/order/{op.name}/missing" in r}
        assert logged == {s: (0.0 if s == 0 else float(len(PROBES) * SAMPLES)) for s in STEPS}
    _assert_no_secret(wandb_dir, must_have=(run_file.name,))
