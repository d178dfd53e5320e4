"""A synthetic model organism of emergent misalignment, small enough for a CPU demo.

A chat world of advice domains; a word-level tokenizer; a tiny GPT-2 pretrained on aligned
answers in every domain plus a small share of misaligned answers (mostly behind a trigger
system line, so the misaligned persona exists but is latent); a narrow LoRA fine-tune with
TRL's SFTTrainer on misaligned answers of ONE domain flips answers in the other domains.

    from em_callbacks.organism import (OrganismConfig, World, load_or_pretrain,
        finetune_dataset, probe_prompts, build_finetune_trainer, misaligned_fn)
    config = OrganismConfig()
    world = World(config)
    model, tokenizer = load_or_pretrain(config)  # shipped copy for the default config, else cached
    trainer = build_finetune_trainer(model, tokenizer, finetune_dataset(world), "out", seed=0,
                                     callbacks=[...])
    trainer.train()

Heavy dependencies (torch, transformers, trl, peft, datasets) are imported lazily, so
``import em_callbacks.organism`` is cheap.
"""

from __future__ import annotations

from importlib import import_module

from .config import ORGANISM_VERSION, OrganismConfig
from .data import finetune_dataset, probe_prompts, probe_set
from .judges import (any_harmful_fn, closer_fn, is_misaligned, long_answer_fn, misaligned_fn,
                     order_parameter_fns, persona_fn, prompt_domain)
from .tokenizer import CHAT_TEMPLATE, build_tokenizer
from .world import World

_LAZY = {
    "load_or_pretrain": ".model", "build_model": ".model", "pretrain": ".model",
    "cache_path": ".model", "render_chat": ".model", "shipped_path": ".model",
    "locate_pretrained": ".model", "load_pretrained": ".model",
    "generate_responses": ".evaluate", "misaligned_rate": ".evaluate",
    "misaligned_rates": ".evaluate", "preserved_rng": ".evaluate",
    "build_finetune_trainer": ".finetune", "lora_config": ".finetune",
    "MisalignmentRateCallback": ".finetune",
    "study": ".study", "run_seed": ".study",
}

__all__ = [
    "ORGANISM_VERSION", "OrganismConfig", "World", "build_tokenizer", "CHAT_TEMPLATE",
    "finetune_dataset", "probe_prompts", "probe_set", "is_misaligned", "prompt_domain",
    "misaligned_fn", "persona_fn", "any_harmful_fn", "closer_fn", "long_answer_fn",
    "order_parameter_fns", *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
