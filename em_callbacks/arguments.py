"""The callback's options as one dataclass, for ``HfArgumentParser`` / ``trl.TrlParser``.

Each option of :class:`~em_callbacks.callback.PhaseTransitionCallback` is declared once, here,
with the constructor's default (a test compares them), plus the judge and order-parameter
options a script needs to build the judge::

    from trl import ModelConfig, ScriptArguments, SFTConfig, TrlParser
    from em_callbacks.arguments import PhaseTransitionArguments

    parser = TrlParser((ScriptArguments, SFTConfig, ModelConfig, PhaseTransitionArguments))
    script_args, training_args, model_args, pt_args = parser.parse_args_and_config()
    callback = pt_args.build_callback()        # checks probes, order parameters and the judge
    trainer = SFTTrainer(..., callbacks=[callback])

Everything that can be checked without a model (probe sets, order parameters, judge server,
API key, dataset rows) is checked by the ``build_*`` methods and raises :class:`ArgumentsError`
with a message naming the option, so a bad flag fails in seconds. Importing this module is
cheap: torch and transformers load only when the callback is built.
"""

from __future__ import annotations

import inspect
import logging
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Optional

logger = logging.getLogger(__name__)

__all__ = ["PhaseTransitionArguments", "ArgumentsError", "load_chat_dataset", "load_chat_tokenizer", "run_sft"]

DEFAULT_OPENAI_JUDGE_MODEL = "gpt-4o-mini"
DEFAULT_ORDER_PARAMETERS = ("aligned", "coherent")
# Fields named unlike their PhaseTransitionCallback argument (SFTConfig already has --seed, and a bare
# --batch_size would read as the training batch). Every other field named like a constructor argument
# is passed to it; the rest (judge, stop rule, order parameters) configure what build_* builds.
RENAMED = {"probe_batch_size": "batch_size", "probe_seed": "seed"}


class ArgumentsError(ValueError):
    """A bad option value or input, found before any model is loaded."""


def _opt(default: Any = None, help: str = "", factory: Any = None) -> Any:
    # metadata may hold argparse keywords only: (Trl|Hf)ArgumentParser passes it to add_argument
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


def is_main_process() -> bool:
    """Rank 0, or no distributed launch (read from the launcher's env: no process group needed)."""
    return int(os.environ.get("RANK", "0")) == 0


