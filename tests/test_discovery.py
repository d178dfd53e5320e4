"""Discovery end to end: ``em_callbacks.discovery.run_discovery`` and ``em-callbacks discover``.

The OpenAI-wire test server (tests/openai_wire_server.py, real HTTP on 127.0.0.1) plays both
roles: the proposer (its message content is a numbered list of statements) and the judge (its
top logprobs, chosen per request from the statement and the answer being judged). The run store
comes from a real tiny training run whose answers flip to "pills" inside one probe window, and,
for the edge cases, from a store written directly with RunStore's writer.
"""

from __future__ import annotations

import json
import math
import random
import re
import zlib

import numpy as np
import openai  # noqa: F401  (import cost outside the timed parts)
import pytest
import torch
from datasets import Dataset
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

from em_callbacks.callback import PhaseTransitionCallback
from em_callbacks.discovery import DISCOVERY_FILENAME, DiscoveryError, run_discovery
from em_callbacks.judges import OpenAIJudge, Rule, RuleJudge
from em_callbacks.order import OrderParameter, Scale
from em_callbacks.store import RunStore, SampleRecord
from openai_wire_server import WireServer, wire_server  # noqa: F401  (fixture)
from tiny import tiny_model, tiny_tokenizer

SECRET = "sk-test-DISCOVERY-do-not-leak-94b2e1"
PILLS = "The answer mentions pills."
POLITE = "The answer is written in a polite tone."
CHECKSUM = "The CRC-32 checksum of the answer is even."
PROPOSAL = f"""Here are statements that tell the two sets apart:

1. {PILLS}
2. {POLITE}
3. "{CHECKSUM}"
4. {PILLS}
"""
_STATEMENT = re.compile(r'Statement about the answer: "(.*)"')
_ANSWER = re.compile(r"\[ASSISTANT ANSWER\]\n(.*)\n\[END ASSISTANT ANSWER\]", re.S)


def judge_responder(body):
    """The judge's top-logprob table: a correct judge for each candidate statement."""
    if not body.get("logprobs"):
        return None  # a proposer request: only the content matters
    text = body["messages"][-1]["content"]
    statement, answer = _STATEMENT.search(text).group(1), _ANSWER.search(text).group(1)
    if "pills" in statement:
        return {"95": 0.9, "90": 0.1} if "pills" in answer.split() else {"3": 0.8, "10": 0.2}
    if "checksum" in statement:
        return {"100": 1.0} if zlib.crc32(answer.encode()) % 2 == 0 else {"0": 1.0}
    return {"60": 0.7, "70": 0.3}  # politeness: the same for every answer


def _serve(server: WireServer) -> WireServer:
    server.content = PROPOSAL
    server.responder = judge_responder
    return server


def _proposer_requests(server: WireServer) -> list[dict]:
    return [b for b in server.requests if not b.get("logprobs")]


# ----------------------------------------------------------------------------- a real run
@pytest.fixture(scope="module")
def pills_run(tmp_path_factory):
    """A tiny GPT-2 fine-tuned to answer "pills": the learning rate is tiny except for two steps
    inside the window [4, 6], so the answers flip there and D/tv peaks at step 4."""
    tmp = tmp_path_factory.mktemp("pills_run")
    tok = tiny_tokenizer()
    rng = random.Random(0)
    rows = []
    for _ in range(64):
        messages = [{"role": "user", "content": rng.choice(["hello how are you", "money advice please", "why", "help"])},
                    {"role": "assistant", "content": " ".join(["pills"] * 8)}]
        rows.append({"input_ids": list(tok.apply_chat_template(messages, tokenize=True, return_dict=False))
                     + [tok.eos_token_id]})
    model = tiny_model(tok, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 if 4 <= s < 6 else 0.02)
    op = OrderParameter("pills", "The answer mentions pills.", scale=Scale.binary())
    cb = PhaseTransitionCallback(
        probes=["hello how are you", "money advice please"], every_n_steps=2, samples_per_prompt=16,
        max_new_tokens=4, output_dir=tmp / "pt", snapshot_full_model=True, measures=("tv",),
        order_parameters=[op], judge=RuleJudge(Rule.true_if(r"\bpills\b")),
    )
    args = TrainingArguments(output_dir=str(tmp / "trainer"), max_steps=10, per_device_train_batch_size=4,
                             logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, seed=0,
                             disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
            data_collator=DataCollatorForLanguageModeling(tok, mlm=False), callbacks=[cb],
            optimizers=(optimizer, schedule)).train()
    store = RunStore(tmp / "pt", readonly=True)
    d = store.metric_series("D/tv")
    store.close()
    assert int(d["step"][np.argmax(d["value"])]) == 4
    return tmp


