"""``PhaseTransitionCallback``: the live driver of the probe engine inside a Trainer.

It owns only what is live-specific: Trainer hooks, the process layout (gather, broadcast,
one stop for every rank), the choice of cross-scoring, and resume files beside each
checkpoint. Everything a probe step does lives in :mod:`em_callbacks.engine`.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import TrainerCallback

from . import detect
from .divergence import MEASURES
from .distributed import Distributed
from .engine import CROSS_SCORING_MODES, ConfigError, EngineConfig, ProbeEngine, StopDecision, check_int
from .schedule import ProbeSchedule
from .probes import ProbeSet
from .sampling import SamplerConfigError, WeightSnapshots, prepare_tokenizer
from .store import RunStore
from .wandb_sink import WandbSink

logger = logging.getLogger(__name__)

__all__ = ["PhaseTransitionCallback", "CallbackConfigError"]

STATE_FILENAME = "em_callbacks_state.json"
SNAPSHOT_FILENAME = "em_callbacks_snapshots.pt"
ADAPTER_FILENAME = "em_callbacks_adapter_trajectory.pt"

CallbackConfigError = ConfigError  # the name users catch; raised before training starts


class PhaseTransitionCallback(TrainerCallback):
    """Watch a fine-tune for behavioural phase transitions and optionally stop at one.

    Args:
        probes: a :class:`ProbeSet`, a built-in name, a JSONL/YAML path or a list of prompts.
        every_n_steps: probe every this many optimizer steps (and at step 0); with
            ``schedule="adaptive"`` the longest interval between probes.
        schedule: "fixed" (default) probes every ``every_n_steps``; "adaptive" probes densely
            for the baseline, then every ``every_n_steps`` while the drift sentinel says the
            model is quiet, earlier (down to ``min_interval``) once it has moved as far as a
            transition moves it (:mod:`em_callbacks.schedule`). Detection, the peak and the
            plots read D per ``min_interval`` steps (``D_rate``; equal to D on a fixed grid). A
            :class:`~em_callbacks.schedule.ProbeSchedule` sets every knob (trigger included).
        min_interval: adaptive: the shortest interval and the baseline's spacing (default
            ``every_n_steps // 4``).
        focus_factor: while a transition is under way (onset seen, peak not confirmed) probes
            draw this many times ``samples_per_prompt``, so the captured fractions at the peak
            resolve (default: 4 with the adaptive schedule, 1 with the fixed one; needs window=1).
        samples_per_prompt: samples drawn per prompt at each probe step (>= 2).
        max_new_tokens: length cap of each sample.
        order_parameters: :class:`OrderParameter` objects scored by ``judge``.
        judge: a judge backend (``OpenAIJudge``, ``TransformersJudge``, ``RuleJudge``).
        early_stopping: ``True`` (stop at the detected onset) or a ``detect.StopRule``.
        window: probes per side of the left/right window estimator (docs/architecture.md).
        measures: dissimilarities to compute; ``primary_measure`` drives detection.
        cross_scoring: "auto" (snapshots for adapters, or for full fine-tunes when
            ``snapshot_full_model``; else one-sided), "snapshot" or "one-sided".
        output_dir: where the run store lives (default ``<args.output_dir>/phase_transition``).
        tokenizer: overrides the Trainer's ``processing_class``.
        detector: a configured :class:`detect.TransitionDetector`.
        judge_drain_timeout: seconds ``on_train_end`` waits for pending judgments.
        report_to_wandb: ``None`` (default) logs to W&B when the Trainer does
            (``"wandb" in args.report_to``); ``True``/``False`` force it on or off.
        save_checkpoint_on_stop: ask the Trainer to save when early stopping fires.
        own_logprobs: "generation" (default) reads the new samples' log-probs under the current
            weights from the sampler's own distribution; "teacher-forcing" scores them again.
        sentinel_every_n_steps: between probes, every this many steps, score the last probe's
            samples (``sentinel_samples_per_prompt`` per prompt; default a quarter of
            ``samples_per_prompt``, at least 2) under the current weights and
            log how far the model moved since (``sentinel/tv``): one scoring pass, no
            generation. Off by default with the fixed schedule; the adaptive one steers by it
            (default ``min_interval``).
        scoring_dtype: "float32" (default) computes the teacher-forced log-probs D is made of in
            float32 whatever the model's dtype (an exact upcast at each operation, no copy of the
            model; samples are still drawn by the model as it is): a bf16 model's rounding would
            otherwise inflate D. "model" scores in the model's own numerics. Either way the
            numerical noise floor of D is estimated at every probe (``D_numerical_floor``).

    Resume: the callback's own state is saved beside each ``checkpoint-*`` folder and read
    back by ``trainer.train(resume_from_checkpoint=...)``; the run store continues.
    """

    def __init__(
        self,
        probes: ProbeSet | str | Sequence[Any] = "em-first-plot",
        every_n_steps: int = 25,
        samples_per_prompt: int = 16,
        max_new_tokens: int = 128,
        order_parameters: Sequence[Any] = (),
        judge: Any = None,
        early_stopping: bool | Any = False,
        window: int = 1,
        measures: Sequence[str] = MEASURES,
        primary_measure: str = "tv",
        cross_scoring: str = "auto",
        snapshot_full_model: bool = False,
        output_dir: str | Path | None = None,
        tokenizer: Any = None,
        seed: int = 0,
        batch_size: int = 64,
        detector: detect.TransitionDetector | None = None,
        judge_concurrency: int = 8,
        judge_drain_timeout: float = 120.0,
        report_to_wandb: bool | None = None,
        save_checkpoint_on_stop: bool = False,
        log_samples_table: bool = True,
        own_logprobs: str = "generation",
        sentinel_every_n_steps: int | None = None,
        sentinel_samples_per_prompt: int | None = None,
        scoring_dtype: str = "float32",
        schedule: str | ProbeSchedule = "fixed",
        min_interval: int | None = None,
        focus_factor: int | None = None,
    ):
        check_int("every_n_steps", every_n_steps, minimum=1)
        for name, value in (("min_interval", min_interval), ("sentinel_every_n_steps", sentinel_every_n_steps)):
            if value is not None:
                check_int(name, value, minimum=1)
        if focus_factor is None:
            focus_factor = 4 if getattr(schedule, "kind", schedule) == "adaptive" and window == 1 else 1
        if cross_scoring not in CROSS_SCORING_MODES:
            raise CallbackConfigError(f"cross_scoring must be one of {CROSS_SCORING_MODES}, got {cross_scoring!r}")
        if cross_scoring == "one-sided" and window != 1:
            raise CallbackConfigError("the one-sided estimator needs window=1 (it cannot score new samples under old checkpoints)")
        try:
            probe_set = ProbeSet.coerce(probes)
        except ValueError as exc:
            raise CallbackConfigError(str(exc)) from None
        self.config = EngineConfig(
            probes=probe_set, samples_per_prompt=samples_per_prompt, max_new_tokens=max_new_tokens,
            order_parameters=tuple(order_parameters), judge=judge, window=window, measures=tuple(measures),
            primary_measure=primary_measure, seed=seed, batch_size=batch_size,
            detector=detector or detect.TransitionDetector(), stop_rule=detect.resolve_stop_rule(early_stopping),
            judge_concurrency=judge_concurrency, judge_drain_timeout=judge_drain_timeout,
            log_samples_table=log_samples_table, own_logprobs=own_logprobs,
            sentinel_samples_per_prompt=sentinel_samples_per_prompt, scoring_dtype=scoring_dtype,
            focus_factor=focus_factor,
        )
        try:
            self.schedule = ProbeSchedule.resolve(
                schedule, every_n_steps, min_interval=min_interval, sentinel_every_n_steps=sentinel_every_n_steps,
                baseline_probes=self.config.baseline_probe_count())
        except ValueError as exc:
            raise CallbackConfigError(str(exc)) from None
        self.every_n_steps = self.schedule.every_n_steps
        self.sentinel_every_n_steps = self.schedule.sentinel_every_n_steps
        self.cross_scoring = cross_scoring
        self.snapshot_full_model = snapshot_full_model
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.tokenizer = tokenizer
        self.report_to_wandb = report_to_wandb
        self.save_checkpoint_on_stop = save_checkpoint_on_stop
        self.engine = ProbeEngine(self.config)
        self._started = False
        self._dist = Distributed()
        self._snapshots = WeightSnapshots(keep=0)
        self._plan = (False, None)  # rank 0's (focus, onset level) after the last probe, on every rank

    # ------------------------------------------------------------------ public state
    # The probe options live in ``self.config`` (an EngineConfig); read them under their names.
    for _name in ("probes", "samples_per_prompt", "max_new_tokens", "order_parameters", "judge", "window",
                  "measures", "primary_measure", "seed", "batch_size", "detector", "stop_rule",
                  "judge_concurrency", "judge_drain_timeout", "log_samples_table", "own_logprobs",
                  "sentinel_samples_per_prompt", "scoring_dtype", "focus_factor"):
        locals()[_name] = property(lambda self, _n=_name: getattr(self.config, _n))
    del _name

    @property
    def run_dir(self) -> Path | None:
        """Folder of the run store and summary.json (known from ``on_train_begin``)."""
        return self.engine.run_dir

    @property
    def store(self) -> RunStore | None:
        return self.engine.store

    @property
    def summary(self) -> dict[str, Any] | None:
        return self.engine.summary.to_dict() if self.engine.summary is not None else None

    @property
    def probe_steps(self) -> list[int]:
        return list(self.engine.probe_steps)

    @property
    def stopped(self) -> StopDecision | None:
        return self.engine.stopped

    @property
    def latest_metrics(self) -> dict[str, tuple[int, float]]:
        """{metric: (probe step, value)}: the newest value of every probe metric, keyed as
        logged to W&B under ``probe/`` (``D/tv``, ``order/<name>/flagged_rate``, ...). For
        progress displays and custom printing; empty before the first probe."""
        return self.engine.latest_metrics

    # ------------------------------------------------------------------ Trainer events
    def on_init_end(self, args, state, control, processing_class=None, **kwargs):
        tokenizer = self.tokenizer or processing_class
        self._validate_tokenizer(tokenizer)
        self.engine.prepare(tokenizer)  # probes that the chat template cannot render fail at Trainer construction

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        tokenizer = self.tokenizer or processing_class
        self._validate_tokenizer(tokenizer)
        self.engine.reset()  # a callback reused for another train() starts from a clean slate
        self._dist = Distributed.detect()
        mode = self._choose_cross_scoring(model)
        self._snapshots = WeightSnapshots(keep=2 * self.config.window - 1 if mode == "snapshot" else 0)
        self._check_logging_resolution(args)
        wandb_on = self.report_to_wandb if self.report_to_wandb is not None else "wandb" in (args.report_to or [])
        sched = self.schedule
        self.engine.begin(
            tokenizer, self.output_dir or Path(args.output_dir) / "phase_transition", mode=mode, layout=self._dist,
            sink=WandbSink(enabled=wandb_on), planned_probes=sched.planned_probes(state.max_steps),
            resuming=state.global_step > 0, reference_interval=sched.reference_interval,
            run_config={"every_n_steps": self.every_n_steps, "schedule": sched.kind, "min_interval": sched.min_interval,
                        "sentinel_every_n_steps": sched.sentinel_every_n_steps,
                        "world_size": self._dist.world_size, "output_dir": str(getattr(args, "output_dir", ""))},
        )
        self._started = True
        self._plan = (False, None)
        if state.global_step > 0:
            self._resume(args, state)
        self._follow_schedule(model, state.global_step, control)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._started and self._dist.is_main and logs and "grad_norm" in logs:
            self.engine.record_grad_norm(state.global_step, logs["grad_norm"])

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if not self._started:
            return
        if self._dist.is_main:
            self.engine.collect_judgments()
        self._follow_schedule(model, state.global_step, control)

    def on_save(self, args, state, control, **kwargs):
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if self._started and self._dist.is_main and checkpoint.is_dir():
            self.engine.safe("checkpoint state", lambda: self._write_checkpoint_state(checkpoint))

    def on_train_end(self, args, state, control, **kwargs):
        if not self._started:
            return
        if self._dist.is_main:
            self.engine.finish(int(state.global_step))
        self._started = False

    # ------------------------------------------------------------------ probing
    def _follow_schedule(self, model: torch.nn.Module, step: int, control: Any) -> None:
        """Probe, read the sentinel, or do nothing at ``step``, as the schedule says; every
        input of the decision is the same on every rank (rank 0's readings are broadcast)."""
        onset_level = self._plan[1]
        decision = self.schedule.decide(step, self.engine.probe_steps, onset_level=onset_level)
        if decision.action == "sentinel":
            shards = self._dist.gather([self.engine.sentinel_scores(model, step)])
            reading = None
            if self._dist.is_main:
                result = self.engine.record_sentinel(step, shards)
                reading = (result.value, result.stderr) if result is not None else None
            reading = self._dist.broadcast(reading)
            if reading is None or not self.schedule.adaptive:
                return
            decision = self.schedule.decide(step, self.engine.probe_steps, onset_level=onset_level, sentinel=reading)
        if decision.action == "probe":
            self._probe(model, step, control, decision.reason)

    def _probe(self, model: torch.nn.Module, step: int, control: Any, reason: str) -> None:
        t0 = time.perf_counter()
        k = self.engine.begin_probe(step, focus=self._plan[0])
        adapter = self.engine.adapter_signal(model, step) if self._dist.is_main else {}
        shards = self._dist.gather([self.engine.sample_and_score(model, k, self._snapshots)])
        decision = plan = None
        if self._dist.is_main:
            decision = self.engine.record(k, step, shards, time.perf_counter() - t0, extra_metrics=adapter)
            plan = (self.engine.focus_active(), self.engine.onset_level())
            if self.schedule.adaptive:
                self.engine.safe("schedule event", lambda: self.engine.store.add_event(
                    "probe_scheduled", step, reason=reason, samples_per_prompt=self.engine.probe_samples[k],
                    reused_sentinel_rows=sum(sh.reused_sentinel_rows for sh in shards)))
        decision, self._plan = self._dist.broadcast((decision, plan))
        if decision is not None and self.engine.stopped is None:
            self.engine.stopped = decision
            control.should_training_stop = True
            if self.save_checkpoint_on_stop:
                control.should_save = True

    # ------------------------------------------------------------------ setup helpers
    def _validate_tokenizer(self, tokenizer: Any) -> None:
        try:
            prepare_tokenizer(tokenizer)
        except SamplerConfigError as exc:
            raise CallbackConfigError(str(exc)) from None

    def _choose_cross_scoring(self, model: torch.nn.Module) -> str:
        n_total = sum(p.numel() for p in model.parameters())
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        adapter_like = n_train < 0.5 * n_total
        sharded = any(type(p).__name__ == "DTensor" or getattr(p, "ds_id", None) is not None for p in model.parameters())
        can_snapshot = not sharded and (adapter_like or self.snapshot_full_model)
        if self.cross_scoring == "snapshot" and not can_snapshot:
            raise CallbackConfigError(
                "cross_scoring='snapshot' needs a PEFT adapter or snapshot_full_model=True (and unsharded parameters)"
            )
        mode = "snapshot" if (self.cross_scoring in ("auto", "snapshot") and can_snapshot) else "one-sided"
        if mode == "one-sided" and self.config.window == 1 and self._dist.is_main:
            logger.warning(
                "em-callbacks: full fine-tune without snapshots: using the one-sided TV estimator "
                "(pass snapshot_full_model=True for all measures)"
            )
        return mode

    def _check_logging_resolution(self, args: Any) -> None:
        logging_steps = getattr(args, "logging_steps", 1)
        if isinstance(logging_steps, float) and logging_steps < 1:
            return  # a fraction of training: cannot judge here
        if logging_steps > max(1, self.schedule.min_interval // 5) and self._dist.is_main:
            warnings.warn(
                f"logging_steps={logging_steps} is coarse against the probe interval ({self.schedule.min_interval}); "
                "the grad-norm peak cannot be resolved. Set logging_steps=1 to record the grad norm every step.",
                stacklevel=2,
            )

    # ------------------------------------------------------------------ resume
    def _write_checkpoint_state(self, checkpoint: Path) -> None:
        (checkpoint / STATE_FILENAME).write_text(json.dumps(self.engine.state_dict()))
        if self._snapshots.available():
            torch.save(self._snapshots.state_dict(), checkpoint / SNAPSHOT_FILENAME)
        if self.engine.adapter_state()["prev"] is not None:
            torch.save(self.engine.adapter_state(), checkpoint / ADAPTER_FILENAME)

    def _resume(self, args: Any, state: Any) -> None:
        """Continue from ``checkpoint-<global_step>``: state file, snapshots and the store's band."""
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        payload = None
        if self._dist.is_main:
            path = checkpoint / STATE_FILENAME
            payload = json.loads(path.read_text()) if path.is_file() else None
            self.engine.store.truncate_after(state.global_step)
        payload = self._dist.broadcast(payload)
        if payload is None:
            if self._dist.is_main:
                logger.warning("em-callbacks: resuming at step %d without saved callback state", state.global_step)
            return
        self.engine.load_state_dict(payload, state.global_step)
        self._plan = (self.engine.focus_active(), self.engine.onset_level())  # the detector state is on every rank now
        snap = checkpoint / SNAPSHOT_FILENAME
        if self._snapshots.keep and snap.is_file():
            self._snapshots.load_state_dict(torch.load(snap, map_location="cpu", weights_only=True))
        if self._dist.is_main and (checkpoint / ADAPTER_FILENAME).is_file():
            self.engine.load_adapter_state(torch.load(checkpoint / ADAPTER_FILENAME, map_location="cpu", weights_only=True))
        self.engine.reload_band(self._dist.broadcast(self.engine.band_rows() if self._dist.is_main else None))
        if self._dist.is_main:
            self.engine.safe("judgment reload", self.engine.reload_judgments)
            self.engine.store.add_event("resume", state.global_step, probe_steps=self.engine.probe_steps)
