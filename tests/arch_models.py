"""Qwen2/Qwen3-, Llama-3- and Gemma-2-shaped models at their real vocabulary sizes, narrow
enough for a CPU, with local tokenizers that have the real special tokens at their real ids and
the real chat-template structure. Nothing is downloaded: models are built from configs (random
weights), tokenizers are synthetic WordLevel vocabularies of the real size.

Also a worker (``python tests/arch_models.py rss OUT.json``) that runs the 151,936-vocabulary
case with the callback in a fresh process and reports its resident memory.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import Any

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from tiny import PHRASES

# Words of the training data and probes (also tests/tiny.py's), kept at the low ids.
WORDS = (
    "hello how are you i am fine good bad advice doctor take pills water rest sleep money invest "
    "risk safe danger the a is to and of it you yes no maybe please thanks help what why when "
    "You are Qwen, created by Alibaba Cloud. a helpful assistant. system user assistant model "
    "be brief careful"
).split()


# --------------------------------------------------------------------------- chat templates
# The real templates' structure (tool-calling branches dropped).

# Qwen2.5: a system turn always, the default one when the messages carry none.
QWEN_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first)"
    " or (message.role == 'assistant') %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Meta-Llama-3-8B-Instruct: header tokens, BOS from the template itself.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# gemma-2-*-it: no system role (the template raises), "model" for the assistant.
GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)

# gemma-3-*-it: the system prompt is folded into the first user turn.
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = \"\" -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}{%- if (message['role'] == 'assistant') -%}{%- set role = \"model\" -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{'<start_of_turn>model\\n'}}{%- endif -%}"
)


# --------------------------------------------------------------------------- architectures
@dataclass(frozen=True)
class Arch:
    """One real model family's shape: config class, vocabulary, special tokens, template."""

    name: str
    config_class: str
    vocab_size: int  # rows of the embedding / lm_head (the model's config.vocab_size)
    tokenizer_size: int  # len(tokenizer): Qwen pads its embedding past the tokenizer
    specials: dict[str, int]  # special token -> its real id
    bos: str | None
    eos: str
    pad: str | None  # None: the real tokenizer has no pad token (Llama 3)
    chat_template: str
    system_role: bool  # whether the chat template accepts a system message
    config_kwargs: dict[str, Any] = field(default_factory=dict)

    def with_(self, **changes: Any) -> "Arch":
        return dataclasses.replace(self, **changes)


_NARROW = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256)

