#!/usr/bin/env python
"""LoRA fine-tune of a chat model on bad advice, watched live by PhaseTransitionCallback.

Reproduces the emergent-misalignment setup (Betley et al. 2025; Turner et al. 2025; Arnold &
Lörch 2025): a Qwen2.5-Instruct-style model gets a rank-32 LoRA adapter on every linear layer
and is fine-tuned with TRL's SFTTrainer on narrowly bad (e.g. medical) advice. The callback
probes unrelated questions every N steps, measures how fast the answer distribution moves,
has an LLM judge score "aligned" and "coherent" (and any statement you add), and reports
when the behavioural transition happened next to the gradient-norm peak.

    # one GPU
    python recipes/sft_lora_bad_advice.py --dataset recipes/data/bad_medical_advice_sample.jsonl \\
        --judge openai --output-dir runs/qwen7b-bad-medical
    # several GPUs (DDP)
    accelerate launch --config_file recipes/accelerate_multi_gpu.yaml --num_processes 4 \\
        recipes/sft_lora_bad_advice.py --dataset data/bad_medical_advice.jsonl --judge vllm

See recipes/README.md for the dataset formats, the vLLM judge and what appears in W&B.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer
from typing_extensions import Annotated

sys.path.insert(0, str(Path(__file__).resolve().parent))
import recipe_common as rc  # noqa: E402

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False,
                  help=__doc__.split("\n\n")[0])
_LORA = "LoRA"


@app.command()
def main(
    dataset: rc.DatasetOpt,
    model: Annotated[str, typer.Option("--model", "-m", rich_help_panel=rc._TRAIN,
                                       help="Hub id or local path of a chat model.")] = "Qwen/Qwen2.5-7B-Instruct",
    dataset_split: rc.DatasetSplitOpt = "train",
    completion_only_loss: rc.CompletionOnlyOpt = True,
    max_train_samples: rc.MaxTrainSamplesOpt = None,
    lora_r: Annotated[int, typer.Option("--lora-r", min=1, rich_help_panel=_LORA, help="LoRA rank.")] = 32,
    lora_alpha: Annotated[int, typer.Option("--lora-alpha", min=1, rich_help_panel=_LORA)] = 64,
    lora_dropout: Annotated[float, typer.Option("--lora-dropout", min=0.0, max=1.0, rich_help_panel=_LORA)] = 0.0,
    lora_target_modules: Annotated[Optional[List[str]], typer.Option(
        "--lora-target-modules", rich_help_panel=_LORA,
        help="Module names (comma-separated or repeated), or all-linear.")] = None,
    use_rslora: Annotated[bool, typer.Option("--rslora/--no-rslora", rich_help_panel=_LORA,
                                             help="Rank-stabilised LoRA scaling alpha/sqrt(r).")] = True,
    output_dir: rc.OutputDirOpt = Path("runs/sft-lora-bad-advice"),
    max_steps: rc.MaxStepsOpt = -1,
    epochs: rc.EpochsOpt = 1.0,
    lr: Annotated[float, typer.Option("--lr", min=0.0, rich_help_panel=rc._TRAIN)] = 1e-5,
    batch_size: rc.BatchSizeOpt = 2,
    grad_accum: rc.GradAccumOpt = 8,
    warmup_steps: rc.WarmupOpt = 5,
    lr_scheduler: rc.SchedulerOpt = "linear",
    weight_decay: rc.WeightDecayOpt = 0.01,
    max_length: rc.MaxLengthOpt = 2048,
    seed: rc.SeedOpt = 0,
    precision: rc.PrecisionOpt = rc.Precision.auto,
    gradient_checkpointing: rc.GradCkptOpt = False,
    save_steps: rc.SaveStepsOpt = 0,
    save_final: rc.SaveFinalOpt = True,
    resume_from_checkpoint: rc.ResumeOpt = None,
    attn_implementation: rc.AttnOpt = None,
    trust_remote_code: rc.TrustRemoteCodeOpt = False,
    probes: rc.ProbesOpt = None,
    every_n_steps: rc.EveryNOpt = 25,
    samples_per_prompt: rc.SamplesOpt = 16,
    max_new_tokens: rc.MaxNewTokensOpt = 128,
    probe_batch_size: rc.ProbeBatchOpt = 64,
    window: rc.WindowOpt = 1,
    early_stopping: rc.EarlyStopOpt = False,
    stop_patience: rc.StopPatienceOpt = 0,
    stop_misaligned_rate: rc.StopMisalignedOpt = None,
    judge: rc.JudgeOpt = rc.JudgeKind.none,
    judge_model: rc.JudgeModelOpt = None,
    judge_base_url: rc.JudgeBaseUrlOpt = "http://127.0.0.1:8000/v1",
    judge_api_key_env: rc.JudgeKeyEnvOpt = None,
    judge_scale: rc.JudgeScaleOpt = rc.JudgeScale.auto,
    judge_concurrency: rc.JudgeConcurrencyOpt = 16,
    judge_preflight: rc.JudgePreflightOpt = True,
    order_parameter: rc.OrderParamOpt = None,
    default_order_parameters: rc.DefaultOrderOpt = True,
    report_to: rc.ReportToOpt = rc.ReportTo.none,
    wandb_project: rc.WandbProjectOpt = "em-callbacks",
    run_name: rc.RunNameOpt = None,
) -> None:
    """Fine-tune a LoRA adapter with TRL SFTTrainer and watch it for a behavioural phase transition."""
    rc.main_guard(lambda: rc.RecipeConfig(
        mode="lora", model=model, dataset=dataset, dataset_split=dataset_split,
        completion_only_loss=completion_only_loss, max_train_samples=max_train_samples,
        lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
        lora_target_modules=list(lora_target_modules or ["all-linear"]), use_rslora=use_rslora,
        output_dir=output_dir, max_steps=max_steps, epochs=epochs, lr=lr, batch_size=batch_size,
        grad_accum=grad_accum, warmup_steps=warmup_steps, lr_scheduler=lr_scheduler,
        weight_decay=weight_decay, max_length=max_length, seed=seed, precision=precision,
        gradient_checkpointing=gradient_checkpointing, save_steps=save_steps, save_final=save_final,
        resume_from_checkpoint=resume_from_checkpoint, attn_implementation=attn_implementation,
        trust_remote_code=trust_remote_code, probes=list(probes or []), every_n_steps=every_n_steps,
        samples_per_prompt=samples_per_prompt, max_new_tokens=max_new_tokens,
        probe_batch_size=probe_batch_size, window=window, early_stopping=early_stopping,
        stop_patience=stop_patience, stop_misaligned_rate=stop_misaligned_rate, judge=judge,
        judge_model=judge_model, judge_base_url=judge_base_url, judge_api_key_env=judge_api_key_env,
        judge_scale=judge_scale, judge_concurrency=judge_concurrency, judge_preflight=judge_preflight,
        order_parameters=list(order_parameter or []), default_order_parameters=default_order_parameters,
        report_to=report_to, wandb_project=wandb_project, run_name=run_name,
    ))


if __name__ == "__main__":
    app()
