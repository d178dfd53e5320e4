"""``PhaseTransitionCallback``: the thin orchestrator that wires the pipeline into a Trainer.

Every ``every_n_steps`` optimizer steps (and at step 0) all ranks sample the probe prompts,
score samples under the checkpoints the window estimator needs, and rank 0 turns that into
dissimilarities, judge requests, detections, store rows and W&B logs. No maths lives here.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import time
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from . import detect
from .adapter_signal import B_NORM, AdapterTrajectory
from .divergence import MEASURES
from .history import ProbeHistory, WindowResult
from .probes import ProbeSet, render_prompt
from .sampling import (
    ProbeSamples,
    SamplerConfigError,
    WeightSnapshots,
    encode_prompts,
    generate_samples,
    prepare_tokenizer,
    preserved_state,
    sequence_logprobs,
)
from .store import RunStore, SampleRecord, scrub_secrets
from .wandb_sink import WandbSink

logger = logging.getLogger(__name__)

__all__ = ["PhaseTransitionCallback", "CallbackConfigError"]

STATE_FILENAME = "em_callbacks_state.json"
SNAPSHOT_FILENAME = "em_callbacks_snapshots.pt"
ADAPTER_FILENAME = "em_callbacks_adapter_trajectory.pt"
CROSS_SCORING_MODES = ("auto", "snapshot", "one-sided")

_LIVE_INSTANCES: "weakref.WeakValueDictionary[str, PhaseTransitionCallback]" = weakref.WeakValueDictionary()


class CallbackConfigError(ValueError):
    """The callback was configured in a way that cannot work; raised before training starts."""


@dataclass
class _Distributed:
    """Process layout, from accelerate when a distributed run is active."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def detect(cls) -> "_Distributed":
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return cls()
        from accelerate import PartialState

        state = PartialState()
        return cls(state.process_index, state.num_processes)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def gather(self, items: list) -> list:
        if self.world_size == 1:
            return items
        from accelerate.utils import gather_object

        return gather_object(items)

    def max_int(self, value: int, device: torch.device) -> int:
        """The largest ``value`` over ranks (sharded models need equal forward-pass counts)."""
        if self.world_size == 1:
            return value
        if torch.distributed.get_backend() == "nccl" and device.type != "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        box = torch.tensor([value], dtype=torch.long, device=device)
        torch.distributed.all_reduce(box, op=torch.distributed.ReduceOp.MAX)
        return int(box.item())

    def broadcast(self, obj: Any) -> Any:
        if self.world_size == 1:
            return obj
        from accelerate.utils import broadcast_object_list

        box = [obj]
        broadcast_object_list(box, from_process=0)
        return box[0]


@dataclass
class _JudgeProgress:
    """How many judgments a probe expects and has received, per order parameter."""

    expected: int
    received: int = 0
    failed: int = 0
    kernels: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)
    scores: list[float] = field(default_factory=list)
    flagged: list[bool] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.received >= self.expected


