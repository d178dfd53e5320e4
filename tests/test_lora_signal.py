"""LoRA adapter signal (B norm, local cosine of the trajectory): exact values on hand-set
weights, and the metrics of a real tiny SFTTrainer LoRA run in the store and in W&B."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from transformers import TrainerCallback

from em_callbacks import adapter_signal as sig
from tiny import tiny_model, tiny_tokenizer

peft = pytest.importorskip("peft")

B_NAMES = [  # sorted, as lora_parameters returns them (r=1, c_attn + c_proj, 2 layers)
    "base_model.model.transformer.h.0.attn.c_attn.lora_B.default.weight",  # 96 x 1
    "base_model.model.transformer.h.0.attn.c_proj.lora_B.default.weight",  # 32 x 1
    "base_model.model.transformer.h.0.mlp.c_proj.lora_B.default.weight",  # 32 x 1
    "base_model.model.transformer.h.1.attn.c_attn.lora_B.default.weight",
    "base_model.model.transformer.h.1.attn.c_proj.lora_B.default.weight",
    "base_model.model.transformer.h.1.mlp.c_proj.lora_B.default.weight",
]


@pytest.fixture(scope="module")
def lora_model():
    tok = tiny_tokenizer()
    cfg = peft.LoraConfig(r=1, lora_alpha=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                          lora_dropout=0.0)
    return peft.get_peft_model(tiny_model(tok), cfg)


def _set_b(model, values: dict[str, float]) -> None:
    """Every entry of the named B matrices set to the given constant; the others to 0."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in B_NAMES:
            params[name].fill_(values.get(name, 0.0))


def test_lora_parameters_and_norms_exact(lora_model):
    assert list(sig.lora_parameters(lora_model, "B")) == B_NAMES
    assert sig.has_lora(lora_model)
    all_params = sig.lora_parameters(lora_model, "all")
    assert len(all_params) == 12 and sum("lora_A" in n for n in all_params) == 6
    _set_b(lora_model, {B_NAMES[0]: 1.0, B_NAMES[5]: 2.0, B_NAMES[4]: -0.5})
    norms = sig.lora_b_norms(lora_model)
    # ||B||_F^2: 96 * 1 ; 32 * 4 ; 32 * 0.25
    assert norms.total == pytest.approx(math.sqrt(96 + 128 + 8), rel=1e-12)
    assert norms.per_layer == pytest.approx({"0": math.sqrt(96), "1": math.sqrt(136)}, rel=1e-12)
    assert norms.per_module["base_model.model.transformer.h.0.attn.c_attn"] == pytest.approx(math.sqrt(96))
    assert norms.per_module["base_model.model.transformer.h.1.attn.c_proj"] == pytest.approx(math.sqrt(8))
    assert norms.per_module["base_model.model.transformer.h.0.mlp.c_proj"] == 0.0
    # the A matrices (random init) do not count; flat vector order = sorted names
    flat = sig.flat_vector(lora_model)
    assert flat.dtype == torch.float32 and flat.numel() == 96 * 2 + 32 * 4
    assert float(flat.norm()) == pytest.approx(norms.total, rel=1e-6)
    assert torch.all(flat[:96] == 1.0) and torch.all(flat[-32:] == 2.0)


def test_no_lora_gives_no_metrics():
    model = tiny_model(tiny_tokenizer())
    assert not sig.has_lora(model)
    assert sig.lora_b_norms(model) is None and sig.flat_vector(model) is None
    assert sig.AdapterTrajectory().update(model, 0) == {}


def test_frozen_adapter_is_ignored_unless_asked(lora_model):
    params = dict(lora_model.named_parameters())
    params[B_NAMES[0]].requires_grad_(False)
    try:
        assert B_NAMES[0] not in sig.lora_parameters(lora_model)
        assert B_NAMES[0] in sig.lora_parameters(lora_model, trainable_only=False)
    finally:
        params[B_NAMES[0]].requires_grad_(True)


def test_local_cosine_exact():
    assert sig.local_cosine([1.0, 0.0], [1.0, 1.0]) == pytest.approx(1 / math.sqrt(2), rel=1e-15)
    assert sig.local_cosine([1.0, 2.0], [-2.0, -4.0]) == pytest.approx(-1.0, rel=1e-15)
    assert sig.local_cosine([1.0, 0.0], [0.0, 3.0]) == 0.0
    assert math.isnan(sig.local_cosine([0.0, 0.0], [1.0, 0.0]))
    assert math.isnan(sig.local_cosine(None, [1.0, 0.0]))
    with pytest.raises(ValueError):
        sig.local_cosine([1.0], [1.0, 2.0])


