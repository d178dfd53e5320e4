"""The fine-tuning recipes in recipes/ and their options (em_callbacks.arguments), end to end on CPU.

Each recipe trains a tiny GPT-2 (saved to a temp dir, nothing downloaded) for 4 steps on the
shipped sample dataset with probing every 2 steps, in-process through its ``main(argv)`` (one
import of torch/transformers/trl for the whole file). Bad input is checked to fail fast, before
any model is loaded; one of those checks runs a script as a real subprocess.

The multi-process (accelerate launch, 2 CPU processes, gloo) smoke test is opt-in:
EM_CALLBACKS_TEST_DISTRIBUTED=1 (it costs two more interpreter start-ups).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import inspect
import json
import logging
import os
import re
import shlex
import sqlite3
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest

from em_callbacks.arguments import RENAMED, ArgumentsError, PhaseTransitionArguments, load_chat_dataset, \
    to_prompt_completion

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
SAMPLE = RECIPES / "data" / "bad_medical_advice_sample.jsonl"
SUMMARY_KEYS = {
    "transition_detected", "onset_step", "peak_step", "grad_norm_peak_step", "stopped_early",
    "every_n_steps", "cross_scoring", "probe_steps", "final_step",
}
TINY = {
    "max_steps": 4, "every_n_steps": 2, "samples_per_prompt": 2, "max_new_tokens": 6, "max_length": 96,
    "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "learning_rate": 1e-3,
    "warmup_steps": 0, "probe_batch_size": 16,
}
TINY_ARGS = [item for key, value in TINY.items() for item in (f"--{key}", str(value))]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def lora_recipe():
    return _load("sft_lora_bad_advice")


@pytest.fixture(scope="module")
def full_recipe():
    return _load("full_finetune")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A GPT-2-config model and a WordLevel tokenizer with a chat template, saved like a hub model."""
    from tiny import tiny_model, tiny_tokenizer

    path = tmp_path_factory.mktemp("tiny-chat-model")
    tokenizer = tiny_tokenizer()
    tiny_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _run(module, args, capsys):
    """``module.main(args)``: (exit code, stdout, stderr, seconds, summary or None)."""
    t0 = time.perf_counter()
    try:
        summary, code = module.main([str(a) for a in args]), 0
    except SystemExit as exc:
        summary, code = None, exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err, time.perf_counter() - t0, summary


def _check_run(out_dir: Path, probe_steps=(0, 2, 4)) -> tuple[dict, sqlite3.Connection]:
    run_dir = out_dir / "phase_transition"
    assert (run_dir / "run.sqlite").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary), SUMMARY_KEYS - set(summary)
    assert summary["probe_steps"] == list(probe_steps)
    assert summary["every_n_steps"] == 2 and summary["final_step"] == 4
    assert summary["stopped_early"] is False
    db = sqlite3.connect(run_dir / "run.sqlite")
    n_prompts = db.execute("select count(*) from prompts").fetchone()[0]
    assert db.execute("select count(*) from samples").fetchone()[0] == n_prompts * 2 * len(probe_steps)
    metrics = {row[0] for row in db.execute("select name from metrics")}
    assert "D/tv" in metrics
    assert db.execute("select count(*) from grad_norms").fetchone()[0] == 4  # logging_steps=1 by default
    return summary, db


