"""Weights & Biases logging, on its own ``probe/step`` axis.

The Trainer's WandbCallback binds every key to ``train/global_step``; probe metrics and
late-arriving judge results are bound to ``probe/step`` instead, so they can be logged
whenever they arrive without fighting the trainer's monotonic step. Every method is a
no-op when wandb is not installed or no run is active, and every failure is swallowed
with a warning: logging must never break the training run.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

from .store import scrub_secrets

logger = logging.getLogger(__name__)

__all__ = ["WandbSink"]


class WandbSink:
    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._defined = False
        self._failed = False

    @property
    def run(self) -> Any | None:
        if not self.enabled or self._failed:
            return None
        try:
            import wandb
        except ImportError:
            return None
        return wandb.run

    def _ensure_axes(self, run: Any) -> None:
        if self._defined:
            return
        run.define_metric("probe/step")
        run.define_metric("probe/*", step_metric="probe/step")
        self._defined = True

    def _guard(self, what: str, fn, *args, **kwargs) -> None:
        run = self.run
        if run is None:
            return
        try:
            self._ensure_axes(run)
            fn(run, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - logging must not crash training
            logger.warning("em-callbacks: W&B %s failed (%s: %s); continuing without it", what, type(exc).__name__, exc)

    def log_config(self, config: dict[str, Any]) -> None:
        self._guard("config", lambda run: run.config.update({"em_callbacks": scrub_secrets(config)}, allow_val_change=True))

    def log_probe(self, step: int, values: dict[str, float]) -> None:
        """``values`` keys without the ``probe/`` prefix; NaN/None dropped."""
        clean = {f"probe/{k}": float(v) for k, v in values.items() if v is not None and v == v}
        if not clean:
            return
        clean["probe/step"] = int(step)
        self._guard("log", lambda run: run.log(clean))

    def log_table(self, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:
        def _log(run):
            import wandb

            run.log({f"probe/{key}": wandb.Table(columns=list(columns), data=[list(r) for r in rows]), "probe/step": int(step)})

        self._guard("table", _log)

    def log_image(self, key: str, path: str, step: int | None = None) -> None:
        def _log(run):
            import wandb

            payload = {f"probe/{key}": wandb.Image(path)}
            if step is not None:
                payload["probe/step"] = int(step)
            run.log(payload)

        self._guard("image", _log)

    def summary(self, values: dict[str, Any]) -> None:
        def _set(run):
            for k, v in values.items():
                run.summary[k] = v

        self._guard("summary", _set)

    def alert(self, title: str, text: str) -> None:
        self._guard("alert", lambda run: run.alert(title=title, text=text))
