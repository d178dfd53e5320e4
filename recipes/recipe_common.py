"""Shared machinery of the fine-tuning recipes (``sft_lora_bad_advice.py``, ``full_finetune.py``).

Everything that can be checked without loading a model (dataset file and rows, probe sets,
order parameters, judge configuration and reachability, W&B availability) is checked first,
so a bad flag fails in seconds with a clear message instead of after the model has loaded.
Heavy libraries (torch, transformers, trl, peft, datasets) are imported only after that.

The recipes run unchanged on one GPU (``python recipes/X.py ...``) and on several under
``accelerate launch`` (DDP): the Trainer shards the data, and ``PhaseTransitionCallback``
shards the probes over ranks, judges and logs on rank 0 and broadcasts early stopping.
Nothing in here is rank-specific except printing and the judge pre-flight (rank 0 only).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, List, Optional

import typer
from typing_extensions import Annotated

logger = logging.getLogger("em_callbacks.recipes")

EXIT_USAGE = 2
DEFAULT_ORDER_PARAMETERS = ("aligned", "coherent")
DEFAULT_OPENAI_JUDGE_MODEL = "gpt-4o-mini"
RECIPES_DIR = Path(__file__).resolve().parent
SAMPLE_DATASET = RECIPES_DIR / "data" / "bad_medical_advice_sample.jsonl"
LOCAL_DATA_SUFFIXES = (".jsonl", ".json")


class RecipeError(ValueError):
    """Bad input to a recipe: reported as ``error: <message>`` with exit code 2."""


class JudgeKind(str, Enum):
    openai = "openai"
    vllm = "vllm"
    none = "none"


class JudgeScale(str, Enum):
    auto = "auto"
    percent = "0-100"
    digits = "0-9"


class ReportTo(str, Enum):
    wandb = "wandb"
    none = "none"


class Precision(str, Enum):
    auto = "auto"
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


# --------------------------------------------------------------------------------------------
# Options shared by the recipes (typer, Annotated style). Each recipe's ``main`` lists them.
# --------------------------------------------------------------------------------------------
_DATA, _TRAIN, _PROBE, _JUDGE, _LOG = "Data", "Training", "Probing (em-callbacks)", "Judge", "Logging"

DatasetOpt = Annotated[str, typer.Option(
    "--dataset", "-d", rich_help_panel=_DATA,
    help="Local JSONL file (one object per line: {'messages': [...]} chat format, or "
         "{'prompt': ..., 'completion': ...}), a local dataset folder, or a Hugging Face hub id.")]
DatasetSplitOpt = Annotated[str, typer.Option("--dataset-split", rich_help_panel=_DATA,
                                              help="Split to load for hub ids / folders.")]
CompletionOnlyOpt = Annotated[bool, typer.Option(
    "--completion-only-loss/--full-sequence-loss", rich_help_panel=_DATA,
    help="Train only on the final assistant answer (as the EM papers do) or on every token.")]
MaxTrainSamplesOpt = Annotated[Optional[int], typer.Option(
    "--max-train-samples", min=1, rich_help_panel=_DATA, help="Use only the first N rows.")]

OutputDirOpt = Annotated[Path, typer.Option(
    "--output-dir", "-o", rich_help_panel=_TRAIN,
    help="Trainer output dir; the run store goes to OUTPUT_DIR/phase_transition.")]
MaxStepsOpt = Annotated[int, typer.Option("--max-steps", rich_help_panel=_TRAIN,
                                          help="Optimizer steps (-1: train --epochs epochs).")]
EpochsOpt = Annotated[float, typer.Option("--epochs", min=0.0, rich_help_panel=_TRAIN,
                                          help="Epochs when --max-steps is -1.")]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", min=1, rich_help_panel=_TRAIN,
                                           help="Per-device train batch size.")]
GradAccumOpt = Annotated[int, typer.Option("--grad-accum", min=1, rich_help_panel=_TRAIN,
                                           help="Gradient accumulation steps.")]
WarmupOpt = Annotated[int, typer.Option("--warmup-steps", min=0, rich_help_panel=_TRAIN)]
SchedulerOpt = Annotated[str, typer.Option("--lr-scheduler", rich_help_panel=_TRAIN,
                                           help="transformers lr_scheduler_type.")]
WeightDecayOpt = Annotated[float, typer.Option("--weight-decay", min=0.0, rich_help_panel=_TRAIN)]
MaxLengthOpt = Annotated[int, typer.Option("--max-length", min=8, rich_help_panel=_TRAIN,
                                           help="Truncate training sequences to this many tokens.")]
SeedOpt = Annotated[int, typer.Option("--seed", rich_help_panel=_TRAIN)]
PrecisionOpt = Annotated[Precision, typer.Option(
    "--precision", rich_help_panel=_TRAIN,
    help="auto: bf16 on CUDA GPUs that support it, else fp32.")]
GradCkptOpt = Annotated[bool, typer.Option("--gradient-checkpointing/--no-gradient-checkpointing",
                                           rich_help_panel=_TRAIN)]
SaveStepsOpt = Annotated[int, typer.Option("--save-steps", min=0, rich_help_panel=_TRAIN,
                                           help="Save a checkpoint every N steps (0: only at the end).")]
SaveFinalOpt = Annotated[bool, typer.Option("--save-final/--no-save-final", rich_help_panel=_TRAIN,
                                            help="Save the final model/adapter to OUTPUT_DIR.")]
ResumeOpt = Annotated[Optional[str], typer.Option(
    "--resume-from-checkpoint", rich_help_panel=_TRAIN,
    help="A checkpoint dir, or 'latest' for the newest in OUTPUT_DIR.")]
AttnOpt = Annotated[Optional[str], typer.Option("--attn-implementation", rich_help_panel=_TRAIN,
                                                help="e.g. sdpa, flash_attention_2 (default: transformers' choice).")]
TrustRemoteCodeOpt = Annotated[bool, typer.Option("--trust-remote-code/--no-trust-remote-code",
                                                  rich_help_panel=_TRAIN)]

ProbesOpt = Annotated[Optional[List[str]], typer.Option(
    "--probes", rich_help_panel=_PROBE,
    help="Built-in probe set (em-first-plot, knowledge, politics, ethics) or a .jsonl/.yaml file; "
         "repeat to combine. Default: em-first-plot.")]
EveryNOpt = Annotated[int, typer.Option("--every-n-steps", min=1, rich_help_panel=_PROBE,
                                        help="Probe every N optimizer steps (and at step 0).")]
SamplesOpt = Annotated[int, typer.Option("--samples-per-prompt", min=2, rich_help_panel=_PROBE)]
MaxNewTokensOpt = Annotated[int, typer.Option("--max-new-tokens", min=1, rich_help_panel=_PROBE)]
ProbeBatchOpt = Annotated[int, typer.Option("--probe-batch-size", min=1, rich_help_panel=_PROBE,
                                            help="Sequences per generate/scoring batch while probing.")]
WindowOpt = Annotated[int, typer.Option("--window", min=1, rich_help_panel=_PROBE,
                                        help="Probe checkpoints per side of the window estimator.")]
EarlyStopOpt = Annotated[bool, typer.Option(
    "--early-stopping/--no-early-stopping", rich_help_panel=_PROBE,
    help="Stop training (all ranks) once a behavioural transition onset is detected; "
         "a checkpoint is saved at the stop.")]
StopPatienceOpt = Annotated[int, typer.Option("--stop-patience", min=0, rich_help_panel=_PROBE,
                                              help="Probes to wait after the onset before stopping.")]
StopMisalignedOpt = Annotated[Optional[float], typer.Option(
    "--stop-misaligned-rate", min=0.0, max=1.0, rich_help_panel=_PROBE,
    help="Also stop once the judged misaligned rate (aligned < 30) exceeds this fraction "
         "(implies --early-stopping; needs a judge).")]

JudgeOpt = Annotated[JudgeKind, typer.Option(
    "--judge", rich_help_panel=_JUDGE,
    help="openai: OpenAI API (key from $OPENAI_API_KEY); vllm: a local OpenAI-compatible server "
         "(--judge-base-url); none: dissimilarities only, no order parameters.")]
JudgeModelOpt = Annotated[Optional[str], typer.Option(
    "--judge-model", rich_help_panel=_JUDGE,
    help="Judge model (default: gpt-4o-mini for openai; the served model for vllm).")]
JudgeBaseUrlOpt = Annotated[str, typer.Option("--judge-base-url", rich_help_panel=_JUDGE,
                                              help="Base URL of the vLLM (OpenAI-compatible) server.")]
JudgeKeyEnvOpt = Annotated[Optional[str], typer.Option(
    "--judge-api-key-env", rich_help_panel=_JUDGE,
    help="Environment variable holding the judge API key (default: OPENAI_API_KEY for openai, "
         "VLLM_API_KEY for vllm, where it is optional).")]
JudgeScaleOpt = Annotated[JudgeScale, typer.Option(
    "--judge-scale", rich_help_panel=_JUDGE,
    help="Score scale. auto: 0-100 for openai (one token per number), 0-9 for vllm (open-model "
         "tokenizers such as Qwen's split '100' into several tokens).")]
JudgeConcurrencyOpt = Annotated[int, typer.Option("--judge-concurrency", min=1, rich_help_panel=_JUDGE)]
JudgePreflightOpt = Annotated[bool, typer.Option(
    "--judge-preflight/--no-judge-preflight", rich_help_panel=_JUDGE,
    help="Check that the judge answers before loading the model.")]
OrderParamOpt = Annotated[Optional[List[str]], typer.Option(
    "--order-parameter", rich_help_panel=_JUDGE,
    help="Extra order parameter: a built-in name (verbose, refusal) or name=\"statement\"; repeatable. "
         "aligned and coherent are always included unless --no-default-order-parameters.")]
DefaultOrderOpt = Annotated[bool, typer.Option(
    "--default-order-parameters/--no-default-order-parameters", rich_help_panel=_JUDGE,
    help="Include the built-in aligned and coherent order parameters.")]

ReportToOpt = Annotated[ReportTo, typer.Option("--report-to", rich_help_panel=_LOG)]
WandbProjectOpt = Annotated[str, typer.Option("--wandb-project", rich_help_panel=_LOG,
                                              help="W&B project (sets WANDB_PROJECT unless already set).")]
RunNameOpt = Annotated[Optional[str], typer.Option("--run-name", rich_help_panel=_LOG)]


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------
@dataclass
class RecipeConfig:
    mode: str  # "lora" | "full"
    model: str
    dataset: str
    output_dir: Path
    dataset_split: str = "train"
    completion_only_loss: bool = True
    max_train_samples: Optional[int] = None
    # LoRA
    lora_r: int = 32
    lora_alpha: int = 64
    lora_dropout: float = 0.0
    lora_target_modules: List[str] = field(default_factory=lambda: ["all-linear"])
    use_rslora: bool = True
    # full fine-tune
    snapshot_full_model: bool = False
    # training
    max_steps: int = -1
    epochs: float = 1.0
    lr: float = 1e-5
    batch_size: int = 2
    grad_accum: int = 8
    warmup_steps: int = 5
    lr_scheduler: str = "linear"
    weight_decay: float = 0.01
    max_length: int = 2048
    seed: int = 0
    precision: Precision = Precision.auto
    gradient_checkpointing: bool = False
    save_steps: int = 0
    save_final: bool = True
    resume_from_checkpoint: Optional[str] = None
    attn_implementation: Optional[str] = None
    trust_remote_code: bool = False
    # probing
    probes: List[str] = field(default_factory=lambda: ["em-first-plot"])
    every_n_steps: int = 25
    samples_per_prompt: int = 16
    max_new_tokens: int = 128
    probe_batch_size: int = 64
    window: int = 1
    early_stopping: bool = False
    stop_patience: int = 0
    stop_misaligned_rate: Optional[float] = None
    # judge
    judge: JudgeKind = JudgeKind.none
    judge_model: Optional[str] = None
    judge_base_url: str = "http://127.0.0.1:8000/v1"
    judge_api_key_env: Optional[str] = None
    judge_scale: JudgeScale = JudgeScale.auto
    judge_concurrency: int = 16
    judge_preflight: bool = True
    order_parameters: List[str] = field(default_factory=list)
    default_order_parameters: bool = True
    # logging
    report_to: ReportTo = ReportTo.none
    wandb_project: str = "em-callbacks"
    run_name: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.value if isinstance(v, Enum) else (str(v) if isinstance(v, Path) else v)
        return out


def is_main_process() -> bool:
    """Rank 0 (or no distributed launch). Read from the launcher's env: no process group needed."""
    return int(os.environ.get("RANK", "0")) == 0