class PhaseTransitionCallback(TrainerCallback, ExportableState):
    """Watch a fine-tune for behavioural phase transitions and optionally stop at one.

    Args:
        probes: a :class:`ProbeSet`, a built-in name, a JSONL/YAML path or a list of prompts.
        every_n_steps: probe every this many optimizer steps (and at step 0).
        samples_per_prompt: samples drawn per prompt at each probe step (>= 2).
        max_new_tokens: length cap of each sample.
        order_parameters: :class:`OrderParameter` objects scored by ``judge``.
        judge: a judge backend (``OpenAIJudge``, ``TransformersJudge``, ``RuleJudge``).
        early_stopping: ``True`` (stop at the detected onset) or a ``detect.StopRule``.
        window: probes per side of the left/right window estimator (DESIGN.md section 2).
        measures: dissimilarities to compute; ``primary_measure`` drives detection.
        cross_scoring: "auto" (snapshots for adapters, or for full fine-tunes when
            ``snapshot_full_model``; else one-sided), "snapshot" or "one-sided".
        output_dir: where the run store lives (default ``<args.output_dir>/phase_transition``).
        tokenizer: overrides the Trainer's ``processing_class``.
        detector: a configured :class:`detect.TransitionDetector`.
        judge_drain_timeout: seconds ``on_train_end`` waits for pending judgments.
        report_to_wandb: log to W&B when a run is active.
        save_checkpoint_on_stop: ask the Trainer to save when early stopping fires.
    """

    def __new__(cls, *args: Any, _instance_key: str | None = None, **kwargs: Any):
        # With restore_callback_states_from_checkpoint=True the Trainer replaces each stateful
        # callback by ``type(cb)(**state["args"])``. Hand back the live, configured instance (the
        # user's object keeps receiving events and its config: probes, judge, ...). In a fresh
        # process the saved key names an instance of the dead one: adopt this process's unused one
        # (also preferred over a live but already used instance that wrote the checkpoint).
        if _instance_key is not None:
            fresh = [cb for cb in list(_LIVE_INSTANCES.values())
                     if type(cb) is cls and not cb._started and not cb._probe_steps and not cb._adopted]
            keyed = _LIVE_INSTANCES.get(_instance_key)
            live = keyed if keyed in fresh else (fresh[0] if fresh else keyed)
            if live is not None:
                live._adopted = True
                return live
            logger.warning("em-callbacks: restoring PhaseTransitionCallback from a checkpoint without a live "
                           "instance; its configuration falls back to the defaults")
        return super().__new__(cls)

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
        report_to_wandb: bool = True,
        save_checkpoint_on_stop: bool = False,
        log_samples_table: bool = True,
        _instance_key: str | None = None,
    ):
        if _instance_key is not None and "_instance_key" in self.__dict__:
            return  # re-created by Trainer._load_callback_state: __new__ handed back the live instance
        _check_int("every_n_steps", every_n_steps, minimum=1)
        _check_int("samples_per_prompt", samples_per_prompt, minimum=2, why="a variance needs two samples")
        _check_int("max_new_tokens", max_new_tokens, minimum=1)
        _check_int("window", window, minimum=1)
        _check_int("batch_size", batch_size, minimum=1)
        _check_int("judge_concurrency", judge_concurrency, minimum=1)
        measures = tuple(measures)
        unknown = [m for m in measures if m not in MEASURES]
        if unknown or not measures:
            raise CallbackConfigError(f"measures must be a non-empty subset of {MEASURES}, got {list(measures)}")
        if primary_measure not in measures:
            raise CallbackConfigError(f"primary_measure {primary_measure!r} must be one of measures {measures}")
        if cross_scoring not in CROSS_SCORING_MODES:
            raise CallbackConfigError(f"cross_scoring must be one of {CROSS_SCORING_MODES}, got {cross_scoring!r}")
        if cross_scoring == "one-sided" and window != 1:
            raise CallbackConfigError("the one-sided estimator needs window=1 (it cannot score new samples under old checkpoints)")
        try:
            self.probes = ProbeSet.coerce(probes)
        except ValueError as exc:
            raise CallbackConfigError(str(exc)) from None
        self.order_parameters = tuple(order_parameters)
        names = [getattr(op, "name", None) for op in self.order_parameters]
        if any(n is None for n in names):
            raise CallbackConfigError("order_parameters must be OrderParameter objects")
        if len(set(names)) != len(names):
            raise CallbackConfigError(f"order parameter names must be unique, got {names}")
        if self.order_parameters and judge is None:
            raise CallbackConfigError("order_parameters need a judge (OpenAIJudge, TransformersJudge or RuleJudge)")
        if judge is not None and not hasattr(judge, "ajudge"):
            raise CallbackConfigError(f"judge must implement the Judge interface (ajudge), got {type(judge).__name__}")
        self.stop_rule = detect.resolve_stop_rule(early_stopping)
        self.every_n_steps = every_n_steps
        self.samples_per_prompt = samples_per_prompt
        self.max_new_tokens = max_new_tokens
        self.judge = judge
        self.window = window
        self.measures = measures
        self.primary_measure = primary_measure
        self.cross_scoring = cross_scoring
        self.snapshot_full_model = snapshot_full_model
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.tokenizer = tokenizer
        self.seed = int(seed)
        self.batch_size = batch_size
        self.detector = detector or detect.TransitionDetector()
        self.judge_concurrency = judge_concurrency
        self.judge_drain_timeout = float(judge_drain_timeout)
        self.report_to_wandb = report_to_wandb
        self.save_checkpoint_on_stop = save_checkpoint_on_stop
        self.log_samples_table = log_samples_table
        self._instance_key = f"{id(self):x}-{time.time_ns()}"
        self._adopted = False
        _LIVE_INSTANCES[self._instance_key] = self
        self._reset_run_state()

    # ------------------------------------------------------------------ state
    def _reset_run_state(self) -> None:
        self._started = False
        self._dist = _Distributed()
        self._store: RunStore | None = None
        self._sink = WandbSink(enabled=self.report_to_wandb)
        self._runner = None
        self._history = ProbeHistory(window=self.window)
        self._snapshots = WeightSnapshots(keep=0)
        self._local_samples: dict[int, ProbeSamples] = {}  # this rank's shard
        self._sample_keys: dict[int, list[tuple[str, int]]] = {}  # rank 0: canonical sample order
        self._probe_steps: list[int] = []
        self._mode = "one-sided"
        self._full: dict[int, dict[str, WindowResult]] = {}
        self._judge_progress: dict[tuple[int, str], _JudgeProgress] = {}
        self._decomposed: set[tuple[int, str]] = set()
        self._order_series: dict[str, list[tuple[int, float]]] = {}
        self._grad_norms: dict[int, float] = {}
        self._stopped: dict[str, Any] | None = None
        self._alerted = False
        self._faults: list[dict[str, Any]] = []
        self._summary: dict[str, Any] | None = None
        self._adapter = AdapterTrajectory()  # LoRA B norm / local cosine (rank 0)
        self._adapter_metrics: dict[int, dict[str, float]] = {}
        self._latest: dict[str, tuple[int, float]] = {}

    def state(self) -> dict:
        """ExportableState: the live instance is found again by key; full state goes to files."""
        return {"args": {"_instance_key": self._instance_key}, "attributes": {}}

    @property
    def run_dir(self) -> Path | None:
        """Folder of the run store and summary.json (known from ``on_train_begin``)."""
        return getattr(self, "_run_dir", None)

    @property
    def store(self) -> RunStore | None:
        return self._store

    @property
    def summary(self) -> dict[str, Any] | None:
        return self._summary

    @property
    def latest_metrics(self) -> dict[str, tuple[int, float]]:
        """{metric: (probe step, value)}: the newest value of every probe metric, keyed as
        logged to W&B under ``probe/`` (``D/tv``, ``order/<name>/flagged_rate``, ...). For
        progress displays and custom printing; empty before the first probe."""
        return dict(self._latest)

    def _log_probe(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            if isinstance(value, numbers.Real) and (key not in self._latest or self._latest[key][0] <= step):
                self._latest[key] = (int(step), float(value))
        self._sink.log_probe(step, values)

    # ------------------------------------------------------------------ Trainer events
    def on_init_end(self, args, state, control, processing_class=None, **kwargs):
        self._validate_tokenizer(self.tokenizer or processing_class)

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        if self._started or self._probe_steps:
            # The same object reused for another train(): start from a clean slate.
            self._reset_run_state()
            self.detector.reset()
            if self.stop_rule is not None:
                self.stop_rule.reset()
        tokenizer = self.tokenizer or processing_class
        pad_id, eos_id = self._validate_tokenizer(tokenizer)
        self._tok, self._pad_id, self._eos_id = tokenizer, pad_id, eos_id
        self._dist = _Distributed.detect()
        self._mode = self._choose_cross_scoring(model)
        self._snapshots = WeightSnapshots(keep=2 * self.window - 1 if self._mode == "snapshot" else 0)
        self._run_dir = self.output_dir or Path(args.output_dir) / "phase_transition"
        uses_template = bool(getattr(tokenizer, "chat_template", None))
        if not uses_template and self._dist.is_main:
            logger.warning("em-callbacks: tokenizer has no chat template; probes use a plain 'User:/Assistant:' prompt")
        self._rendered = [render_prompt(tokenizer, p) for p in self.probes]
        self._prompt_ids = encode_prompts(tokenizer, self._rendered, uses_template)
        self._shard = list(range(self._dist.rank, len(self.probes), self._dist.world_size))
        self._check_logging_resolution(args)
        if self._dist.is_main:
            self._open_store(args)
            self._start_judges()
            self._sink.log_config(self._config_dict(args))
        self._started = True
        if state.global_step > 0:
            self._resume(args, state)
        if not self._probe_steps or self._probe_steps[-1] < state.global_step:
            if state.global_step == 0 or state.global_step % self.every_n_steps == 0:
                self._probe(model, state.global_step, control)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self._started or not self._dist.is_main or not logs or "grad_norm" not in logs:
            return
        value = _finite_or_nan(logs["grad_norm"])
        self._grad_norms[state.global_step] = value
        self._safe("grad-norm store", lambda: self._store.write_grad_norms([(state.global_step, value)]))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if not self._started:
            return
        if self._dist.is_main:
            self._collect_judgments()
        if state.global_step % self.every_n_steps == 0 and (not self._probe_steps or self._probe_steps[-1] < state.global_step):
            self._probe(model, state.global_step, control)

    def on_save(self, args, state, control, **kwargs):
        if not self._started or not self._dist.is_main:
            return
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not checkpoint.is_dir():
            return
        self._safe("checkpoint state", lambda: self._write_checkpoint_state(checkpoint))

    def on_train_end(self, args, state, control, **kwargs):
        if not self._started:
            return
        if self._dist.is_main:
            self._finish(state)
        self._started = False

    # ------------------------------------------------------------------ setup helpers
    def _validate_tokenizer(self, tokenizer: Any) -> tuple[int, int | None]:
        try:
            return prepare_tokenizer(tokenizer)
        except SamplerConfigError as exc:
            raise CallbackConfigError(str(exc)) from None

    def _choose_cross_scoring(self, model: torch.nn.Module) -> str:
        n_total = sum(p.numel() for p in model.parameters())
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        adapter_like = n_train < 0.5 * n_total
        sharded = any(type(p).__name__ in ("DTensor",) or getattr(p, "ds_id", None) is not None for p in model.parameters())
        can_snapshot = not sharded and (adapter_like or self.snapshot_full_model)
        if self.cross_scoring == "snapshot" and not can_snapshot:
            raise CallbackConfigError(
                "cross_scoring='snapshot' needs a PEFT adapter or snapshot_full_model=True (and unsharded parameters)"
            )
        mode = "snapshot" if (self.cross_scoring in ("auto", "snapshot") and can_snapshot) else "one-sided"
        if mode == "one-sided" and self.window != 1:
            raise CallbackConfigError(
                f"window={self.window} needs snapshots of old checkpoints; pass snapshot_full_model=True, "
                "train a PEFT adapter, or use window=1"
            )
        if mode == "one-sided" and self._dist.is_main:  # logs from one process only
            logger.warning(
                "em-callbacks: full fine-tune without snapshots: using the one-sided TV estimator "
                "(pass snapshot_full_model=True for all measures)"
            )
        return mode

    def _check_logging_resolution(self, args: Any) -> None:
        logging_steps = getattr(args, "logging_steps", 1)
        if isinstance(logging_steps, float) and logging_steps < 1:
            return  # a fraction of training: cannot judge here
        if logging_steps > max(1, self.every_n_steps // 5) and self._dist.is_main:
            warnings.warn(
                f"logging_steps={logging_steps} is coarse against the probe interval ({self.every_n_steps}); "
                "the grad-norm peak cannot be resolved. Set logging_steps=1 to record the grad norm every step.",
                stacklevel=2,
            )

    def _open_store(self, args: Any) -> None:
        self._store = RunStore(self._run_dir)
        self._store.set_meta(config=self._config_dict(args))
        self._store.write_prompts(
            (p.id, i, p.prompt, p.system, p.tags, r) for i, (p, r) in enumerate(zip(self.probes, self._rendered))
        )

    def _config_dict(self, args: Any) -> dict[str, Any]:
        judge_config = None
        if self.judge is not None:
            judge_config = self.judge.config() if hasattr(self.judge, "config") else type(self.judge).__name__
        return scrub_secrets(
            {
                "probes": self.probes.name,
                "n_prompts": len(self.probes),
                "every_n_steps": self.every_n_steps,
                "samples_per_prompt": self.samples_per_prompt,
                "max_new_tokens": self.max_new_tokens,
                "window": self.window,
                "measures": list(self.measures),
                "primary_measure": self.primary_measure,
                "cross_scoring": self._mode,
                "seed": self.seed,
                "order_parameters": [
                    {"name": op.name, "statement": getattr(op, "statement", "")} for op in self.order_parameters
                ],
                "judge": judge_config,
                "early_stopping": type(self.stop_rule).__name__ if self.stop_rule else None,
                "detector": self.detector.config(),
                "world_size": self._dist.world_size,
                "output_dir": str(getattr(args, "output_dir", "")),
            }
        )

    def _start_judges(self) -> None:
        if self.judge is None or not self.order_parameters:
            return
        from .judges import JudgeRunner

        self._runner = JudgeRunner(self.judge, list(self.order_parameters), max_concurrency=self.judge_concurrency)

    # ------------------------------------------------------------------ probing (all ranks)
    def _probe_seed(self, probe_index: int) -> int:
        return int(np.random.SeedSequence([self.seed, probe_index]).generate_state(1)[0])

    def _probe(self, model: torch.nn.Module, step: int, control: Any) -> None:
        k = len(self._probe_steps)
        t0 = time.perf_counter()
        if self._dist.is_main:
            self._adapter_metrics[k] = self._safe("adapter signal", lambda: self._adapter.update(model, step)) or {}
        rows = self._sample_and_score(model, k)
        gathered = self._dist.gather(rows)
        self._probe_steps.append(step)
        decision = None
        if self._dist.is_main:
            decision = self._safe("probe bookkeeping", lambda: self._record_probe(k, step, gathered, time.perf_counter() - t0))
        decision = self._dist.broadcast(decision)
        if decision and self._stopped is None:
            self._stopped = decision
            control.should_training_stop = True
            if self.save_checkpoint_on_stop:
                control.should_save = True

    def _sample_and_score(self, model: torch.nn.Module, k: int) -> list[tuple]:
        """This rank's share: new samples, and every log-prob the band needs at checkpoint k."""
        prompt_ids = [self._prompt_ids[p] for p in self._shard]
        n_batches = math.ceil(len(self.probes) / self._dist.world_size) * self.samples_per_prompt
        n_batches = math.ceil(n_batches / self.batch_size)
        decode = lambda ids: self._tok.decode(ids, skip_special_tokens=True)  # noqa: E731
        with preserved_state(model, self._tok):
            model.eval()
            samples = generate_samples(
                model, prompt_ids, self.samples_per_prompt, self.max_new_tokens, self._pad_id, self._eos_id,
                seed=self._probe_seed(k) + self._dist.rank, batch_size=self.batch_size, min_batches=n_batches,
                decode=decode,
            )
            samples.prompt_index = np.array([self._shard[i] for i in samples.prompt_index], dtype=np.int64)
            self._local_samples[k] = samples
            rows: list[tuple] = [("sample", k, self.probes[int(p)].id, int(s), text, ids, bool(f))
                                 for p, s, text, ids, f in zip(samples.prompt_index, samples.sample_index,
                                                               samples.texts, samples.completion_ids, samples.finished)]
            # Every sample set in the band, under the current weights.
            for j in sorted(self._local_samples):
                if k - j <= self._history.band:
                    rows += self._score_rows(model, j, k)
            # The new samples under the older checkpoints still held as snapshots.
            for old in self._snapshots.available():
                if k - old <= self._history.band:
                    with self._snapshots.swapped_in(model, old):
                        rows += self._score_rows(model, k, old)
            self._snapshots.capture(model, k)
        for j in [j for j in self._local_samples if k - j >= self._history.band + 1]:
            del self._local_samples[j]
        return rows

    def _score_rows(self, model: torch.nn.Module, sample_probe: int, checkpoint: int) -> list[tuple]:
        samples = self._local_samples[sample_probe]
        device = next(model.parameters()).device
        logp = sequence_logprobs(
            model, [self._prompt_ids[int(p)] for p in samples.prompt_index], samples.completion_ids, self._pad_id,
            batch_size=self.batch_size, sync_batches=lambda n: self._dist.max_int(n, device),
        )
        return [("logp", sample_probe, self.probes[int(p)].id, int(s), checkpoint, float(v))
                for p, s, v in zip(samples.prompt_index, samples.sample_index, logp)]

    # ------------------------------------------------------------------ rank-0 bookkeeping
    def _record_probe(self, k: int, step: int, rows: list[tuple], seconds: float) -> dict | None:
        position = {p.id: i for i, p in enumerate(self.probes)}
        sample_rows = sorted((r for r in rows if r[0] == "sample"), key=lambda r: (position[r[2]], r[3]))
        keys = [(r[2], r[3]) for r in sample_rows]
        self._sample_keys[k] = keys
        self._history.add_samples(k, np.array([pid for pid, _ in keys]))
        logp_rows = [r[1:] for r in rows if r[0] == "logp"]
        by_pair: dict[tuple[int, int], dict[tuple[str, int], float]] = {}
        for j, pid, s, ckpt, v in logp_rows:
            by_pair.setdefault((j, ckpt), {})[(pid, s)] = v
        for (j, ckpt), values in by_pair.items():
            if j in self._sample_keys:
                self._history.add_logp(j, ckpt, np.array([values[key] for key in self._sample_keys[j]]))
        self_logp = by_pair.get((k, k), {})
        records = [SampleRecord(k, r[2], r[3], r[4], list(r[5]), r[6]) for r in sample_rows]

        metrics, logged = [], {}
        nan_logp = sum(1 for r in logp_rows if not math.isfinite(r[4]))
        if nan_logp:
            self._record_fault("nan_logprobs", step, count=nan_logp)
        i = k - self.window
        if i >= 0 and self._history.computable(i, two_sided=self._mode == "snapshot"):
            logged = self._window_metrics(i)
        lengths = [len(r.token_ids) for r in records]
        logged.update({
            "samples/mean_tokens": float(np.mean(lengths)),
            "samples/finished_rate": float(np.mean([r.finished for r in records])),
            "samples/mean_logp": float(np.mean(list(self_logp.values()))) if self_logp else float("nan"),
            "seconds": seconds,
        })
        for name, value in self._adapter_metrics.pop(k, {}).items():
            norms = self._adapter.last_norms
            extra = {"per_layer": norms.per_layer} if name == B_NORM and norms is not None else None
            metrics.append((name, value, None, None, None, extra))
            logged[name] = value
        self._store.write_probe(
            k, step, self._probe_seed(k), self._mode, records, logp_rows, metrics, seconds=seconds,
        )
        self._log_probe(step, {k2: v for k2, v in logged.items() if not k2.startswith("D/")})
        if i >= 0 and any(k2.startswith("D/") for k2 in logged):
            self._log_probe(self._probe_steps[i], {k2: v for k2, v in logged.items() if k2.startswith("D/")})
        if self.log_samples_table:
            self._sink.log_table(
                "samples",
                ["probe_step", "prompt_id", "sample_idx", "prompt", "completion", "logp", "n_tokens", "finished"],
                [(step, r.prompt_id, r.sample_idx, self.probes[position[r.prompt_id]].prompt, r.text,
                  self_logp.get((r.prompt_id, r.sample_idx)), len(r.token_ids), r.finished) for r in records],
                step,
            )
        if self._runner is not None:
            self._submit_judgments(k, records)
        self._history.prune(k)
        if i >= 0 and i in self._full:
            self._update_detection(i)
            self._try_decompositions()
        return self._stop_decision(step)

    def _window_metrics(self, i: int) -> dict[str, float]:
        """Compute D(t_i) for every measure, store it on probe i's row, return what to log."""
        step_i = self._probe_steps[i]
        metrics, logged = [], {}
        results = {}
        for measure in self.measures:
            if self._mode == "one-sided" and measure != "tv":
                continue
            result = self._history.window_dissimilarity(i, measure, two_sided=self._mode == "snapshot")
            results[measure] = result
            ci = result.combined.confidence_interval(0.95)
            extra = {"per_prompt": {pid: [r.value, r.stderr] for pid, r in result.per_prompt.items()},
                     "left": list(result.left), "right": list(result.right),
                     "estimator": next(iter(result.per_prompt.values())).estimator if result.per_prompt else None,
                     "cross_scoring": self._mode}
            metrics.append((f"D/{measure}", result.combined.value, result.combined.stderr, ci.low, ci.high, extra))
            logged[f"D/{measure}"] = result.combined.value
            logged[f"D/{measure}_stderr"] = result.combined.stderr
            logged[f"D/{measure}_ci_low"] = ci.low
            logged[f"D/{measure}_ci_high"] = ci.high
        self._full[i] = results
        # D(t_i) belongs to probe i: rewrite its metrics row there too.
        self._store.write_metrics(i, step_i, metrics)
        return logged

    def _update_detection(self, i: int) -> None:
        result = self._full[i].get(self.primary_measure) or next(iter(self._full[i].values()))
        before = self.detector.state.onset_step
        state = self.detector.update(self._probe_steps[i], result.combined.value, result.combined.stderr)
        if state.onset_step is not None and before is None:
            text = (f"Behavioural transition onset at step {state.onset_step} "
                    f"(D/{result.measure}={result.combined.value:.3f} ± {result.combined.stderr:.3f})")
            logger.warning("em-callbacks: %s", text)
            self._store.add_event("onset", state.onset_step, **state.to_dict())
            if not self._alerted:
                self._sink.alert("Phase transition detected", text)
                self._alerted = True
        self._sink.summary({f"transition/{k}": v for k, v in state.to_dict().items() if v is not None})

    def _stop_decision(self, step: int) -> dict | None:
        if self.stop_rule is None or self._stopped is not None:
            return None
        reason = self.stop_rule.should_stop(self.detector.state, self._order_series, step)
        if not reason:
            return None
        decision = {"step": step, "reason": reason, "last_pre_onset_step": self.detector.state.last_pre_onset_step}
        self._store.add_event("early_stop", **decision)  # decision carries "step"
        logger.warning("em-callbacks: stopping training at step %d: %s", step, reason)
        return decision

    # ------------------------------------------------------------------ judges (rank 0)
    def _submit_judgments(self, k: int, records: Sequence[SampleRecord]) -> None:
        from .judges import JudgeItem

        position = {p.id: i for i, p in enumerate(self.probes)}
        items = [JudgeItem(k, r.prompt_id, r.sample_idx, self.probes[position[r.prompt_id]].prompt, r.text) for r in records]
        for op in self.order_parameters:
            self._judge_progress[(k, op.name)] = _JudgeProgress(expected=len(items))
        self._runner.submit(items)

    def _collect_judgments(self, results: list | None = None) -> None:
        if self._runner is None:
            return
        try:
            results = self._runner.poll() if results is None else results
        except Exception as exc:  # noqa: BLE001
            self._record_fault("judge_poll", None, error=repr(exc))
            return
        if not results:
            return
        ops = {op.name: op for op in self.order_parameters}
        rows, finished = [], set()
        for res in results:
            item, name, judgment = res.item, res.order_parameter, res.judgment
            progress = self._judge_progress.get((item.probe_index, name))
            if progress is None or name not in ops:
                continue
            op = ops[name]
            probs = None if judgment.probs is None else np.asarray(judgment.probs, dtype=float)
            rows.append((item.probe_index, item.prompt_id, item.sample_idx, name, judgment.score,
                         None if probs is None else probs.tolist(), judgment.error))
            progress.received += 1
            if probs is None or judgment.score is None or not np.all(np.isfinite(probs)):
                progress.failed += 1
            else:
                progress.kernels[(item.prompt_id, item.sample_idx)] = probs
                progress.scores.append(float(judgment.score))
                if getattr(op, "threshold", None) is not None:
                    progress.flagged.append(bool(op.flagged(judgment.score)))
            if progress.complete:
                finished.add((item.probe_index, name))
        self._safe("judgment store", lambda: self._store.write_judgments(rows))
        for k, name in sorted(finished):
            self._log_order_parameter(k, name)
        if finished:
            self._try_decompositions()

    def _log_order_parameter(self, k: int, name: str) -> None:
        progress = self._judge_progress[(k, name)]
        step = self._probe_steps[k]
        values = {
            f"order/{name}/mean": float(np.mean(progress.scores)) if progress.scores else float("nan"),
            f"order/{name}/missing": float(progress.failed),
            f"order/{name}/missing_rate": progress.failed / max(progress.expected, 1),
        }
        if progress.flagged:
            values[f"order/{name}/flagged_rate"] = float(np.mean(progress.flagged))
            self._order_series.setdefault(f"{name}/flagged_rate", []).append((step, values[f"order/{name}/flagged_rate"]))
        self._order_series.setdefault(name, []).append((step, values[f"order/{name}/mean"]))
        for series in self._order_series.values():
            series.sort()
        metrics = [(key, v, None, None, None, None) for key, v in values.items()]
        self._safe("order metrics", lambda: self._store.write_metrics(k, step, metrics))
        self._log_probe(step, values)
        if progress.failed:
            self._record_fault("missing_judgments", step, order_parameter=name, count=progress.failed)

    def _try_decompositions(self) -> None:
        from .order import decompose

        for i, results in sorted(self._full.items()):
            full = results.get(self.primary_measure)
            if full is None:
                continue
            left, right = full.left, full.right
            for op in self.order_parameters:
                if (i, op.name) in self._decomposed:
                    continue
                progress = [self._judge_progress.get((j, op.name)) for j in left + right]
                if any(p is None or not p.complete for p in progress):
                    continue
                self._decomposed.add((i, op.name))
                n_left = len(left)
                width = len(op.scale)
                left_kernels = _kernels_by_prompt(progress[:n_left], [self._sample_keys[j] for j in left], width)
                right_kernels = _kernels_by_prompt(progress[n_left:], [self._sample_keys[j] for j in right], width)
                try:
                    captured = decompose(op, left_kernels, right_kernels, full.per_prompt, measure=full.measure,
                                         pool_prompts=True)
                except Exception as exc:  # noqa: BLE001 - a bad judge batch must not stop training
                    self._record_fault("decomposition", self._probe_steps[i], order_parameter=op.name, error=repr(exc))
                    continue
                step = self._probe_steps[i]
                ci = (captured.value - 1.96 * captured.stderr, captured.value + 1.96 * captured.stderr)
                self._safe("captured store", lambda: self._store.write_metrics(i, step, [
                    (f"captured/{op.name}", captured.value, captured.stderr, ci[0], ci[1],
                     {"d_order": captured.d_order.value, "d_order_stderr": captured.d_order.stderr,
                      "noise_floor": captured.noise_floor}),
                    (f"D_order/{op.name}", captured.d_order.value, captured.d_order.stderr, None, None, None),
                ]))
                self._log_probe(step, {
                    f"order/{op.name}/captured": captured.value,
                    f"order/{op.name}/captured_stderr": captured.stderr,
                    f"order/{op.name}/captured_noise_floor": captured.noise_floor,
                    f"order/{op.name}/D": captured.d_order.value,
                })

    # ------------------------------------------------------------------ end of training
    def _finish(self, state: Any) -> None:
        if self._runner is not None:
            try:
                leftover = self._runner.drain(self.judge_drain_timeout)
                self._collect_judgments(leftover)
                stats = self._runner.stats() if hasattr(self._runner, "stats") else {}
                self._safe("judge stats", lambda: self._store.add_event("judge_stats", state.global_step, **stats))
            finally:
                self._runner.close()
        self._summary = self._safe("summary", lambda: self._write_summary(state)) or {}
        self._safe("final plots", self._log_final_plots)
        self._store.close()

    def _write_summary(self, state: Any) -> dict[str, Any]:
        steps = sorted(self._grad_norms)
        report = detect.transition_report(self.detector.state, steps, [self._grad_norms[s] for s in steps])
        summary = {
            **report.to_dict(),
            "stopped_early": self._stopped is not None,
            "stop_step": self._stopped["step"] if self._stopped else None,
            "stop_reason": self._stopped["reason"] if self._stopped else None,
            "last_pre_onset_step": self.detector.state.last_pre_onset_step,
            "every_n_steps": self.every_n_steps,
            "window": self.window,
            "primary_measure": self.primary_measure,
            "cross_scoring": self._mode,
            "probe_steps": list(self._probe_steps),
            "final_step": int(state.global_step),
            "peak_value": self.detector.state.peak_value,
            "faults": self._faults,
            "missing_judgments": {
                op.name: sum(p.failed + (p.expected - p.received)
                             for (k, name), p in self._judge_progress.items() if name == op.name)
                for op in self.order_parameters
            },
            "captured_at_peak": self._captured_at(self.detector.state.peak_step),
        }
        path = self._run_dir / "summary.json"
        path.write_text(json.dumps(summary, indent=2, default=_json_default))
        self._store.set_meta(summary=summary)
        self._sink.summary({f"transition/{k}": v for k, v in summary.items()
                            if isinstance(v, (int, float, bool, str)) and v is not None})
        return summary

    def _captured_at(self, step: int | None) -> dict[str, Any]:
        if step is None or step not in self._probe_steps:
            return {}
        return self._store.captured_at(self._probe_steps.index(step))

    def _log_final_plots(self) -> None:
        if self._sink.run is None:
            return
        from .report import plot_overview

        path = plot_overview(self._store, self._run_dir / "overview.png", summary=self._summary)
        self._sink.log_image("overview", str(path))

    # ------------------------------------------------------------------ resume
    def _write_checkpoint_state(self, checkpoint: Path) -> None:
        payload = {
            "probe_steps": self._probe_steps,
            "detector": self.detector.state_dict(),
            "stop_rule": self.stop_rule.state_dict() if self.stop_rule else None,
            "stopped": self._stopped,
            "grad_norms": {str(k): v for k, v in self._grad_norms.items()},
            "order_series": self._order_series,
            "alerted": self._alerted,
        }
        (checkpoint / STATE_FILENAME).write_text(json.dumps(payload, default=_json_default))
        if self._snapshots.available():
            torch.save(self._snapshots.state_dict(), checkpoint / SNAPSHOT_FILENAME)
        if self._adapter.state_dict()["prev"] is not None:
            torch.save(self._adapter.state_dict(), checkpoint / ADAPTER_FILENAME)

    def _resume(self, args: Any, state: Any) -> None:
        """Continue from ``checkpoint-<global_step>``: state file, snapshots and the store's band."""
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        payload = None
        if self._dist.is_main:
            path = checkpoint / STATE_FILENAME
            payload = json.loads(path.read_text()) if path.is_file() else None
            self._store.truncate_after(state.global_step)
        payload = self._dist.broadcast(payload)
        if payload is None:
            if self._dist.is_main:
                logger.warning("em-callbacks: resuming at step %d without saved callback state", state.global_step)
            return
        self._probe_steps = [s for s in payload["probe_steps"] if s <= state.global_step]
        self.detector.load_state_dict(payload["detector"])
        if self.stop_rule and payload.get("stop_rule"):
            self.stop_rule.load_state_dict(payload["stop_rule"])
        self._stopped = payload.get("stopped")
        self._grad_norms = {int(k): v for k, v in payload.get("grad_norms", {}).items()}
        self._order_series = {k: [tuple(x) for x in v] for k, v in payload.get("order_series", {}).items()}
        self._alerted = payload.get("alerted", False)
        snap = checkpoint / SNAPSHOT_FILENAME
        if self._mode == "snapshot" and snap.is_file():
            self._snapshots.load_state_dict(torch.load(snap, map_location="cpu", weights_only=True))
        if self._dist.is_main and (checkpoint / ADAPTER_FILENAME).is_file():
            self._adapter.load_state_dict(torch.load(checkpoint / ADAPTER_FILENAME, map_location="cpu", weights_only=True))
        self._reload_band()
        if self._dist.is_main:
            self._safe("judgment reload", self._reload_judgments)
            self._store.add_event("resume", state.global_step, probe_steps=self._probe_steps)

    def _reload_band(self) -> None:
        """Rebuild the in-memory band (samples, log-probs) from the store after a resume."""
        k = len(self._probe_steps) - 1
        band = [j for j in range(max(0, k - self._history.band), k + 1)]
        data = None
        if self._dist.is_main:
            data = {
                "samples": {j: [(r.prompt_id, r.sample_idx, r.text, r.token_ids, r.finished) for r in self._store.samples(j)] for j in band},
                "logp": {(j, c): self._store.logprobs(j, c) for j in band for c in band},
            }
        data = self._dist.broadcast(data)
        position = {p.id: i for i, p in enumerate(self.probes)}
        for j in band:
            rows = sorted(data["samples"][j], key=lambda r: (position[r[0]], r[1]))
            if not rows:
                continue
            keys = [(r[0], r[1]) for r in rows]
            self._sample_keys[j] = keys
            self._history.add_samples(j, np.array([r[0] for r in rows]))
            mine = [r for r in rows if position[r[0]] in self._shard]
            self._local_samples[j] = ProbeSamples(
                prompt_index=np.array([position[r[0]] for r in mine], dtype=np.int64),
                sample_index=np.array([r[1] for r in mine], dtype=np.int64),
                prompt_ids=[self._prompt_ids[p] for p in self._shard],
                completion_ids=[list(r[3]) for r in mine],
                texts=[r[2] for r in mine],
                finished=np.array([r[4] for r in mine], dtype=bool),
            )
            for c in band:
                values = data["logp"].get((j, c), {})
                if values and all(key in values for key in keys):
                    self._history.add_logp(j, c, np.array([values[key] for key in keys]))

    def _reload_judgments(self) -> None:
        """Rank 0 after a resume: judge progress (kernels for the decomposition of windows that
        span the resume point) from the store; judgments lost in flight are submitted again."""
        if self._runner is None:
            return
        from .judges import JudgeItem

        position = {p.id: i for i, p in enumerate(self.probes)}
        resubmit = []
        for j, step in enumerate(self._probe_steps):
            samples = self._store.samples(j)
            stored = {op.name: {(r["prompt_id"], r["sample_idx"]): r for r in self._store.judgments(op.name, j)}
                      for op in self.order_parameters}
            missing = [r for r in samples if any((r.prompt_id, r.sample_idx) not in stored[n] for n in stored)]
            lost = {(r.prompt_id, r.sample_idx) for r in missing}
            for op in self.order_parameters:
                progress = self._judge_progress[(j, op.name)] = _JudgeProgress(expected=len(samples))
                for key, row in stored[op.name].items():
                    if key in lost:
                        continue  # judged again below, for every order parameter
                    progress.received += 1
                    if row["probs"] is None or row["score"] is None:
                        progress.failed += 1
                        continue
                    progress.kernels[key] = np.asarray(row["probs"], dtype=float)
                    progress.scores.append(float(row["score"]))
                    if getattr(op, "threshold", None) is not None:
                        progress.flagged.append(bool(op.flagged(row["score"])))
                if progress.complete and all(s != step for s, _ in self._order_series.get(op.name, [])):
                    self._log_order_parameter(j, op.name)
            resubmit += [JudgeItem(j, r.prompt_id, r.sample_idx, self.probes[position[r.prompt_id]].prompt, r.text)
                         for r in missing]
        if resubmit:
            self._store.add_event("judgments_resubmitted", self._probe_steps[-1], count=len(resubmit))
            self._runner.submit(resubmit)

    # ------------------------------------------------------------------ faults
    def _record_fault(self, kind: str, step: int | None, **details: Any) -> None:
        entry = {"kind": kind, "step": step, **details}
        self._faults.append(entry)
        if self._store is not None:
            try:
                self._store.add_event("fault", step, fault=kind, **details)
            except Exception:  # noqa: BLE001
                pass

    def _safe(self, what: str, fn):
        """Run bookkeeping that must never crash the user's training run; record any failure."""
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001
            logger.exception("em-callbacks: %s failed; training continues", what)
            self._record_fault(what.replace(" ", "_"), None, error=f"{type(exc).__name__}: {exc}")
            return None


def _kernels_by_prompt(
    progress: Sequence[_JudgeProgress], keys: Sequence[Sequence[tuple[str, int]]], width: int
) -> dict[str, np.ndarray]:
    """Per prompt, stacked judge distributions of one window's samples (NaN rows where missing)."""
    out: dict[str, list[np.ndarray]] = {}
    for prog, probe_keys in zip(progress, keys):
        for key in probe_keys:
            out.setdefault(key[0], []).append(prog.kernels.get(key, np.full(width, np.nan)))
    return {pid: np.stack(rows) for pid, rows in out.items()}


def _check_int(name: str, value: Any, minimum: int, why: str | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise CallbackConfigError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        reason = f" ({why})" if why else ""
        raise CallbackConfigError(f"{name} must be >= {minimum}{reason}, got {value}")


def _finite_or_nan(value: Any) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return float("nan")
    return value if math.isfinite(value) else float("nan")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    return str(obj)
