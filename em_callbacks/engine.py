"""The probe engine: one probe step end to end, for any driver.

A driver (the live :class:`~em_callbacks.callback.PhaseTransitionCallback`, or the offline
:func:`~em_callbacks.analyze.analyze_checkpoints`) hands the engine a model at probe index
``k`` and a :class:`CheckpointSource` that can swap older probe checkpoints in. The engine
samples, scores every sample set of the window band under every checkpoint of the band,
turns that into D with errors, judge requests, decompositions, detection and a stop
decision, and writes the run store and the sinks. No Trainer import lives here.

Every rank runs :meth:`ProbeEngine.sample_and_score` on its shard of the prompts; the
driver gathers the :class:`ProbeShard` records and rank 0 runs :meth:`ProbeEngine.record`.
"""

from __future__ import annotations

import logging
import math
import numbers
import warnings
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple, Protocol, Sequence

import numpy as np
import torch

from . import detect
from ._util import json_safe
from .adapter_signal import B_NORM, AdapterTrajectory
from .divergence import MEASURES, DissimilarityResult, combine_prompts, dissimilarity, one_sided_tv
from .history import ProbeHistory, WindowResult
from .precision import SCORING_DTYPES, ScoringPrecision, check_scoring_precision
from .schedule import interval_of, rate
from .probes import ProbeSet, render_prompt
from .sampling import (
    ProbeSamples,
    SamplerConfigError,
    encode_prompts,
    generate_samples,
    prepare_tokenizer,
    preserved_state,
    sequence_logprobs,
)
from .store import RunStore, SampleRecord, scrub_secrets
from .summary import RunSummary, detection_feasibility, summarize
from .wandb_sink import WandbSink

logger = logging.getLogger(__name__)

__all__ = [
    "ConfigError",
    "EngineConfig",
    "ProbeEngine",
    "ProbeShard",
    "ScoreRow",
    "Metric",
    "StopDecision",
    "CheckpointSource",
    "RankLayout",
]

CROSS_SCORING_MODES = ("auto", "snapshot", "one-sided")
OWN_LOGPROBS = ("generation", "teacher-forcing")  # where the new samples' own log-probs come from
SENTINEL = -1  # checkpoint index of the drift sentinel's scores (the current weights between probes)
# The numerical noise floor scores the first this many new samples of each prompt again (the
# current weights, other numerics); see ProbeEngine._floor_scores.
FLOOR_SAMPLES_PER_PROMPT = 2


class ConfigError(ValueError):
    """The probe configuration cannot work; raised before any training or analysis starts."""


# ------------------------------------------------------------------------------ typed records
class ScoreRow(NamedTuple):
    """log p_checkpoint(sample) for one sample of probe ``sample_probe``; the store's row order."""

    sample_probe: int
    prompt_id: str
    sample_idx: int
    checkpoint_probe: int
    logp: float


class Metric(NamedTuple):
    """One metrics-table row: value with optional stderr, interval and a JSON ``extra``."""

    name: str
    value: float | None
    stderr: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    extra: dict | None = None


@dataclass
class ProbeShard:
    """What one rank produced at one probe: its samples and every score the band needs."""

    samples: list[SampleRecord] = field(default_factory=list)
    scores: list[ScoreRow] = field(default_factory=list)
    out_of_vocab: int = 0  # sampled ids the tokenizer cannot decode
    # the first FLOOR_SAMPLES_PER_PROMPT new samples of each prompt under the current weights,
    # scored again with other numerics (checkpoint_probe = k): the numerical floor's reference
    floor: list[ScoreRow] = field(default_factory=list)
    precision: dict[str, Any] | None = None  # how this rank's scoring computes (ScoringPrecision.to_dict)
    reused_sentinel_rows: int = 0  # scores taken from the drift sentinel's pass at the same step


@dataclass(frozen=True)
class StopDecision:
    """The stop rule fired at ``step`` for ``reason`` (broadcast to every rank)."""

    step: int
    reason: str
    last_pre_onset_step: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "reason": self.reason, "last_pre_onset_step": self.last_pre_onset_step}


class CheckpointSource(Protocol):
    """Older probe checkpoints a driver can put in place for scoring.

    Live: :class:`~em_callbacks.sampling.WeightSnapshots` (in-place adapter/parameter swap);
    offline: adapters loaded from disk, or the previous full model kept resident.
    """

    def available(self) -> list[int]: ...

    def swapped_in(self, model: torch.nn.Module, probe_index: int) -> AbstractContextManager[torch.nn.Module]: ...

    def capture(self, model: torch.nn.Module, probe_index: int) -> None: ...