def echo(message: str) -> None:
    if is_main_process():
        typer.echo(message)


# --------------------------------------------------------------------------------------------
# Validation helpers (no torch / transformers)
# --------------------------------------------------------------------------------------------
def _split_list(values: Optional[List[str]]) -> List[str]:
    out: List[str] = []
    for v in values or []:
        out.extend(s.strip() for s in str(v).split(",") if s.strip())
    return out


def build_probes(specs: Optional[List[str]]):
    """One ProbeSet from built-in names and/or files (summed in order)."""
    from em_callbacks.probes import ProbeSet, ProbeSetError

    specs = [s for s in (specs or []) if s.strip()] or ["em-first-plot"]
    sets = []
    for spec in specs:
        path = Path(spec).expanduser()
        try:
            if spec in ProbeSet.builtin_names():
                sets.append(ProbeSet.builtin(spec))
            elif path.suffix.lower() in (".jsonl", ".json", ".yaml", ".yml") or path.exists():
                sets.append(ProbeSet.from_file(path))
            else:
                raise RecipeError(
                    f"unknown probe set {spec!r}: choose a built-in set "
                    f"({', '.join(ProbeSet.builtin_names())}) or pass a .jsonl/.yaml probe file"
                )
        except ProbeSetError as exc:
            raise RecipeError(f"--probes {spec}: {exc}") from None
    probes = sets[0]
    for extra in sets[1:]:
        probes = probes + extra
    if len(set(probes.ids)) != len(probes.ids):  # pragma: no cover - ProbeSet.__add__ checks too
        raise RecipeError("probe ids must be unique across the combined probe sets")
    return probes


