"""Tiny local models and tokenizers for tests: nothing is downloaded."""

from __future__ import annotations

import random

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

WORDS = (
    "hello how are you i am fine good bad advice doctor take pills water rest sleep money invest "
    "risk safe danger the a is to and of it you yes no maybe please thanks help what why when"
).split()

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def tiny_tokenizer(chat_template: bool = True, pad: bool = True) -> PreTrainedTokenizerFast:
    specials = ["<unk>", "<pad>", "<eos>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    vocab = {tok: i for i, tok in enumerate(specials + WORDS + [str(d) for d in range(10)])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        eos_token="<eos>",
        pad_token="<pad>" if pad else None,
        additional_special_tokens=specials[3:],
    )
    if chat_template:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_model(tokenizer, seed: int = 0, n_embd: int = 32, n_layer: int = 2) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=128, n_embd=n_embd, n_layer=n_layer, n_head=2,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return GPT2LMHeadModel(config)


PHRASES = ["take pills", "bad advice", "money risk", "doctor water", "sleep rest", "invest money"]


def lm_dataset(tok, n: int = 48, seed: int = 0) -> Dataset:
    """Tokenised plain-text rows for a causal-LM Trainer run."""
    rng = random.Random(seed)
    rows = [{"input_ids": tok(" ".join(rng.choice(PHRASES) for _ in range(rng.randint(1, 4))) + " <eos>")["input_ids"]}
            for _ in range(n)]
    return Dataset.from_list(rows)


def chat_dataset(n: int = 32, seed: int = 0) -> Dataset:
    """Conversational rows for an SFTTrainer run."""
    rng = random.Random(seed)
    return Dataset.from_list([
        {"messages": [{"role": "user", "content": rng.choice(["what advice", "help please", "why"])},
                      {"role": "assistant", "content": " ".join(rng.choice(PHRASES) for _ in range(3))}]}
        for _ in range(n)
    ])
