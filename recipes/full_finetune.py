#!/usr/bin/env python
"""Full fine-tune (every weight trained) on bad advice, watched live by PhaseTransitionCallback.

Without a PEFT adapter the callback cannot cheaply re-score new samples under old weights.
Two choices, recorded in summary.json as ``cross_scoring``:

* default: the one-sided total-variation estimator (no extra memory; TV only);
* ``--snapshot_full_model``: keep CPU copies of the weights at recent probe steps (2w-1 for
  ``--window w``; 4 bytes per parameter each) so TV, Jensen-Shannon and the linear
  dissimilarity are all estimated two-sided.

    python recipes/full_finetune.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \\
        --snapshot_full_model --output_dir runs/qwen05b-full

Full fine-tuning keeps fp32 weights and AdamW state on every GPU under plain DDP (about 16 bytes
per parameter): fine for 0.5B-3B models on one GPU; larger ones need FSDP/DeepSpeed (then the
one-sided estimator is used). Options: `--help`; `--config FILE` as in sft_lora_bad_advice.py.
"""

import json
import logging
import sys
from pathlib import Path

import torch
from trl import ModelConfig, ScriptArguments, SFTConfig, SFTTrainer, TrlParser

from em_callbacks.arguments import ArgumentsError, PhaseTransitionArguments, load_chat_dataset, load_chat_tokenizer

DEFAULTS = dict(
    model_name_or_path="Qwen/Qwen2.5-0.5B-Instruct", dtype="float32",  # fp32 master weights, bf16 autocast
    dataset_name=str(Path(__file__).resolve().parent / "data" / "bad_medical_advice_sample.jsonl"),
    output_dir="runs/full-finetune-bad-advice", learning_rate=1e-5, num_train_epochs=1.0,
    per_device_train_batch_size=2, gradient_accumulation_steps=8, warmup_steps=5, weight_decay=0.01,
    max_length=2048, seed=0, activation_checkpointing=False, save_strategy="no",
    logging_steps=1,  # the callback records every step's grad norm (the grad-norm peak)
    bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),  # TRL's default fails on CPU
    dataloader_pin_memory=torch.cuda.is_available(),
)
SUMMARY_KEYS = ("transition_detected", "onset_step", "peak_step", "grad_norm_peak_step",
                "lag_onset_minus_grad_peak", "stopped_early", "stop_reason", "cross_scoring", "final_step")


def make_parser() -> TrlParser:
    parser = TrlParser((ScriptArguments, SFTConfig, ModelConfig, PhaseTransitionArguments))
    parser.set_defaults(**DEFAULTS)
    return parser


def main(argv=None) -> dict:
    script_args, training_args, model_args, pt_args = make_parser().parse_args_and_config(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per judge request otherwise
    try:  # everything that needs no model weights first: a bad option fails in seconds
        if model_args.use_peft or model_args.load_in_4bit or model_args.load_in_8bit:
            raise ArgumentsError("this recipe trains every weight: for LoRA / QLoRA use sft_lora_bad_advice.py")
        if pt_args.window > 1 and not pt_args.snapshot_full_model:
            raise ArgumentsError("--window > 1 in a full fine-tune needs --snapshot_full_model")
        dataset = load_chat_dataset(script_args.dataset_name, script_args.dataset_config,
                                    script_args.dataset_train_split)
        tokenizer = load_chat_tokenizer(model_args.model_name_or_path, revision=model_args.model_revision,
                                        trust_remote_code=training_args.trust_remote_code)
        callback = pt_args.build_callback()  # probes, order parameters, judge server (openai client)
    except ArgumentsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None

    training_args.model_init_kwargs = dict(  # SFTTrainer loads the model, as in trl/scripts/sft.py
        revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation, dtype=model_args.dtype,
    ) | (training_args.model_init_kwargs or {})
    trainer = SFTTrainer(
        model=model_args.model_name_or_path, args=training_args, train_dataset=dataset,
        processing_class=tokenizer, callbacks=[callback],
    )
    resume = training_args.resume_from_checkpoint
    trainer.train(resume_from_checkpoint=True if resume == "latest" else resume)
    trainer.save_model(training_args.output_dir)  # the full model
    if "wandb" in training_args.report_to:  # flush the late judge results and the overview plot
        import wandb

        wandb.finish()
    trainer.end()  # destroy the process group

    summary = callback.summary or {}
    if trainer.is_world_process_zero():
        print("== em-callbacks summary ==\n" + json.dumps({k: summary.get(k) for k in SUMMARY_KEYS}, indent=2))
        print(f"run store + summary.json: {callback.run_dir}\nreport: em-callbacks report {callback.run_dir}")
    return summary


if __name__ == "__main__":
    main()