def test_trajectory_on_hand_set_weights(lora_model):
    """θ_0 = 0 (LoRA init), then B moves along module 0, turns by 90° to module 5, continues,
    reverses: cos = NaN, NaN, 0, 1, -1 and a 45° turn."""
    traj = sig.AdapterTrajectory()
    plan = [
        ({}, float("nan")),
        ({B_NAMES[0]: 1.0}, float("nan")),  # Δ1 = e0 (only one delta so far)
        ({B_NAMES[0]: 1.0, B_NAMES[5]: 1.0}, 0.0),  # Δ2 = e5 ⟂ Δ1
        ({B_NAMES[0]: 1.0, B_NAMES[5]: 3.0}, 1.0),  # Δ3 = 2 e5 ∥ Δ2
        ({B_NAMES[0]: 1.0, B_NAMES[5]: 2.5}, -1.0),  # Δ4 = -0.5 e5
        # Δ5 = (+1 on 96 entries of module 0) + (+0.5 on 32 of module 5):
        # Δ4·Δ5 = 32 * (-0.5 * 0.5) = -8 ; |Δ4| = 0.5 sqrt(32) ; |Δ5| = sqrt(96 + 8)
        ({B_NAMES[0]: 2.0, B_NAMES[5]: 3.0}, -8 / (0.5 * math.sqrt(32) * math.sqrt(104))),
    ]
    for step, (values, expected_cos) in enumerate(plan):
        _set_b(lora_model, values)
        out = traj.update(lora_model, step * 5)
        assert set(out) == {"lora/B_norm", "lora/cosine_local"}
        b0, b5 = values.get(B_NAMES[0], 0.0), values.get(B_NAMES[5], 0.0)
        assert out["lora/B_norm"] == pytest.approx(math.sqrt(96 * b0**2 + 32 * b5**2), rel=1e-12)
        if math.isnan(expected_cos):
            assert math.isnan(out["lora/cosine_local"])
        else:
            assert out["lora/cosine_local"] == pytest.approx(expected_cos, abs=1e-7)
    assert traj.last_norms.per_layer["1"] == pytest.approx(3.0 * math.sqrt(32))


def test_trajectory_state_dict_continues_and_ignores_replays():
    a = sig.AdapterTrajectory()
    for step, vec in enumerate([[0.0, 0.0], [1.0, 0.0]]):
        a.push(torch.tensor(vec), step)
    state = a.state_dict()
    b = sig.AdapterTrajectory()
    b.load_state_dict(state)
    assert b.push(torch.tensor([2.0, 1.0]), 2) == pytest.approx(1 / math.sqrt(2))
    assert math.isnan(b.push(torch.tensor([9.0, 9.0]), 2))  # replayed step: ignored
    assert b.push(torch.tensor([2.0, 2.0]), 3) == pytest.approx(1 / math.sqrt(2))  # Δ=(0,1) vs (1,1)
    with pytest.raises(ValueError):
        sig.AdapterTrajectory(which="all").load_state_dict(state)
    # a vector of another size (another adapter) restarts the trajectory instead of failing
    assert math.isnan(b.push(torch.tensor([1.0, 2.0, 3.0]), 4))


def test_full_adapter_trajectory_includes_a(lora_model):
    traj = sig.AdapterTrajectory(which="all")
    _set_b(lora_model, {})
    traj.update(lora_model, 0)
    assert traj.state_dict()["prev"].numel() == sum(p.numel() for p in sig.lora_parameters(lora_model, "all").values())


# --------------------------------------------------------------------------- real SFTTrainer run
class RecordB(TrainerCallback):
    """Independent record of the raw lora_B weights at every probe step (runs after the
    em-callbacks callback in the same on_train_begin / on_step_end)."""

    def __init__(self, every: int):
        self.every = every
        self.vectors: dict[int, np.ndarray] = {}

    def _grab(self, step, model):
        if step % self.every == 0:
            named = sorted((n, p) for n, p in model.named_parameters() if "lora_B" in n)
            self.vectors[step] = np.concatenate([p.detach().double().reshape(-1).numpy() for _, p in named])

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._grab(state.global_step, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._grab(state.global_step, model)


@pytest.mark.slow
def test_sft_lora_run_writes_lora_metrics(tmp_path):
    pytest.importorskip("trl")
    import sqlite3

    import dist_worker

    recorder = RecordB(every=2)
    out = tmp_path / "run"
    assert dist_worker.main(["--out", str(out), "--sft", "--lora", "--max-steps", "8", "--every", "2"],
                            extra_callbacks=[recorder]) == 0
    result = json.loads((out / "rank0.json").read_text())
    assert result["global_step"] == 8 and result["probe_steps"] == [0, 2, 4, 6, 8]

    con = sqlite3.connect(out / "phase_transition" / "run.sqlite")
    rows = {name: dict(con.execute("SELECT step, value FROM metrics WHERE name = ? ORDER BY step", (name,)).fetchall())
            for name in ("lora/B_norm", "lora/cosine_local")}
    extra = json.loads(con.execute("SELECT extra FROM metrics WHERE name = 'lora/B_norm' AND step = 8").fetchone()[0])

    # B norm: exact against the raw weights recorded independently; 0 at the LoRA init
    steps = [0, 2, 4, 6, 8]
    assert sorted(rows["lora/B_norm"]) == steps
    for s in steps:
        assert rows["lora/B_norm"][s] == pytest.approx(float(np.linalg.norm(recorder.vectors[s])), rel=1e-5)
    assert rows["lora/B_norm"][0] == 0.0 and rows["lora/B_norm"][8] > 0
    assert set(extra["per_layer"]) == {"0", "1"}
    assert math.hypot(*extra["per_layer"].values()) == pytest.approx(rows["lora/B_norm"][8], rel=1e-9)

    # local cosine: NULL (NaN) for the first two probes, then cos(Δ_{t-1}, Δ_t) of the raw vectors
    assert rows["lora/cosine_local"][0] is None and rows["lora/cosine_local"][2] is None
    for s in (4, 6, 8):
        d_prev = recorder.vectors[s - 2] - recorder.vectors[s - 4]
        d = recorder.vectors[s] - recorder.vectors[s - 2]
        expected = float(d_prev @ d / (np.linalg.norm(d_prev) * np.linalg.norm(d)))
        assert rows["lora/cosine_local"][s] == pytest.approx(expected, abs=1e-5)

    # and in the W&B probe/ logs (a real wandb run in disabled mode, calls recorded)
    logged = {key for call in result["wandb_logs"] for key in call}
    assert {"probe/lora/B_norm", "probe/lora/cosine_local", "probe/step"} <= logged
    assert result["summary"]["faults"] == []