@dataclass
class RankLayout:
    """This process's place among the ranks (one process unless a driver says otherwise)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def max_int(self, value: int, device: torch.device) -> int:
        """The largest ``value`` over ranks (sharded models need equal forward-pass counts)."""
        return value


# ------------------------------------------------------------------------------ configuration
@dataclass
class EngineConfig:
    """What to probe and how to read it; validated once, before anything runs."""

    probes: ProbeSet
    samples_per_prompt: int = 16
    max_new_tokens: int = 128
    order_parameters: tuple = ()
    judge: Any = None
    window: int = 1
    measures: tuple[str, ...] = MEASURES
    primary_measure: str = "tv"
    seed: int = 0
    batch_size: int = 64
    detector: detect.TransitionDetector = field(default_factory=detect.TransitionDetector)
    stop_rule: detect.StopRule | None = None
    judge_concurrency: int = 8
    judge_drain_timeout: float = 120.0
    log_samples_table: bool = True
    own_logprobs: str = "generation"
    sentinel_samples_per_prompt: int | None = None  # default: a quarter of samples_per_prompt, at least 2
    scoring_dtype: str = "float32"
    focus_factor: int = 1  # samples_per_prompt is multiplied by this while a transition is under way

    def __post_init__(self) -> None:
        check_int("samples_per_prompt", self.samples_per_prompt, minimum=2, why="a variance needs two samples")
        check_int("max_new_tokens", self.max_new_tokens, minimum=1)
        check_int("window", self.window, minimum=1)
        check_int("batch_size", self.batch_size, minimum=1)
        check_int("judge_concurrency", self.judge_concurrency, minimum=1)
        if self.sentinel_samples_per_prompt is None:  # a reading costs a quarter of a scoring pass
            self.sentinel_samples_per_prompt = max(2, self.samples_per_prompt // 4)
        check_int("sentinel_samples_per_prompt", self.sentinel_samples_per_prompt, minimum=2,
                  why="a standard error needs two samples")
        check_int("focus_factor", self.focus_factor, minimum=1)
        if self.focus_factor > 1 and self.window != 1:
            raise ConfigError("focus_factor > 1 needs window=1 (a window's mixture needs equal sample counts per probe)")
        self.measures = tuple(self.measures)
        unknown = [m for m in self.measures if m not in MEASURES]
        if unknown or not self.measures:
            raise ConfigError(f"measures must be a non-empty subset of {MEASURES}, got {list(self.measures)}")
        if self.primary_measure not in self.measures:
            raise ConfigError(f"primary_measure {self.primary_measure!r} must be one of measures {self.measures}")
        self.order_parameters = tuple(self.order_parameters)
        names = [getattr(op, "name", None) for op in self.order_parameters]
        if any(n is None for n in names):
            raise ConfigError("order_parameters must be OrderParameter objects")
        if len(set(names)) != len(names):
            raise ConfigError(f"order parameter names must be unique, got {names}")
        if self.order_parameters and self.judge is None:
            raise ConfigError("order_parameters need a judge (OpenAIJudge, TransformersJudge or RuleJudge)")
        if self.judge is not None:
            if not hasattr(self.judge, "ajudge"):
                raise ConfigError(f"judge must implement the Judge interface (ajudge), got {type(self.judge).__name__}")
            if not self.order_parameters:
                raise ConfigError(
                    f"a judge ({type(self.judge).__name__}) was given without order_parameters: it would score nothing; "
                    "pass order_parameters=[OrderParameter.builtin('aligned'), ...]"
                )
            check = getattr(self.judge, "check_order_parameters", None)
            if check is not None:
                try:
                    check(list(self.order_parameters))
                except ValueError as exc:
                    raise ConfigError(str(exc)) from None
        if self.own_logprobs not in OWN_LOGPROBS:
            raise ConfigError(f"own_logprobs must be one of {OWN_LOGPROBS}, got {self.own_logprobs!r}")
        if self.scoring_dtype not in SCORING_DTYPES:
            raise ConfigError(f"scoring_dtype must be one of {SCORING_DTYPES}, got {self.scoring_dtype!r}")
        self.judge_drain_timeout = float(self.judge_drain_timeout)
        self.seed = int(self.seed)

    def probe_seed(self, probe_index: int) -> int:
        """The sampling seed of probe ``probe_index`` (same in every run and every driver)."""
        return int(np.random.SeedSequence([self.seed, probe_index]).generate_state(1)[0])

    def baseline_probe_count(self) -> int:
        """Probes until the detector's baseline is complete: D needs ``2w`` probes for its
        first value, then ``baseline_probes`` values form the baseline."""
        return 2 * self.window - 1 + self.detector.baseline_probes

    def min_probes_for_detection(self) -> int:
        """Probes a run needs before the detector can declare an onset: the baseline's, then
        ``consecutive`` more D values must exceed it."""
        return self.baseline_probe_count() + self.detector.consecutive

    def to_dict(self, **extra: Any) -> dict[str, Any]:
        judge_config = None
        if self.judge is not None:
            judge_config = self.judge.config() if hasattr(self.judge, "config") else type(self.judge).__name__
        return scrub_secrets({
            "probes": self.probes.name,
            "n_prompts": len(self.probes),
            "samples_per_prompt": self.samples_per_prompt,
            "max_new_tokens": self.max_new_tokens,
            "window": self.window,
            "measures": list(self.measures),
            "primary_measure": self.primary_measure,
            "own_logprobs": self.own_logprobs,
            "scoring_dtype": self.scoring_dtype,
            "focus_factor": self.focus_factor,
            "seed": self.seed,
            "order_parameters": [{"name": op.name, "statement": getattr(op, "statement", "")} for op in self.order_parameters],
            "judge": judge_config,
            "early_stopping": type(self.stop_rule).__name__ if self.stop_rule else None,
            "detector": self.detector.config(),
            **extra,
        })


# ------------------------------------------------------------------------------ judge ledger
@dataclass
class _JudgeLedger:
    """How many judgments a probe expects and has received, for one order parameter."""

    expected: int
    received: int = 0
    failed: int = 0
    kernels: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)
    scores: list[float] = field(default_factory=list)
    flagged: list[bool] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.received >= self.expected

    def add(self, op: Any, key: tuple[str, int], score: float | None, probs: Sequence[float] | None) -> None:
        self.received += 1
        kernel = None if probs is None else np.asarray(probs, dtype=float)
        if kernel is None or score is None or not np.all(np.isfinite(kernel)):
            self.failed += 1
            return
        self.kernels[key] = kernel
        self.scores.append(float(score))
        if getattr(op, "threshold", None) is not None:
            self.flagged.append(bool(op.flagged(score)))


# ------------------------------------------------------------------------------ the engine
class ProbeEngine:
    """One probe step end to end; the drivers own only models, ranks and resume files."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.detector = config.detector
        self.stop_rule = config.stop_rule
        self.reset()

    # ----------------------------------------------------------------- lifecycle
    def reset(self) -> None:
        """Forget any previous run (an engine, like its callback, may be reused)."""
        self.detector.reset()
        if self.stop_rule is not None:
            self.stop_rule.reset()
        self.layout = RankLayout()
        self.mode = "one-sided"
        self.run_dir: Path | None = None
        self.store: RunStore | None = None
        self.sink = WandbSink(enabled=False)
        self.summary: RunSummary | None = None
        self.probe_steps: list[int] = []
        self.probe_samples: list[int] = []  # samples per prompt of each probe (focus raises it)
        self.reference_interval: int | None = None  # D_rate is D per this many steps
        self.stopped: StopDecision | None = None
        self.faults: list[dict[str, Any]] = []
        self.grad_norms: dict[int, float] = {}
        self.order_series: dict[str, list[tuple[int, float]]] = {}
        self.feasibility: dict[str, Any] = {}
        self._runner = None
        self._history = ProbeHistory(window=self.config.window)
        self._local_samples: dict[int, ProbeSamples] = {}  # this rank's shard
        self._sentinel_rows: tuple[int, list[ScoreRow]] | None = None  # (step, rows): a probe at that step reuses them
        self._sample_keys: dict[int, list[tuple[str, int]]] = {}  # rank 0: canonical sample order
        self._full: dict[int, dict[str, WindowResult]] = {}
        self._ledger: dict[tuple[int, str], _JudgeLedger] = {}
        self._decomposed: set[tuple[int, str]] = set()
        self._alerted = False
        self._oov_warned = False
        self._logged: dict[int, set[str]] = {}  # probe step -> keys already sent to the sink
        self._adapter = AdapterTrajectory()
        self._latest: dict[str, tuple[int, float]] = {}
        self._precision: ScoringPrecision | None = None  # decided at the first probe (every rank)
        self._precision_logged = False

    def prepare(self, tokenizer: Any) -> None:
        """Validate the tokenizer and render the prompts (all ranks)."""
        try:
            self._pad_id, self._eos_id = prepare_tokenizer(tokenizer)
        except SamplerConfigError as exc:
            raise ConfigError(str(exc)) from None
        self._tok = tokenizer
        uses_template = bool(getattr(tokenizer, "chat_template", None))
        if not uses_template and self.layout.is_main:
            logger.warning("em-callbacks: tokenizer has no chat template; probes use a plain 'User:/Assistant:' prompt")
        self._rendered = [_render(tokenizer, p) for p in self.config.probes]
        self._prompt_ids = encode_prompts(tokenizer, self._rendered, uses_template)
        self._shard = list(range(self.layout.rank, len(self.config.probes), self.layout.world_size))
        self._decodable = _decodable_size(tokenizer)

    def begin(
        self,
        tokenizer: Any,
        run_dir: str | Path,
        *,
        mode: str,
        layout: RankLayout | None = None,
        sink: WandbSink | None = None,
        run_config: dict[str, Any] | None = None,
        planned_probes: int | None = None,
        resuming: bool = False,
        reference_interval: int | None = None,
    ) -> None:
        """Open a run: prompts on every rank; store, judges and sink on rank 0.

        A new (not resumed) run into a folder that holds an earlier run moves the earlier one
        aside first and says where (nothing is overwritten)."""
        if mode not in ("snapshot", "one-sided"):
            raise ConfigError(f"cross-scoring mode must be 'snapshot' or 'one-sided', got {mode!r}")
        if mode == "one-sided" and self.config.window != 1:
            raise ConfigError(
                f"window={self.config.window} needs snapshots of old checkpoints; pass snapshot_full_model=True, "
                "train a PEFT adapter, or use window=1"
            )
        self.layout = layout or RankLayout()
        self.mode = mode
        self.run_dir = Path(run_dir)
        self.reference_interval = reference_interval
        self.prepare(tokenizer)
        self.feasibility = detection_feasibility(planned_probes, self.config.min_probes_for_detection())
        if not self.layout.is_main:
            return
        moved = None
        if not resuming:
            from .store import archive_previous_run

            moved = archive_previous_run(self.run_dir)
            if moved is not None:
                warnings.warn(f"em-callbacks: {self.run_dir} held an earlier run; it was moved to {moved} "
                              "(nothing is overwritten)", stacklevel=3)
        self.sink = sink or WandbSink(enabled=False)
        config = self.config.to_dict(cross_scoring=mode, **(run_config or {}), detection=self.feasibility,
                                     reference_interval=reference_interval)
        self.store = RunStore(self.run_dir)
        self.store.set_meta(config=config)
        self.store.write_prompts(
            (p.id, i, p.prompt, p.system, p.tags, r) for i, (p, r) in enumerate(zip(self.config.probes, self._rendered))
        )
        if self.config.judge is not None and self.config.order_parameters:
            from .judges import JudgeRunner

            self._runner = JudgeRunner(self.config.judge, list(self.config.order_parameters),
                                       max_concurrency=self.config.judge_concurrency)
        if moved is not None:
            self.store.add_event("previous_run_archived", None, path=str(moved))
        self.sink.log_config(config)
        if not self.feasibility["possible"]:
            warnings.warn(f"em-callbacks: {self.feasibility['why']}", stacklevel=3)
            self.store.add_event("detection_impossible", None, **self.feasibility)

    # ----------------------------------------------------------------- all ranks
    def begin_probe(self, step: int, focus: bool | None = None) -> int:
        """Register a probe at training step ``step`` (every rank); returns its index ``k``.
        ``focus``: whether a transition is under way (then the probe draws ``focus_factor``
        times the samples); default: this engine's own detector says so (rank 0, offline). A
        multi-rank driver passes rank 0's answer to every rank."""
        focus = self.focus_active() if focus is None else focus
        self.probe_steps.append(int(step))
        self.probe_samples.append(self.config.samples_per_prompt * (self.config.focus_factor if focus else 1))
        return len(self.probe_steps) - 1

    def focus_active(self) -> bool:
        """A transition is under way: onset seen, peak not yet confirmed."""
        state = self.detector.state
        return state.onset_step is not None and not state.peak_confirmed

    def onset_level(self) -> float | None:
        """What the adaptive schedule's trigger is scaled by, in D_rate of TV (the sentinel's
        measure): the rate the detector would call an onset (baseline mean + the rise it needs
        at the baseline's stderr), or once a transition is under way its fastest rate so far
        (the peak), so probes stay a fixed fraction of the transition's own scale apart. None
        before the baseline is complete, or when detection runs on another measure."""
        state = self.detector.state
        if self.config.primary_measure != "tv" or state.baseline_mean is None:
            return None
        return max(state.baseline_mean + self.detector.threshold_for(float("nan")), state.peak_value or 0.0)

    def sample_and_score(self, model: torch.nn.Module, k: int, checkpoints: CheckpointSource) -> ProbeShard:
        """This rank's share of probe ``k``: new samples, and every log-prob the band needs."""
        cfg, layout = self.config, self.layout
        n_samples = self.probe_samples[k]
        n_batches = math.ceil(math.ceil(len(cfg.probes) / layout.world_size) * n_samples / cfg.batch_size)
        band = self._history.band
        shard = ProbeShard()
        with preserved_state(model, self._tok):
            model.eval()
            samples = generate_samples(
                model, [self._prompt_ids[p] for p in self._shard], n_samples, cfg.max_new_tokens,
                self._pad_id, self._eos_id, seed=cfg.probe_seed(k) + layout.rank, batch_size=cfg.batch_size,
                min_batches=n_batches, decode=self._decode, with_logprobs=self._own_logprobs_from_generation(model),
            )
            samples.prompt_index = np.array([self._shard[i] for i in samples.prompt_index], dtype=np.int64)
            self._local_samples[k] = samples
            shard.out_of_vocab = sum(1 for ids in samples.completion_ids for t in ids if t >= self._decodable)
            shard.samples = [
                SampleRecord(k, cfg.probes[int(p)].id, int(s), text, list(ids), bool(f))
                for p, s, text, ids, f in zip(samples.prompt_index, samples.sample_index, samples.texts,
                                              samples.completion_ids, samples.finished)
            ]
            for j in sorted(self._local_samples):  # every sample set in the band, current weights
                if j == k and samples.logp is not None:  # paid for by the sampler: no second pass
                    shard.scores += self._rows(k, k, samples.logp)
                elif k - j <= band:
                    rows, reused = self._current_scores(model, j, k)
                    shard.scores += rows
                    shard.reused_sentinel_rows += reused
            for old in checkpoints.available():  # the new samples under older checkpoints
                if old < k and k - old <= band:
                    with checkpoints.swapped_in(model, old) as scoring_model:
                        shard.scores += self._score(scoring_model, k, old)
            shard.floor, shard.precision = self._floor_scores(model, k)
            checkpoints.capture(model, k)
        for j in [j for j in self._local_samples if k - j >= band + 1]:
            del self._local_samples[j]
        return shard

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def _own_logprobs_from_generation(self, model: torch.nn.Module) -> bool:
        """Whether the new samples' log-probs under the current weights come from generation
        itself (``own_logprobs="generation"``) instead of a teacher-forced pass. Not when scoring
        computes in another precision than the sampler (``scoring_dtype="float32"`` on a bf16
        model): every log-prob D compares must come from the same numerics."""
        return self.config.own_logprobs == "generation" and not self._scoring_precision(model).changes_numerics

    def _scoring_precision(self, model: torch.nn.Module) -> ScoringPrecision:
        """How teacher-forced scoring computes for this run's model (decided once, at the first
        probe, by :func:`~em_callbacks.precision.check_scoring_precision`; every rank)."""
        if self._precision is None:
            first = self._prompt_ids[self._shard[0]] if self._shard else [self._pad_id]
            self._precision = check_scoring_precision(model, self.config.scoring_dtype, first)
        return self._precision

    def _floor_scores(self, model: torch.nn.Module, k: int) -> tuple[list[ScoreRow], dict[str, Any] | None]:
        """The numerical noise floor's reference: the first ``FLOOR_SAMPLES_PER_PROMPT`` new
        samples of each prompt under the same (current) weights, computed differently only in
        numerics. When scoring computes in bf16/fp16 (``scoring_dtype="model"`` on such a model)
        the reference is a float32 forward (the exact upcast), so the floor is that precision's
        rounding noise; when it computes in float32, a second float32 pass one row at a time
        (another batch layout than the scoring's; with own log-probs from generation, teacher
        forcing vs the KV-cached sampler). :meth:`record` turns the pairs into D_numerical_floor.
        Cost: one teacher-forced pass over that subset (2 of 16 samples per prompt by default)."""
        precision = self._scoring_precision(model)
        narrow = precision.computed.itemsize < 4
        try:
            rows = self._score(model, k, k, per_prompt=FLOOR_SAMPLES_PER_PROMPT,
                               batch_size=self.config.batch_size if narrow else 1,
                               scoring_dtype=torch.float32 if narrow else precision.dtype)
        except Exception as exc:  # noqa: BLE001 - the floor is a diagnostic: never stop the probe for it
            self.record_fault("numerical_floor", self.probe_steps[k], error=f"{type(exc).__name__}: {exc}")
            return [], precision.to_dict()
        return rows, {**precision.to_dict(), "floor_reference": "float32" if narrow else "float32, one row per pass"}

    def _current_scores(self, model: torch.nn.Module, j: int, k: int) -> tuple[list[ScoreRow], int]:
        """Probe ``j``'s samples under the current weights (checkpoint ``k``). When the drift
        sentinel read these very weights at this step (it scored the first
        ``sentinel_samples_per_prompt`` of them, and its reading is what fired this probe), its
        rows are taken as they are and only the other samples are scored: every probe the
        sentinel triggers saves the sentinel's pass."""
        reused = self._sentinel_rows
        if reused is None or reused[0] != self.probe_steps[k] or not reused[1] or reused[1][0].sample_probe != j:
            return self._score(model, j, k), 0
        self._sentinel_rows = None
        rest = self._score(model, j, k, skip=self.config.sentinel_samples_per_prompt)
        return [row._replace(checkpoint_probe=k) for row in reused[1]] + rest, len(reused[1])

    def _score(self, model: torch.nn.Module, sample_probe: int, checkpoint: int, *, per_prompt: int | None = None,
               skip: int = 0, batch_size: int | None = None, scoring_dtype: Any = None) -> list[ScoreRow]:
        """Probe ``sample_probe``'s samples on this rank (of each prompt, those with index in
        ``[skip, per_prompt)``; by default all) scored by teacher forcing under ``model``,
        labelled ``checkpoint``. Defaults: the probe batch size and the run's scoring
        precision; every rank makes as many passes."""
        samples = self._local_samples[sample_probe]
        index = samples.sample_index
        keep = np.flatnonzero((index >= skip) & (index < (np.inf if per_prompt is None else per_prompt)))
        device = next(model.parameters()).device
        logp = sequence_logprobs(
            model, [self._prompt_ids[int(samples.prompt_index[i])] for i in keep],
            [samples.completion_ids[i] for i in keep], self._pad_id,
            batch_size=batch_size or self.config.batch_size, sync_batches=lambda n: self.layout.max_int(n, device),
            scoring_dtype=scoring_dtype if scoring_dtype is not None else self._scoring_precision(model).dtype,
        )
        return self._rows(sample_probe, checkpoint, logp, keep)

    def _rows(self, sample_probe: int, checkpoint: int, logp: Sequence[float],
              keep: Sequence[int] | None = None) -> list[ScoreRow]:
        samples, probes = self._local_samples[sample_probe], self.config.probes
        keep = range(len(samples)) if keep is None else keep
        return [ScoreRow(sample_probe, probes[int(samples.prompt_index[i])].id, int(samples.sample_index[i]),
                         checkpoint, float(v)) for i, v in zip(keep, logp)]

    # ----------------------------------------------------------------- drift sentinel
    def sentinel_scores(self, model: torch.nn.Module, step: int) -> ProbeShard:
        """All ranks, between probes: the last full probe's samples (the first
        ``sentinel_samples_per_prompt`` of each prompt) under the current weights at ``step``.
        One scoring pass, no generation; :meth:`record_sentinel` turns it into the distance
        travelled, and a probe at the same step reuses the rows (:meth:`_current_scores`)."""
        shard = ProbeShard()
        if not self._local_samples:
            return shard
        k = max(self._local_samples)
        with preserved_state(model, self._tok):
            model.eval()  # scored in the numerics of the probe it is compared with
            shard.scores = self._score(model, k, SENTINEL, per_prompt=self.config.sentinel_samples_per_prompt)
        self._sentinel_rows = (int(step), shard.scores)
        return shard

    def record_sentinel(self, step: int, shards: Sequence[ProbeShard]) -> DissimilarityResult | None:
        """Rank 0: one-sided TV between the last probe's distribution and the current one,
        TV(p_k, p_t) = E_{x~p_k}[(1 - p_t(x)/p_k(x))^+], per prompt then combined; stored and
        logged on the training-step axis as ``sentinel/tv`` (+ ``_stderr``, ``since_step``)."""
        return self.safe("drift sentinel", lambda: self._record_sentinel(int(step), shards))

    def _record_sentinel(self, step: int, shards: Sequence[ProbeShard]) -> DissimilarityResult | None:
        rows = [r for sh in shards for r in sh.scores]
        if not rows:
            return None
        k = rows[0].sample_probe
        own = dict(zip(self._sample_keys[k], self._history.logp[(k, k)]))
        by_prompt: dict[str, tuple[list[float], list[float]]] = {}
        for r in rows:
            then, now = by_prompt.setdefault(r.prompt_id, ([], []))
            then.append(own[(r.prompt_id, r.sample_idx)])
            now.append(r.logp)
        result = combine_prompts([one_sided_tv(then, now) for then, now in by_prompt.values()])
        self.store.write_sentinel(step, k, result.value, result.stderr, len(rows))
        self._log(step, {"sentinel/tv": result.value, "sentinel/tv_stderr": result.stderr,
                         "sentinel/since_step": float(self.probe_steps[k])})
        return result

    def adapter_signal(self, model: torch.nn.Module, step: int) -> dict[str, float]:
        """LoRA B-norm / direction signal at this probe (rank 0; empty for other models)."""
        return self.safe("adapter signal", lambda: self._adapter.update(model, step)) or {}

    def adapter_state(self) -> dict[str, Any]:
        return self._adapter.state_dict()

    def load_adapter_state(self, state: dict[str, Any]) -> None:
        self._adapter.load_state_dict(state)

    # ----------------------------------------------------------------- rank 0
    def record(self, k: int, step: int, shards: Sequence[ProbeShard], seconds: float,
               extra_metrics: dict[str, float] | None = None) -> StopDecision | None:
        """Turn probe ``k``'s gathered shards into history, D, store rows, judge requests,
        detection and a stop decision. Never raises: a failure is recorded as a fault."""
        return self.safe("probe bookkeeping", lambda: self._record(k, step, shards, seconds, extra_metrics or {}))

    def _record(self, k: int, step: int, shards: Sequence[ProbeShard], seconds: float,
                extra_metrics: dict[str, float]) -> StopDecision | None:
        cfg, window = self.config, self.config.window
        position = {p.id: i for i, p in enumerate(cfg.probes)}
        records = sorted((s for sh in shards for s in sh.samples), key=lambda r: (position[r.prompt_id], r.sample_idx))
        scores = [r for sh in shards for r in sh.scores]
        keys = [(r.prompt_id, r.sample_idx) for r in records]
        self._sample_keys[k] = keys
        self._history.add_samples(k, np.array([pid for pid, _ in keys]))
        by_pair: dict[tuple[int, int], dict[tuple[str, int], float]] = {}
        for r in scores:
            by_pair.setdefault((r.sample_probe, r.checkpoint_probe), {})[(r.prompt_id, r.sample_idx)] = r.logp
        for (j, ckpt), values in by_pair.items():
            if j in self._sample_keys:
                self._history.add_logp(j, ckpt, np.array([values[key] for key in self._sample_keys[j]]))
        self_logp = by_pair.get((k, k), {})

        nan_logp = sum(1 for r in scores if not math.isfinite(r.logp))
        if nan_logp:
            self.record_fault("nan_logprobs", step, count=nan_logp)
        oov = sum(sh.out_of_vocab for sh in shards)
        if oov:
            self._warn_out_of_vocab(step, oov)
        logged: dict[str, float] = {}
        i = k - window
        if i >= 0 and self._history.computable(i, two_sided=self.mode == "snapshot"):
            logged = self._window_metrics(i)
        lengths = [len(r.token_ids) for r in records]
        logged.update({
            "samples/mean_tokens": float(np.mean(lengths)) if lengths else float("nan"),
            "samples/finished_rate": float(np.mean([r.finished for r in records])) if records else float("nan"),
            "samples/mean_logp": float(np.mean(list(self_logp.values()))) if self_logp else float("nan"),
            "samples/out_of_vocab_tokens": float(oov),
            "seconds": seconds,
        })
        metrics = []
        for name, value in extra_metrics.items():
            norms = self._adapter.last_norms
            extra = {"per_layer": norms.per_layer} if name == B_NORM and norms is not None else None
            metrics.append(Metric(name, value, extra=extra))
            logged[name] = value
        floor = self._numerical_floor(k, step, shards, self_logp)
        if floor is not None:
            metrics.append(floor)
        self.store.write_probe(k, step, cfg.probe_seed(k), self.mode, records, scores, metrics, seconds=seconds)
        self._log(step, {key: v for key, v in logged.items() if not key.startswith(("D/", "D_rate/"))})
        if i >= 0 and any(key.startswith("D/") for key in logged):
            self._log(self.probe_steps[i], {key: v for key, v in logged.items() if key.startswith(("D/", "D_rate/"))})
        if cfg.log_samples_table:
            self.sink.log_table(
                "samples",
                ["probe_step", "prompt_id", "sample_idx", "prompt", "completion", "logp", "n_tokens", "finished"],
                [(step, r.prompt_id, r.sample_idx, cfg.probes[position[r.prompt_id]].prompt, r.text,
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

    def _numerical_floor(self, k: int, step: int, shards: Sequence[ProbeShard],
                         own: dict[tuple[str, int], float]) -> Metric | None:
        """D between two scorings of the same samples under the same weights that differ only
        numerically (:meth:`_floor_scores`): what D reads from rounding alone, with D's own
        estimator (one-sided TV, or the primary measure two-sided with the subset on both
        sides). Two checkpoints whose scorings each carry such noise independently can read up
        to ~1.4x this apart. Stored on probe ``k``'s row and logged as ``probe/D_numerical_floor``
        at its step; the first probe also stores a ``scoring_precision`` event."""
        info = next((sh.precision for sh in shards if sh.precision), None)
        if info is not None and not self._precision_logged:
            self._precision_logged = True
            self.store.add_event("scoring_precision", step, **info)
        pairs = [(own[(r.prompt_id, r.sample_idx)], r.logp) for sh in shards for r in sh.floor
                 if (r.prompt_id, r.sample_idx) in own]
        if len(pairs) < 2:
            return None
        scored, reference = (np.array(x, dtype=np.float64) for x in zip(*pairs))
        if not (np.isfinite(scored).all() and np.isfinite(reference).all()):
            return None
        if self.mode == "snapshot":
            result = dissimilarity(scored, reference, scored, reference, self.config.primary_measure)
        else:
            result = one_sided_tv(scored, reference)
        extra = {"measure": result.measure, "estimator": result.estimator, "n": len(pairs),
                 "mean_abs_logp_diff": float(np.mean(np.abs(scored - reference))),
                 "max_abs_logp_diff": float(np.max(np.abs(scored - reference))), **(info or {})}
        self._log(step, {"D_numerical_floor": result.value, "D_numerical_floor_stderr": result.stderr})
        return Metric("D_numerical_floor", result.value, result.stderr, extra=json_safe(extra))

    def _warn_out_of_vocab(self, step: int, count: int) -> None:
        self.store.add_event("out_of_vocab", step, count=count, tokenizer_size=self._decodable)
        if not self._oov_warned:
            self._oov_warned = True
            warnings.warn(
                f"em-callbacks: {count} sampled token ids at step {step} lie outside the tokenizer's vocabulary "
                f"({self._decodable} ids; the model's embedding is larger) and decode to nothing; judges see "
                "shortened text. Counted per probe as samples/out_of_vocab_tokens.",
                stacklevel=2,
            )

    def _window_metrics(self, i: int) -> dict[str, float]:
        """D(t_i) for every measure, and its rate D_rate (D per ``reference_interval`` steps,
        :func:`~em_callbacks.schedule.rate`; equal to D on a fixed grid), stored on probe i's
        row; returns what to log."""
        logged: dict[str, float] = {}
        metrics, results = [], {}
        interval = self._interval(i)
        if self.reference_interval is None:  # offline on an uneven grid: the first interval
            self.reference_interval = max(1, int(round(interval)))
        for measure in self.config.measures:
            if self.mode == "one-sided" and measure != "tv":
                continue
            result = self._history.window_dissimilarity(i, measure, two_sided=self.mode == "snapshot")
            results[measure] = result
            combined = result.combined
            ci = combined.confidence_interval(0.95)
            extra = {"per_prompt": {pid: [r.value, r.stderr] for pid, r in result.per_prompt.items()},
                     "left": list(result.left), "right": list(result.right),
                     "estimator": next(iter(result.per_prompt.values())).estimator if result.per_prompt else None,
                     "cross_scoring": self.mode, "interval": interval}
            metrics.append(Metric(f"D/{measure}", combined.value, combined.stderr, ci.low, ci.high, extra))
            value, stderr = rate(combined.value, combined.stderr, interval, self.reference_interval)
            scale = self.reference_interval / interval
            metrics.append(Metric(f"D_rate/{measure}", value, stderr, ci.low * scale, ci.high * scale,
                                  {"interval": interval, "reference_interval": self.reference_interval}))
            logged.update({f"D/{measure}": combined.value, f"D/{measure}_stderr": combined.stderr,
                           f"D/{measure}_ci_low": ci.low, f"D/{measure}_ci_high": ci.high,
                           f"D_rate/{measure}": value, f"D_rate/{measure}_stderr": stderr})
        self._full[i] = results
        self.store.write_metrics(i, self.probe_steps[i], metrics)
        return logged

    def _interval(self, i: int) -> float:
        """Steps D(t_i) spans, centre to centre of its windows (:func:`~em_callbacks.schedule.interval_of`)."""
        left, right = self._history.windows_for(i)
        return interval_of([self.probe_steps[j] for j in left], [self.probe_steps[j] for j in right])

    def _update_detection(self, i: int) -> None:
        result = self._full[i].get(self.config.primary_measure) or next(iter(self._full[i].values()))
        value, stderr = rate(result.combined.value, result.combined.stderr, self._interval(i), self.reference_interval)
        before = self.detector.state.onset_step
        state = self.detector.update(self.probe_steps[i], value, stderr)
        if state.onset_step is not None and before is None:
            text = (f"Behavioural transition onset at step {state.onset_step} "
                    f"(D_rate/{result.measure}={value:.3f} ± {stderr:.3f} per {self.reference_interval} steps)")
            logger.warning("em-callbacks: %s", text)
            self.store.add_event("onset", state.onset_step, **state.to_dict())
            if not self._alerted:
                self.sink.alert("Phase transition detected", text)
                self._alerted = True
        self.sink.summary({f"transition/{key}": v for key, v in state.to_dict().items() if v is not None})

    def _stop_decision(self, step: int) -> StopDecision | None:
        if self.stop_rule is None or self.stopped is not None:
            return None
        reason = self.stop_rule.should_stop(self.detector.state, self.order_series, step)
        if not reason:
            return None
        decision = StopDecision(int(step), str(reason), self.detector.state.last_pre_onset_step)
        self.store.add_event("early_stop", **decision.to_dict())
        logger.warning("em-callbacks: stopping training at step %d: %s", step, reason)
        return decision

    def record_grad_norm(self, step: int, value: Any) -> None:
        value = _finite_or_nan(value)
        self.grad_norms[int(step)] = value
        self.safe("grad-norm store", lambda: self.store.write_grad_norms([(int(step), value)]))

    # ----------------------------------------------------------------- judges (rank 0)
    def _submit_judgments(self, k: int, records: Sequence[SampleRecord]) -> None:
        from .judges import JudgeItem

        prompts = {p.id: p.prompt for p in self.config.probes}
        items = [JudgeItem(k, r.prompt_id, r.sample_idx, prompts[r.prompt_id], r.text) for r in records]
        for op in self.config.order_parameters:
            self._ledger[(k, op.name)] = _JudgeLedger(expected=len(items))
        self._runner.submit(items)

    def collect_judgments(self, results: list | None = None) -> None:
        """Take whatever judgments have arrived (never blocks) and act on finished probes."""
        if self._runner is None:
            return
        try:
            results = self._runner.poll() if results is None else results
        except Exception as exc:  # noqa: BLE001
            self.record_fault("judge_poll", None, error=repr(exc))
            return
        if not results:
            return
        ops = {op.name: op for op in self.config.order_parameters}
        rows, finished = [], set()
        for res in results:
            item, name, judgment = res.item, res.order_parameter, res.judgment
            ledger = self._ledger.get((item.probe_index, name))
            if ledger is None or name not in ops:
                continue
            probs = None if judgment.probs is None else [float(x) for x in judgment.probs]
            rows.append((item.probe_index, item.prompt_id, item.sample_idx, name, judgment.score, probs, judgment.error))
            ledger.add(ops[name], (item.prompt_id, item.sample_idx), judgment.score, probs)
            if ledger.complete:
                finished.add((item.probe_index, name))
        self.safe("judgment store", lambda: self.store.write_judgments(rows))
        for k, name in sorted(finished):
            self._log_order_parameter(k, name)
        if finished:
            self._try_decompositions()

    def _log_order_parameter(self, k: int, name: str) -> None:
        ledger = self._ledger[(k, name)]
        step = self.probe_steps[k]
        values = {
            f"order/{name}/mean": float(np.mean(ledger.scores)) if ledger.scores else float("nan"),
            f"order/{name}/missing": float(ledger.failed),
            f"order/{name}/missing_rate": ledger.failed / max(ledger.expected, 1),
        }
        if ledger.flagged:
            values[f"order/{name}/flagged_rate"] = float(np.mean(ledger.flagged))
            _add_point(self.order_series, f"{name}/flagged_rate", step, values[f"order/{name}/flagged_rate"])
        _add_point(self.order_series, name, step, values[f"order/{name}/mean"])
        self.safe("order metrics", lambda: self.store.write_metrics(k, step, [Metric(key, v) for key, v in values.items()]))
        self._log(step, values)
        if ledger.failed:
            self.record_fault("missing_judgments", step, order_parameter=name, count=ledger.failed)

    def _try_decompositions(self) -> None:
        from .order import decompose

        for i, results in sorted(self._full.items()):
            full = results.get(self.config.primary_measure)
            if full is None:
                continue
            for op in self.config.order_parameters:
                if (i, op.name) in self._decomposed:
                    continue
                ledgers = [self._ledger.get((j, op.name)) for j in full.left + full.right]
                if any(ledger is None or not ledger.complete for ledger in ledgers):
                    continue
                self._decomposed.add((i, op.name))
                n_left, width = len(full.left), len(op.scale)
                left = _kernels_by_prompt(ledgers[:n_left], [self._sample_keys[j] for j in full.left], width)
                right = _kernels_by_prompt(ledgers[n_left:], [self._sample_keys[j] for j in full.right], width)
                try:
                    captured = decompose(op, left, right, full.per_prompt, measure=full.measure, pool_prompts=True)
                except Exception as exc:  # noqa: BLE001 - a bad judge batch must not stop training
                    self.record_fault("decomposition", self.probe_steps[i], order_parameter=op.name, error=repr(exc))
                    continue
                self._store_captured(i, op.name, captured)

    def _store_captured(self, i: int, name: str, captured: Any) -> None:
        step = self.probe_steps[i]
        ci = captured.confidence_interval(0.95)
        extra = {"d_order": captured.d_order.value, "d_order_stderr": captured.d_order.stderr,
                 "noise_floor": captured.noise_floor}
        for key in ("resolved", "why_unresolved"):
            if hasattr(captured, key):
                extra[key] = getattr(captured, key)
        self.safe("captured store", lambda: self.store.write_metrics(i, step, [
            Metric(f"captured/{name}", captured.value, captured.stderr, ci.low, ci.high, json_safe(extra)),
            Metric(f"D_order/{name}", captured.d_order.value, captured.d_order.stderr),
        ]))
        self._log(step, {
            f"order/{name}/captured": captured.value,
            f"order/{name}/captured_stderr": captured.stderr,
            f"order/{name}/captured_noise_floor": captured.noise_floor,
            f"order/{name}/D": captured.d_order.value,
        })

    # ----------------------------------------------------------------- sinks
    @property
    def latest_metrics(self) -> dict[str, tuple[int, float]]:
        return dict(self._latest)

    def _log(self, step: int, values: dict[str, float]) -> None:
        """Send probe metrics to the sink once per (step, key): a resumed run that continues the
        same W&B run does not log a probe step twice."""
        seen = self._logged.setdefault(int(step), set())
        fresh = {key: v for key, v in values.items() if key not in seen}
        for key, value in fresh.items():
            if isinstance(value, numbers.Real) and (key not in self._latest or self._latest[key][0] <= step):
                self._latest[key] = (int(step), float(value))
        seen.update(fresh)
        if fresh:
            self.sink.log_probe(step, fresh)

    # ----------------------------------------------------------------- end of run
    def finish(self, final_step: int) -> RunSummary | None:
        """Drain the judges, write ``summary.json`` and final plots, close the store (rank 0)."""
        if self.store is None:
            return None
        if self._runner is not None:
            try:
                self.collect_judgments(self._runner.drain(self.config.judge_drain_timeout))
                stats = self._runner.stats() if hasattr(self._runner, "stats") else {}
                self.safe("judge stats", lambda: self.store.add_event("judge_stats", final_step, **stats))
            finally:
                self._runner.close()
        self.summary = self.safe("summary", lambda: self._write_summary(final_step))
        self.safe("final plots", self._log_final_plots)
        self.store.close()
        return self.summary

    def _write_summary(self, final_step: int) -> RunSummary:
        summary = summarize(self.store, live_state=self.detector.state, final_step=final_step,
                            feasibility=self.feasibility)
        if self.stop_rule is not None and hasattr(self.stop_rule, "notes"):
            summary.stop_rule_notes = list(self.stop_rule.notes())
        summary.write(self.run_dir / "summary.json")
        self.store.set_meta(summary=summary.to_dict())
        self.sink.summary({f"transition/{key}": v for key, v in summary.to_dict().items()
                           if isinstance(v, (int, float, bool, str)) and v is not None})
        return summary

    def _log_final_plots(self) -> None:
        if self.sink.run is None:
            return
        from .report import plot_overview

        path = plot_overview(self.store, self.run_dir / "overview.png", summary=self.summary.to_dict())
        self.sink.log_image("overview", str(path))

    # ----------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs beyond the store (JSON-safe)."""
        return json_safe({
            "probe_steps": self.probe_steps,
            "probe_samples": self.probe_samples,
            "reference_interval": self.reference_interval,
            "detector": self.detector.state_dict(),
            "stop_rule": self.stop_rule.state_dict() if self.stop_rule else None,
            "stopped": self.stopped.to_dict() if self.stopped else None,
            "grad_norms": {str(s): v for s, v in self.grad_norms.items()},
            "order_series": self.order_series,
            "alerted": self._alerted,
            "logged": {str(s): sorted(keys) for s, keys in self._logged.items()},
        })

    def load_state_dict(self, payload: dict[str, Any], step: int) -> None:
        """Continue after ``step`` from a saved state (every rank; the store on rank 0)."""
        self.probe_steps = [s for s in payload["probe_steps"] if s <= step]
        samples = payload.get("probe_samples") or [self.config.samples_per_prompt] * len(payload["probe_steps"])
        self.probe_samples = list(samples[:len(self.probe_steps)])
        if payload.get("reference_interval") is not None:
            self.reference_interval = int(payload["reference_interval"])
        self.detector.load_state_dict(payload["detector"])
        if self.stop_rule and payload.get("stop_rule"):
            self.stop_rule.load_state_dict(payload["stop_rule"])
        stopped = payload.get("stopped")
        self.stopped = StopDecision(**stopped) if stopped else None
        self.grad_norms = {int(s): (math.nan if v is None else v) for s, v in payload.get("grad_norms", {}).items()}
        self.order_series = {name: [tuple(x) for x in v] for name, v in payload.get("order_series", {}).items()}
        self._alerted = payload.get("alerted", False)
        self._logged = {int(s): set(keys) for s, keys in payload.get("logged", {}).items() if int(s) <= step}

    def band_rows(self) -> dict[str, Any]:
        """Rank 0: the stored samples and log-probs of the band (to broadcast on resume)."""
        k = len(self.probe_steps) - 1
        band = list(range(max(0, k - self._history.band), k + 1))
        return {
            "samples": {j: [(r.prompt_id, r.sample_idx, r.text, r.token_ids, r.finished) for r in self.store.samples(j)]
                        for j in band},
            "logp": {(j, c): self.store.logprobs(j, c) for j in band for c in band},
        }

    def reload_band(self, data: dict[str, Any]) -> None:
        """Rebuild the in-memory band (samples, log-probs) from stored rows after a resume."""
        position = {p.id: i for i, p in enumerate(self.config.probes)}
        for j, stored in data["samples"].items():
            rows = sorted(stored, key=lambda r: (position[r[0]], r[1]))
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
            for c in data["samples"]:
                values = data["logp"].get((j, c), {})
                if values and all(key in values for key in keys):
                    self._history.add_logp(j, c, np.array([values[key] for key in keys]))

    def reload_judgments(self) -> None:
        """Rank 0 after a resume: the judge ledger from the store (kernels for windows that span
        the resume point); judgments lost in flight are submitted again."""
        if self._runner is None:
            return
        from .judges import JudgeItem

        prompts = {p.id: p.prompt for p in self.config.probes}
        ops = self.config.order_parameters
        resubmit = []
        for j, step in enumerate(self.probe_steps):
            samples = self.store.samples(j)
            stored = {op.name: {(r["prompt_id"], r["sample_idx"]): r for r in self.store.judgments(op.name, j)}
                      for op in ops}
            missing = [r for r in samples if any((r.prompt_id, r.sample_idx) not in stored[n] for n in stored)]
            lost = {(r.prompt_id, r.sample_idx) for r in missing}
            for op in ops:
                ledger = self._ledger[(j, op.name)] = _JudgeLedger(expected=len(samples))
                for key, row in stored[op.name].items():
                    if key not in lost:  # the lost ones are judged again below, for every order parameter
                        ledger.add(op, key, row["score"], row["probs"])
                if ledger.complete and all(s != step for s, _ in self.order_series.get(op.name, [])):
                    self._log_order_parameter(j, op.name)
            resubmit += [JudgeItem(j, r.prompt_id, r.sample_idx, prompts[r.prompt_id], r.text) for r in missing]
        if resubmit:
            self.store.add_event("judgments_resubmitted", self.probe_steps[-1], count=len(resubmit))
            self._runner.submit(resubmit)

    def pending_judgments(self) -> int:
        return self._runner.pending() if self._runner is not None else 0

    # ----------------------------------------------------------------- faults
    def record_fault(self, kind: str, step: int | None, **details: Any) -> None:
        self.faults.append({"kind": kind, "step": step, **details})
        if self.store is not None:
            try:
                self.store.add_event("fault", step, fault=kind, **details)
            except Exception:  # noqa: BLE001 - the store itself may be what failed
                pass

    def safe(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run bookkeeping that must never crash the user's training run; record any failure."""
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001
            logger.exception("em-callbacks: %s failed; training continues", what)
            self.record_fault(what.replace(" ", "_"), None, error=f"{type(exc).__name__}: {exc}")
            return None


# ------------------------------------------------------------------------------ helpers
def _kernels_by_prompt(ledgers: Sequence[_JudgeLedger], keys: Sequence[Sequence[tuple[str, int]]],
                       width: int) -> dict[str, np.ndarray]:
    """Per prompt, stacked judge distributions of one window's samples (NaN rows where missing)."""
    out: dict[str, list[np.ndarray]] = {}
    for ledger, probe_keys in zip(ledgers, keys):
        for key in probe_keys:
            out.setdefault(key[0], []).append(ledger.kernels.get(key, np.full(width, np.nan)))
    return {pid: np.stack(rows) for pid, rows in out.items()}


def _render(tokenizer: Any, probe: Any) -> str:
    """The probe through the tokenizer's chat template; a template that cannot render it (e.g.
    Gemma's, which has no system role) is a configuration error naming the probe."""
    try:
        return render_prompt(tokenizer, probe)
    except Exception as exc:  # noqa: BLE001 - jinja2 TemplateError and friends
        hint = (": this chat template has no system role; drop 'system' from the probe or fold it into the prompt"
                if getattr(probe, "system", None) and "system" in str(exc).lower() else "")
        raise ConfigError(f"probe {probe.id!r} cannot be rendered with the tokenizer's chat template "
                          f"({type(exc).__name__}: {exc}){hint}") from None


def _add_point(series: dict[str, list[tuple[int, float]]], name: str, step: int, value: float) -> None:
    points = series.setdefault(name, [])
    points.append((step, value))
    points.sort()


def _decodable_size(tokenizer: Any) -> int:
    """Ids below this decode to text (``len(tokenizer)`` counts added tokens too)."""
    try:
        return int(len(tokenizer))
    except TypeError:
        return int(getattr(tokenizer, "vocab_size", 0) or 2**62)


def check_int(name: str, value: Any, minimum: int, why: str | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        reason = f" ({why})" if why else ""
        raise ConfigError(f"{name} must be >= {minimum}{reason}, got {value}")


def _finite_or_nan(value: Any) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return float("nan")
    return value if math.isfinite(value) else float("nan")

