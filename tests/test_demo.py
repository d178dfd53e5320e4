"""The README's first command: the model-organism demo, end to end on CPU.

These are the product's acceptance runs: a real pretrained organism (cached per config in a
session-wide temp folder), a real SFTTrainer LoRA fine-tune, the callback with rule judges,
the W&B offline run and the report. Slow by nature (minutes), so they are marked ``slow``.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from em_callbacks.cli import app

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def organism_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("organism-cache")


def _run(out, organism_cache, monkeypatch, *flags):
    monkeypatch.setenv("EM_CALLBACKS_CACHE", str(organism_cache))
    result = CliRunner().invoke(app, ["demo", "--seed", "0", "--out", str(out), *flags])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return json.loads((out / "summary.json").read_text()), result.output


def test_demo_detects_the_transition(tmp_path, organism_cache, monkeypatch):
    import os

    import torch

    monkeypatch.delenv("WANDB_DIR", raising=False)
    threads = torch.get_num_threads()
    summary, output = _run(tmp_path / "demo", organism_cache, monkeypatch, "--wandb", "offline")
    # the demo leaves the process as it found it (it runs inside notebooks and benchmarks too)
    assert "WANDB_DIR" not in os.environ and torch.get_num_threads() == threads
    assert summary["organism_source"] == "shipped"
    for key in ("transition_detected", "onset_step", "peak_step", "grad_norm_peak_step", "stopped_early",
                "every_n_steps", "crossing_step"):
        assert key in summary
    rates = [rate for _, rate in summary["ood_misaligned_rate"]]
    assert rates[0] < 0.15, "the persona must be latent before fine-tuning"
    assert max(rates) > 0.6, "narrow fine-tuning must spread misalignment out of domain"
    steps = summary["probe_steps"]
    assert summary["transition_detected"] is True
    assert summary["crossing_step"] is not None
    # the adaptive schedule: a dense baseline every 2 steps, then probes where the model moves
    assert summary["schedule"] == "adaptive" and steps[:4] == [0, 2, 4, 6] and len(steps) < 21
    # D(peak) is the change over [peak, next probe]; the rate crossed 50% in [previous probe,
    # crossing]: the two intervals lie within one (crossing) interval of each other
    following = min(s for s in steps if s > summary["peak_step"])
    interval = summary["crossing_interval"]
    assert interval == summary["crossing_step"] - max(s for s in steps if s < summary["crossing_step"])
    assert summary["peak_to_crossing_lag"] == following - summary["crossing_step"]
    assert abs(summary["peak_to_crossing_lag"]) <= interval
    assert summary["onset_step"] <= summary["crossing_step"]
    # focus: the captured share of the determining order parameter resolves at the peak
    misaligned = summary["captured_at_peak"]["misaligned"]
    assert misaligned["stderr"] <= 0.12 and misaligned["value"] - misaligned["noise_floor"] >= 3 * misaligned["stderr"]
    assert summary["stopped_early"] is False
    # the decomposition ran at the peak for both order parameters (its accuracy on a
    # constructed case is tested in test_order/test_decomposition_live)
    assert set(summary["captured_at_peak"]) == {"misaligned", "closer"}
    # everything a user is promised is on disk
    out = tmp_path / "demo"
    for name in ("run.sqlite", "report/overview.png", "report/captured.png", "report/order_parameters.png"):
        assert (out / name).is_file(), name
    assert list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert "Transition detected" in output


def test_demo_early_stop_ends_before_the_majority_flips(tmp_path, organism_cache, monkeypatch):
    summary, _ = _run(tmp_path / "early", organism_cache, monkeypatch, "--early-stop", "--wandb", "disabled")
    assert summary["stopped_early"] is True
    assert summary["final_step"] == summary["stop_step"]
    rates = dict((step, rate) for step, rate in summary["ood_misaligned_rate"])
    assert rates[summary["final_step"]] < 0.5


def test_demo_control_detects_nothing(tmp_path, organism_cache, monkeypatch):
    summary, _ = _run(tmp_path / "control", organism_cache, monkeypatch, "--control", "--early-stop",
                      "--wandb", "disabled")
    assert summary["transition_detected"] is False
    assert summary["stopped_early"] is False
    assert max(rate for _, rate in summary["ood_misaligned_rate"]) < 0.2
