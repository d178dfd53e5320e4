"""Two CPU processes (torchrun, gloo) fine-tune with the callback and stop early together.

The stop is decided on rank 0 only (a StopRule that fires at probe step 4) and must reach
every rank through the callback's broadcast: both ranks stop at the same global step, exit 0
without hanging, and only rank 0 writes the store, the summary and the logs.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

HERE = Path(__file__).resolve().parent
WORKER = HERE / "dist_worker.py"
TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(out: Path, *worker_args: str, nproc: int = 2, worker: Path = WORKER,
                 timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    """``worker --out out *worker_args`` on ``nproc`` local ranks (also used by test_fsdp.py)."""
    env = dict(os.environ)
    env.update(WANDB_MODE="disabled", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parent), env.get("PYTHONPATH", "")]))
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_TORCH_DEVICE"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(worker), "--out", str(out), *worker_args]
    # Own process group: on a hang, the launcher and both ranks are killed together.
    proc = subprocess.Popen(cmd, env=env, cwd=str(HERE.parent), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"torchrun {worker.name} {' '.join(worker_args)} hung (> {timeout} s):\n{output[-6000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, output, "")


def test_two_ranks_stop_together_and_rank0_writes_once(tmp_path):
    out = tmp_path / "run"
    result = run_torchrun(out, "--lora", "--stop-at", "4", "--max-steps", "12", "--every", "2")
    assert result.returncode == 0, result.stdout[-6000:]
    assert "Traceback" not in result.stdout, result.stdout[-6000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]

    # same stop on both ranks, although only rank 0 evaluated the rule
    for r, res in enumerate(ranks):
        assert res["rank"] == r and res["world_size"] == 2
        assert res["global_step"] == 4, res
        assert res["probe_steps"] == [0, 2, 4]
        assert res["stopped"]["step"] == 4 and "probe step 4" in res["stopped"]["reason"]
        assert res["user_callback_is_active"]

    # one store, one summary: rank 0's
    assert ranks[0]["has_store"] and not ranks[1]["has_store"]
    assert ranks[1]["summary"] is None
    summary = ranks[0]["summary"]
    assert summary["stopped_early"] is True and summary["stop_step"] == 4 and summary["final_step"] == 4
    assert summary["probe_steps"] == [0, 2, 4] and summary["faults"] == []
    assert [p.name for p in out.rglob("run.sqlite")] == ["run.sqlite"]
    assert [p.name for p in out.rglob("summary.json")] == ["summary.json"]
    assert json.loads((out / "phase_transition" / "summary.json").read_text())["stop_step"] == 4

    con = sqlite3.connect(out / "phase_transition" / "run.sqlite")
    probes = con.execute("SELECT probe_index, step FROM probes ORDER BY probe_index").fetchall()
    assert probes == [(0, 0), (1, 2), (2, 4)]
    all_keys = {(f"p{i}", s) for i in range(3) for s in range(2)}  # 3 prompts x 2 samples
    for k in range(3):
        # prompts are sharded (rank 0: p0, p2; rank 1: p1) and gathered: all present, once
        samples = con.execute("SELECT prompt_id, sample_idx FROM samples WHERE probe_index = ?", (k,)).fetchall()
        assert len(samples) == len(all_keys) and set(samples) == all_keys
        own = con.execute("SELECT prompt_id, sample_idx FROM logprobs WHERE sample_probe = ? AND checkpoint_probe = ?",
                          (k, k)).fetchall()
        assert set(own) == all_keys
    # LoRA: snapshots cross-score new samples under the previous checkpoint on every rank
    cross = con.execute("SELECT prompt_id, sample_idx FROM logprobs WHERE sample_probe = 2 AND checkpoint_probe = 1")
    assert set(cross.fetchall()) == all_keys
    d_steps = [s for (s,) in con.execute("SELECT step FROM metrics WHERE name = 'D/tv' ORDER BY step")]
    assert d_steps == [0, 2]
    events = [k for (k,) in con.execute("SELECT kind FROM events")]
    assert events.count("early_stop") == 1
    (summary_meta,) = con.execute("SELECT value FROM meta WHERE key = 'summary'").fetchone()
    assert json.loads(summary_meta)["stop_step"] == 4
    grad_steps = [s for (s,) in con.execute("SELECT step FROM grad_norms ORDER BY step")]
    assert grad_steps == [1, 2, 3, 4]

    # logs from one process only: em_callbacks log records and W&B calls (real disabled-mode
    # wandb runs on both ranks, their log() calls recorded)
    assert "stopping training at step 4" in (out / "log-rank0.txt").read_text()
    assert (out / "log-rank1.txt").read_text() == ""
    assert ranks[1]["wandb_logs"] == []
    logged = {key for call in ranks[0]["wandb_logs"] for key in call}
    assert {"probe/step", "probe/D/tv", "probe/lora/B_norm", "probe/samples/mean_tokens"} <= logged


def test_two_ranks_follow_one_adaptive_schedule(tmp_path):
    """The adaptive schedule on 2 ranks: rank 0 reads the sentinel and the detector, every rank
    gets the same decisions (probe steps, focus sample counts, stop), and the stored schedule
    events and sentinel readings are rank 0's, once."""
    out = tmp_path / "run"
    result = run_torchrun(out, "--lora", "--adaptive", "--max-steps", "10", "--every", "4", "--stop-at", "9")
    assert result.returncode == 0, result.stdout[-6000:]
    assert "Traceback" not in result.stdout, result.stdout[-6000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["probe_steps"] == ranks[1]["probe_steps"]
    assert ranks[0]["probe_samples"] == ranks[1]["probe_samples"]
    assert ranks[0]["stopped"] == ranks[1]["stopped"] and ranks[0]["global_step"] == ranks[1]["global_step"]
    steps, samples = ranks[0]["probe_steps"], ranks[0]["probe_samples"]
    # every interval lies between min_interval (1) and the longest (4); the sentinel fired some early
    gaps = [b - a for a, b in zip(steps, steps[1:])]
    assert steps[0] == 0 and all(1 <= g <= 4 for g in gaps) and any(g < 4 for g in gaps[1:]), steps
    assert set(samples) <= {2, 4} and 4 in samples  # focus doubles the samples once an onset is seen
    con = sqlite3.connect(out / "phase_transition" / "run.sqlite")
    scheduled = [s for (s,) in con.execute("SELECT step FROM events WHERE kind = 'probe_scheduled' ORDER BY step")]
    assert scheduled == steps
    for k, n in enumerate(samples):  # 3 prompts x n samples, gathered from both ranks
        (count,) = con.execute("SELECT COUNT(*) FROM samples WHERE probe_index = ?", (k,)).fetchone()
        assert count == 3 * n
    sentinel_steps = [s for (s,) in con.execute("SELECT step FROM sentinel ORDER BY step")]
    assert sentinel_steps and not set(sentinel_steps) & set(steps[:1])