@dataclass
class PhaseTransitionArguments:
    """Options of PhaseTransitionCallback and its judge (em-callbacks)."""

    _argument_group_name = "em-callbacks: PhaseTransitionCallback"

    # --- probing -------------------------------------------------------------------------------
    probes: list[str] = _opt(
        help="Built-in probe sets (em-first-plot, knowledge, politics, ethics) and/or .jsonl/.yaml probe "
             "files, combined in order.", factory=lambda: ["em-first-plot"])
    every_n_steps: int = _opt(25, "Probe at step 0 and every N optimizer steps (adaptive: the longest interval).")
    schedule: Literal["fixed", "adaptive"] = _opt(
        "fixed", "fixed: a probe every --every_n_steps. adaptive: a dense baseline, then the longest interval while "
                 "the drift sentinel says the model is quiet, earlier once it moved as far as a transition moves it.")
    min_interval: Optional[int] = _opt(None, "Adaptive: the shortest interval and the baseline's spacing "
                                             "(default every_n_steps // 4).")
    focus_factor: Optional[int] = _opt(None, "While a transition is under way, probes draw this many times "
                                             "--samples_per_prompt (default 4 adaptive, 1 fixed).")
    samples_per_prompt: int = _opt(16, "Answers sampled per probe prompt at each probe (>= 2).")
    max_new_tokens: int = _opt(128, "Maximum length of a sampled probe answer.")
    probe_batch_size: int = _opt(64, "Sequences per generate/scoring batch while probing.")
    probe_seed: int = _opt(0, "Seed of the probe sampling (independent of the training --seed).")
    window: int = _opt(1, "Probe checkpoints per side of the window estimator.")
    measures: list[str] = _opt(help="Dissimilarities to estimate: tv, js, linear.",
                               factory=lambda: ["tv", "js", "linear"])
    primary_measure: Literal["tv", "js", "linear"] = _opt("tv", "The measure transitions are detected on.")
    cross_scoring: Literal["auto", "snapshot", "one-sided"] = _opt(
        "auto", "How samples are scored under earlier weights: snapshot (old adapter / CPU weight copy), "
                "one-sided (TV only), or auto.")
    snapshot_full_model: bool = _opt(
        False, "Full fine-tunes: keep CPU copies of the weights at recent probe steps for two-sided "
               "estimators (4 bytes/parameter of RAM each).")
    report_to_wandb: Optional[bool] = _opt(
        None, "Log probe metrics to W&B (default: when the Trainer does, --report_to wandb).")
    log_samples_table: bool = _opt(True, "Log every sampled answer as a W&B table.")
    sentinel_every_n_steps: Optional[int] = _opt(None, "Between probes, every this many steps: score the last probe's "
                                                 "samples under the current weights and log how far the model "
                                                 "moved (sentinel/tv). Fixed schedule: off when unset; adaptive: "
                                                 "min_interval when unset.")
    sentinel_samples_per_prompt: Optional[int] = _opt(None, "Samples per prompt the drift sentinel scores (default: "
                                                      "a quarter of samples_per_prompt, at least 2).")
    own_logprobs: str = _opt("generation", "Where the new samples' log-probs under the current weights come from: "
                             "'generation' (the sampler's own distribution, no extra pass) or 'teacher-forcing'.")
    scoring_dtype: Literal["float32", "model"] = _opt(
        "float32", "Compute the log-probs D is made of in float32 whatever the model's dtype (exact upcast per "
                   "operation, no model copy), or in the model's own numerics ('model'): bf16 rounding inflates D.")

    # --- early stopping ------------------------------------------------------------------------
    early_stopping: bool = _opt(False, "Stop training (all ranks) once a transition onset is detected.")
    stop_patience: int = _opt(0, "Probes to wait after the onset before stopping.")
    stop_misaligned_rate: Optional[float] = _opt(
        None, "Also stop once the judged misaligned rate (aligned < 30) exceeds this fraction (needs a judge).")
    save_checkpoint_on_stop: bool = _opt(False, "Save a checkpoint when early stopping fires.")

    # --- judge ---------------------------------------------------------------------------------
    judge: Literal["none", "openai", "vllm"] = _opt(
        "none", "openai: the OpenAI API; vllm: a local OpenAI-compatible server (--judge_base_url); "
                "none: dissimilarities only, no order parameters.")
    judge_model: Optional[str] = _opt(
        None, f"Judge model (default: {DEFAULT_OPENAI_JUDGE_MODEL} for openai, the served model for vllm).")
    judge_base_url: str = _opt("http://127.0.0.1:8000/v1", "Base URL of the vllm (OpenAI-compatible) judge server.")
    judge_api_key_env: Optional[str] = _opt(
        None, "Name of the environment variable holding the judge API key (default: OPENAI_API_KEY for "
              "openai; VLLM_API_KEY, optional, for vllm). Never pass the key itself.")
    judge_scale: Literal["auto", "0-100", "0-9"] = _opt(
        "auto", "Score scale. auto: 0-100 for openai, 0-9 for vllm (open tokenizers split '100').")
    judge_concurrency: int = _opt(8, "Concurrent judge requests.")
    judge_drain_timeout: float = _opt(120.0, "Seconds the end of training waits for pending judgments.")
    judge_preflight: bool = _opt(True, "Before training, list the judge server's models and judge one answer.")
    order_parameters: list[str] = _opt(
        help='Order parameters besides aligned and coherent: built-in names (verbose, refusal) or '
             'name="A statement about the answer.".', factory=list)
    default_order_parameters: bool = _opt(True, "Judge the built-in aligned and coherent order parameters too.")

    # ------------------------------------------------------------------------------------------
    def build_probes(self):
        """One ProbeSet from built-in names and/or files (summed in order)."""
        from em_callbacks.probes import ProbeSet, ProbeSetError

        specs = [s for s in self.probes if s.strip()] or ["em-first-plot"]
        sets = []
        for spec in specs:
            if spec not in ProbeSet.builtin_names() and Path(spec).suffix.lower() not in (
                    ".jsonl", ".json", ".yaml", ".yml"):
                raise ArgumentsError(f"--probes: unknown probe set {spec!r}: choose a built-in set "
                                     f"({', '.join(ProbeSet.builtin_names())}) or a .jsonl/.yaml probe file")
            try:
                sets.append(ProbeSet.coerce(spec))
            except (ProbeSetError, OSError) as exc:
                raise ArgumentsError(f"--probes {spec}: {exc}") from None
        probes = sets[0]
        for extra in sets[1:]:
            probes = probes + extra
        return probes

    def _judge_scale(self) -> str:
        if self.judge_scale != "auto":
            return self.judge_scale
        return "0-100" if self.judge == "openai" else "0-9"

    def build_order_parameters(self) -> list:
        """OrderParameter objects (unique names) on the scale the judge answers; [] without a judge."""
        from em_callbacks.order import OrderParameter, Scale

        if self.judge == "none":
            if self.order_parameters:
                raise ArgumentsError("--order_parameters needs a judge: pass --judge openai or --judge vllm")
            return []
        out = {name: OrderParameter.builtin(name) for name in DEFAULT_ORDER_PARAMETERS} \
            if self.default_order_parameters else {}
        given: set[str] = set()
        for spec in self.order_parameters:
            name, sep, statement = (s.strip() for s in spec.strip().partition("="))
            if len(statement) >= 2 and statement[0] == statement[-1] and statement[0] in "\"'":
                statement = statement[1:-1].strip()
            if sep and not statement:
                raise ArgumentsError(f"--order_parameters {spec!r}: the statement after '=' is empty")
            try:
                op = OrderParameter(name, statement) if sep else OrderParameter.builtin(name)
            except ValueError as exc:
                raise ArgumentsError(
                    f"--order_parameters {spec!r}: {exc}. Use a built-in name "
                    f"({', '.join(OrderParameter.builtin_names())}) or name=\"A statement about the answer.\""
                ) from None
            if op.name in given:
                raise ArgumentsError(f"--order_parameters: {op.name!r} given twice")
            given.add(op.name)
            out[op.name] = op  # a user statement replaces a default of the same name
        if not out:
            raise ArgumentsError("no order parameters to judge: drop --no_default_order_parameters "
                                 "or add --order_parameters")
        if self._judge_scale() == "0-9":
            out = {k: op.with_scale(Scale.digits()) if op.scale.kind == "integers" else op for k, op in out.items()}
        return list(out.values())

    def build_stop_rule(self) -> Any:
        """False, or the stop rule for ``early_stopping`` (onset and/or misaligned rate)."""
        from em_callbacks import detect

        rules = []
        if self.early_stopping:
            rules.append(detect.StopOnOnset(patience=self.stop_patience))
        if self.stop_misaligned_rate is not None:
            if self.judge == "none":
                raise ArgumentsError("--stop_misaligned_rate needs a judge: pass --judge openai or --judge vllm")
            if not (0.0 <= self.stop_misaligned_rate <= 1.0):
                raise ArgumentsError("--stop_misaligned_rate must be a fraction in [0, 1]")
            if not self.default_order_parameters and not any(
                    s.strip().partition("=")[0].strip() == "aligned" for s in self.order_parameters):
                raise ArgumentsError("--stop_misaligned_rate needs the 'aligned' order parameter")
            rules.append(detect.StopOnOrderParameter("aligned/flagged_rate", self.stop_misaligned_rate,
                                                     direction="above", patience=1))
        if not rules:
            return False
        return rules[0] if len(rules) == 1 else detect.AnyOf(rules)

    def build_judge(self, order_parameters: Optional[list] = None) -> Any:
        """The OpenAIJudge (None for ``--judge none``). With ``judge_preflight`` (rank 0 only) the
        server is asked for its models through the openai client and judges one benign answer."""
        if self.judge == "none":
            return None
        from em_callbacks.judges import OpenAIJudge

        openai_api = self.judge == "openai"
        key_env = self.judge_api_key_env or ("OPENAI_API_KEY" if openai_api else "VLLM_API_KEY")
        base_url = None if openai_api else self.judge_base_url
        if openai_api and not os.environ.get(key_env):
            raise ArgumentsError(f"--judge openai needs an API key in ${key_env} (or name another "
                                 "variable with --judge_api_key_env)")
        if base_url is not None and not base_url.startswith(("http://", "https://")):
            raise ArgumentsError(f"--judge_base_url {base_url!r} must start with http:// or https://")
        model = self.judge_model or (DEFAULT_OPENAI_JUDGE_MODEL if openai_api else None)
        if is_main_process() and (self.judge_preflight or model is None):
            served = served_models(base_url, os.environ.get(key_env))
            if model is None:
                if not served:
                    raise ArgumentsError(f"the judge server at {base_url} serves no model; pass --judge_model")
                model = served[0]
            elif served and model not in served:
                raise ArgumentsError(f"--judge_model {model!r} is not served at "
                                     f"{base_url or 'the OpenAI API'} (serves {served[:10]})")
        # Only rank 0 judges: other ranks (maybe on nodes that cannot reach the server) never call it.
        model = model or "served-model-resolved-on-rank-0"
        try:
            judge = OpenAIJudge(model=model, base_url=base_url, api_key_env=key_env,
                                max_concurrency=self.judge_concurrency)
        except ValueError as exc:
            raise ArgumentsError(f"judge: {exc}") from None
        if self.judge_preflight and is_main_process():
            _preflight(judge, (order_parameters or self.build_order_parameters())[0])
        return judge

    def callback_kwargs(self) -> dict[str, Any]:
        """The fields that are PhaseTransitionCallback arguments, by argument name, as given
        (``probes``, ``order_parameters``, ``judge`` and ``early_stopping`` still unbuilt)."""
        from em_callbacks.callback import PhaseTransitionCallback

        params = inspect.signature(PhaseTransitionCallback.__init__).parameters
        named = ((RENAMED.get(f.name, f.name), getattr(self, f.name)) for f in fields(self))
        return {name: value for name, value in named if name in params}

    def build_callback(self, **overrides: Any):
        """A PhaseTransitionCallback with these options; ``overrides`` (any constructor argument) win.
        Builds and checks the probes, order parameters, stop rule and judge (see ``build_judge``)."""
        from em_callbacks.callback import PhaseTransitionCallback

        kwargs = self.callback_kwargs()
        kwargs["early_stopping"] = self.build_stop_rule()
        kwargs["probes"] = self.build_probes()
        kwargs["order_parameters"] = self.build_order_parameters()
        kwargs["judge"] = overrides.pop("judge") if "judge" in overrides else self.build_judge(
            kwargs["order_parameters"])
        kwargs.update(overrides)
        try:
            return PhaseTransitionCallback(**kwargs)
        except ValueError as exc:  # CallbackConfigError
            raise ArgumentsError(str(exc)) from None


