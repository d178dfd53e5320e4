"""Batched sampling from the current model and exact sequence log-probabilities.

Everything here runs on the model's own device and dtype. Samples are drawn from the
*unwarped* softmax (temperature 1, no top-k/top-p, no repetition penalty): the divergence
estimators need each sample's exact probability, so the sampler and the scorer must describe
the same distribution. The scorer uses teacher forcing, the same function for a model's own
samples and for cross-scoring other checkpoints' samples.
"""

from __future__ import annotations

import contextlib
import random
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList

__all__ = [
    "ProbeSamples",
    "SamplerConfigError",
    "preserved_state",
    "prepare_tokenizer",
    "encode_prompts",
    "generate_samples",
    "InverseCdfSampler",
    "sequence_logprobs",
    "WeightSnapshots",
]


class SamplerConfigError(ValueError):
    """The model or tokenizer cannot be probed as configured."""


@dataclass
class ProbeSamples:
    """Samples of one probe step: ``samples_per_prompt`` completions for each prompt, prompt-major."""

    prompt_index: np.ndarray  # (n,) index into the prompt list
    sample_index: np.ndarray  # (n,) 0..S-1 within its prompt
    prompt_ids: list[list[int]]  # per prompt
    completion_ids: list[list[int]]  # per sample, up to and including EOS when finished
    texts: list[str]
    finished: np.ndarray  # (n,) bool, ended with EOS before max_new_tokens
    logp: np.ndarray | None = None  # (n,) log-prob under the sampling weights, from generation itself

    def __len__(self) -> int:
        return len(self.completion_ids)


# ----------------------------------------------------------------------------- state hygiene
def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.random.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.random.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def _checkpointing(model: torch.nn.Module) -> bool | None:
    """Whether activation (gradient) checkpointing is on, without transformers 5's FutureWarning
    for the old ``is_gradient_checkpointing`` name (which would fire at every probe)."""
    value = getattr(model, "is_activation_checkpointing", None)
    if value is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            value = getattr(model, "is_gradient_checkpointing", None)
    return None if value is None else bool(value)


@contextlib.contextmanager
def preserved_state(model: torch.nn.Module, tokenizer: Any | None = None) -> Iterator[None]:
    """Leave the observed run exactly as it was: RNG streams, train/eval mode of every module,
    tokenizer padding side and pad token, and gradient checkpointing.

    Inside, the model runs its own forward, without the mixed-precision wrapper accelerate
    puts on a prepared model (``model._original_forward``; SFTTrainer's default ``bf16=True``
    adds a bf16 autocast even on CPU). ``generate`` of a PEFT model reaches the inner model and
    never passes through that wrapper, ``generate`` of a plain model does, so without this
    samples would be drawn and scored by different functions (1e-3 apart in the logits of the
    tiny test model: a noise floor of its own in D). Restored afterwards (same object)."""
    rng = _rng_state()
    wrapped = model.__dict__.get("forward") if "_original_forward" in model.__dict__ else None
    if wrapped is not None:
        model.forward = model._original_forward
    modes = [(m, m.training) for m in model.modules()]
    padding_side = getattr(tokenizer, "padding_side", None)
    pad_token = getattr(tokenizer, "pad_token", None)
    checkpointing = _checkpointing(model)
    try:
        yield
    finally:
        if wrapped is not None:
            model.forward = wrapped
        _set_rng_state(rng)
        for module, training in modes:
            module.training = training
        if tokenizer is not None:
            if padding_side is not None:
                tokenizer.padding_side = padding_side
            if getattr(tokenizer, "pad_token", None) != pad_token:
                tokenizer.pad_token = pad_token
        if checkpointing is not None and _checkpointing(model) != checkpointing:
            raise RuntimeError("gradient checkpointing changed while probing; this is a bug in em-callbacks")


def prepare_tokenizer(tokenizer: Any) -> tuple[int, int | None]:
    """Return (pad_token_id, eos_token_id) to use for probing, without mutating the tokenizer.

    A tokenizer with no pad token borrows EOS (standard for decoder-only models); one with
    neither cannot delimit samples and is rejected before training starts.
    """
    if tokenizer is None:
        raise SamplerConfigError(
            "no tokenizer: pass processing_class=tokenizer to the Trainer or tokenizer=... to the callback"
        )
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = eos
    if pad is None:
        raise SamplerConfigError(
            "the tokenizer has neither a pad token nor an EOS token, so samples cannot be padded or ended; "
            "set tokenizer.pad_token (e.g. tokenizer.add_special_tokens({'pad_token': '<pad>'}) and resize embeddings)"
        )
    return int(pad), (int(eos) if eos is not None else None)


def encode_prompts(tokenizer: Any, texts: Sequence[str], uses_chat_template: bool) -> list[list[int]]:
    """Token ids of rendered prompts. Chat templates already contain their special tokens."""
    encoded = tokenizer(list(texts), add_special_tokens=not uses_chat_template)["input_ids"]
    for text, ids in zip(texts, encoded):
        if not ids:
            raise SamplerConfigError(f"prompt {text[:60]!r} encodes to zero tokens")
    return [list(map(int, ids)) for ids in encoded]


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(p.device for p in model.parameters())
    except StopIteration:  # pragma: no cover - parameterless model
        return torch.device("cpu")


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.as_tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


def _unwarped_generation_config(model: torch.nn.Module, max_new_tokens: int, pad_id: int, eos_id: int | None):
    """transformers' own unwarped sampling (``torch.multinomial`` over the softmax): what the
    benchmarks compare the probe sampler with, and the reference its tests draw from."""
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        min_p=None,
        typical_p=1.0,
        repetition_penalty=1.0,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        use_cache=True,
        num_beams=1,
    )


def _sampler_generation_config(max_new_tokens: int, pad_id: int, eos_id: int | None):
    """The probe sampler's ``generate`` settings: the decoding loop picks the token
    :class:`InverseCdfSampler` leaves as the only finite score (greedy over a one-hot), so no
    warper of transformers' sampling path runs, whatever the model ships."""
    from transformers import GenerationConfig

    return GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                            eos_token_id=eos_id, use_cache=True)


@contextlib.contextmanager
def _neutral_model_generation_configs(model: torch.nn.Module) -> Iterator[None]:
    """Blank every ``generation_config`` a (wrapped) model carries while sampling.

    ``generate`` fills each field our config leaves at None from ``model.generation_config``
    (min_p, top_h, suppress_tokens, bad_words_ids, sequence_bias, forced_eos_token_id, ...), and
    a None cannot be set explicitly, so an instruct model's shipped defaults would warp the
    sampler away from the distribution the scorer measures. Restored (same objects) afterwards.
    """
    from transformers import GenerationConfig

    saved = []
    for module in model.modules():
        config = module.__dict__.get("generation_config")
        if isinstance(config, GenerationConfig):
            saved.append((module, config))
            module.generation_config = GenerationConfig()
    try:
        yield
    finally:
        for module, config in saved:
            module.generation_config = config


@contextlib.contextmanager
def _root_params_gathered(model: torch.nn.Module) -> Iterator[None]:
    """FSDP1 only: the root unit's full parameters while ``model.generate`` runs.

    ``FullyShardedDataParallel`` forwards ``generate`` to the wrapped model, which calls its own
    ``forward`` and never the root wrapper's, so the root unit's parameters (embeddings, final
    norm: whatever no inner unit owns) would stay sharded ("'weight' must be 2-D"). Inner units
    gather their own in their forward. FSDP2 (``fully_shard``) hooks the module itself and
    needs nothing; every rank enters this together (generate is called the same number of times
    on every rank). TRL does the same around generation (``summon_full_params(recurse=False)``).
    """
    fsdp1 = None
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        from torch.distributed.fsdp import FullyShardedDataParallel as fsdp1
    if fsdp1 is None or not isinstance(model, fsdp1):
        yield
        return
    with fsdp1.summon_full_params(model, recurse=False, writeback=False):
        yield


@torch.no_grad()
def generate_samples(
    model: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    samples_per_prompt: int,
    max_new_tokens: int,
    pad_id: int,
    eos_id: int | None,
    seed: int,
    batch_size: int = 64,
    min_batches: int = 0,
    decode: Any = None,
    with_logprobs: bool = False,
) -> ProbeSamples:
    """Draw ``samples_per_prompt`` completions for every prompt in large left-padded batches.

    The global RNG is seeded with ``seed`` (callers wrap this in :func:`preserved_state`), so
    a probe step draws the same random numbers in every run. ``min_batches`` forces extra
    generate calls on a dummy row so every rank of a sharded (ZeRO-3/FSDP) run calls
    ``generate`` the same number of times. ``with_logprobs`` also records each sample's exact
    log-probability from the very distribution it was drawn from (one log-softmax per step,
    no extra forward pass); it equals teacher forcing to float precision
    (tests/test_sampling.py).
    """
    device = _model_device(model)
    rows = [(p, s) for p in range(len(prompt_ids)) for s in range(samples_per_prompt)]
    config = _sampler_generation_config(max_new_tokens, pad_id, eos_id)
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(seed)
    completions: list[list[int]] = []
    finished: list[bool] = []
    logps: list[float] = []
    batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    n_calls = max(len(batches), min_batches)
    for b in range(n_calls):
        batch = batches[b] if b < len(batches) else None
        inputs = [prompt_ids[p] for p, _ in batch] if batch else [list(prompt_ids[0]) if prompt_ids else [pad_id]]
        ids, mask = _left_pad(inputs, pad_id, device)
        sampler = InverseCdfSampler(record=with_logprobs)
        with _neutral_model_generation_configs(model), _root_params_gathered(model):
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                                 logits_processor=LogitsProcessorList([sampler]))
        if batch is None:
            continue
        generated = out[:, ids.shape[1] :]
        step_logp = sampler.finish(generated) if with_logprobs else None
        for r, row in enumerate(generated.tolist()):
            tokens, done = _trim_completion(row, eos_id, pad_id)
            completions.append(tokens)
            finished.append(done)
            if step_logp is not None:
                logps.append(float(step_logp[r, : len(tokens)].sum()))
    texts = [decode(c) for c in completions] if decode is not None else [""] * len(completions)
    return ProbeSamples(
        prompt_index=np.array([p for p, _ in rows], dtype=np.int64),
        sample_index=np.array([s for _, s in rows], dtype=np.int64),
        prompt_ids=[list(p) for p in prompt_ids],
        completion_ids=completions,
        texts=texts,
        finished=np.array(finished, dtype=bool),
        logp=np.array(logps, dtype=np.float64) if with_logprobs else None,
    )


class InverseCdfSampler(LogitsProcessor):
    """Draws every next token exactly from softmax(raw logits), by inverse transform: one
    uniform per row against the float64 cumulative distribution (``searchsorted``), and records
    log p(chosen token) from that same log-softmax when ``record`` is set.

    Why not transformers' ``do_sample``: its ``torch.multinomial`` draws one exponential per
    vocabulary entry per row (the Gumbel/exponential race), ~25% of a CPU probe's generation
    time at vocab 8192; this draws one number per row, and its log-softmax doubles as the
    recorder's. The distribution is the same (tests/test_sampling.py checks it against the
    exact one on an enumerable vocabulary); the random numbers, and so the samples of a given
    seed, differ from ``do_sample``'s. It runs as the last logits processor of greedy decoding
    and leaves one finite score per row, so the loop picks exactly its draw. Only one step's
    log-softmax (batch x vocab) is held at a time: the token chosen at step t is read from
    ``input_ids`` at step t + 1, and the last one in :meth:`finish`.
    """

    def __init__(self, record: bool = True) -> None:
        self.record = record
        self._previous: torch.Tensor | None = None
        self._chosen: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logp = torch.log_softmax(scores.float(), dim=-1)
        if self.record:
            if self._previous is not None:
                self._chosen.append(self._previous.gather(-1, input_ids[:, -1:]).squeeze(-1))
            self._previous = logp
        cdf = logp.exp().double().cumsum_(dim=-1)
        total = cdf[:, -1:]
        if not bool(torch.isfinite(total).all()):  # as torch.multinomial refuses it
            raise ValueError("probability tensor contains either `inf`, `nan` or element < 0")
        draw = torch.rand(total.shape, dtype=torch.float64, device=total.device) * total
        chosen = torch.searchsorted(cdf, draw, right=True).clamp_(max=scores.shape[-1] - 1)
        return torch.full_like(scores, float("-inf")).scatter_(-1, chosen, 0.0)  # a new tensor: raw logits untouched

    def finish(self, generated: torch.Tensor) -> torch.Tensor:
        """(batch, generated length) float64 log-probs of the generated tokens (CPU)."""
        if self._previous is not None and generated.shape[1] > len(self._chosen):
            self._chosen.append(self._previous.gather(-1, generated[:, len(self._chosen) : len(self._chosen) + 1]).squeeze(-1))
        self._previous = None
        chosen, self._chosen = self._chosen, []
        if not chosen:
            return torch.zeros((generated.shape[0], 0), dtype=torch.float64)
        return torch.stack(chosen, dim=1).double().cpu()


def _trim_completion(row: list[int], eos_id: int | None, pad_id: int) -> tuple[list[int], bool]:
    """Cut generated tokens after the first EOS (kept: its probability is part of the sample's)."""
    if eos_id is not None and eos_id in row:
        end = row.index(eos_id)
        return row[: end + 1], True
    return row, False


@torch.no_grad()
def sequence_logprobs(
    model: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    pad_id: int,
    batch_size: int = 64,
    max_logit_elements: int = 2**28,
    sync_batches: Callable[[int], int] | None = None,
    scoring_dtype: torch.dtype | str | None = None,
) -> np.ndarray:
    """Exact log p(completion | prompt) by teacher forcing, one value per (prompt, completion) pair.

    Rows are right-padded so position ids are the natural 0..L-1, the same positions that
    left-padded generation assigns from the attention mask. Logits are computed only at the
    positions that predict completion tokens (the model's ``logits_to_keep`` with a boolean
    mask: its own head and any logit soft-capping, never the prompt's positions); models that
    ignore it return every position's logits, which are used as they are. Log-softmax is taken
    in float32 in chunks of positions (``cross_entropy``: no full-vocabulary float32 copy of the
    logits), and token log-probs are summed in float64.
    Batches hold at most ``batch_size`` rows and ``max_logit_elements`` logits (a
    150k-token vocabulary would otherwise need gigabytes of them). ``scoring_dtype``: run the
    forward pass in at least this dtype (:func:`em_callbacks.precision.computed_in`: exact
    upcast of narrower weights, autocast off; ``"float32"`` works too); ``None`` or ``"model"``
    keeps the model's own numerics.
    ``sync_batches(n_local) -> n_all`` lets sharded (ZeRO-3/FSDP) ranks agree on a common
    number of forward passes; the extra ones run on a dummy row.
    """
    from .precision import computed_in

    if len(prompt_ids) != len(completion_ids):
        raise ValueError("prompt_ids and completion_ids must pair up")
    device = _model_device(model)
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 32_000)
    out = np.zeros(len(completion_ids), dtype=np.float64)
    keeps = _keeps_logits(model, pad_id, device)
    lengths = [len(p) + len(c) for p, c in zip(prompt_ids, completion_ids)]
    order = np.argsort(lengths, kind="stable")  # similar lengths together: less padding
    batches: list[np.ndarray] = []
    start = 0
    while start < len(order):  # lengths ascend along `order`: a batch's last row sets its width
        rows, kept = 1, len(completion_ids[order[start]])
        while start + rows < len(order) and rows < batch_size:
            nxt = order[start + rows]
            kept += len(completion_ids[nxt])
            if (kept if keeps else (rows + 1) * lengths[nxt]) * vocab > max_logit_elements:
                break
            rows += 1
        batches.append(order[start : start + rows])
        start += rows
    n_calls = sync_batches(len(batches)) if sync_batches is not None else len(batches)
    for b in range(max(n_calls, len(batches))):
        idx = batches[b] if b < len(batches) else None
        rows_ids = [list(prompt_ids[i]) + list(completion_ids[i]) for i in idx] if idx is not None else [[pad_id, pad_id]]
        width = max(len(r) for r in rows_ids)
        ids = torch.full((len(rows_ids), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows_ids), width), dtype=torch.long)
        predicts = torch.zeros((len(rows_ids), width), dtype=torch.bool)  # position t predicts token t + 1
        for r, seq in enumerate(rows_ids):
            ids[r, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
            mask[r, : len(seq)] = 1
            if idx is not None:
                predicts[r, max(len(prompt_ids[idx[r]]) - 1, 0) : len(seq) - 1] = True
        if not predicts.any():  # empty completions or a dummy batch: keep one position (sharded ranks stay in step)
            predicts[0, 0] = True
        ids, mask, predicts = ids.to(device), mask.to(device), predicts.to(device)
        extra = {"logits_to_keep": predicts} if keeps else {}
        with computed_in(scoring_dtype, device.type):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False, **extra).logits
        if idx is None:
            continue
        if logits.dim() == 3:  # every position (the model ignored logits_to_keep)
            logits = logits[predicts]
        targets = torch.roll(ids, shifts=-1, dims=1)[predicts]
        row_of = torch.arange(len(rows_ids), device=device).unsqueeze(1).expand_as(predicts)[predicts]
        token_lp = _target_logprobs(logits, targets)
        del logits  # before the next batch's forward: one batch of logits alive at a time
        sums = torch.zeros(len(rows_ids), dtype=torch.float64, device=device).index_add_(0, row_of, token_lp)
        real = torch.tensor([len(completion_ids[i]) > 0 for i in idx], device=device)
        out[idx] = torch.where(real, sums, torch.zeros_like(sums)).cpu().numpy()
    return out


def _target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] per row of (n, vocab) ``logits``, computed in float32 by chunks
    of rows (``cross_entropy``: one fused log-softmax and pick, no full-size float32 copy), returned
    in float64. Chunks of 2**20 values (4 MiB, cache-sized) on a CPU, where they are ~3x faster
    than 64 MiB ones at a 152k vocabulary; 2**24 on accelerators (fewer kernel launches)."""
    n, vocab = logits.shape
    chunk_elements = 2**20 if logits.device.type == "cpu" else 2**24
    step = max(1, chunk_elements // max(vocab, 1))
    out = torch.empty(n, dtype=torch.float64, device=logits.device)
    for s in range(0, n, step):
        nll = torch.nn.functional.cross_entropy(logits[s : s + step].float(), targets[s : s + step], reduction="none")
        out[s : s + step] = -nll.double()
    return out


_KEEPS_LOGITS: "weakref.WeakKeyDictionary[torch.nn.Module, bool]" = weakref.WeakKeyDictionary()


def _keeps_logits(model: torch.nn.Module, pad_id: int, device: torch.device) -> bool:
    """Whether ``model`` computes logits only where a boolean ``logits_to_keep`` mask says
    (transformers' causal LMs do). Found out once per model with a two-token forward pass (every
    rank at the same point: sharded models gather weights in it)."""
    known = _KEEPS_LOGITS.get(model)
    if known is not None:
        return known
    ids = torch.full((1, 2), pad_id, dtype=torch.long, device=device)
    keep = torch.tensor([[False, True]], device=device)
    try:
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, logits_to_keep=keep).logits
        known = logits.dim() == 2 and logits.shape[0] == 1
    except (TypeError, ValueError, IndexError, RuntimeError) as exc:
        if "out of memory" in str(exc).lower():
            raise
        known = False
    _KEEPS_LOGITS[model] = known
    return known


# ----------------------------------------------------------------------------- weight snapshots
class WeightSnapshots:
    """CPU copies of a model's trainable parameters at recent probe steps.

    New samples must be scored under older checkpoints. For a PEFT adapter the trainable
    parameters are the adapter (megabytes), so keeping the last few is cheap; for a full
    fine-tune this is an opt-in. Scoring swaps a snapshot in *in place* (``copy_``), so the
    optimizer's references to the parameter tensors stay valid, and swaps the live weights
    back afterwards bit for bit.
    """

    def __init__(self, keep: int):
        if keep < 0:
            raise ValueError("keep must be >= 0")
        self.keep = keep
        self._snapshots: dict[int, dict[str, torch.Tensor]] = {}

    @staticmethod
    def trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        return {name: p for name, p in model.named_parameters() if p.requires_grad}

    def capture(self, model: torch.nn.Module, probe_index: int) -> None:
        if self.keep == 0:
            return
        self._snapshots[probe_index] = {
            name: p.detach().to("cpu", copy=True) for name, p in self.trainable(model).items()
        }
        for old in sorted(self._snapshots)[: -self.keep]:
            del self._snapshots[old]

    def available(self) -> list[int]:
        return sorted(self._snapshots)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for snap in self._snapshots.values() for t in snap.values())

    @contextlib.contextmanager
    @torch.no_grad()
    def swapped_in(self, model: torch.nn.Module, probe_index: int) -> Iterator[torch.nn.Module]:
        """``model`` with probe ``probe_index``'s parameters in place (yields the same model)."""
        snapshot = self._snapshots[probe_index]
        params = self.trainable(model)
        live = {name: p.detach().to("cpu", copy=True) for name, p in params.items()}
        try:
            for name, p in params.items():
                p.data.copy_(snapshot[name].to(p.device, p.dtype))
            yield model
        finally:
            for name, p in params.items():
                p.data.copy_(live[name].to(p.device, p.dtype))

    def state_dict(self) -> dict[int, dict[str, torch.Tensor]]:
        return self._snapshots

    def load_state_dict(self, state: dict[int, dict[str, torch.Tensor]]) -> None:
        self._snapshots = {int(k): v for k, v in state.items()}
