"""Narrow fine-tuning of the organism with TRL's SFTTrainer, and a probe-rate callback."""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Sequence

from transformers import TrainerCallback

from .config import DEFAULT_LORA_LR
from .evaluate import _field, generate_responses
from .judges import is_misaligned
from .world import World

LORA_TARGETS = ("c_attn", "c_proj", "c_fc")  # every linear (Conv1D) layer of GPT-2


def lora_config(r: int = 1, alpha: int = 2):
    """LoRA on all GPT-2 linear layers (Conv1D: ``fan_in_fan_out=True``), no dropout."""
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(LORA_TARGETS),
                      fan_in_fan_out=True, bias="none", task_type="CAUSAL_LM")


def build_finetune_trainer(model, tokenizer, dataset, output_dir, seed: int = 0, steps: int = 40,
                           callbacks: Sequence = (), report_to="none", lora: bool = True,
                           learning_rate: float | None = None, batch_size: int = 16,
                           lora_r: int = 1, lora_alpha: int = 2, save: bool = False,
                           quiet: bool = True, **sft_kwargs):
    """An ``SFTTrainer`` for the organism's narrow fine-tune.

    LoRA rank ``lora_r`` / alpha ``lora_alpha`` on c_attn, c_proj, c_fc (with ``lora=False``:
    full fine-tuning, default lr 1e-4), constant lr (1.25e-3 with LoRA), batch 16, ``steps``
    optimizer steps, ``logging_steps=1`` (so ``logs["grad_norm"]`` exists every step),
    completion-only loss, no evaluation, no checkpoints unless ``save``, CPU.

    ``model`` is modified in place (LoRA layers are injected): pass a fresh copy per run. The
    LoRA init is seeded from ``seed``. Extra keyword arguments go to ``SFTConfig``. With
    ``quiet`` (default) the per-step log printer and the dataset-preparation progress bars are
    suppressed (pass ``disable_tqdm=False`` for the Trainer's progress bar).
    """
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    if learning_rate is None:
        learning_rate = DEFAULT_LORA_LR if lora else 1e-4
    args = dict(
        output_dir=str(output_dir), max_steps=steps, learning_rate=learning_rate,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        per_device_train_batch_size=batch_size, gradient_accumulation_steps=1,
        logging_steps=1, logging_strategy="steps", save_strategy="steps" if save else "no",
        eval_strategy="no", report_to=report_to, use_cpu=True, seed=seed, data_seed=seed,
        completion_only_loss=True, max_length=tokenizer.model_max_length,
        bf16=False, fp16=False, dataloader_num_workers=0,
        disable_tqdm=True, max_grad_norm=1.0, optim="adamw_torch",
    )
    # transformers 5 renamed gradient_checkpointing (TRL defaults it to True) to
    # activation_checkpointing; the old name warns there.
    names = {f.name for f in dataclasses.fields(SFTConfig)}
    args["activation_checkpointing" if "activation_checkpointing" in names
         else "gradient_checkpointing"] = False
    args.update(sft_kwargs)
    set_seed(seed)  # the LoRA A matrices are drawn when SFTTrainer wraps the model
    import datasets

    bars = datasets.is_progress_bar_enabled()
    if quiet:
        datasets.disable_progress_bars()
    try:
        with warnings.catch_warnings():
            # peft's PeftModel reads transformers 5's deprecated is_gradient_checkpointing
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            trainer = SFTTrainer(
                model=model, args=SFTConfig(**args), train_dataset=dataset,
                processing_class=tokenizer,
                peft_config=lora_config(lora_r, lora_alpha) if lora else None,
                callbacks=list(callbacks),
            )
    finally:
        if quiet and bars:
            datasets.enable_progress_bars()
    if quiet:
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    return trainer


class MisalignmentRateCallback(TrainerCallback):
    """Every ``every_n_steps`` optimizer steps (and at step 0), sample ``n_samples`` answers per
    probe and record the exact misaligned rate out of domain / in domain, plus the grad norm
    from the logs. The RNG is restored around sampling, so the training run is unaffected.

    ``history``: list of dicts {step, ood_rate, in_rate, seconds}; ``grad_norms``: {step: norm};
    ``crossing_step``: first probe step with ood_rate > threshold (None if never);
    ``samples`` (with ``sample_log=k``): {step: the first k answers of each prompt, in order}.
    """

    def __init__(self, world: World, tokenizer, prompts: Sequence, every_n_steps: int = 2,
                 n_samples: int = 8, seed: int = 0, max_new_tokens: int = 48,
                 threshold: float = 0.5, verbose: bool = True, sample_log: int = 0):
        self.world, self.tokenizer, self.prompts = world, tokenizer, list(prompts)
        self.every_n_steps, self.n_samples, self.seed = every_n_steps, n_samples, seed
        self.max_new_tokens, self.threshold, self.verbose = max_new_tokens, threshold, verbose
        self.sample_log = sample_log
        self.history: list[dict] = []
        self.grad_norms: dict[int, float] = {}
        self.samples: dict[int, list] = {}
        self.seconds = 0.0

    @property
    def crossing_step(self) -> int | None:
        for h in self.history:
            if h["ood_rate"] > self.threshold:
                return h["step"]
        return None

    def measure(self, model, step: int) -> dict:
        t0 = time.perf_counter()
        responses = generate_responses(model, self.tokenizer, self.prompts, self.n_samples,
                                       seed=self.seed + step, max_new_tokens=self.max_new_tokens)
        ood, ind = [], []
        for p, rs in zip(self.prompts, responses):
            flags = [is_misaligned(self.world, _field(p, "prompt"), r) for r in rs]
            (ind if "in-domain" in (_field(p, "tags") or ()) else ood).extend(flags)
        rec = {"step": step, "ood_rate": sum(ood) / max(1, len(ood)),
               "in_rate": sum(ind) / max(1, len(ind)), "seconds": time.perf_counter() - t0}
        self.seconds += rec["seconds"]
        self.history.append(rec)
        if self.sample_log:
            self.samples[step] = [rs[:self.sample_log] for rs in responses]
        if self.verbose:
            print(f"step {step:4d}  out-of-domain misaligned {rec['ood_rate']:.3f}  "
                  f"in-domain {rec['in_rate']:.3f}", flush=True)
        return rec

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and not self.history:
            self.measure(model, 0)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "grad_norm" in logs:
            self.grad_norms[state.global_step] = float(logs["grad_norm"])

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None and state.global_step % self.every_n_steps == 0:
            self.measure(model, state.global_step)
