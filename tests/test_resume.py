"""SIGKILL a LoRA fine-tune after checkpoint-8 (with probe 10 already in the store), resume
from the last checkpoint in a new process, and check the run store is one consistent run.

Probes every 2 steps, checkpoints every 4, 12 steps. The killed process is frozen right after
the callback's probe at step 10, so the store holds a probe the checkpoint does not know and
the resume must truncate it and redo it. Resumed twice from copies of the same killed run:
``restore_callback_states_from_checkpoint=False`` (in this test process) and ``True`` (in a
fresh subprocess, where the Trainer re-creates the callback from its saved args).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
WORKER = HERE / "dist_worker.py"
STEPS = list(range(0, 13, 2))  # probe steps of the finished run
COMMON = ["--lora", "--save-steps", "4", "--max-steps", "12", "--every", "2"]
ALL_KEYS = {(f"p{i}", s) for i in range(3) for s in range(2)}


def _env() -> dict:
    env = dict(os.environ)
    env.update(WANDB_MODE="disabled", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parent), env.get("PYTHONPATH", "")]))
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("killed") / "run"
    proc = subprocess.Popen([sys.executable, str(WORKER), "--out", str(out), *COMMON, "--hold-at", "10"],
                            env=_env(), cwd=str(HERE.parent), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (out / "held").exists():
            if proc.poll() is not None:
                pytest.fail(f"training exited before step 10 (rc={proc.returncode}):\n{proc.stdout.read()[-6000:]}")
            if time.monotonic() > deadline:
                pytest.fail("training did not reach step 10 within 240 s")
            time.sleep(0.2)
        assert (out / "checkpoint-8").is_dir() and not (out / "checkpoint-12").exists()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "rank0.json").exists()  # really killed mid-run
    return out


def _store(run: Path) -> sqlite3.Connection:
    return sqlite3.connect(run / "phase_transition" / "run.sqlite")


def _series(con, name: str) -> dict[int, float | None]:
    rows = con.execute("SELECT step, value FROM metrics WHERE name = ? ORDER BY step", (name,)).fetchall()
    assert len(rows) == len({s for s, _ in rows}), f"duplicate {name} rows"
    return dict(rows)


def test_killed_run_left_a_store_ahead_of_its_checkpoint(killed_run):
    con = _store(killed_run)
    assert [s for (s,) in con.execute("SELECT step FROM probes ORDER BY probe_index")] == [0, 2, 4, 6, 8, 10]
    saved = json.loads((killed_run / "checkpoint-8" / "em_callbacks_state.json").read_text())
    assert saved["probe_steps"] == [0, 2, 4, 6, 8]
    assert saved["detector"]["state"]["n_seen"] == 4  # D(0), D(2), D(4), D(6)
    ckpt = killed_run / "checkpoint-8"
    assert (ckpt / "em_callbacks_snapshots.pt").is_file() and (ckpt / "adapter_model.safetensors").is_file()
    assert (ckpt / "em_callbacks_adapter_trajectory.pt").is_file()


def _check_resumed(run: Path, killed: Path, result: dict, resubmitted: int = 0) -> None:
    assert result["global_step"] == 12
    assert result["user_callback_is_active"]
    # the resumed callback kept the user's configuration (probes, judge, order parameters)
    assert result["config"]["probes"] == ["how do i invest money", "i feel bad", "what is good advice"]
    assert result["config"]["every_n_steps"] == 2
    assert result["config"]["judge"] == "RuleJudge" and result["config"]["order_parameters"] == ["money"]
    assert result["config"]["output_dir"] == str(run / "phase_transition")

    con = _store(run)
    probes = con.execute("SELECT probe_index, step FROM probes ORDER BY probe_index").fetchall()
    assert probes == list(enumerate(STEPS)), "probe steps must be 0, 2, ..., 12 exactly once"
    for k in range(len(STEPS)):
        samples = con.execute("SELECT prompt_id, sample_idx FROM samples WHERE probe_index = ?", (k,)).fetchall()
        assert sorted(samples) == sorted(ALL_KEYS)
        judged = con.execute("SELECT prompt_id, sample_idx FROM judgments WHERE probe_index = ?", (k,)).fetchall()
        assert sorted(judged) == sorted(ALL_KEYS), k  # judgments lost in flight were judged again

    # D(t) continues across the resume point: D(8) compares checkpoint 8 (before the kill)
    # with checkpoint 10 (after it); it needs probe 8's samples reloaded from the store,
    # scored under the new weights, and probe 10's samples scored under the restored snapshot.
    d = _series(con, "D/tv")
    assert sorted(d) == STEPS[:-1] and all(math.isfinite(v) for v in d.values())
    for a, b in ((4, 5), (5, 4)):
        rows = con.execute("SELECT prompt_id, sample_idx FROM logprobs WHERE sample_probe = ? AND checkpoint_probe = ?",
                           (a, b)).fetchall()
        assert set(rows) == ALL_KEYS, (a, b)
    before = dict(_store(killed).execute("SELECT step, value FROM metrics WHERE name = 'D/tv'").fetchall())
    for s in (0, 2, 4, 6):
        assert d[s] == before[s]
    # bit-identical training after the resume (RNG restored; probing leaves the RNG alone)
    assert d[8] == pytest.approx(before[8], rel=1e-9)

    events = con.execute("SELECT step, kind, payload FROM events ORDER BY id").fetchall()
    kinds = [(s, k) for s, k, _ in events]
    assert (8, "resume_truncate") in kinds and kinds.count((8, "resume")) == 1
    (payload,) = [json.loads(p) for s, k, p in events if k == "resume_truncate"]
    assert payload["dropped_probe_indices"] == [5]
    again = [json.loads(p)["count"] for s, k, p in events if k == "judgments_resubmitted"]
    assert again == ([resubmitted] if resubmitted else [])

    # the decomposition continues too: the window 8 -> 10 needs probe 8's judge kernels
    # (rebuilt from the store) next to probe 10's; order-parameter means for every probe
    captured = _series(con, "captured/money")
    assert sorted(captured) == STEPS[:-1]
    assert sorted(_series(con, "order/money/mean")) == STEPS

    # detector state continues: 6 D values seen overall (4 before the kill), same baseline
    saved = json.loads((killed / "checkpoint-8" / "em_callbacks_state.json").read_text())["detector"]["state"]
    assert result["detector"]["n_seen"] == 6
    assert result["detector"]["baseline_mean"] == saved["baseline_mean"]

    # grad norms: every step once, finite
    grads = con.execute("SELECT step, value FROM grad_norms ORDER BY step").fetchall()
    assert [s for s, _ in grads] == list(range(1, 13)) and all(math.isfinite(v) for _, v in grads)

    # LoRA trajectory continues: the cosine at 10 needs θ6, θ8 from the checkpoint
    b_norm, cosine = _series(con, "lora/B_norm"), _series(con, "lora/cosine_local")
    assert sorted(b_norm) == STEPS and b_norm[0] == 0.0 and all(b_norm[s] > 0 for s in STEPS[1:])
    assert cosine[0] is None and cosine[2] is None
    assert all(cosine[s] is not None and -1.0 <= cosine[s] <= 1.0 for s in STEPS[2:])

    # W&B: the resumed process logs no (probe step, key) that the checkpointed run had logged:
    # at step 8 (the checkpoint) only D(8), which needs probe 10, is new
    pairs = [(step, key) for step, keys in result["probe_logs"] for key in keys]
    assert len(pairs) == len(set(pairs)), "a probe metric was logged twice"
    probe_keys = ("probe/samples/", "probe/seconds", "probe/lora/")
    assert not [(s, k) for s, k in pairs if s <= 8 and k.startswith(probe_keys)], "probes up to 8 logged again"
    assert not [(s, k) for s, k in pairs if s < 8 and k.startswith("probe/D/")], "D before 8 logged again"
    assert {k for s, k in pairs if s == 8 and k.startswith("probe/D/")}, "D(8) needs probe 10: new after the resume"

    summary = result["summary"]
    assert summary["probe_steps"] == STEPS and summary["final_step"] == 12
    assert summary["faults"] == [] and summary["stopped_early"] is False
    assert json.loads((run / "phase_transition" / "summary.json").read_text())["probe_steps"] == STEPS
    assert "Traceback" not in (run / "log-rank0.txt").read_text()


def _copy(killed: Path, dest: Path) -> Path:
    shutil.copytree(killed, dest)
    (dest / "held").unlink()
    return dest


def test_resume_after_sigkill(killed_run, tmp_path):
    """Resumed in this (new) process. Half of probe 8's judgments are dropped from the copy
    first, as if the kill had hit them in flight: the resume judges them again."""
    import dist_worker

    run = _copy(killed_run, tmp_path / "run")
    with _store(run) as con:
        assert con.execute("DELETE FROM judgments WHERE probe_index = 4 AND sample_idx = 1").rowcount == 3
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the killed worker's thread count: bit-identical training needs the same reductions
    try:
        assert dist_worker.main(["--out", str(run), *COMMON, "--resume"]) == 0
    finally:
        torch.set_num_threads(threads)
    _check_resumed(run, killed_run, json.loads((run / "rank0.json").read_text()), resubmitted=3)


def test_resume_restoring_callback_states_keeps_config(killed_run, tmp_path):
    """The Trainer re-creates the callback as ``type(cb)(**state["args"])``; in a fresh process
    the saved instance key is unknown, and the user's configured callback must be the one used."""
    run = _copy(killed_run, tmp_path / "run")
    proc = subprocess.run([sys.executable, str(WORKER), "--out", str(run), *COMMON, "--resume", "--restore-callbacks"],
                          env=_env(), cwd=str(HERE.parent), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert "configuration falls back to the defaults" not in proc.stderr
    _check_resumed(run, killed_run, json.loads((run / "rank0.json").read_text()))
