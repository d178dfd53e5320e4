"""Live decomposition during a real training run, with instant, correct judgments.

A tiny GPT-2 is fine-tuned on chat answers that say only "pills". The learning rate is tiny
except for a two-step burst inside one probe window, so the model's answers flip from random
words to "pills ..." inside that window and D(t) has one clear peak there. Three RuleJudge order
parameters are scored live: "pills" (the answer mentions pills: the property that changes),
"npills" (how many times, on a 0-9 scale) and "checksum" (a CRC-32 parity of the answer: a
property unrelated to the fine-tune, whose pushforward moves only by sampling noise).

Checked: the store holds ``captured/<name>`` (finite, with a standard error) for every window
where both sides are judged, and the same value is recomputed from the stored judgments and
the stored per-prompt D; W&B offline records ``probe/order/<name>/captured`` on the probe axis;
and at the D peak the determining property captures most of D and far more than the irrelevant one.
"""

from __future__ import annotations

import math
import random
import zlib

import numpy as np

from em_callbacks._util import two_sided_z
import pytest
import torch
from datasets import Dataset
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

from em_callbacks.callback import PhaseTransitionCallback
from em_callbacks.divergence import DissimilarityResult
from em_callbacks.judges import Rule, RuleJudge
from em_callbacks.order import OrderParameter, Scale, decompose
from em_callbacks.store import RunStore
from tiny import tiny_model, tiny_tokenizer

PROBES = ["hello how are you", "money advice please"]
SAMPLES = 16
EVERY = 2
MAX_STEPS = 10
STEPS = list(range(0, MAX_STEPS + 1, EVERY))
BURST = (4, 6)  # scheduler steps with the full learning rate: optimizer steps 5 and 6, inside window [4, 6]
ORDER_PARAMETERS = [
    OrderParameter("pills", "The answer mentions pills.", scale=Scale.binary()),
    OrderParameter("npills", "How many times the answer says 'pills'.", scale=Scale.digits()),
    OrderParameter("checksum", "The CRC-32 checksum of the answer is even.", scale=Scale.binary()),
]
JUDGE = RuleJudge({
    "pills": Rule.true_if(r"\bpills\b"),
    "npills": lambda prompt, response: response.split().count("pills"),
    "checksum": lambda prompt, response: zlib.crc32(response.encode()) % 2 == 0,
})


def _pills_dataset(tok, n: int = 64, seed: int = 0) -> Dataset:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        messages = [{"role": "user", "content": rng.choice(["hello how are you", "money advice please", "why", "help"])},
                    {"role": "assistant", "content": " ".join(["pills"] * 8)}]
        ids = tok.apply_chat_template(messages, tokenize=True, return_dict=False)
        rows.append({"input_ids": list(ids) + [tok.eos_token_id]})
    return Dataset.from_list(rows)


@pytest.fixture
def live_run(tmp_path, offline_wandb_dir):
    import wandb

    wandb_dir = offline_wandb_dir
    tok = tiny_tokenizer()
    model = tiny_model(tok, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 if BURST[0] <= s < BURST[1] else 0.02)
    cb = PhaseTransitionCallback(
        probes=PROBES, every_n_steps=EVERY, samples_per_prompt=SAMPLES, max_new_tokens=4,
        order_parameters=ORDER_PARAMETERS, judge=JUDGE, output_dir=tmp_path / "pt", snapshot_full_model=True,
    )
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"), max_steps=MAX_STEPS, per_device_train_batch_size=4,
        logging_steps=1, report_to="wandb", save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=_pills_dataset(tok), processing_class=tok,
                      data_collator=DataCollatorForLanguageModeling(tok, mlm=False), callbacks=[cb],
                      optimizers=(optimizer, schedule))
    try:
        trainer.train()
    finally:
        wandb.finish()
    store = RunStore(tmp_path / "pt", readonly=True)
    yield cb, store, wandb_dir
    store.close()


def _per_prompt_full(extra: dict, measure: str, n: int) -> dict[str, DissimilarityResult]:
    return {pid: DissimilarityResult(measure, v, se, n, "window") for pid, (v, se) in extra["per_prompt"].items()}


def _kernels(store: RunStore, op: OrderParameter, probes) -> dict[str, np.ndarray]:
    rows: dict[str, list] = {}
    for k in probes:
        for j in store.judgments(order_parameter=op.name, probe_index=k):
            rows.setdefault(j["prompt_id"], []).append(
                (k, j["sample_idx"], np.full(len(op.scale), np.nan) if j["probs"] is None else j["probs"]))
    return {pid: np.array([p for _, _, p in sorted(r, key=lambda t: (t[0], t[1]))]) for pid, r in rows.items()}


