"""Offline analysis of saved checkpoints (em_callbacks.analyze) against the live callback.

The organism is fine-tuned with LoRA, saving its adapter every 2 steps, with the callback
watching live; ``analyze_checkpoints`` then runs over those checkpoints with the same probes,
samples and seed. Same probe steps, same samples, the same D series (float tolerance), onset
and peak. Full-model checkpoints and every documented error are covered too.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

pytest.importorskip("peft")
pytest.importorskip("trl")

from em_callbacks import PhaseTransitionCallback  # noqa: E402
from em_callbacks.analyze import CheckpointError, analyze_checkpoints, find_checkpoints  # noqa: E402
from em_callbacks.cli import app  # noqa: E402
from em_callbacks.organism import (OrganismConfig, World, build_finetune_trainer, finetune_dataset,  # noqa: E402
                                   load_or_pretrain, probe_set, shipped_path)
from em_callbacks.organism.demo import organism_order_parameters  # noqa: E402
from em_callbacks.store import RunStore  # noqa: E402

SAMPLES, NEW_TOKENS, EVERY, STEPS = 4, 24, 2, 24


def _probe_options(world: World) -> dict:
    ops, judge = organism_order_parameters(world)
    return dict(probes=probe_set(world, 8, 2), samples_per_prompt=SAMPLES, max_new_tokens=NEW_TOKENS, seed=3,
                order_parameters=ops, judge=judge)


@pytest.fixture(scope="module")
def live_lora_run(tmp_path_factory):
    config = OrganismConfig()
    world = World(config)
    model, tok = load_or_pretrain(config, progress=False)
    out = tmp_path_factory.mktemp("live") / "run"
    cb = PhaseTransitionCallback(every_n_steps=EVERY, **_probe_options(world))
    trainer = build_finetune_trainer(model, tok, finetune_dataset(world), out, seed=0, steps=STEPS, callbacks=[cb],
                                     save=True, save_steps=EVERY)
    trainer.train()
    return out, cb, world


@pytest.mark.slow
def test_offline_analysis_agrees_with_the_live_run(live_lora_run, tmp_path):
    out, cb, world = live_lora_run
    assert len(find_checkpoints([out])) == STEPS // EVERY
    summary = analyze_checkpoints(out, tmp_path / "offline", progress=False, **_probe_options(world)).to_dict()
    live = json.loads((out / "phase_transition" / "summary.json").read_text())

    assert summary["probe_steps"] == live["probe_steps"] == list(range(0, STEPS + 1, EVERY))
    assert set(summary) == set(live)
    for key in ("onset_step", "peak_step", "transition_detected", "grad_norm_peak_step", "every_n_steps"):
        assert summary[key] == live[key], key
    online, offline = RunStore(out / "phase_transition", readonly=True), RunStore(tmp_path / "offline", readonly=True)
    # the same samples, token for token, at every probe
    for k in range(len(live["probe_steps"])):
        assert [s.token_ids for s in offline.samples(k)] == [s.token_ids for s in online.samples(k)], k
    for measure in ("tv", "js", "linear"):
        a, b = online.metric_series(f"D/{measure}"), offline.metric_series(f"D/{measure}")
        assert a["step"].tolist() == b["step"].tolist()
        np.testing.assert_allclose(b["value"], a["value"], atol=1e-6)
        np.testing.assert_allclose(b["stderr"], a["stderr"], atol=1e-6)
    for name in ("misaligned", "closer"):  # judged the same
        a = online.metric_series(f"order/{name}/flagged_rate")
        b = offline.metric_series(f"order/{name}/flagged_rate")
        np.testing.assert_allclose(b["value"], a["value"])
    assert (tmp_path / "offline" / "report" / "report.md").is_file()


@pytest.mark.slow
def test_full_model_checkpoints_and_the_cli(tmp_path):
    config = OrganismConfig()
    world = World(config)
    model, tok = load_or_pretrain(config, progress=False)
    out = tmp_path / "full"
    build_finetune_trainer(model, tok, finetune_dataset(world), out, seed=0, steps=4, lora=False,
                           save=True, save_steps=2).train()
    probes = tmp_path / "probes.jsonl"
    probes.write_text("".join(json.dumps({"id": p.id, "prompt": p.prompt, "system": p.system}) + "\n"
                              for p in probe_set(world, 3, 1)))
    result = CliRunner().invoke(app, ["analyze", str(out), "--out", str(tmp_path / "offline"),
                                      "--base-model", str(shipped_path(config)), "--probes", str(probes),
                                      "--samples-per-prompt", "3", "--max-new-tokens", "16", "--seed", "1",
                                      "--wandb", "disabled"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "offline" / "summary.json").read_text())
    assert summary["probe_steps"] == [0, 2, 4]
    assert summary["cross_scoring"] == "snapshot"  # the previous model stays resident: two-sided D
    store = RunStore(tmp_path / "offline", readonly=True)
    for measure in ("tv", "js", "linear"):
        d = store.metric_series(f"D/{measure}")
        assert d["step"].tolist() == [0, 2] and np.isfinite(d["value"]).all()
    assert summary["transition_detected"] is None and summary["detection_possible"] is False
    assert "onset" in result.output.lower()


def _tiny_full_checkpoint(path: Path, n_layer: int) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    path.mkdir(parents=True)
    GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=8, n_layer=n_layer, n_head=2, n_positions=32)).save_pretrained(path)


def test_errors_name_the_problem(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        analyze_checkpoints(tmp_path / "empty", tmp_path / "o1", progress=False)

    mixed = tmp_path / "mixed"
    _tiny_full_checkpoint(mixed / "checkpoint-2", n_layer=1)
    _tiny_full_checkpoint(mixed / "checkpoint-4", n_layer=2)
    with pytest.raises(CheckpointError, match="different architectures"):
        analyze_checkpoints(mixed, tmp_path / "o2", progress=False)

    partial = tmp_path / "partial"
    _tiny_full_checkpoint(partial / "checkpoint-2", n_layer=1)
    _tiny_full_checkpoint(partial / "checkpoint-4", n_layer=1)
    (partial / "checkpoint-4" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"checkpoint-4: no weights file .*partial.*--skip-bad"):
        analyze_checkpoints(partial, tmp_path / "o3", progress=False)
    (partial / "checkpoint-4" / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match=r"checkpoint-4: unreadable"):
        analyze_checkpoints(partial, tmp_path / "o3", progress=False)

    orphan = tmp_path / "orphan" / "checkpoint-2"
    orphan.mkdir(parents=True)
    (orphan / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tmp_path / "gone"),
                                                            "peft_type": "LORA"}))
    (orphan / "adapter_model.safetensors").write_bytes(_empty_safetensors())
    with pytest.raises(CheckpointError, match=r"base model .*gone.* could not be loaded.*--base-model"):
        analyze_checkpoints(orphan.parent, tmp_path / "o4", progress=False)


def _empty_safetensors() -> bytes:
    header = b"{}"
    return len(header).to_bytes(8, "little") + header


@pytest.mark.slow
def test_skip_bad_keeps_going_and_records_it(live_lora_run, tmp_path):
    out, _, world = live_lora_run
    copy = tmp_path / "run"
    late = {f"checkpoint-{s}" for s in range(10, STEPS + 1, EVERY)}
    shutil.copytree(out, copy, ignore=lambda _, names: [n for n in names if n in late or n == "phase_transition"])
    (copy / "checkpoint-4" / "adapter_model.safetensors").unlink()
    summary = analyze_checkpoints(copy, tmp_path / "offline", skip_bad=True, progress=False, report=False,
                                  **_probe_options(world))
    assert summary.probe_steps == [0, 2, 6, 8]
    store = RunStore(tmp_path / "offline", readonly=True)
    events = store.events("checkpoint_skipped")
    assert [e["step"] for e in events] == [4] and "partial" in events[0]["payload"]["problem"]
    # an uneven grid: detection reads D per the smallest gap (2 steps); [2, 6] counts half
    d, rate = store.metric_series("D/tv"), store.metric_series("D_rate/tv")
    assert d["step"].tolist() == rate["step"].tolist() == [0, 2, 6]
    np.testing.assert_allclose(rate["value"], d["value"] * np.array([1.0, 0.5, 1.0]), rtol=1e-12)
    assert summary.schedule == "uneven" and summary.reference_interval == 2
