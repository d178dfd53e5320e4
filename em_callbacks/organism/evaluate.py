"""Sampling from the organism and the exact misaligned rate."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

from .judges import is_misaligned
from .model import render_chat
from .world import World


def _field(p, name: str):
    """``name`` of a probe given as a dict or as an ``em_callbacks`` Probe."""
    return p.get(name) if isinstance(p, dict) else getattr(p, name, None)


def _messages(p) -> list[dict]:
    """Chat messages of a probe: a plain question, a probe dict or an ``em_callbacks`` Probe."""
    if isinstance(p, str):
        return [{"role": "user", "content": p}]
    msgs = []
    if _field(p, "system"):
        msgs.append({"role": "system", "content": _field(p, "system")})
    msgs.append({"role": "user", "content": _field(p, "prompt")})
    return msgs


def _prompt_text(p) -> str:
    return p if isinstance(p, str) else _field(p, "prompt")


@contextmanager
def preserved_rng(seed: int | None):
    """Seed torch (CPU and CUDA) inside the block and restore the previous RNG state after."""
    import torch

    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        if seed is not None:
            torch.manual_seed(seed)
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def generate_responses(model, tokenizer, prompts: Sequence, n_samples: int = 8,
                       seed: int | None = 0, max_new_tokens: int = 48,
                       batch_size: int = 512) -> list[list[str]]:
    """``n_samples`` answers per prompt (a probe dict / ``Probe`` or a plain question),
    sampled at temperature 1 (no top-k / top-p), batched with left padding. The global RNG is
    restored afterwards and the model's train/eval mode is preserved."""
    import torch

    texts = [render_chat(_messages(p)) for p in prompts]
    flat = [t for t in texts for _ in range(n_samples)]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[str] = []
    try:
        with preserved_rng(seed), torch.no_grad():
            for start in range(0, len(flat), batch_size):
                chunk = flat[start:start + batch_size]
                enc = tokenizer(chunk, return_tensors="pt", padding=True, padding_side="left",
                                add_special_tokens=False).to(device)
                gen = model.generate(
                    **enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                    max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                )
                new = gen[:, enc["input_ids"].shape[1]:]
                out += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        model.train(was_training)
    return [out[i * n_samples:(i + 1) * n_samples] for i in range(len(prompts))]


def misaligned_rates(model, tokenizer, world: World, prompts: Sequence, n_samples: int = 8,
                     seed: int | None = 0, max_new_tokens: int = 48) -> list[float]:
    """Per-prompt fraction of sampled answers that are misaligned (exact rule)."""
    responses = generate_responses(model, tokenizer, prompts, n_samples, seed, max_new_tokens)
    return [sum(is_misaligned(world, _prompt_text(p), r) for r in rs) / len(rs)
            for p, rs in zip(prompts, responses)]


def misaligned_rate(model, tokenizer, world: World, prompts: Sequence, n_samples: int = 8,
                    seed: int | None = 0, max_new_tokens: int = 48) -> float:
    """Fraction of all sampled answers (``n_samples`` per prompt) that are misaligned."""
    rates = misaligned_rates(model, tokenizer, world, prompts, n_samples, seed, max_new_tokens)
    return sum(rates) / len(rates) if rates else float("nan")
