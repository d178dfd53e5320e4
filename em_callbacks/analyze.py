"""Offline analysis of saved checkpoints: the second driver of the probe engine.

``analyze_checkpoints`` runs the same probe pipeline as the live callback over the
``checkpoint-*`` folders a Trainer saved, and writes the same run store, ``summary.json``
and report. PEFT adapter checkpoints are swapped onto one resident base model (the base is
loaded once); full-model checkpoints are loaded one at a time, with the previous one kept
resident so that new samples are scored under it (two models at most).

With the same probes, samples, seed and probe steps, offline and live give the same samples
and D series: probe index ``k`` draws with the same seed, and an adapter checkpoint holds the
exact weights the live callback probed (tests/test_analyze.py holds this).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from .engine import ConfigError, EngineConfig, ProbeEngine
from .probes import ProbeSet
from .sampling import WeightSnapshots
from .summary import RunSummary
from .wandb_sink import WandbSink

logger = logging.getLogger(__name__)

__all__ = ["analyze_checkpoints", "find_checkpoints", "Checkpoint", "CheckpointError"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
MODEL_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")
_STEP_RE = re.compile(r"checkpoint-(\d+)$")
_ARCH_KEYS = ("model_type", "architectures", "vocab_size", "hidden_size", "num_hidden_layers", "n_embd", "n_layer")


class CheckpointError(ValueError):
    """A checkpoint path cannot be analysed (named in the message)."""


@dataclass(frozen=True)
class Checkpoint:
    """One saved checkpoint: its folder, training step and kind ("adapter" or "full")."""

    path: Path
    step: int
    kind: str

    @property
    def base_model(self) -> str | None:
        if self.kind != "adapter":
            return None
        return json.loads((self.path / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")


# ------------------------------------------------------------------------------ discovery
def _step_of(folder: Path) -> int | None:
    state = folder / "trainer_state.json"
    if state.is_file():
        try:
            return int(json.loads(state.read_text())["global_step"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    hit = _STEP_RE.search(folder.name)
    return int(hit.group(1)) if hit else None


def _kind_of(folder: Path) -> str | None:
    if (folder / ADAPTER_CONFIG).is_file():
        return "adapter"
    if (folder / "config.json").is_file():
        return "full"
    return None


def find_checkpoints(paths: Sequence[str | Path]) -> list[Checkpoint]:
    """Checkpoints named by ``paths`` (a Trainer ``output_dir`` or ``checkpoint-*`` folders),
    in step order. Raises :class:`CheckpointError` naming what is wrong."""
    found: list[Checkpoint] = []
    for raw in paths:
        path = Path(raw)
        if not path.is_dir():
            raise CheckpointError(f"{path} is not a folder")
        folders = [path] if _kind_of(path) else sorted(p for p in path.glob("checkpoint-*") if p.is_dir())
        if not folders:
            raise CheckpointError(f"{path} holds no checkpoint-* folders (and is not a checkpoint itself)")
        for folder in folders:
            step = _step_of(folder)
            kind = _kind_of(folder)
            if step is None:
                raise CheckpointError(f"{folder}: no trainer_state.json and no step in its name (checkpoint-<step>)")
            if kind is None:
                raise CheckpointError(f"{folder}: neither {ADAPTER_CONFIG} nor config.json: not a model checkpoint")
            found.append(Checkpoint(folder, step, kind))
    found.sort(key=lambda c: c.step)
    steps = [c.step for c in found]
    if len(set(steps)) != len(steps):
        raise CheckpointError(f"two checkpoints share a step: {sorted(s for s in steps if steps.count(s) > 1)}")
    kinds = {c.kind for c in found}
    if len(kinds) > 1:
        raise CheckpointError("mixed adapter and full-model checkpoints: analyse them separately")
    return found


def _problem(ckpt: Checkpoint) -> str | None:
    """Why ``ckpt`` cannot be read (missing, partial or corrupt weights), or None."""
    names = ADAPTER_WEIGHTS if ckpt.kind == "adapter" else MODEL_WEIGHTS
    weights = [ckpt.path / n for n in names if (ckpt.path / n).is_file()]
    if not weights:
        return f"no weights file ({' or '.join(names)}): a partial checkpoint"
    try:
        config = ckpt.path / (ADAPTER_CONFIG if ckpt.kind == "adapter" else "config.json")
        json.loads(config.read_text())
        for f in weights:
            if f.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(f), framework="pt") as handle:
                    for key in handle.keys():
                        handle.get_slice(key)
            elif f.name.endswith(".index.json"):
                index = json.loads(f.read_text())
                missing = sorted({s for s in index["weight_map"].values() if not (ckpt.path / s).is_file()})
                if missing:
                    return f"shards missing: {', '.join(missing)}"
    except Exception as exc:  # noqa: BLE001 - any failure to read is reported by name
        return f"unreadable ({type(exc).__name__}: {exc})"
    return None


def _architecture(ckpt: Checkpoint) -> dict[str, Any]:
    config = json.loads((ckpt.path / "config.json").read_text())
    return {k: config.get(k) for k in _ARCH_KEYS if k in config}


# ------------------------------------------------------------------------------ loading
def _load_model(path: str | Path, dtype: torch.dtype | None, device: torch.device) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    return model.to(device).eval()


def _load_tokenizer(candidates: Sequence[str | Path | None]) -> Any:
    from transformers import AutoTokenizer

    errors = []
    for c in candidates:
        if c is None:
            continue
        try:
            return AutoTokenizer.from_pretrained(str(c))
        except Exception as exc:  # noqa: BLE001 - try the next place
            errors.append(f"{c}: {type(exc).__name__}")
    raise CheckpointError(f"no tokenizer found (tried {'; '.join(errors) or 'nothing'}); pass tokenizer=...")


def _adapter_weights(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    f = ckpt.path / ADAPTER_WEIGHTS[0]
    if f.is_file():
        from safetensors.torch import load_file

        return load_file(str(f))
    return torch.load(ckpt.path / ADAPTER_WEIGHTS[1], map_location="cpu", weights_only=True)


def _check_base(base: str | Path) -> None:
    """Fail early, naming the path, when the adapters' base model cannot be found."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(str(base))
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"the adapters' base model {base} could not be loaded ({type(exc).__name__}); "
                              "pass base_model=/path/to/base (--base-model)") from None