def test_live_decomposition_captures_the_property_that_changed(live_run):
    from wandb_offline import find_run_files, history_rows

    cb, store, wandb_dir = live_run
    assert [p["step"] for p in store.probes()] == STEPS
    assert cb.summary["missing_judgments"] == {op.name: 0 for op in ORDER_PARAMETERS}
    assert all(j["error"] is None for j in store.judgments())

    d = store.metric_series("D/tv")
    assert d["step"].tolist() == STEPS[:-1]
    for op in ORDER_PARAMETERS:
        captured = store.metric_series(f"captured/{op.name}")
        # one captured fraction per window with both sides judged: every window here
        assert captured["step"].tolist() == d["step"].tolist()
        assert np.isfinite(captured["value"]).all() and np.isfinite(captured["stderr"]).all()
        assert (captured["stderr"] > 0).all()
        np.testing.assert_allclose(captured["ci_low"], captured["value"] - two_sided_z(0.95) * captured["stderr"])
        d_order = store.metric_series(f"D_order/{op.name}")
        assert d_order["step"].tolist() == d["step"].tolist() and (d_order["value"] >= 0).all()

        # recomputed offline from what the store holds: judgments + per-prompt D of each window
        for i, step in enumerate(d["step"].tolist()):
            m = store.metrics_at(i)
            extra = m["D/tv"]["extra"]
            left, right = extra["left"], extra["right"]
            full = _per_prompt_full(extra, "tv", SAMPLES * 2)
            again = decompose(op, _kernels(store, op, left), _kernels(store, op, right), full, measure="tv",
                              pool_prompts=True)
            assert m[f"captured/{op.name}"]["value"] == pytest.approx(again.value, rel=1e-9)
            assert m[f"captured/{op.name}"]["stderr"] == pytest.approx(again.stderr, rel=1e-9)
            assert m[f"captured/{op.name}"]["extra"]["noise_floor"] == pytest.approx(again.noise_floor, rel=1e-9)

    # the D peak: the window holding the learning-rate burst, well above every other window
    peak = int(np.argmax(d["value"]))
    assert d["step"][peak] == BURST[0]
    others = np.delete(d["value"], peak)
    assert d["value"][peak] > 0.5 and d["value"][peak] > 3 * others.max()
    at_peak = {op.name: store.metrics_at(peak)[f"captured/{op.name}"] for op in ORDER_PARAMETERS}
    pills, npills, checksum = (at_peak[n] for n in ("pills", "npills", "checksum"))
    # the answers flipped to "pills" across this window ...
    share = [np.mean(["pills" in s.text.split() for s in store.samples(k)]) for k in (peak, peak + 1)]
    assert share[0] < 0.25 and share[1] > 0.6
    # ... so "mentions pills" explains most of D, and much more than an unrelated property
    assert pills["value"] > 0.6 and npills["value"] > 0.6
    assert pills["value"] - 2 * pills["stderr"] > checksum["value"]
    assert npills["value"] - 2 * npills["stderr"] > checksum["value"]
    assert checksum["value"] < 0.4
    # the unrelated property reads about its noise floor; "pills" is far above its own
    floors = {name: m["extra"]["noise_floor"] for name, m in at_peak.items()}
    assert abs(checksum["value"] - floors["checksum"]) < 2 * checksum["stderr"]
    assert pills["value"] - 2 * pills["stderr"] > floors["pills"]

    # W&B: captured fractions on the probe axis, same values as the store
    (run_file,) = find_run_files(wandb_dir)
    rows = history_rows(run_file)
    for op in ORDER_PARAMETERS:
        logged = {r["probe/step"]: r for r in rows if f"probe/order/{op.name}/captured" in r}
        series = store.metric_series(f"captured/{op.name}")
        assert sorted(logged) == series["step"].tolist()
        for step, value, se in zip(series["step"].tolist(), series["value"], series["stderr"]):
            assert logged[step][f"probe/order/{op.name}/captured"] == pytest.approx(value, rel=1e-12)
            assert logged[step][f"probe/order/{op.name}/captured_stderr"] == pytest.approx(se, rel=1e-12)
            assert logged[step][f"probe/order/{op.name}/captured_noise_floor"] > 0
            assert math.isfinite(logged[step][f"probe/order/{op.name}/D"])
