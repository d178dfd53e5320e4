"""``benchmarks/gpu_check.py --tiny`` runs end to end on the CPU and prints every figure, so the
GPU check (one command on one H200) cannot rot between the times someone has a GPU."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
GPU_MEMORY = {"peak_gib_without", "peak_gib_with", "probe_extra_gib", "big_weights_gib", "big_probe_peak_gib",
              "big_probe_extra_gib"}


def _figure_keys() -> tuple[str, ...]:
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return gpu_check.FIGURE_KEYS


def test_tiny_gpu_check_runs_on_cpu_and_prints_every_figure(tmp_path):
    out = tmp_path / "figures.json"
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--json", str(out)], cwd=str(ROOT), env=env,
                            capture_output=True, text=True, timeout=300)
    text = result.stdout + result.stderr
    assert result.returncode == 0, text[-6000:]
    assert "section failed" not in text and "figures not produced" not in text, text[-6000:]

    keys = _figure_keys()
    printed = dict(re.findall(r"^figure (\w+) = (\S+)", result.stdout, flags=re.M))
    assert set(keys) <= set(printed), sorted(set(keys) - set(printed))

    data = json.loads(out.read_text())
    figures = data["figures"]
    assert set(keys) <= set(figures) and data["failed_sections"] == [] and data["meta"]["tiny"] is True
    for key in keys:
        value = figures[key]
        if key in GPU_MEMORY:
            assert value is None, (key, value)  # the CPU has no GPU memory to report
        else:
            assert isinstance(value, (int, float)) and value == value, (key, value)
    # the workload is the one planned: 6 steps, a probe every 2 (steps 0, 2, 4, 6)
    assert figures["train_steps"] == 6 and figures["probes"] == 4
    assert figures["probe_s_median"] > 0 and figures["floor_s"] > 0 and figures["probe_over_floor"] > 0
    # identical weights read as (almost) no change: noise only
    for name in ("gen_vs_tf_bf16", "batch_vs_row_bf16", "bf16_vs_fp32"):
        assert 0 <= figures[f"noise_tv_{name}"] < 0.1, (name, figures[f"noise_tv_{name}"])
        assert figures[f"noise_sigma_{name}"] >= 0
    assert figures["big_params_b"] > 0 and figures["big_probe_s"] > 0