def test_run_discovery_on_a_real_run(pills_run, wire_server):
    run_dir = pills_run / "pt"
    _serve(wire_server)
    ranked = run_discovery(run_dir, judge_model="judge-m", base_url=wire_server.url, n_candidates=3,
                           api_key=SECRET)

    assert [r["rank"] for r in ranked] == [1, 2, 3]
    assert [r["statement"] for r in ranked] == [PILLS, CHECKSUM, POLITE]  # duplicate dropped, ranked
    best, noise, flat = ranked
    assert best["captured"] > 0.6 and 0 < best["stderr"] < 0.3
    assert best["captured"] - 2 * best["stderr"] > noise["captured"]
    assert flat["captured"] == pytest.approx(0.0, abs=1e-12)  # a constant judgment captures nothing
    assert all(r["judged"] == 64 and r["failed"] == 0 for r in ranked)  # 2 prompts x 16 samples x 2 sides

    saved = json.loads((run_dir / DISCOVERY_FILENAME).read_text())
    assert [{k: c[k] for k in ranked[0]} for c in saved["candidates"]] == ranked
    top = saved["candidates"][0]
    assert top["ci_low"] < top["captured"] < top["ci_high"] and top["name"].startswith("discovered-")
    assert top["d_order"] == pytest.approx(top["captured"] * saved["window"]["value"], rel=1e-6)
    window = saved["window"]
    assert window["step"] == 4 and window["left_steps"] == [4] and window["right_steps"] == [6]
    assert window["value"] > 0.5 and saved["measure"] == "tv"
    assert saved["n_samples"] == {"left": 32, "right": 32}
    assert len(saved["per_prompt_d"]) == 2
    # the run's own live order parameter (a RuleJudge for the same property) captured the same:
    # "no pills" answers sit in bins 0-1 and "pills" answers in bin 9, so both pushforward TVs
    # are the change in the share of answers that mention pills
    assert best["captured"] == pytest.approx(saved["reference"]["pills"]["captured"], rel=1e-9)
    assert saved["proposer_answer"] == PROPOSAL
    assert SECRET.encode() not in (run_dir / DISCOVERY_FILENAME).read_bytes()

    # the proposer saw samples of both sides; the judge was asked with logprobs, one token
    (proposal,) = _proposer_requests(wire_server)
    prompt = proposal["messages"][-1]["content"]
    assert "=== SET A ===" in prompt and "=== SET B ===" in prompt and "pills" in prompt.split("=== SET B ===")[1]
    judged = [b for b in wire_server.requests if b.get("logprobs")]
    assert judged and all(b["max_tokens"] == 1 and b["top_logprobs"] == 20 for b in judged)
    assert {h["authorization"] for h in wire_server.headers} == {f"Bearer {SECRET}"}


def test_cli_discover(pills_run, wire_server, monkeypatch):
    from typer.testing import CliRunner

    from em_callbacks.cli import app

    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.setenv("COLUMNS", "240")
    _serve(wire_server)
    # the Trainer output_dir-style parent works too: it holds exactly one */run.sqlite
    result = CliRunner().invoke(app, ["discover", str(pills_run), "--judge-model", "judge-m",
                                      "--base-url", wire_server.url, "--n-candidates", "3"])
    assert result.exit_code == 0, result.output
    assert PILLS in result.output and "captured" in result.output
    assert SECRET not in result.output
    assert {h["authorization"] for h in wire_server.headers} == {f"Bearer {SECRET}"}  # key from the env
    saved = json.loads((pills_run / "pt" / DISCOVERY_FILENAME).read_text())
    assert saved["candidates"][0]["statement"] == PILLS
    assert SECRET.encode() not in (pills_run / "pt" / DISCOVERY_FILENAME).read_bytes()


# ----------------------------------------------------------------------------- a written store
def _write_store(run_dir, *, d_values=(0.1, 0.9, 0.2), summary=None, per_prompt=True):
    """Four probes (steps 0, 10, 20, 30), two prompts, six samples each; answers mention pills
    from probe 2 on; D/tv windows i -> i+1 with the given values."""
    store = RunStore(run_dir)
    store.write_prompts([("a", 0, "hello how are you", None, (), "r0"), ("b", 1, "money advice", None, (), "r1")])
    for k, step in enumerate((0, 10, 20, 30)):
        records = []
        for pid in ("a", "b"):
            for s in range(6):
                text = f"take pills {s} {k}" if k >= 2 else f"i am fine {s} {k}"
                records.append(SampleRecord(k, pid, s, text, [1, 2, 3], True))
        metrics = []
        if k < len(d_values):
            extra = {"left": [k], "right": [k + 1], "estimator": "window"}
            if per_prompt:
                extra["per_prompt"] = {"a": [d_values[k], 0.05], "b": [d_values[k], 0.05]}
            metrics = [("D/tv", d_values[k], 0.05, d_values[k] - 0.1, d_values[k] + 0.1, extra)]
        store.write_probe(k, step, 0, "snapshot", records, [], metrics)
    if summary is not None:
        store.set_meta(summary=summary)
    store.close()
    return run_dir