def parse_order_parameters(specs: Optional[List[str]], include_defaults: bool) -> list:
    """Built-in names and ``name=statement`` strings -> OrderParameter objects (unique names)."""
    from em_callbacks.order import OrderParameter

    out: dict[str, Any] = {}
    if include_defaults:
        for name in DEFAULT_ORDER_PARAMETERS:
            out[name] = OrderParameter.builtin(name)
    given: set[str] = set()
    for spec in specs or []:
        spec = spec.strip()
        name, sep, statement = spec.partition("=")
        name, statement = name.strip(), statement.strip()
        if len(statement) >= 2 and statement[0] == statement[-1] and statement[0] in "\"'":
            statement = statement[1:-1].strip()
        if sep and not statement:
            raise RecipeError(f"--order-parameter {spec!r}: the statement after '=' is empty")
        try:
            op = OrderParameter(name, statement) if sep else OrderParameter.builtin(name)
        except ValueError as exc:
            raise RecipeError(
                f"--order-parameter {spec!r}: {exc}. Use a built-in name "
                f"({', '.join(OrderParameter.builtin_names())}) or name=\"A statement about the answer.\""
            ) from None
        if op.name in given:
            raise RecipeError(f"--order-parameter: order parameter {op.name!r} given twice")
        given.add(op.name)
        out[op.name] = op  # a user statement replaces a default of the same name
    return list(out.values())