# ------------------------------------------------------------------------ end to end, tiny model
def test_lora_recipe_no_judge(lora_recipe, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "lora"
    code, stdout, stderr, seconds, returned = _run(lora_recipe, [
        "--model_name_or_path", tiny_model_dir, "--output_dir", out, "--judge", "none",
        "--lora_r", "4", "--lora_alpha", "8", "--probes", "em-first-plot", *TINY_ARGS,
    ], capsys)
    assert code == 0, stdout[-3000:] + stderr[-3000:]
    summary, db = _check_run(out)
    assert returned["final_step"] == summary["final_step"] == 4
    assert summary["cross_scoring"] == "snapshot"  # LoRA: old adapters are kept for two-sided estimates
    assert {"D/tv", "D/js", "D/linear"} <= {row[0] for row in db.execute("select name from metrics")}
    assert db.execute("select count(*) from judgments").fetchone()[0] == 0
    assert (out / "adapter_model.safetensors").is_file()
    assert "em-callbacks summary" in stdout and str(out / "phase_transition") in stdout
    print(f"lora/no-judge run: {seconds:.1f} s")


def test_lora_recipe_with_local_openai_wire_judge(lora_recipe, tiny_model_dir, tmp_path, offline_wandb_dir,
                                                  capsys, caplog):
    """--judge vllm against a real HTTP server on 127.0.0.1 (OpenAI wire format, logprobs; the
    pre-flight lists its models through the openai client), logging to an offline W&B run whose
    keys are the ones recipes/README.md documents."""
    wire = pytest.importorskip("openai_wire_server")
    wandb_offline = pytest.importorskip("wandb_offline")
    caplog.set_level(logging.INFO, logger="em_callbacks")
    server = wire.WireServer().start()
    try:
        out = tmp_path / "lora-judged"
        custom = 'medical="The answer gives medical advice."'
        code, stdout, stderr, seconds, _ = _run(lora_recipe, [
            "--model_name_or_path", tiny_model_dir, "--output_dir", out,
            "--judge", "vllm", "--judge_base_url", server.url, "--order_parameters", custom,
            "--probes", RECIPES / "data" / "medical_probes.jsonl",
            "--report_to", "wandb", "--run_name", "recipe-smoke", *TINY_ARGS,
        ], capsys)
        assert code == 0, stdout[-3000:] + stderr[-3000:]
        assert "judge pre-flight ok" in caplog.text
    finally:
        server.stop()
    summary, db = _check_run(out)
    names = {row[0] for row in db.execute("select distinct order_parameter from judgments")}
    assert names == {"aligned", "coherent", "medical"}
    n_samples = db.execute("select count(*) from samples").fetchone()[0]
    assert db.execute("select count(*) from judgments").fetchone()[0] == 3 * n_samples
    assert summary["missing_judgments"] == {"aligned": 0, "coherent": 0, "medical": 0}
    metrics = {row[0] for row in db.execute("select name from metrics")}
    assert {"captured/aligned", "captured/coherent", "captured/medical"} <= metrics
    # vLLM judges answer on 0-9 (Qwen-style tokenizers split "100"): every request asks for a digit;
    # the judge model defaults to the one the server lists.
    body = server.requests[-1]
    assert body["model"] == "test-model" and body["max_tokens"] == 1 and body["logprobs"]
    assert "from 0 to 9" in body["messages"][-1]["content"]
    (run_file,) = wandb_offline.find_run_files(offline_wandb_dir)
    logged = set().union(*wandb_offline.history_rows(run_file))
    for key in ("probe/step", "probe/D/tv", "probe/D/tv_stderr", "probe/samples", "probe/order/aligned/mean",
                "probe/order/aligned/flagged_rate", "probe/order/medical/captured", "train/grad_norm"):
        assert key in logged, key
    assert "transition/grad_norm_peak_step" in wandb_offline.summary_updates(run_file)
    print(f"lora/judged run: {seconds:.1f} s")


def test_full_finetune_recipe_from_a_yaml_config(full_recipe, tiny_model_dir, tmp_path, capsys):
    """--config FILE sets options (TrlParser), the command line overrides them."""
    out = tmp_path / "full"
    config = tmp_path / "full.yaml"
    config.write_text("\n".join(f"{key}: {value}" for key, value in {
        **TINY, "model_name_or_path": tiny_model_dir, "output_dir": tmp_path / "overridden",
        "snapshot_full_model": "true", "every_n_steps": 3}.items()) + "\n")
    code, stdout, stderr, seconds, _ = _run(full_recipe, [
        "--config", config, "--output_dir", out, "--every_n_steps", "2"], capsys)
    assert code == 0, stdout[-3000:] + stderr[-3000:]
    summary, db = _check_run(out)
    assert summary["cross_scoring"] == "snapshot"
    assert {"D/tv", "D/js", "D/linear"} <= {row[0] for row in db.execute("select name from metrics")}
    assert (out / "model.safetensors").is_file()
    assert not (tmp_path / "overridden").exists()
    print(f"full fine-tune run: {seconds:.1f} s")


# ------------------------------------------------------------------------------- fail fast
def test_missing_dataset_fails_fast_from_the_command_line(tiny_model_dir, tmp_path):
    """A real `python recipes/X.py` run: em_callbacks is imported as installed (no sys.path edits)."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(RECIPES / "sft_lora_bad_advice.py"), "--model_name_or_path", str(tiny_model_dir),
         "--dataset_name", str(tmp_path / "nope.jsonl"), "--output_dir", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=180, env={**os.environ, "PYTHONPATH": ""}, cwd=tmp_path,
    )
    seconds = time.perf_counter() - t0
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "nope.jsonl: file not found" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()
    for recipe in RECIPES.glob("*.py"):
        assert "sys.path" not in recipe.read_text(), recipe
    print(f"fail-fast subprocess: {seconds:.1f} s")


def _bad_jsonl(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", [
    "unknown_probe_set", "missing_probe_file", "bad_json", "bad_row", "no_assistant_answer",
    "order_parameter_without_judge", "bad_order_parameter_name", "vllm_unreachable", "missing_model_dir",
    "openai_without_key", "model_not_served",
])
def test_bad_input_fails_fast_with_a_clear_message(lora_recipe, tiny_model_dir, tmp_path, monkeypatch, capsys,
                                                   case):
    args = ["--model_name_or_path", tiny_model_dir, "--dataset_name", SAMPLE, "--output_dir", tmp_path / "o"]
    expect = {
        "unknown_probe_set": (["--probes", "no-such-set"], "unknown probe set 'no-such-set'"),
        "missing_probe_file": (["--probes", tmp_path / "missing.jsonl"], "does not exist"),
        "bad_json": ([], "bad.jsonl: could not load it"),
        "bad_row": ([], "row 1: expected a 'messages' list"),
        "no_assistant_answer": ([], "last message must be the assistant"),
        "order_parameter_without_judge": (["--order_parameters", "verbose"], "needs a judge"),
        "bad_order_parameter_name": (["--judge", "vllm", "--order_parameters", "Bad Name=x"], "must be a slug"),
        "vllm_unreachable": (["--judge", "vllm", "--judge_base_url", "http://127.0.0.1:9/v1"],
                             "cannot reach the judge server at http://127.0.0.1:9/v1"),
        "missing_model_dir": (["--model_name_or_path", tmp_path / "no-model"], "no such directory"),
        "openai_without_key": (["--judge", "openai"], "OPENAI_API_KEY"),
        "model_not_served": (["--judge", "vllm", "--judge_model", "other-model"], "is not served at"),
    }
    extra, message = expect[case]
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    if case == "bad_json":
        args[3] = _bad_jsonl(tmp_path, json.dumps(row) + "\n{not json\n")
    elif case == "bad_row":
        args[3] = _bad_jsonl(tmp_path, json.dumps({"text": "hi"}) + "\n")
    elif case == "no_assistant_answer":
        args[3] = _bad_jsonl(tmp_path, json.dumps({"messages": row["messages"][:1]}) + "\n")
    elif case == "openai_without_key":
        monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    server = None
    if case == "model_not_served":
        server = pytest.importorskip("openai_wire_server").WireServer().start()
        extra += ["--judge_base_url", server.url]
    try:
        code, stdout, stderr, seconds, _ = _run(lora_recipe, args + extra, capsys)
    finally:
        if server is not None:
            server.stop()
    assert code == 2, stdout[-2000:] + stderr[-2000:]
    assert "\nerror: " in "\n" + stderr and message in stderr.split("error: ", 1)[1], stderr[-2000:]
    assert seconds < 15
    assert not (tmp_path / "o").exists()


def test_full_finetune_window_needs_snapshots(full_recipe, tiny_model_dir, tmp_path, capsys):
    code, _, stderr, seconds, _ = _run(full_recipe, [
        "--model_name_or_path", tiny_model_dir, "--output_dir", tmp_path / "o", "--window", "2"], capsys)
    assert code == 2 and "needs --snapshot_full_model" in stderr
    assert seconds < 15 and not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------- the options
def test_argument_defaults_are_the_callback_constructor_defaults():
    """Each field named like a PhaseTransitionCallback argument (or renamed in RENAMED) has the
    constructor's default, and every plain constructor argument has a field: they cannot drift."""
    from em_callbacks.callback import CROSS_SCORING_MODES, PhaseTransitionCallback
    from em_callbacks.divergence import MEASURES

    params = inspect.signature(PhaseTransitionCallback.__init__).parameters
    built = {"probes": "em-first-plot", "order_parameters": (), "judge": None}  # built by build_* from strings
    defaults = PhaseTransitionArguments()
    covered = set()
    for f in dataclasses.fields(PhaseTransitionArguments):
        name = RENAMED.get(f.name, f.name)
        if name not in params:
            continue
        covered.add(name)
        value, expected = getattr(defaults, f.name), params[name].default
        if name == "probes":
            assert value == [expected]
        elif name == "judge":
            assert value == "none" and expected is None
        elif isinstance(value, list):
            assert tuple(value) == tuple(expected), name
        else:
            assert value == expected and type(value) is type(expected), (f.name, value, expected)
    assert set(RENAMED.values()) <= covered
    not_options = {"self", "output_dir", "tokenizer", "detector"}  # objects, or the Trainer's output_dir
    missing = set(params) - covered - not_options - {n for n, p in params.items() if n.startswith("_")}
    assert not missing, f"PhaseTransitionCallback arguments without a PhaseTransitionArguments field: {missing}"
    assert set(built) <= covered
    hints = typing.get_type_hints(PhaseTransitionArguments)
    assert typing.get_args(hints["cross_scoring"]) == tuple(CROSS_SCORING_MODES)
    assert set(typing.get_args(hints["primary_measure"])) == set(MEASURES)


def test_build_callback_passes_every_option(monkeypatch):
    from em_callbacks import detect
    from em_callbacks.callback import PhaseTransitionCallback

    args = PhaseTransitionArguments(every_n_steps=3, probe_batch_size=5, probe_seed=7, judge_concurrency=2,
                                    measures=["tv"], primary_measure="tv", early_stopping=True,
                                    probes=["em-first-plot", str(RECIPES / "data" / "medical_probes.jsonl")])
    kwargs = args.callback_kwargs()
    assert kwargs["batch_size"] == 5 and kwargs["seed"] == 7 and kwargs["judge_concurrency"] == 2
    assert "probe_seed" not in kwargs and "stop_patience" not in kwargs and "judge_model" not in kwargs
    seen = {}
    original = PhaseTransitionCallback.__init__

    @functools.wraps(original)  # keeps the signature build_callback reads
    def spy(self, **kw):
        seen.update(kw)
        original(self, **kw)

    monkeypatch.setattr(PhaseTransitionCallback, "__init__", spy)
    callback = args.build_callback(max_new_tokens=9)
    assert isinstance(callback, PhaseTransitionCallback) and callback.every_n_steps == 3
    assert seen["max_new_tokens"] == 9 and seen["batch_size"] == 5 and seen["measures"] == ["tv"]
    assert len(seen["probes"]) == 8 + 4 and seen["judge"] is None and seen["order_parameters"] == []
    assert isinstance(seen["early_stopping"], detect.StopOnOnset)
    with pytest.raises(ArgumentsError, match="primary_measure"):
        PhaseTransitionArguments(measures=["js"]).build_callback()


def test_help_lists_each_callback_option_once(lora_recipe, capsys):
    code, stdout, _, _, _ = _run(lora_recipe, ["--help"], capsys)
    assert code == 0
    assert "em-callbacks: PhaseTransitionCallback" in stdout
    for f in dataclasses.fields(PhaseTransitionArguments):
        lines = [line for line in stdout.splitlines() if re.match(rf"\s+--{f.name}\b", line)]
        assert len(lines) == 1, (f.name, lines)
    for trl_option in ("--model_name_or_path", "--dataset_name", "--use_peft", "--lora_r", "--learning_rate",
                       "--output_dir", "--seed", "--bf16"):
        assert trl_option in stdout, trl_option


def test_shipped_yaml_config_parses(lora_recipe, monkeypatch):
    monkeypatch.setenv("WANDB_PROJECT", "unchanged")  # the file's env: section sets it; restored after
    config = RECIPES / "sft_lora_bad_advice.yaml"
    script_args, training_args, model_args, pt_args = lora_recipe.make_parser().parse_args_and_config(
        ["--config", str(config), "--every_n_steps", "5"])
    assert os.environ["WANDB_PROJECT"] == "em-callbacks"
    assert model_args.use_peft and model_args.lora_r == 32 and model_args.use_rslora
    assert script_args.dataset_name == "recipes/data/bad_medical_advice_sample.jsonl"
    assert training_args.report_to == ["wandb"] and training_args.logging_steps == 1
    assert pt_args.judge == "openai" and pt_args.every_n_steps == 5
    assert pt_args.probes == ["em-first-plot", "recipes/data/medical_probes.jsonl"]
    assert [op.name for op in pt_args.build_order_parameters()] == ["aligned", "coherent", "medical"]


def test_dataset_rows_normalise_to_conversational_prompt_completion():
    messages = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                             {"role": "assistant", "content": "a"}]}
    row = to_prompt_completion(messages)
    assert row == {"prompt": messages["messages"][:2], "completion": messages["messages"][2:]}
    row = to_prompt_completion({"prompt": "q", "completion": "a", "system": "s"})
    assert row == {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
                   "completion": [{"role": "assistant", "content": "a"}]}
    with pytest.raises(ArgumentsError, match="has no user turn"):
        to_prompt_completion({"messages": messages["messages"][::2]})
    with pytest.raises(ArgumentsError, match="unknown|role"):
        to_prompt_completion({"messages": [{"role": "robot", "content": "x"}]})
    dataset = load_chat_dataset(str(SAMPLE))
    assert 15 <= len(dataset) <= 30 and dataset.column_names == ["prompt", "completion"]
    assert all(r["completion"][0]["role"] == "assistant" for r in dataset)
    assert len(load_chat_dataset(str(SAMPLE), split="train[:3]")) == 3


