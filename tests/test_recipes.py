"""Smoke tests of the fine-tuning recipes in recipes/, end to end on CPU.

Each recipe trains a tiny GPT-2 (saved to a temp dir, nothing downloaded) for 4 steps on the
shipped sample dataset with probing every 2 steps, in-process through its typer app (one
import of torch/transformers/trl for the whole file). Bad input is checked to fail fast,
before any model is loaded; one of those checks runs the script as a real subprocess.

The multi-process (accelerate launch, 2 CPU processes, gloo) smoke test is opt-in:
EM_CALLBACKS_TEST_DISTRIBUTED=1 (it costs two more interpreter start-ups).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
SAMPLE = RECIPES / "data" / "bad_medical_advice_sample.jsonl"
SUMMARY_KEYS = {
    "transition_detected", "onset_step", "peak_step", "grad_norm_peak_step", "stopped_early",
    "every_n_steps", "cross_scoring", "probe_steps", "final_step",
}
TINY_ARGS = [
    "--max-steps", "4", "--every-n-steps", "2", "--samples-per-prompt", "2", "--max-new-tokens", "6",
    "--max-length", "96", "--batch-size", "2", "--grad-accum", "1", "--lr", "1e-3", "--warmup-steps", "0",
    "--probe-batch-size", "16",
]


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


def _invoke(module, args):
    from typer.testing import CliRunner

    t0 = time.perf_counter()
    result = CliRunner().invoke(module.app, [str(a) for a in args], catch_exceptions=False)
    return result, time.perf_counter() - t0


def _output(result) -> str:
    out = result.output
    try:
        out += result.stderr
    except (ValueError, AttributeError):
        pass
    return out


def _check_run(out_dir: Path, probe_steps=(0, 2, 4)) -> tuple[dict, sqlite3.Connection]:
    run_dir = out_dir / "phase_transition"
    assert (run_dir / "run.sqlite").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary), SUMMARY_KEYS - set(summary)
    assert summary["probe_steps"] == list(probe_steps)
    assert summary["every_n_steps"] == 2 and summary["final_step"] == 4
    assert summary["stopped_early"] is False
    config = json.loads((out_dir / "recipe_config.json").read_text())
    assert config["max_steps"] == 4
    db = sqlite3.connect(run_dir / "run.sqlite")
    n_prompts = db.execute("select count(*) from prompts").fetchone()[0]
    assert db.execute("select count(*) from samples").fetchone()[0] == n_prompts * 2 * len(probe_steps)
    metrics = {row[0] for row in db.execute("select name from metrics")}
    assert "D/tv" in metrics
    assert db.execute("select count(*) from grad_norms").fetchone()[0] == 4
    return summary, db


def test_lora_recipe_no_judge(lora_recipe, tiny_model_dir, tmp_path):
    out = tmp_path / "lora"
    result, seconds = _invoke(lora_recipe, [
        "--model", tiny_model_dir, "--dataset", SAMPLE, "--output-dir", out, "--judge", "none",
        "--lora-r", "4", "--lora-alpha", "8", "--probes", "em-first-plot", *TINY_ARGS,
    ])
    assert result.exit_code == 0, _output(result)
    summary, db = _check_run(out)
    assert summary["cross_scoring"] == "snapshot"  # LoRA: old adapters are kept for two-sided estimates
    assert {"D/tv", "D/js", "D/linear"} <= {row[0] for row in db.execute("select name from metrics")}
    assert db.execute("select count(*) from judgments").fetchone()[0] == 0
    assert (out / "adapter_model.safetensors").is_file()
    assert "em-callbacks summary" in result.output
    print(f"lora/no-judge run: {seconds:.1f} s")


def test_lora_recipe_with_local_openai_wire_judge(lora_recipe, tiny_model_dir, tmp_path, offline_wandb_dir):
    """--judge vllm against a real HTTP server on 127.0.0.1 (OpenAI wire format, logprobs),
    logging to an offline W&B run whose keys are the ones recipes/README.md documents."""
    wire = pytest.importorskip("openai_wire_server")
    wandb_offline = pytest.importorskip("wandb_offline")
    server = wire.WireServer().start()
    try:
        out = tmp_path / "lora-judged"
        custom = 'medical="The answer gives medical advice."'
        result, seconds = _invoke(lora_recipe, [
            "--model", tiny_model_dir, "--dataset", SAMPLE, "--output-dir", out,
            "--judge", "vllm", "--judge-base-url", server.url, "--order-parameter", custom,
            "--probes", RECIPES / "data" / "medical_probes.jsonl", "--no-save-final",
            "--report-to", "wandb", "--run-name", "recipe-smoke", *TINY_ARGS,
        ])
        assert result.exit_code == 0, _output(result)
        assert "judge pre-flight ok" in result.output
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
    # vLLM judges answer on 0-9 (Qwen-style tokenizers split "100"): every request asks for a digit.
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


def test_full_finetune_recipe_with_snapshots(full_recipe, tiny_model_dir, tmp_path):
    out = tmp_path / "full"
    result, seconds = _invoke(full_recipe, [
        "--model", tiny_model_dir, "--dataset", SAMPLE, "--output-dir", out, "--snapshot-full-model",
        "--full-sequence-loss", *TINY_ARGS,
    ])
    assert result.exit_code == 0, _output(result)
    summary, db = _check_run(out)
    assert summary["cross_scoring"] == "snapshot"
    assert {"D/tv", "D/js", "D/linear"} <= {row[0] for row in db.execute("select name from metrics")}
    assert (out / "model.safetensors").is_file()
    print(f"full fine-tune run: {seconds:.1f} s")


# ------------------------------------------------------------------------------- fail fast
def test_missing_dataset_fails_fast_from_the_command_line(tiny_model_dir, tmp_path):
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(RECIPES / "sft_lora_bad_advice.py"), "--model", str(tiny_model_dir),
         "--dataset", str(tmp_path / "nope.jsonl"), "--output-dir", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": ""},
    )
    seconds = time.perf_counter() - t0
    assert proc.returncode == 2, proc.stderr
    assert "nope.jsonl: file not found" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()
    print(f"fail-fast subprocess: {seconds:.1f} s")


def _bad_jsonl(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", [
    "unknown_probe_set", "missing_probe_file", "bad_json", "bad_row", "no_assistant_answer",
    "order_parameter_without_judge", "bad_order_parameter_name", "vllm_unreachable", "missing_model_dir",
    "openai_without_key",
])
def test_bad_input_fails_fast_with_a_clear_message(lora_recipe, tiny_model_dir, tmp_path, monkeypatch, case):
    args = ["--model", tiny_model_dir, "--dataset", SAMPLE, "--output-dir", tmp_path / "o"]
    expect = {
        "unknown_probe_set": (["--probes", "no-such-set"], "unknown probe set 'no-such-set'"),
        "missing_probe_file": (["--probes", tmp_path / "missing.jsonl"], "does not exist"),
        "bad_json": ([], "bad.jsonl:2: invalid JSON"),
        "bad_row": ([], "expected a 'messages' list"),
        "no_assistant_answer": ([], "last message must be the assistant"),
        "order_parameter_without_judge": (["--order-parameter", "verbose"], "needs a judge"),
        "bad_order_parameter_name": (["--judge", "vllm", "--order-parameter", "Bad Name=x"], "must be a slug"),
        "vllm_unreachable": (["--judge", "vllm", "--judge-base-url", "http://127.0.0.1:9/v1"],
                             "cannot reach the judge server"),
        "missing_model_dir": (["--model", tmp_path / "no-model"], "no such directory"),
        "openai_without_key": (["--judge", "openai"], "OPENAI_API_KEY"),
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
    if case == "missing_model_dir":
        args = extra + args[2:]
    else:
        args += extra
    result, seconds = _invoke(lora_recipe, args)
    assert result.exit_code == 2, _output(result)
    assert message in _output(result)
    assert seconds < 15
    assert not (tmp_path / "o").exists()


def test_dataset_formats_normalise_to_conversational_prompt_completion(lora_recipe):
    import recipe_common as rc

    messages = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                             {"role": "assistant", "content": "a"}]}
    row = rc.normalize_row(messages, "row 1", completion_only_loss=True)
    assert row == {"prompt": messages["messages"][:2], "completion": messages["messages"][2:]}
    assert rc.normalize_row(messages, "row 1", completion_only_loss=False) == messages
    row = rc.normalize_row({"prompt": "q", "completion": "a"}, "row 1", completion_only_loss=True)
    assert row == {"prompt": [{"role": "user", "content": "q"}],
                   "completion": [{"role": "assistant", "content": "a"}]}
    from em_callbacks import detect

    cfg = rc.RecipeConfig(mode="lora", model="m", dataset="d", output_dir=Path("o"), early_stopping=True,
                          stop_patience=1, stop_misaligned_rate=0.2)
    rule = rc.build_stop_rule(cfg)
    assert isinstance(rule, detect.AnyOf) and len(rule.rules) == 2
    assert rc.build_stop_rule(dataclasses.replace(cfg, early_stopping=False, stop_misaligned_rate=None)) is False
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    assert 15 <= len(rows) <= 30
    for i, r in enumerate(rows):
        rc.normalize_row(r, f"row {i}", completion_only_loss=True)


def test_readme_commands_use_real_options(lora_recipe, full_recipe):
    """Every --flag the README passes to a recipe script exists on that script."""
    import typer

    readme = (RECIPES / "README.md").read_text()
    options = {}
    for name, module in (("sft_lora_bad_advice.py", lora_recipe), ("full_finetune.py", full_recipe)):
        command = typer.main.get_command(module.app)
        options[name] = {"--help"} | {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)}
    commands = re.findall(r"recipes/(sft_lora_bad_advice\.py|full_finetune\.py)((?:\\\n|[^\n])*)", readme)
    assert len(commands) >= 8
    assert sum(tail.count("--") for _, tail in commands) >= 40  # continuation lines are followed
    for script, tail in commands:
        for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", tail):
            assert flag in options[script], f"README passes unknown option {flag} to {script}"
    config = (RECIPES / "accelerate_multi_gpu.yaml").read_text()
    assert "distributed_type: MULTI_GPU" in config and "mixed_precision: 'no'" in config


@pytest.mark.skipif(os.environ.get("EM_CALLBACKS_TEST_DISTRIBUTED") != "1",
                    reason="opt-in: EM_CALLBACKS_TEST_DISTRIBUTED=1 (spawns 2 processes)")
def test_lora_recipe_under_accelerate_launch_two_cpu_processes(tiny_model_dir, tmp_path):
    out = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         str(RECIPES / "sft_lora_bad_advice.py"), "--model", str(tiny_model_dir), "--dataset", str(SAMPLE),
         "--output-dir", str(out), "--lora-r", "4", *TINY_ARGS],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    summary, _ = _check_run(out)
    assert summary["cross_scoring"] == "snapshot"
