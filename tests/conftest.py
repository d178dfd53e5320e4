"""Shared test setup: offline everything, one CPU thread, tests/ importable (tiny.py, ...)."""

from __future__ import annotations

import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
for path in (HERE, os.path.dirname(HERE)):
    if path not in sys.path:
        sys.path.insert(0, path)

# Before anything imports wandb / transformers: nothing may reach the network, and W&B files
# go to a throw-away folder instead of ./wandb (tests that inspect them set their own WANDB_DIR).
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_CONSOLE", "off")
os.environ.setdefault("WANDB_DISABLE_GIT", "true")
os.environ.setdefault("WANDB_DIR", tempfile.mkdtemp(prefix="em-cb-wandb-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DISABLE_MLFLOW_INTEGRATION", "TRUE")

try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover
    pass


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_wandb():
    """A W&B service reads WANDB_DIR & co. once, when it starts: tear it down after any test that
    used it (finishing a run left open), so the next test's monkeypatched settings apply."""
    yield
    wandb = sys.modules.get("wandb")
    if wandb is not None and hasattr(wandb, "teardown"):
        wandb.teardown()


@pytest.fixture
def offline_wandb_dir(tmp_path, monkeypatch):
    """An empty folder that receives this test's offline W&B runs (WANDB_MODE=offline,
    WANDB_DIR, a project name), with a fresh W&B service so these settings apply."""
    wandb = pytest.importorskip("wandb")
    path = tmp_path / "wandb_dir"
    path.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(path))
    monkeypatch.setenv("WANDB_PROJECT", "em-callbacks-tests")
    wandb.teardown()  # settings are read once per wandb service
    return path