class _ResidentPrevious:
    """Full-model checkpoints: the previous model stays loaded to score the new samples."""

    def __init__(self) -> None:
        self.model: torch.nn.Module | None = None
        self.index: int | None = None

    def available(self) -> list[int]:
        return [self.index] if self.model is not None else []

    @contextlib.contextmanager
    def swapped_in(self, model: torch.nn.Module, probe_index: int) -> Iterator[torch.nn.Module]:
        yield self.model

    def capture(self, model: torch.nn.Module, probe_index: int) -> None:
        self.model, self.index = model, probe_index


def _adapter_models(checkpoints: Sequence[Checkpoint], base: str | Path, include_base: bool, dtype, device):
    """Yield (step, model) with each adapter loaded onto one resident base model."""
    from peft import PeftModel, set_peft_model_state_dict

    try:
        base_model = _load_model(base, dtype, device)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"the adapters' base model {base} could not be loaded ({type(exc).__name__}: {exc}); "
                              "pass base_model=/path/to/base (--base-model)") from None
    model = PeftModel.from_pretrained(base_model, str(checkpoints[0].path), is_trainable=True).to(device).eval()
    if include_base:
        with torch.no_grad():  # LoRA starts with B = 0: the adapter adds exactly nothing
            for name, p in model.named_parameters():
                if p.requires_grad and ("lora_B" in name or "lora_embedding_B" in name):
                    p.zero_()
        yield 0, model
    for ckpt in checkpoints:
        set_peft_model_state_dict(model, _adapter_weights(ckpt))
        yield ckpt.step, model


def _full_models(checkpoints: Sequence[Checkpoint], base: str | Path | None, dtype, device):
    if base is not None:
        yield 0, _load_model(base, dtype, device)
    for ckpt in checkpoints:
        yield ckpt.step, _load_model(ckpt.path, dtype, device)


def _grad_norms(checkpoints: Sequence[Checkpoint]) -> dict[int, float]:
    """Per-step grad norms from the last checkpoint's ``trainer_state.json`` log history."""
    for ckpt in reversed(checkpoints):
        state = ckpt.path / "trainer_state.json"
        if state.is_file():
            history = json.loads(state.read_text()).get("log_history", [])
            return {int(e["step"]): float(e["grad_norm"]) for e in history if "grad_norm" in e and "step" in e}
    return {}