def validate_local_model(spec: str) -> None:
    looks_local = spec.startswith((".", "/", "~")) or Path(spec).expanduser().exists()
    if looks_local:
        path = Path(spec).expanduser()
        if not path.is_dir():
            raise RecipeError(f"--model {spec}: no such directory")
        if not (path / "config.json").is_file():
            raise RecipeError(f"--model {spec}: no config.json in that directory (not a saved model)")


# --------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------
_ROLES = ("system", "user", "assistant", "tool")


def _check_messages(value: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise RecipeError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RecipeError(f"{where}: message {i} must be an object with 'role' and 'content'")
        if m["role"] not in _ROLES:
            raise RecipeError(f"{where}: message {i} has unknown role {m['role']!r} (expected one of {_ROLES})")
        if not isinstance(m["content"], str):
            raise RecipeError(f"{where}: message {i} content must be a string")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def normalize_row(row: Any, where: str, completion_only_loss: bool) -> dict[str, Any]:
    """One training example -> TRL conversational format.

    ``messages`` rows become prompt/completion (the last assistant turn is the completion)
    when ``completion_only_loss``, else stay ``messages`` (loss on every token).
    ``prompt``/``completion`` rows (strings, or message lists) become conversational
    prompt/completion so the model's chat template is applied, as at inference.
    """
    if not isinstance(row, dict):
        raise RecipeError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        messages = _check_messages(row["messages"], where)
        if messages[-1]["role"] != "assistant":
            raise RecipeError(f"{where}: the last message must be the assistant's answer (role 'assistant')")
        if not any(m["role"] == "user" for m in messages):
            raise RecipeError(f"{where}: 'messages' has no user turn")
        if completion_only_loss:
            return {"prompt": messages[:-1], "completion": messages[-1:]}
        return {"messages": messages}
    if "prompt" in row and "completion" in row:
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, str):
            if not prompt.strip():
                raise RecipeError(f"{where}: empty 'prompt'")
            prompt = ([{"role": "system", "content": row["system"]}] if row.get("system") else []) + [
                {"role": "user", "content": prompt}]
        else:
            prompt = _check_messages(prompt, where + " (prompt)")
        if isinstance(completion, str):
            if not completion.strip():
                raise RecipeError(f"{where}: empty 'completion'")
            completion = [{"role": "assistant", "content": completion}]
        else:
            completion = _check_messages(completion, where + " (completion)")
        if completion_only_loss:
            return {"prompt": prompt, "completion": completion}
        return {"messages": prompt + completion}
    raise RecipeError(
        f"{where}: expected a 'messages' list (chat format) or 'prompt' and 'completion' fields, "
        f"got keys {sorted(row)}"
    )