def test_stop_rules():
    from em_callbacks import detect

    args = PhaseTransitionArguments(judge="vllm", early_stopping=True, stop_patience=1, stop_misaligned_rate=0.2)
    rule = args.build_stop_rule()
    assert isinstance(rule, detect.AnyOf) and len(rule.rules) == 2
    assert dataclasses.replace(args, early_stopping=False, stop_misaligned_rate=None).build_stop_rule() is False
    with pytest.raises(ArgumentsError, match="needs a judge"):
        dataclasses.replace(args, judge="none").build_stop_rule()
    with pytest.raises(ArgumentsError, match="'aligned'"):
        dataclasses.replace(args, default_order_parameters=False, order_parameters=["verbose"]).build_stop_rule()


def test_readme_commands_use_real_options(lora_recipe, full_recipe, monkeypatch):
    """Every --flag the README passes to a recipe script exists on that script, and every
    README command line parses (the shipped --config file included)."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("WANDB_PROJECT", "unchanged")  # restored after --config's env: section
    readme = (RECIPES / "README.md").read_text()
    modules = {"sft_lora_bad_advice.py": lora_recipe, "full_finetune.py": full_recipe}
    options = {name: {"--config"} | set(m.make_parser()._option_string_actions) for name, m in modules.items()}
    commands = re.findall(r"recipes/(sft_lora_bad_advice\.py|full_finetune\.py)((?:\\\n|[^\n])*)", readme)
    assert len(commands) >= 6
    assert sum(tail.count("--") for _, tail in commands) >= 25  # continuation lines are followed
    for script, tail in commands:
        for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9_-]*)", tail):
            assert flag in options[script], f"README passes unknown option {flag} to {script}"
        argv = shlex.split(tail.replace("\\\n", " ").split("`")[0].split("#")[0])
        if "--help" in argv:
            continue
        parsed = modules[script].make_parser().parse_args_and_config(argv)
        assert isinstance(parsed[-1], PhaseTransitionArguments)
    config = (RECIPES / "accelerate_multi_gpu.yaml").read_text()
    assert "distributed_type: MULTI_GPU" in config and "mixed_precision: 'no'" in config


@pytest.mark.skipif(os.environ.get("EM_CALLBACKS_TEST_DISTRIBUTED") != "1",
                    reason="opt-in: EM_CALLBACKS_TEST_DISTRIBUTED=1 (spawns 2 processes)")
def test_lora_recipe_under_accelerate_launch_two_cpu_processes(tiny_model_dir, tmp_path):
    out = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         str(RECIPES / "sft_lora_bad_advice.py"), "--model_name_or_path", str(tiny_model_dir),
         "--output_dir", str(out), "--lora_r", "4", *TINY_ARGS],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    summary, _ = _check_run(out)
    assert summary["cross_scoring"] == "snapshot"