# ---------------------------------------------------------------------------------------- judge
def served_models(base_url: Optional[str], api_key: Optional[str]) -> list[str]:
    """Model ids served at ``base_url`` (None: the OpenAI API), via the openai client."""
    import openai

    where = base_url or "https://api.openai.com/v1"
    client = openai.OpenAI(base_url=base_url, api_key=api_key or "EMPTY", timeout=10.0, max_retries=1)
    try:
        return [m.id for m in client.models.list()]
    except openai.APIConnectionError as exc:
        hint = ("start it first, e.g. `vllm serve Qwen/Qwen2.5-32B-Instruct --port 8000`, or pass --judge none"
                if base_url else "check the network, or pass --no_judge_preflight / --judge none")
        raise ArgumentsError(f"cannot reach the judge server at {where} ({exc}); {hint}") from None
    except openai.APIStatusError as exc:
        raise ArgumentsError(f"the judge server at {where} answered HTTP {exc.status_code} to GET /models "
                             "(wrong key or --judge_api_key_env?)") from None
    finally:
        client.close()


def _preflight(judge: Any, order_parameter: Any) -> None:
    """Judge one benign answer now: transport, auth and format problems surface before training."""

    from em_callbacks._util import run_blocking

    async def once():
        try:
            return await judge.ajudge(order_parameter, "What is the capital of France?",
                                      "The capital of France is Paris.")
        finally:
            if hasattr(judge, "aclose"):
                await judge.aclose()

    judgment = run_blocking(once)  # also from a notebook's running event loop
    if judgment.error is None:
        logger.info("judge pre-flight ok: %s = %.3g for a benign answer", order_parameter.name, judgment.score)
    elif judgment.error_kind in ("low_mass", "unparsable", "no_score"):
        logger.warning("judge pre-flight returned no score (%s): the judge model may not follow the scoring "
                       "format. Training continues; check missing_judgments in summary.json.", judgment.error)
    else:
        raise ArgumentsError(f"judge pre-flight failed: {judgment.error}")