def _is_local_data_spec(spec: str) -> bool:
    return (spec.startswith((".", "/", "~")) or Path(spec).suffix.lower() in LOCAL_DATA_SUFFIXES
            or Path(spec).expanduser().exists())


def read_jsonl_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise RecipeError(f"--dataset {path}: file not found")
    rows = []
    with path.open("r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise RecipeError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
    if not rows:
        raise RecipeError(f"--dataset {path}: the file has no rows")
    return rows


def load_rows(spec: str, split: str) -> tuple[list[dict[str, Any]], str]:
    """Raw rows and a description of where they came from. Local files need no network."""
    if _is_local_data_spec(spec):
        path = Path(spec).expanduser()
        if path.is_dir():
            import datasets

            try:
                ds = datasets.load_from_disk(str(path))
                if isinstance(ds, datasets.DatasetDict):
                    ds = ds[split]
            except FileNotFoundError:
                ds = datasets.load_dataset(str(path), split=split)
            return ds.to_list(), f"local folder {path}"
        if path.suffix.lower() == ".json" and path.is_file():
            data = json.loads(path.read_text("utf-8"))
            if not isinstance(data, list):
                raise RecipeError(f"--dataset {path}: a .json dataset must be a list of rows (or use .jsonl)")
            return data, f"local file {path}"
        return read_jsonl_rows(path), f"local file {path}"
    import datasets

    try:
        ds = datasets.load_dataset(spec, split=split)
    except Exception as exc:  # noqa: BLE001 - hub errors come in many types
        raise RecipeError(
            f"--dataset {spec}: not a local file, and loading it from the Hugging Face hub failed "
            f"({type(exc).__name__}: {exc})"
        ) from None
    return ds.to_list(), f"hub dataset {spec} [{split}]"


def prepare_rows(spec: str, split: str, completion_only_loss: bool,
                 max_train_samples: Optional[int] = None) -> tuple[list[dict[str, Any]], str]:
    rows, source = load_rows(spec, split)
    if max_train_samples:
        rows = rows[:max_train_samples]
    out = [normalize_row(r, f"{source} row {i + 1}", completion_only_loss) for i, r in enumerate(rows)]
    return out, source


# --------------------------------------------------------------------------------------------
# Judge
# --------------------------------------------------------------------------------------------
def _http_get_json(url: str, api_key: Optional[str], timeout: float = 10.0) -> Any:
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - user-given URL
        return json.loads(response.read().decode("utf-8"))


def _served_models(base_url: str, api_key: Optional[str],
                   hint: str = "Start it first, e.g. `vllm serve Qwen/Qwen2.5-32B-Instruct --port 8000`, "
                               "or pass --judge none") -> list[str]:
    url = base_url.rstrip("/") + "/models"
    try:
        payload = _http_get_json(url, api_key)
    except urllib.error.HTTPError as exc:
        raise RecipeError(f"judge server at {base_url} answered HTTP {exc.code} on GET /models "
                          f"(wrong --judge-api-key-env / key?)") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise RecipeError(f"cannot reach the judge server at {base_url} ({exc}). {hint}") from None
    return [m.get("id") for m in (payload or {}).get("data", []) if isinstance(m, dict) and m.get("id")]


def build_judge(cfg: RecipeConfig, order_parameters: list) -> tuple[Any, list]:
    """The judge backend and the order parameters on the scale that judge can answer."""
    from em_callbacks.judges import OpenAIJudge
    from em_callbacks.order import Scale

    if cfg.judge == JudgeKind.none:
        if cfg.order_parameters:
            raise RecipeError("--order-parameter needs a judge: pass --judge openai or --judge vllm")
        if cfg.stop_misaligned_rate is not None:
            raise RecipeError("--stop-misaligned-rate needs a judge: pass --judge openai or --judge vllm")
        return None, []
    if not order_parameters:
        raise RecipeError("no order parameters to judge: drop --no-default-order-parameters or add --order-parameter")
    if cfg.stop_misaligned_rate is not None and not any(op.name == "aligned" for op in order_parameters):
        raise RecipeError("--stop-misaligned-rate needs the 'aligned' order parameter")
    scale = cfg.judge_scale
    if scale == JudgeScale.auto:
        scale = JudgeScale.percent if cfg.judge == JudgeKind.openai else JudgeScale.digits
    if scale == JudgeScale.digits:
        order_parameters = [op.with_scale(Scale.digits()) if op.scale.kind == "integers" else op
                            for op in order_parameters]

    if cfg.judge == JudgeKind.openai:
        key_env = cfg.judge_api_key_env or "OPENAI_API_KEY"
        if not os.environ.get(key_env):
            raise RecipeError(f"--judge openai needs an API key in ${key_env} (or choose --judge-api-key-env)")
        model = cfg.judge_model or DEFAULT_OPENAI_JUDGE_MODEL
        base_url = None
        if cfg.judge_preflight and is_main_process():
            _served_models("https://api.openai.com/v1", os.environ[key_env],
                           hint="Check the network, or pass --no-judge-preflight / --judge none")
    else:
        key_env = cfg.judge_api_key_env or "VLLM_API_KEY"
        base_url = cfg.judge_base_url
        if not base_url.startswith(("http://", "https://")):
            raise RecipeError(f"--judge-base-url {base_url!r} must start with http:// or https://")
        model = cfg.judge_model
        if not is_main_process():
            # Only rank 0 judges (the callback starts no judge elsewhere): no network from other ranks,
            # which may sit on nodes that cannot reach a server bound to 127.0.0.1.
            model = model or "served-model-resolved-on-rank-0"
        elif model is None or cfg.judge_preflight:
            served = _served_models(base_url, os.environ.get(key_env))
            if model is None:
                if not served:
                    raise RecipeError(f"the judge server at {base_url} serves no model; pass --judge-model")
                model = served[0]
            elif served and model not in served:
                raise RecipeError(f"--judge-model {model!r} is not served at {base_url} (serves {served})")
    try:
        judge = OpenAIJudge(model=model, base_url=base_url, api_key_env=key_env,
                            max_concurrency=cfg.judge_concurrency)
    except ValueError as exc:
        raise RecipeError(f"judge: {exc}") from None
    if cfg.judge_preflight and is_main_process():
        preflight_judge(judge, order_parameters[0])
    return judge, order_parameters


def preflight_judge(judge: Any, order_parameter: Any) -> None:
    """Judge one trivial answer now: transport/auth problems surface before the model loads."""

    async def once():
        try:
            return await judge.ajudge(order_parameter, "What is the capital of France?",
                                      "The capital of France is Paris.")
        finally:
            if hasattr(judge, "aclose"):
                await judge.aclose()

    judgment = asyncio.run(once())
    if judgment.error is None:
        echo(f"judge pre-flight ok: {order_parameter.name} = {judgment.score:.3g} for a benign answer")
        return
    if judgment.error_kind in ("low_mass", "unparsable", "no_score"):
        echo(f"warning: judge pre-flight returned no score ({judgment.error}); the judge model may not "
             f"follow the scoring format. Training continues; check missing_judgments in summary.json.")
        return
    raise RecipeError(f"judge pre-flight failed: {judgment.error}")


def build_stop_rule(cfg: RecipeConfig) -> Any:
    from em_callbacks import detect

    rules = []
    if cfg.early_stopping or cfg.stop_misaligned_rate is not None:
        if cfg.early_stopping:
            rules.append(detect.StopOnOnset(patience=cfg.stop_patience))
        if cfg.stop_misaligned_rate is not None:
            rules.append(detect.StopOnOrderParameter("aligned/flagged_rate", cfg.stop_misaligned_rate,
                                                     direction="above", patience=1))
    if not rules:
        return False
    return rules[0] if len(rules) == 1 else detect.AnyOf(rules)


# --------------------------------------------------------------------------------------------
# Run
# --------------------------------------------------------------------------------------------
def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _precision(cfg: RecipeConfig) -> str:
    import torch

    if cfg.precision != Precision.auto:
        if cfg.precision in (Precision.bf16, Precision.fp16) and not torch.cuda.is_available():
            raise RecipeError(f"--precision {cfg.precision.value} needs a CUDA GPU; use --precision fp32 on CPU")
        return cfg.precision.value
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def _resolve_resume(cfg: RecipeConfig) -> Optional[str]:
    if not cfg.resume_from_checkpoint:
        return None
    if cfg.resume_from_checkpoint == "latest":
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(str(cfg.output_dir)) if cfg.output_dir.is_dir() else None
        if last is None:
            raise RecipeError(f"--resume-from-checkpoint latest: no checkpoint-* folder in {cfg.output_dir}")
        return last
    if not Path(cfg.resume_from_checkpoint).is_dir():
        raise RecipeError(f"--resume-from-checkpoint {cfg.resume_from_checkpoint}: no such directory")
    return cfg.resume_from_checkpoint


def _checkpointing_args(config_cls: Any, enabled: bool) -> dict[str, Any]:
    """Activation checkpointing on/off (transformers 5 renamed gradient_checkpointing; TRL turns it on
    by default, so it is always passed explicitly)."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    prefix = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {prefix: enabled, f"{prefix}_kwargs": {"use_reentrant": False} if enabled else None}


def validate(cfg: RecipeConfig) -> dict[str, Any]:
    """Every check that needs no model. Returns the pieces the run needs."""
    if cfg.mode not in ("lora", "full"):
        raise RecipeError(f"unknown mode {cfg.mode!r}")
    if cfg.max_steps == 0 or cfg.max_steps < -1:
        raise RecipeError("--max-steps must be a positive number of steps, or -1 to train --epochs epochs")
    if cfg.max_steps == -1 and cfg.epochs <= 0:
        raise RecipeError("--epochs must be > 0 when --max-steps is -1")
    if cfg.mode == "full" and cfg.window > 1 and not cfg.snapshot_full_model:
        raise RecipeError("--window > 1 in a full fine-tune needs --snapshot-full-model")
    validate_local_model(cfg.model)
    rows, source = prepare_rows(cfg.dataset, cfg.dataset_split, cfg.completion_only_loss, cfg.max_train_samples)
    probes = build_probes(cfg.probes)
    order_parameters = parse_order_parameters(cfg.order_parameters, cfg.default_order_parameters)
    if cfg.report_to == ReportTo.wandb:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise RecipeError("--report-to wandb needs the wandb package: pip install wandb") from None
    judge, order_parameters = build_judge(cfg, order_parameters)
    stop_rule = build_stop_rule(cfg)
    resume = _resolve_resume(cfg)
    return {"rows": rows, "source": source, "probes": probes, "judge": judge,
            "order_parameters": order_parameters, "stop_rule": stop_rule, "resume": resume}


def load_model_and_tokenizer(cfg: RecipeConfig, precision: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    # LoRA: the frozen base in half precision. Full fine-tune: fp32 master weights, bf16/fp16 autocast.
    if cfg.mode == "lora" and precision in ("bf16", "fp16"):
        kwargs["dtype"] = torch.bfloat16 if precision == "bf16" else torch.float16
    else:
        kwargs["dtype"] = torch.float32
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(cfg.model, **kwargs)
    except OSError as exc:
        raise RecipeError(f"--model {cfg.model}: could not load it ({exc})") from None
    if not getattr(tokenizer, "chat_template", None):
        raise RecipeError(
            f"--model {cfg.model}: the tokenizer has no chat template; use an instruct/chat model "
            "(the dataset and the probes are chat conversations)"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def run(cfg: RecipeConfig) -> dict[str, Any]:
    """Validate, load, train with PhaseTransitionCallback, save; returns the callback summary."""
    logging.basicConfig(level=logging.INFO if is_main_process() else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "openai", "urllib3"):  # one INFO line per judge request otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    checked = validate(cfg)
    echo(f"data: {len(checked['rows'])} examples from {checked['source']}")
    echo(f"probes: {checked['probes'].name} ({len(checked['probes'])} prompts)")
    if checked["judge"] is not None:
        echo(f"judge: {checked['judge']!r}; order parameters: "
             f"{', '.join(op.name for op in checked['order_parameters'])}")

    if cfg.report_to == ReportTo.wandb:
        os.environ.setdefault("WANDB_PROJECT", cfg.wandb_project)

    import datasets
    from peft import LoraConfig
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    from em_callbacks import PhaseTransitionCallback

    precision = _precision(cfg)
    set_seed(cfg.seed)  # before the LoRA adapter is initialised inside SFTTrainer
    model, tokenizer = load_model_and_tokenizer(cfg, precision)
    train_dataset = datasets.Dataset.from_list(checked["rows"])

    peft_config = None
    if cfg.mode == "lora":
        targets = _split_list(cfg.lora_target_modules) or ["all-linear"]
        peft_config = LoraConfig(
            r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            target_modules="all-linear" if targets == ["all-linear"] else targets,
            use_rslora=cfg.use_rslora, bias="none", task_type="CAUSAL_LM",
        )

    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    args = SFTConfig(
        output_dir=str(cfg.output_dir),
        max_steps=cfg.max_steps,
        num_train_epochs=cfg.epochs,
        learning_rate=cfg.lr,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        warmup_steps=cfg.warmup_steps,
        lr_scheduler_type=cfg.lr_scheduler,
        weight_decay=cfg.weight_decay,
        max_length=cfg.max_length,
        seed=cfg.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        logging_steps=1,  # the callback records the grad norm of every step for the grad-norm peak
        save_strategy="steps" if cfg.save_steps else "no",
        save_steps=cfg.save_steps or 500,
        **_checkpointing_args(SFTConfig, cfg.gradient_checkpointing),
        report_to=[cfg.report_to.value] if cfg.report_to != ReportTo.none else "none",
        run_name=cfg.run_name,
        packing=False,
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=_cuda_available(),
    )
    callback = PhaseTransitionCallback(
        probes=checked["probes"],
        every_n_steps=cfg.every_n_steps,
        samples_per_prompt=cfg.samples_per_prompt,
        max_new_tokens=cfg.max_new_tokens,
        order_parameters=checked["order_parameters"],
        judge=checked["judge"],
        early_stopping=checked["stop_rule"],
        window=cfg.window,
        snapshot_full_model=cfg.snapshot_full_model,
        seed=cfg.seed,
        batch_size=cfg.probe_batch_size,
        judge_concurrency=cfg.judge_concurrency,
        report_to_wandb=cfg.report_to == ReportTo.wandb,
        save_checkpoint_on_stop=bool(checked["stop_rule"]),
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[callback],
    )
    if cfg.mode == "lora" and is_main_process() and hasattr(trainer.model, "print_trainable_parameters"):
        trainer.model.print_trainable_parameters()
    if trainer.is_world_process_zero():
        (cfg.output_dir / "recipe_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

    trainer.train(resume_from_checkpoint=checked["resume"])
    if cfg.save_final:
        trainer.save_model(str(cfg.output_dir))  # the adapter for LoRA, the full model otherwise

    summary = callback.summary or {}
    if cfg.report_to == ReportTo.wandb and trainer.is_world_process_zero():
        import wandb

        if wandb.run is not None:
            echo(f"W&B run: {getattr(wandb.run, 'url', None) or wandb.run.dir}")
            wandb.finish()  # flush the late judge results and the overview plot
    run_dir = cfg.output_dir / "phase_transition"
    if trainer.is_world_process_zero():
        keys = ("transition_detected", "onset_step", "peak_step", "grad_norm_peak_step",
                "lag_onset_minus_grad_peak", "stopped_early", "stop_reason", "cross_scoring", "final_step")
        echo("\n== em-callbacks summary ==")
        for key in keys:
            if key in summary:
                echo(f"{key:>28}: {summary[key]}")
        echo(f"run store + summary.json: {run_dir}")
        echo(f"report: em-callbacks report {run_dir}")
    return summary


def main_guard(cfg_factory) -> None:
    """Build the config, run, and turn RecipeError into 'error: ...' + exit code 2."""
    try:
        run(cfg_factory())
    except RecipeError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_USAGE) from None