# ------------------------------------------------------------------------------ the driver
def analyze_checkpoints(
    paths: Sequence[str | Path] | str | Path,
    out_dir: str | Path,
    *,
    base_model: str | Path | None = None,
    include_base: bool | None = None,
    tokenizer: Any = None,
    skip_bad: bool = False,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    wandb_mode: str = "disabled",
    progress: bool = True,
    report: bool = True,
    **probe_options: Any,
) -> RunSummary:
    """Probe every checkpoint under ``paths`` in step order and write a run to ``out_dir``.

    ``probe_options`` are the probe settings of :class:`~em_callbacks.engine.EngineConfig`
    (``probes`` — a ProbeSet, built-in name, file or list —, ``samples_per_prompt``,
    ``max_new_tokens``, ``seed``, ``order_parameters``, ``judge``, ``window``, ``measures``,
    ``primary_measure``, ``batch_size``, ``detector``, ...), the same as the live callback's;
    use the live run's values to reproduce its samples. ``include_base`` adds a probe at step
    0 on the model before fine-tuning (for adapters the default, as the live callback probes
    step 0 too; for full models only when ``base_model`` is given). Bad checkpoints raise
    :class:`CheckpointError`, or are skipped with a warning and a stored event when
    ``skip_bad``. Returns the run's summary.
    """
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    checkpoints = find_checkpoints(paths)
    problems = {ckpt: _problem(ckpt) for ckpt in checkpoints}
    for ckpt, problem in problems.items():
        if problem is not None and not skip_bad:
            raise CheckpointError(f"{ckpt.path}: {problem} (pass skip_bad=True / --skip-bad to skip it)")
        if problem is not None:
            logger.warning("em-callbacks analyze: skipping %s: %s", ckpt.path, problem)
    good = [c for c in checkpoints if problems[c] is None]
    if not good:
        raise CheckpointError("no readable checkpoint left to analyse")
    kind = good[0].kind
    if kind == "full":
        archs = {json.dumps(_architecture(c), sort_keys=True): c for c in good}
        if len(archs) > 1:
            names = "; ".join(f"{c.path.name}: {a}" for a, c in archs.items())
            raise CheckpointError(f"checkpoints of different architectures: {names}")
    config = _engine_config(probe_options)
    window = config.window
    if kind == "full" and window != 1:
        raise ConfigError("full-model checkpoints keep two models resident: window must be 1")

    if kind == "adapter":
        bases = {c.base_model for c in good}
        base = base_model or (bases.pop() if len(bases) == 1 else None)
        if base is None:
            raise CheckpointError(f"the adapters name different base models {sorted(map(str, bases))}; pass base_model=")
        include = True if include_base is None else include_base
        _check_base(base)
    else:
        base = base_model
        include = base is not None if include_base is None else include_base
        if include and base is None:
            raise ConfigError("include_base=True for full-model checkpoints needs base_model")
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok = tokenizer or _load_tokenizer([good[0].path, base])
    n_probes = len(good) + int(include)
    steps = ([0] if include else []) + [c.step for c in good]
    gaps = {b - a for a, b in zip(steps, steps[1:])}

    out_dir = Path(out_dir)
    engine = ProbeEngine(config)
    sink, wandb_run = _open_wandb(wandb_mode, out_dir, config)
    engine.begin(  # uneven checkpoint steps: detection reads D per the smallest gap (D_rate)
        tok, out_dir, mode="snapshot", sink=sink, planned_probes=n_probes, reference_interval=min(gaps, default=None),
        run_config={"every_n_steps": next(iter(gaps)) if len(gaps) == 1 else None, "driver": "analyze",
                    "schedule": "fixed" if len(gaps) <= 1 else "uneven",
                    "checkpoints": [str(c.path) for c in good], "checkpoint_kind": kind,
                    "base_model": str(base) if base is not None else None},
    )
    for ckpt in (c for c in checkpoints if problems[c] is not None):
        engine.store.add_event("checkpoint_skipped", ckpt.step, path=str(ckpt.path), problem=problems[ckpt])
    for step, value in sorted(_grad_norms(good).items()):
        engine.record_grad_norm(step, value)
    source = WeightSnapshots(keep=2 * window - 1) if kind == "adapter" else _ResidentPrevious()
    models = (_adapter_models(good, base, include, dtype, device) if kind == "adapter"
              else _full_models(good, base, dtype, device))
    bar = _progress(n_probes, progress)
    try:
        for step, model in models:
            t0 = time.perf_counter()
            k = engine.begin_probe(step)
            adapter = engine.adapter_signal(model, step) if kind == "adapter" else {}
            shard = engine.sample_and_score(model, k, source)
            engine.record(k, step, [shard], time.perf_counter() - t0, extra_metrics=adapter)
            engine.collect_judgments()
            bar.update(1)
            bar.set_postfix_str(_postfix(engine))
    finally:
        bar.close()
        summary = engine.finish(steps[-1])
        if wandb_run is not None:
            wandb_run.finish()
    if report:
        from .report import build_report

        engine.safe("report", lambda: build_report(out_dir, out_dir / "report"))
    return summary


def _engine_config(options: dict[str, Any]) -> EngineConfig:
    known = {f.name for f in dataclasses.fields(EngineConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"unknown probe option(s) {unknown}; known: {sorted(known)}")
    options = {"judge_drain_timeout": 600.0, **options}
    try:
        options["probes"] = ProbeSet.coerce(options.get("probes", "em-first-plot"))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return EngineConfig(**options)


def _postfix(engine: ProbeEngine) -> str:
    latest = engine.latest_metrics
    tv = latest.get(f"D/{engine.config.primary_measure}")
    return f"step {engine.probe_steps[-1]}" + (f", D={tv[1]:.3f} at {tv[0]}" if tv else "")


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="em-callbacks analyze", unit="ckpt", disable=not enabled)


def _open_wandb(mode: str, out_dir: Path, config: EngineConfig) -> tuple[WandbSink, Any]:
    if mode not in ("offline", "online", "disabled"):
        raise ConfigError(f"wandb mode must be offline, online or disabled, got {mode!r}")
    if mode == "disabled":
        return WandbSink(enabled=False), None
    import wandb

    out_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(project="em-callbacks", name=f"analyze-{out_dir.name}", dir=str(out_dir), mode=mode,
                     config={"em_callbacks": config.to_dict(driver="analyze")})
    return WandbSink(enabled=True), run