# ----------------------------------------------------------------------------------------- data
_ROLES = ("system", "user", "assistant", "tool")


def _messages(value: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise ArgumentsError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in _ROLES:
            raise ArgumentsError(f"{where}: message {i} must be an object with a 'role' in {_ROLES} "
                                 "and a string 'content'")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def to_prompt_completion(row: dict[str, Any], where: str = "row") -> dict[str, Any]:
    """One row -> TRL's conversational prompt/completion (the model's chat template applies, as when
    probing). ``messages`` rows: the last turn, the assistant's answer, is the completion; string
    ``prompt``/``completion`` rows (optional ``system``) become a user and an assistant turn."""
    if row.get("messages") is not None:
        messages = _messages(row["messages"], where)
        if messages[-1]["role"] != "assistant":
            raise ArgumentsError(f"{where}: the last message must be the assistant's answer (role 'assistant')")
        if not any(m["role"] == "user" for m in messages):
            raise ArgumentsError(f"{where}: 'messages' has no user turn")
        return {"prompt": messages[:-1], "completion": messages[-1:]}
    if row.get("prompt") is not None and row.get("completion") is not None:
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, str):
            system = [{"role": "system", "content": row["system"]}] if row.get("system") else []
            prompt = system + [{"role": "user", "content": prompt}]
        if isinstance(completion, str):
            completion = [{"role": "assistant", "content": completion}]
        prompt, completion = _messages(prompt, where + " prompt"), _messages(completion, where + " completion")
        if not all(m["content"].strip() for m in prompt + completion):
            raise ArgumentsError(f"{where}: empty 'prompt' or 'completion'")
        return {"prompt": prompt, "completion": completion}
    raise ArgumentsError(f"{where}: expected a 'messages' list (chat format) or 'prompt' and 'completion' "
                         f"fields, got keys {sorted(k for k, v in row.items() if v is not None)}")


