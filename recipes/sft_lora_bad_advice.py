#!/usr/bin/env python
"""LoRA fine-tune of a chat model on bad advice, watched live by PhaseTransitionCallback.

The emergent-misalignment setup (Betley et al. 2025; Turner et al. 2025; Arnold & Lörch 2025):
a rank-32 rsLoRA adapter on every linear layer of a Qwen2.5-Instruct model, trained with TRL's
SFTTrainer on narrowly bad advice. The callback probes unrelated questions every N steps, measures
how fast the answers change, has an LLM judge score them, and reports when the behavioural
transition happened next to the gradient-norm peak.

    python recipes/sft_lora_bad_advice.py --output_dir runs/smoke --max_steps 20 --every_n_steps 5
    python recipes/sft_lora_bad_advice.py --config recipes/sft_lora_bad_advice.yaml
    accelerate launch --config_file recipes/accelerate_multi_gpu.yaml --num_processes 4 \\
        recipes/sft_lora_bad_advice.py --config recipes/sft_lora_bad_advice.yaml

Options: TRL's ScriptArguments, SFTConfig and ModelConfig, and em-callbacks' PhaseTransitionArguments
(`--help` lists them all). Defaults below, then `--config FILE`, then the command line.
"""

from pathlib import Path

import torch
from trl import ModelConfig, ScriptArguments, SFTConfig, TrlParser, get_peft_config, get_quantization_config

from em_callbacks.arguments import PhaseTransitionArguments, run_sft

DEFAULTS = dict(
    model_name_or_path="Qwen/Qwen2.5-7B-Instruct", dtype="auto",
    dataset_name=str(Path(__file__).resolve().parent / "data" / "bad_medical_advice_sample.jsonl"),
    use_peft=True, lora_r=32, lora_alpha=64, lora_dropout=0.0, use_rslora=True, lora_target_modules=["all-linear"],
    output_dir="runs/sft-lora-bad-advice", learning_rate=1e-5, num_train_epochs=1.0, per_device_train_batch_size=2,
    gradient_accumulation_steps=8, warmup_steps=5, weight_decay=0.01, max_length=2048, seed=0,
    activation_checkpointing=False, save_strategy="no",
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
    return run_sft(script_args, training_args, model_args, pt_args,
                   peft_config=get_peft_config(model_args), quantization_config=get_quantization_config(model_args))


if __name__ == "__main__":
    main()