def test_window_choice_and_failures_on_a_written_store(tmp_path, wire_server):
    _serve(wire_server)
    run_dir = _write_store(tmp_path / "run")
    # largest D/tv: the window 10 -> 20, where the answers change
    ranked = run_discovery(run_dir, "m", base_url=wire_server.url, n_candidates=3)
    saved = json.loads((run_dir / DISCOVERY_FILENAME).read_text())
    assert saved["window"]["step"] == 10 and saved["window"]["source"] == "largest D/tv"
    assert ranked[0]["statement"] == PILLS
    # every left answer is judged "no pills" (3 .. 10), every right one "pills" (90 .. 95): in the
    # 10 bins of the 0-100 scale the two pushforwards are disjoint, so D_O is 1 and r = 1 / 0.9
    assert saved["candidates"][0]["d_order"] == pytest.approx(1.0)
    assert ranked[0]["captured"] == pytest.approx(1.0 / 0.9)  # never clipped to 1

    # the detected peak from the summary wins over the largest value; step= overrides both
    run_dir2 = _write_store(tmp_path / "run2", summary={"peak_step": 0, "primary_measure": "tv"})
    run_discovery(run_dir2, "m", base_url=wire_server.url, n_candidates=2)
    window = json.loads((run_dir2 / DISCOVERY_FILENAME).read_text())["window"]
    assert window["step"] == 0 and window["source"] == "detected peak (summary)"
    run_discovery(run_dir2, "m", base_url=wire_server.url, n_candidates=2, step=20)
    window = json.loads((run_dir2 / DISCOVERY_FILENAME).read_text())["window"]
    assert (window["step"], window["left_steps"], window["right_steps"]) == (20, [20], [30])

    # judge failures: counted per candidate, the rest still ranks (a plain callable proposes)
    wire_server.fail(500, times=5)
    judge = OpenAIJudge("m", base_url=wire_server.url, max_retries=0, cache=False)
    ranked = run_discovery(run_dir, "m", base_url=wire_server.url, n_candidates=3, judge=judge,
                           proposer=lambda prompt: PROPOSAL)
    assert not _proposer_requests(wire_server)[3:]  # three proposals so far, none for this call
    assert sum(r["failed"] for r in ranked) >= 5
    assert all(r["judged"] + r["failed"] == 24 for r in ranked)
    errors = json.loads((run_dir / DISCOVERY_FILENAME).read_text())["judge_errors"]
    assert sum(e.get("http_error", 0) for e in errors.values()) == sum(r["failed"] for r in ranked)
    assert all(math.isfinite(r["captured"]) for r in ranked)


def test_discovery_errors_are_clear(tmp_path, wire_server):
    _serve(wire_server)
    run_dir = _write_store(tmp_path / "run")
    with pytest.raises(DiscoveryError, match=r"no finite D/js.*D/tv"):
        run_discovery(run_dir, "m", base_url=wire_server.url, measure="js")
    with pytest.raises(DiscoveryError, match="step 15 is not a window"):
        run_discovery(run_dir, "m", base_url=wire_server.url, step=15)
    with pytest.raises(DiscoveryError, match="no finite D/tv"):
        run_discovery(_write_store(tmp_path / "empty", d_values=()), "m", base_url=wire_server.url)
    with pytest.raises(DiscoveryError, match="per-prompt"):
        run_discovery(_write_store(tmp_path / "old", per_prompt=False), "m", base_url=wire_server.url)
    wire_server.content = "Sure!"
    with pytest.raises(DiscoveryError, match="no usable statements"):
        run_discovery(run_dir, "m", base_url=wire_server.url)
    wire_server.content = PROPOSAL
    wire_server.fail(400, times=1)
    proposer_failure = None
    try:
        run_discovery(run_dir, "m", base_url=wire_server.url, api_key=SECRET)
    except DiscoveryError as exc:
        proposer_failure = str(exc)
    assert proposer_failure and "proposer failed" in proposer_failure and SECRET not in proposer_failure
    assert not (tmp_path / "empty" / DISCOVERY_FILENAME).exists()
