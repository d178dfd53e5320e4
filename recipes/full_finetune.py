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

from pathlib import Path

import torch
from trl import ModelConfig, ScriptArguments, SFTConfig, TrlParser

from em_callbacks.arguments import ArgumentsError, PhaseTransitionArguments, run_sft

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


def make_parser() -> TrlParser:
    parser = TrlParser((ScriptArguments, SFTConfig, ModelConfig, PhaseTransitionArguments))
    parser.set_defaults(**DEFAULTS)
    return parser


def main(argv=None) -> dict:
    script_args, training_args, model_args, pt_args = make_parser().parse_args_and_config(argv)

    def check() -> None:
        if model_args.use_peft or model_args.load_in_4bit or model_args.load_in_8bit:
            raise ArgumentsError("this recipe trains every weight: for LoRA / QLoRA use sft_lora_bad_advice.py")
        if pt_args.window > 1 and not pt_args.snapshot_full_model:
            raise ArgumentsError("--window > 1 in a full fine-tune needs --snapshot_full_model")

    return run_sft(script_args, training_args, model_args, pt_args, check=check)


if __name__ == "__main__":
    main()