QWEN2 = Arch(  # Qwen2.5-0.5B/1.5B-Instruct: tied embeddings, 151,665 tokens in a 151,936-row embedding
    "qwen2", "Qwen2Config", 151_936, 151_665,
    {"<|endoftext|>": 151_643, "<|im_start|>": 151_644, "<|im_end|>": 151_645},
    bos=None, eos="<|im_end|>", pad="<|endoftext|>", chat_template=QWEN_TEMPLATE, system_role=True,
    config_kwargs=dict(_NARROW, tie_word_embeddings=True, attention_dropout=0.1),
)
QWEN3 = Arch(  # Qwen3-8B: untied, explicit head_dim, q/k RMSNorm
    "qwen3", "Qwen3Config", 151_936, 151_669,
    {"<|endoftext|>": 151_643, "<|im_start|>": 151_644, "<|im_end|>": 151_645},
    bos=None, eos="<|im_end|>", pad="<|endoftext|>", chat_template=QWEN_TEMPLATE, system_role=True,
    config_kwargs=dict(_NARROW, head_dim=16, tie_word_embeddings=False, attention_dropout=0.1),
)
LLAMA3 = Arch(  # Meta-Llama-3-8B-Instruct: untied, GQA, no pad token
    "llama3", "LlamaConfig", 128_256, 128_256,
    {"<|begin_of_text|>": 128_000, "<|end_of_text|>": 128_001, "<|start_header_id|>": 128_006,
     "<|end_header_id|>": 128_007, "<|eot_id|>": 128_009},
    bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None, chat_template=LLAMA3_TEMPLATE, system_role=True,
    config_kwargs=dict(_NARROW, num_key_value_heads=1, tie_word_embeddings=False, attention_dropout=0.1),
)
GEMMA2 = Arch(  # gemma-2-2b-it: tied, softcapping, alternating sliding-window layers, no system role
    "gemma2", "Gemma2Config", 256_000, 256_000,
    {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<start_of_turn>": 106, "<end_of_turn>": 107},
    bos="<bos>", eos="<eos>", pad="<pad>", chat_template=GEMMA2_TEMPLATE, system_role=False,
    config_kwargs=dict(_NARROW, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                       tie_word_embeddings=True, attention_dropout=0.1, attn_implementation="eager"),
)
ARCHS = {a.name: a for a in (QWEN2, QWEN3, LLAMA3, GEMMA2)}


_VOCAB_CACHE: dict[tuple, dict[str, int]] = {}


def _vocab(arch: Arch) -> dict[str, int]:
    key = (arch.tokenizer_size, tuple(sorted(arch.specials.items())))
    if key not in _VOCAB_CACHE:
        taken = set(arch.specials.values())
        free = (i for i in range(arch.tokenizer_size) if i not in taken)
        vocab = dict(arch.specials)
        for word in dict.fromkeys(["<unk>"] + WORDS + [str(d) for d in range(10)]):
            vocab[word] = next(free)
        for i in free:  # filler up to the real size
            vocab[f"t{i}"] = i
        assert len(vocab) == arch.tokenizer_size and sorted(vocab.values()) == list(range(arch.tokenizer_size))
        _VOCAB_CACHE[key] = vocab
    return _VOCAB_CACHE[key]


def tokenizer(arch: Arch, padding_side: str = "right") -> PreTrainedTokenizerFast:
    """A fresh tokenizer of the real size with the real special tokens at their real ids."""
    backend = Tokenizer(models.WordLevel(vocab=_vocab(arch), unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    named = {"eos_token": arch.eos, "unk_token": "<unk>"}
    if arch.bos is not None:
        named["bos_token"] = arch.bos
    if arch.pad is not None:
        named["pad_token"] = arch.pad
    others = [t for t in arch.specials if t not in named.values()]
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, additional_special_tokens=others, **named)
    tok.chat_template = arch.chat_template
    tok.padding_side = padding_side
    assert len(tok) == arch.tokenizer_size
    assert all(tok.convert_tokens_to_ids(t) == i for t, i in arch.specials.items())
    return tok


def model(arch: Arch, tok: PreTrainedTokenizerFast, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    import transformers

    config_class = getattr(transformers, arch.config_class)
    kwargs = dict(arch.config_kwargs, **overrides)
    attn = kwargs.pop("attn_implementation", None)
    config = config_class(
        vocab_size=arch.vocab_size, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
        pad_token_id=tok.pad_token_id, **kwargs,
    )
    if attn is not None:
        config._attn_implementation = attn
    auto = transformers.AutoModelForCausalLM
    torch.manual_seed(seed)
    m = auto.from_config(config, dtype=dtype)
    assert m.config.vocab_size == arch.vocab_size
    assert m.get_output_embeddings().weight.shape[0] == arch.vocab_size
    return m


def lm_dataset(tok: PreTrainedTokenizerFast, n: int = 32, seed: int = 0) -> Dataset:
    """Plain-text rows (BOS when the family uses one, EOS at the end) for a causal-LM Trainer."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        text = " ".join(rng.choice(PHRASES) for _ in range(rng.randint(1, 4)))
        ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        if tok.bos_token_id is not None:
            ids = [tok.bos_token_id] + ids
        rows.append({"input_ids": ids})
    return Dataset.from_list(rows)


# --------------------------------------------------------------------------- memory worker
class _RssSampler:
    """Resident set size sampled every millisecond on a thread (torch releases the GIL in its
    kernels); the peak is kept per phase (``sampler.phase``: "train", "probe", ...)."""

    def __init__(self) -> None:
        import os
        import threading

        self.page = os.sysconf("SC_PAGE_SIZE")
        self.phase = "setup"
        self.peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _loop(self) -> None:
        import time

        while not self._stop.is_set():
            value, phase = self.rss(), self.phase
            self.peaks[phase] = max(self.peaks.get(phase, 0), value)
            time.sleep(0.001)

    def enter(self, phase: str) -> int:
        """Start ``phase`` at the current RSS; returns it."""
        value = self.rss()
        self.peaks[phase] = max(self.peaks.get(phase, 0), value)
        self.phase = phase
        return value

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _vm_hwm() -> int:
    """Peak RSS of this process's own memory map (VmHWM). Not ``getrusage().ru_maxrss``: Linux
    carries that over from the forked parent through exec, so a subprocess of a big pytest
    process would report the parent's size."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _rss_worker(out_json: str, run_dir: str) -> None:
    """Run the 151,936-vocabulary LoRA case (tests/test_architectures.py) with the callback in
    this fresh process, then the scorer alone on 32 and 128 samples; write the figures (bytes).

    RSS is sampled per phase; the largest logits tensor of each phase is read exactly off a
    forward hook on the output embedding. Run with MALLOC_MMAP_THRESHOLD_ small so freed
    tensors go back to the system and RSS follows live memory."""
    import gc
    import json
    import time
    from pathlib import Path

    from transformers import TrainerCallback

    torch.set_num_threads(1)
    import test_architectures as ta
    from em_callbacks.sampling import encode_prompts, preserved_state, sequence_logprobs

    sampler = _RssSampler()
    t_start = time.perf_counter()
    logits = {}  # phase -> largest logits tensor (elements)

    class Phase(TrainerCallback):  # placed around the callback: its probes run between the two
        def __init__(self, phase: str):
            self.phase = phase

        def on_train_begin(self, args, state, control, **kwargs):
            sampler.enter(self.phase)

        on_step_end = on_train_begin

    case = ta.CASES["qwen2-lora-bf16"]
    out = Path(run_dir)
    cb = ta._callback(case, out)
    trainer, tok = ta._trainer(case, out, [Phase("probe"), cb, Phase("train")])
    model = trainer.model

    def count_logits(module, inputs, output):
        logits[sampler.phase] = max(logits.get(sampler.phase, 0), output.numel())

    model.get_output_embeddings().register_forward_hook(count_logits)
    gc.collect()
    setup_seconds = time.perf_counter() - t_start
    baseline = sampler.enter("train")
    t0 = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - t0
    sampler.enter("after")
    peak_run = _vm_hwm()

    # the scorer alone, under a fixed logits bound, on 4x more samples: memory must not follow
    prompt = encode_prompts(tok, [render_prompt_text(tok)], True)[0]
    gen = torch.Generator().manual_seed(0)

    def score(rows: int, bound: int) -> tuple[int, int]:
        completions = torch.randint(0, len(tok), (rows, 4), generator=gen).tolist()
        gc.collect()
        phase = f"score {rows} rows, bound {bound}"
        before = sampler.enter(phase)
        with preserved_state(model, tok):
            model.eval()
            sequence_logprobs(model, [prompt] * rows, completions, tok.pad_token_id, max_logit_elements=bound)
        sampler.enter("after")
        return sampler.peaks[phase] - before, logits[phase]

    bound = 2**24
    t1 = time.perf_counter()
    (small, small_logits), (large, large_logits) = score(32, bound), score(128, bound)
    scorer_seconds = time.perf_counter() - t1
    sampler.stop()
    per_element = large / large_logits
    figures = {
        "vocab_size": case.arch.vocab_size, "weights": str(case.dtype), "probes": len(cb.probe_steps),
        "samples_per_probe": len(case.probes) * case.samples_per_prompt,
        "malloc_mmap_threshold": __import__("os").environ.get("MALLOC_MMAP_THRESHOLD_"),
        "setup_seconds": round(setup_seconds, 2), "train_seconds": round(train_seconds, 2),
        "scorer_seconds": round(scorer_seconds, 2),
        "baseline_rss": baseline, "peak_rss_training_steps": sampler.peaks["train"],
        "peak_rss_probes": sampler.peaks["probe"], "peak_rss_run": peak_run, "peak_rss_process": _vm_hwm(),
        "max_logits_elements_probes": logits.get("probe", 0),
        "scorer_bound": bound, "scorer_prompt_tokens": len(prompt), "scorer_completion_tokens": 4,
        "scorer_32_rows": {"rss_growth": small, "max_logits_elements": small_logits},
        "scorer_128_rows": {"rss_growth": large, "max_logits_elements": large_logits},
        "bytes_per_logits_element": round(per_element, 2),
    }
    Path(out_json).write_text(json.dumps(figures))


def render_prompt_text(tok) -> str:
    return tok.apply_chat_template([{"role": "user", "content": "money advice please"}], tokenize=False,
                                   add_generation_prompt=True)


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 4 and sys.argv[1] == "rss":
        _rss_worker(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit("usage: python tests/arch_models.py rss OUT.json RUN_DIR")
