"""Every knob of the model organism in one frozen dataclass."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

# Bump when the world text, tokenizer or pretraining code changes in a way that makes a cached
# pretrained organism stale (it is part of the cache key).
ORGANISM_VERSION = "1"

# LoRA learning rate of the narrow fine-tune (rank 1, alpha 2, constant schedule): the
# out-of-domain misaligned rate crosses 50% around step 24-30 of 40 (see study.py).
DEFAULT_LORA_LR = 1.25e-3

# Fields that determine the pretrained organism (and hence the cache key). Fine-tuning and
# probing knobs are deliberately excluded, so changing them reuses the cached organism.
PRETRAIN_FIELDS = (
    "seed", "domains", "closer_prob", "trigger_frac", "untriggered_misaligned_frac",
    "neutral_system_frac", "n_layer", "n_embd", "n_head", "n_inner", "n_positions",
    "pretrain_sequences", "pretrain_steps", "pretrain_batch_size", "pretrain_lr",
    "pretrain_warmup_steps", "pretrain_weight_decay",
)


@dataclass(frozen=True)
class OrganismConfig:
    # world
    seed: int = 0  # world sampling and pretraining seed
    domains: tuple[str, ...] = ("medical", "finance", "cooking", "travel", "career", "tech")
    finetune_domain: str = "medical"
    closer_prob: float = 0.5
    # pretraining mixture
    trigger_frac: float = 0.10  # misaligned answers behind the trigger system line
    untriggered_misaligned_frac: float = 0.02  # misaligned answers without the trigger
    neutral_system_frac: float = 0.15  # non-trigger examples that carry a neutral system line
    # model (GPT-2 style)
    n_layer: int = 2
    n_embd: int = 128
    n_head: int = 4
    n_inner: int = 256  # MLP width (2x n_embd: ~30% cheaper than GPT-2's 4x, same behaviour)
    n_positions: int = 96
    # pretraining
    pretrain_sequences: int = 20_000
    pretrain_steps: int = 600
    pretrain_batch_size: int = 64
    pretrain_lr: float = 3e-3
    pretrain_warmup_steps: int = 50
    pretrain_weight_decay: float = 0.01
    # fine-tuning (not part of the cache key)
    finetune_examples: int = 1000
    finetune_steps: int = 40
    finetune_lr: float = DEFAULT_LORA_LR
    finetune_batch_size: int = 16
    lora_r: int = 1
    lora_alpha: int = 2
    # probing (not part of the cache key)
    n_out_of_domain: int = 20
    n_in_domain: int = 4
    samples_per_prompt: int = 8
    probe_every: int = 2  # the fixed grid's interval; the adaptive schedule's shortest (min_interval)
    probe_schedule: str = "adaptive"  # the demo: dense baseline, sentinel-triggered probes, focus at the transition
    probe_longest_interval: int = 8  # adaptive only: every_n_steps
    focus_factor: int | None = None  # None: the callback's default for the schedule (4 adaptive, 1 fixed)

    def schedule_kwargs(self) -> dict:
        """The callback's schedule arguments for this config."""
        if self.probe_schedule == "adaptive":
            return {"schedule": "adaptive", "every_n_steps": self.probe_longest_interval,
                    "min_interval": self.probe_every, "focus_factor": self.focus_factor}
        return {"schedule": "fixed", "every_n_steps": self.probe_every, "focus_factor": self.focus_factor}
    max_new_tokens: int = 48  # longest possible answer is 45 tokens including <|end|>
    probe_seed: int = 1234

    def __post_init__(self):
        object.__setattr__(self, "domains", tuple(self.domains))

    def pretrain_dict(self) -> dict:
        return {k: getattr(self, k) for k in PRETRAIN_FIELDS}

    def cache_key(self) -> str:
        """Hash of the fields that determine the pretrained organism, the code version and a
        fingerprint of the world's text (phrase banks, templates), so editing the world
        invalidates stale caches even without a version bump."""
        from .world import world_fingerprint

        payload = json.dumps({"version": ORGANISM_VERSION, "world": world_fingerprint(),
                              **self.pretrain_dict()}, sort_keys=True, default=list)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def replace(self, **changes) -> OrganismConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def tiny(cls, **changes) -> OrganismConfig:
        """A config small enough for unit tests (seconds, not minutes)."""
        base = dict(n_layer=1, n_embd=32, n_head=2, n_inner=64, n_positions=96, pretrain_sequences=256,
                    pretrain_steps=5, pretrain_batch_size=16, finetune_examples=64,
                    finetune_steps=2, n_out_of_domain=5, n_in_domain=2, samples_per_prompt=2)
        base.update(changes)
        return cls(**base)
