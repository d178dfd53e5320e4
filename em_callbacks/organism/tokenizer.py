"""Word-level tokenizer and chat template of the organism."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerFast

    from .world import World

PAD, BOS, EOS, UNK = "<|pad|>", "<|bos|>", "<|end|>", "<|unk|>"
SYSTEM, USER, ASSISTANT = "<|system|>", "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, SYSTEM, USER, ASSISTANT)

# Rendering: "<|bos|> <|system|> ... <|end|> <|user|> ... <|end|> <|assistant|> ... <|end|>".
# Every turn (the assistant's included) ends with <|end|>, which is the eos token, so
# generation stops at the end of the answer. The assistant turn is wrapped in
# {% generation %} markers (assistant-only loss works); the generation prompt is
# " <|assistant|>", a token prefix of the rendered prompt+completion (completion-only loss works).
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- ' <|assistant|> ' -}}"
    "{%- generation -%}{{- message['content'] | trim -}}{{- ' ' + eos_token -}}{%- endgeneration -%}"
    "{%- elif message['role'] == 'system' or message['role'] == 'user' -%}"
    "{{- ' <|' + message['role'] + '|> ' + (message['content'] | trim) + ' ' + eos_token -}}"
    "{%- else -%}"
    "{{- raise_exception('unsupported role: ' + message['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- ' <|assistant|>' -}}{%- endif -%}"
)


def build_tokenizer(world: World) -> PreTrainedTokenizerFast:
    """WordLevel tokenizer over the world's closed vocabulary, with the organism chat template.

    Text is split on whitespace; decoding joins words with single spaces, so any
    single-spaced text made of vocabulary words round-trips exactly. Padding side is left
    (ready for batched generation; TRL's collator pads on its own).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in world.vocabulary():
        if word not in vocab:
            vocab[word] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        additional_special_tokens=[SYSTEM, USER, ASSISTANT],  # v5: extra_special_tokens
        clean_up_tokenization_spaces=False,
        padding_side="left",
        model_max_length=world.config.n_positions,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok
