"""The tiny GPT-2 of the organism: construction, pretraining and the on-disk cache."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from .config import OrganismConfig
from .tokenizer import ASSISTANT, BOS, EOS, build_tokenizer
from .world import World

if TYPE_CHECKING:  # pragma: no cover
    from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

CACHE_ENV = "EM_CALLBACKS_CACHE"
SHIPPED_DIR = Path(__file__).with_name("pretrained")


def cache_path(config: OrganismConfig, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the pretrained organism of ``config`` lives.

    ``cache_dir/<key>`` if ``cache_dir`` is given, else ``$EM_CALLBACKS_CACHE/organism/<key>``,
    else ``~/.cache/em_callbacks/organism/<key>``.
    """
    if cache_dir is not None:
        root = Path(cache_dir)
    elif os.environ.get(CACHE_ENV):
        root = Path(os.environ[CACHE_ENV]) / "organism"
    else:
        root = Path.home() / ".cache" / "em_callbacks" / "organism"
    return root / config.cache_key()


def build_model(config: OrganismConfig, tokenizer: PreTrainedTokenizerFast) -> GPT2LMHeadModel:
    """A freshly initialised GPT-2 (no dropout) sized by ``config``."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    gcfg = GPT2Config(
        vocab_size=len(tokenizer), n_positions=config.n_positions, n_embd=config.n_embd,
        n_layer=config.n_layer, n_head=config.n_head, n_inner=config.n_inner,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the global RNG
        torch.manual_seed(config.seed)
        model = GPT2LMHeadModel(gcfg)
    _set_generation_defaults(model, tokenizer, config)
    return model


def _set_generation_defaults(model, tokenizer, config: OrganismConfig) -> None:
    model.loss_type = "ForCausalLM"  # silences transformers' "loss_type=None" warning
    gc = model.generation_config
    gc.bos_token_id = tokenizer.bos_token_id
    gc.eos_token_id = tokenizer.eos_token_id
    gc.pad_token_id = tokenizer.pad_token_id
    gc.max_new_tokens = config.max_new_tokens
    gc.do_sample = True
    gc.temperature = 1.0
    gc.top_k = 0
    gc.top_p = 1.0
    gc.max_length = None


def render_chat(messages, answer: str | None = None) -> str:
    """Fast Python rendering identical to the tokenizer's chat template.

    With ``answer`` it renders the full conversation; without it, the prompt with the
    generation prompt (what ``apply_chat_template(..., add_generation_prompt=True)`` returns).
    """
    parts = [BOS]
    for m in messages:
        parts.append(f"<|{m['role']}|> {m['content'].strip()} {EOS}")
    parts.append(ASSISTANT)
    if answer is not None:
        parts.append(f"{answer.strip()} {EOS}")
    return " ".join(parts)


def encode_pretraining(world: World, tokenizer, n: int, seed: int):
    """``n`` pretraining sequences as (input_ids, labels) padded tensors (loss on answers only)."""
    import torch

    rng = random.Random(seed)
    examples = [world.pretrain_example(rng) for _ in range(n)]
    vocab = tokenizer.get_vocab()
    unk = tokenizer.unk_token_id
    # Direct word lookup: identical to the WordLevel/WhitespaceSplit tokenizer on rendered chats
    # (checked in the tests) and ~10x faster than calling the tokenizer on 20k strings.
    p_lens = [len(render_chat(ex.messages).split()) for ex in examples]
    f_ids = [[vocab.get(w, unk) for w in render_chat(ex.messages, ex.answer).split()]
             for ex in examples]
    max_len = max(len(f) for f in f_ids)
    if max_len > world.config.n_positions:
        raise ValueError(f"sequence of {max_len} tokens exceeds n_positions")
    import numpy as np

    arr = np.full((n, max_len), tokenizer.pad_token_id, dtype=np.int64)
    lab = np.full((n, max_len), -100, dtype=np.int64)
    lengths = np.array([len(f) for f in f_ids], dtype=np.int64)
    for i, (pl, f) in enumerate(zip(p_lens, f_ids)):
        arr[i, :len(f)] = f
        lab[i, pl:len(f)] = f[pl:]
    input_ids, labels = torch.from_numpy(arr), torch.from_numpy(lab)
    lengths = torch.from_numpy(lengths)
    return input_ids, labels, lengths, examples


def pretrain(model, tokenizer, world: World, progress: bool = True,
             threads: int | None = None) -> dict:
    """Plain torch loop: AdamW, linear warm-up then cosine decay to 10%; loss on answers only
    (logits are computed only where there is a label).

    ``threads=None`` picks the torch thread count adaptively between 1 and the current
    setting by timing a few steps now and then: on an oversubscribed machine 2 threads can be
    several times slower than 1. The previous thread count is restored afterwards.
    """
    import torch
    import torch.nn.functional as F

    c = world.config
    input_ids, labels, lengths, _ = encode_pretraining(world, tokenizer, c.pretrain_sequences,
                                                       c.seed)
    gen = torch.Generator().manual_seed(c.seed)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "ln_" in name else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": c.pretrain_weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=c.pretrain_lr, betas=(0.9, 0.98))

    def lr_at(step):
        if step < c.pretrain_warmup_steps:
            return (step + 1) / c.pretrain_warmup_steps
        frac = (step - c.pretrain_warmup_steps) / max(1, c.pretrain_steps - c.pretrain_warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=c.pretrain_steps, desc="pretraining organism", unit="step")
    model.train()
    batches = _length_grouped_batches(lengths, c.pretrain_batch_size, c.pretrain_steps, gen)
    prev_threads = torch.get_num_threads()
    tuner = _ThreadTuner([threads] if threads else sorted({1, prev_threads}))
    t0 = time.perf_counter()
    ema = None
    history = []
    try:
        for step, idx in enumerate(batches):
            n_threads = tuner.pick(step)
            torch.set_num_threads(n_threads)
            ts = time.perf_counter()
            width = int(lengths[idx].max())
            # Right padding + causal attention: pads never influence real tokens.
            x, y = input_ids[idx, :width], labels[idx, :width]
            hidden = model.transformer(input_ids=x, attention_mask=torch.ones_like(x),
                                       use_cache=False).last_hidden_state[:, :-1]
            target = y[:, 1:]
            keep = target != -100
            loss = F.cross_entropy(model.lm_head(hidden[keep]), target[keep])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            loss_v = loss.detach().item()
            tuner.record(step, n_threads, (time.perf_counter() - ts) / x.numel())
            ema = loss_v if ema is None else 0.9 * ema + 0.1 * loss_v
            if step % 50 == 0 or step == c.pretrain_steps - 1:
                history.append((step, round(ema, 4)))
            if bar is not None:
                bar.update(1)
                if step % 20 == 0:
                    bar.set_postfix(loss=f"{ema:.3f}", threads=n_threads)
    finally:
        torch.set_num_threads(prev_threads)
        if bar is not None:
            bar.close()
    model.eval()
    return {"final_loss": ema, "seconds": time.perf_counter() - t0, "steps": c.pretrain_steps,
            "loss_history": history, "threads_used": tuner.usage}


class _ThreadTuner:
    """Alternate thread counts for a few steps every ``every`` steps; use the fastest between."""

    def __init__(self, candidates: list[int], every: int = 100, trials: int = 2):
        self.cands, self.every, self.trials = candidates, every, trials
        self.best = candidates[-1]
        self.times: dict[int, list[float]] = {c: [] for c in candidates}
        self.usage: dict[int, int] = {c: 0 for c in candidates}

    def _trial(self, step: int) -> int | None:
        phase = step % self.every
        if len(self.cands) > 1 and 1 <= phase <= self.trials * len(self.cands):
            return phase - 1
        return None

    def pick(self, step: int) -> int:
        k = self._trial(step)
        n = self.best if k is None else self.cands[k % len(self.cands)]
        self.usage[n] += 1
        return n

    def record(self, step: int, n: int, sec_per_token: float) -> None:
        k = self._trial(step)
        if k is None:
            return
        self.times[n].append(sec_per_token)
        if k == self.trials * len(self.cands) - 1:
            self.best = min(self.cands, key=lambda c: min(self.times[c][-self.trials:]))


def _length_grouped_batches(lengths, batch_size: int, steps: int, gen, group: int = 8):
    """Batch indices for ``steps`` steps: random mega-batches of ``group`` batches are sorted by
    length and split, so batches are padded little yet stay well mixed."""
    import torch

    n = len(lengths)
    out = []
    while len(out) < steps:
        perm = torch.randperm(n, generator=gen)
        mega = batch_size * group
        for start in range(0, n - batch_size + 1, mega):
            chunk = perm[start:start + mega]
            chunk = chunk[torch.argsort(lengths[chunk], stable=True)]
            bs = [chunk[i:i + batch_size] for i in range(0, len(chunk) - batch_size + 1, batch_size)]
            order = torch.randperm(len(bs), generator=gen)
            out.extend(bs[i] for i in order)
    return out[:steps]


@contextmanager
def _no_hf_progress_bars():
    """Hide transformers' per-file progress bars (loading / writing a 2 MB model)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def shipped_path(config: OrganismConfig) -> Path | None:
    """The copy of ``config``'s organism that ships with the package, if there is one.

    Pretraining is deterministic per machine but not across machines or thread counts (float
    reduction order), so the shipped copy is what makes the README's figures reproducible, and
    it spares a new user the pretraining minute or two. Only the default config ships.
    """
    path = SHIPPED_DIR / config.cache_key()
    return path if (path / "organism.json").is_file() else None


def _cached_meta(path: Path, config: OrganismConfig) -> dict | None:
    """``organism.json`` of a complete cached copy of ``config``'s organism, else None."""
    try:
        meta = json.loads((path / "organism.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("cache_key") != config.cache_key():
        return None
    return meta if (path / "model.safetensors").is_file() else None


def locate_pretrained(config: OrganismConfig,
                      cache_dir: str | os.PathLike | None = None) -> tuple[Path, str] | None:
    """(directory, "cache" | "shipped") of an already pretrained organism, else None.

    The shipped copy wins over a cached one unless the cached one was made on purpose with
    ``retrain=True`` (``em-callbacks demo --retrain``): a copy cached by an older version of
    the package would otherwise silently replace the organism the README was measured on.
    """
    cached = cache_path(config, cache_dir)
    meta = _cached_meta(cached, config)
    shipped = shipped_path(config)
    if meta is not None and (shipped is None or meta.get("retrained")):
        return cached, "cache"
    return (shipped, "shipped") if shipped is not None else None


def load_pretrained(path: str | os.PathLike, config: OrganismConfig) -> tuple[GPT2LMHeadModel, PreTrainedTokenizerFast]:
    """The organism saved in ``path`` (a directory from :func:`locate_pretrained`), in eval mode.
    The tokenizer is rebuilt from the world (a pure function of the config) rather than read
    back, so a copy saved by another transformers version loads all the same."""
    from transformers import GPT2LMHeadModel

    with _no_hf_progress_bars():
        model = GPT2LMHeadModel.from_pretrained(path)
    tokenizer = build_tokenizer(World(config))
    _set_generation_defaults(model, tokenizer, config)
    model.eval()
    return model, tokenizer


def load_or_pretrain(config: OrganismConfig | None = None,
                     cache_dir: str | os.PathLike | None = None,
                     progress: bool = True,
                     retrain: bool = False) -> tuple[GPT2LMHeadModel, PreTrainedTokenizerFast]:
    """The pretrained organism for ``config`` (see :func:`locate_pretrained`: the shipped copy
    or the cached one), else pretrain it and save it to the cache.

    ``retrain=True`` pretrains from scratch even when a copy exists and replaces the cached
    one; later calls then use it. The cache directory holds ``save_pretrained`` output of
    model and tokenizer plus ``organism.json`` (config and pretraining stats). Writes go to a
    temporary directory that is renamed into place (a replaced copy is first renamed aside),
    so concurrent runs never see a half-written cache.
    """
    config = config or OrganismConfig()
    path = cache_path(config, cache_dir)
    found = None if retrain else locate_pretrained(config, cache_dir)
    if found is not None:
        return load_pretrained(found[0], config)

    world = World(config)
    tokenizer = build_tokenizer(world)
    model = build_model(config, tokenizer)
    stats = pretrain(model, tokenizer, world, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        with _no_hf_progress_bars():
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        meta = {"cache_key": config.cache_key(), "config": config.pretrain_dict(), "retrained": retrain, **stats}
        (tmp / "organism.json").write_text(json.dumps(meta, indent=2, default=list))
        _move_into_place(tmp, path, replace=retrain)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return model, tokenizer


def _move_into_place(tmp: Path, path: Path, replace: bool) -> None:
    """Rename ``tmp`` to ``path``. An existing ``path`` is kept (another process won the race)
    unless ``replace``: then it is renamed aside first and deleted afterwards."""
    aside = None
    if replace and path.exists():
        aside = path.with_name(f".{path.name}-old-{os.getpid()}-{time.time_ns()}")
        os.replace(path, aside)
    try:
        os.replace(tmp, path)
    except OSError:
        if replace:
            raise RuntimeError(f"could not replace the cached organism at {path}: another process "
                               "wrote it at the same time; run again") from None
        shutil.rmtree(tmp, ignore_errors=True)  # another process won the race; keep its copy
    finally:
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