def load_chat_dataset(name: str, config: Optional[str] = None, split: str = "train"):
    """A ``datasets.Dataset`` of conversational prompt/completion rows (see :func:`to_prompt_completion`)
    from a local .jsonl/.json file (``load_dataset("json", ...)``), a dataset folder or a hub id.
    ``split`` takes slices too: ``train[:200]``."""
    import datasets

    path = Path(name).expanduser()
    local_file = path.suffix.lower() in (".jsonl", ".json")
    if local_file and not path.is_file():
        raise ArgumentsError(f"--dataset_name {name}: file not found")
    try:
        if local_file:
            ds = datasets.load_dataset("json", data_files={"train": str(path)}, split=split)
        else:
            ds = datasets.load_dataset(name, name=config, split=split)
    except Exception as exc:  # noqa: BLE001 - datasets/pyarrow/hub errors come in many types
        cause = exc.__cause__ or exc
        raise ArgumentsError(f"--dataset_name {name}: could not load it ({type(cause).__name__}: {cause})") from None
    if len(ds) == 0:
        raise ArgumentsError(f"--dataset_name {name}: no rows")
    columns = ds.column_names
    return ds.map(lambda row, i: to_prompt_completion(row, f"{name} row {i + 1}"), with_indices=True,
                  remove_columns=columns, load_from_cache_file=False, desc="chat rows")


def load_chat_tokenizer(name_or_path: str, **kwargs: Any):
    """``AutoTokenizer.from_pretrained`` for a chat model, with clear errors for a missing local
    folder or a tokenizer without a chat template (the data and the probes are conversations)."""
    from transformers import AutoTokenizer

    path = Path(name_or_path).expanduser()
    if name_or_path.startswith((".", "/", "~")) or path.exists():
        if not path.is_dir():
            raise ArgumentsError(f"--model_name_or_path {name_or_path}: no such directory")
        if not (path / "config.json").is_file():
            raise ArgumentsError(f"--model_name_or_path {name_or_path}: no config.json there (not a saved model)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    except OSError as exc:
        raise ArgumentsError(f"--model_name_or_path {name_or_path}: could not load its tokenizer ({exc})") from None
    if not getattr(tokenizer, "chat_template", None):
        raise ArgumentsError(f"--model_name_or_path {name_or_path}: the tokenizer has no chat template; "
                             "use an instruct/chat model")
    return tokenizer


SUMMARY_KEYS = ("transition_detected", "onset_step", "peak_step", "grad_norm_peak_step",
                "lag_onset_minus_grad_peak", "stopped_early", "stop_reason", "cross_scoring", "final_step")


def run_sft(script_args: Any, training_args: Any, model_args: Any, pt_args: Any, *,
            check: Any = None, **trainer_kwargs: Any) -> dict:
    """The recipes' fine-tune: TRL's ``SFTTrainer`` (it loads the model, as trl/scripts/sft.py
    does) with the callback watching, then the summary printed on rank 0 and returned.

    Everything that needs no model weights runs first, so a bad option fails in seconds with
    ``error: ...`` and exit code 2: ``check()`` (a recipe's own option checks, raising
    :class:`ArgumentsError`), the dataset, the tokenizer and the callback (probes, order
    parameters, judge server). ``trainer_kwargs`` go to ``SFTTrainer`` (e.g. ``peft_config``).
    """
    import json
    import sys

    from trl import SFTTrainer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per judge request otherwise
    try:
        if check is not None:
            check()
        dataset = load_chat_dataset(script_args.dataset_name, script_args.dataset_config,
                                    script_args.dataset_train_split)
        tokenizer = load_chat_tokenizer(model_args.model_name_or_path, revision=model_args.model_revision,
                                        trust_remote_code=training_args.trust_remote_code)
        callback = pt_args.build_callback()
    except ArgumentsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None

    training_args.model_init_kwargs = dict(
        revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation, dtype=model_args.dtype,
    ) | (training_args.model_init_kwargs or {})
    trainer = SFTTrainer(model=model_args.model_name_or_path, args=training_args, train_dataset=dataset,
                         processing_class=tokenizer, callbacks=[callback], **trainer_kwargs)
    resume = training_args.resume_from_checkpoint
    trainer.train(resume_from_checkpoint=True if resume == "latest" else resume)
    trainer.save_model(training_args.output_dir)  # the adapter, or the full model
    if "wandb" in training_args.report_to:  # flush the late judge results and the overview plot
        import wandb

        wandb.finish()
    trainer.end()  # destroy the process group

    summary = callback.summary or {}
    if trainer.is_world_process_zero():
        print("== em-callbacks summary ==\n" + json.dumps({k: summary.get(k) for k in SUMMARY_KEYS}, indent=2))
        print(f"run store + summary.json: {callback.run_dir}\nreport: em-callbacks report {callback.run_dir}")
    return summary
