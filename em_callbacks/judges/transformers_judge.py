"""Judge backend for a local causal LM (transformers).

The judge prompt is rendered with the tokenizer's chat template when it has one (else as
plain text followed by "Answer:"), and the model's next-token distribution is read. The
probability of each scale label is the summed probability of the single tokens that
decode to that label (e.g. "7" and " 7"), renormalised over the labels. Every label must
be reachable as ONE token: use ``Scale.digits()`` or single-token ``Scale.candidates``
for tokenizers that split "100" (Llama, Qwen, ...).

Calls are collected into batches of ``batch_size`` and run in a worker thread
(``asyncio.to_thread``) so the event loop is never blocked. The model is switched to eval
mode for the forward pass and every module's train/eval flag is restored afterwards. The
forward pass draws no random numbers, so the global torch RNG is left untouched. (It is
deliberately not saved/restored: a restore from the worker thread would rewind the RNG
stream of a training loop running concurrently in the main thread.)
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import weakref
from typing import Any, Sequence

import numpy as np

from em_callbacks.judges.base import Judge, Judgment, dumps_raw
from em_callbacks.order import OrderParameter, Scale

__all__ = ["TransformersJudge"]

logger = logging.getLogger(__name__)


class TransformersJudge(Judge):
    """Next-token judge on a local ``AutoModelForCausalLM``-style model.

    Args:
        model: a causal LM (``model(input_ids, attention_mask) -> .logits``). Use a
            dedicated judge model; do not pass the model being trained while it trains.
        tokenizer: its tokenizer.
        batch_size: maximum items per forward pass.
        min_mass: minimum probability mass on the label tokens (default 0: always score).
        use_chat_template: True / False / None (auto: if the tokenizer has one).
        max_length: prompts longer than this are truncated from the left (None: the
            model's maximum context, if known).
        chat_template_kwargs: extra arguments for ``apply_chat_template``.
        order_parameters: validate these at construction (label tokenization).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        batch_size: int = 16,
        *,
        min_mass: float = 0.0,
        use_chat_template: bool | None = None,
        max_length: int | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        order_parameters: Sequence[OrderParameter] | None = None,
    ) -> None:
        if int(batch_size) < 1:
            raise ValueError("TransformersJudge: batch_size must be >= 1")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self.min_mass = float(min_mass)
        if use_chat_template is None:
            use_chat_template = bool(getattr(tokenizer, "chat_template", None))
        self.use_chat_template = bool(use_chat_template)
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        if max_length is None:
            cfg = getattr(model, "config", None)
            max_length = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        self.max_length = int(max_length) if max_length else None
        self._label_cache: dict[Scale, list[list[int]]] = {}
        self._vocab: dict[str, int] | None = None
        self._model_lock = threading.Lock()
        self._queues: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, list]" = weakref.WeakKeyDictionary()
        self._flush_tasks: set[asyncio.Task] = set()
        self._flushing: "weakref.WeakSet[asyncio.AbstractEventLoop]" = weakref.WeakSet()
        self._accepts_position_ids = "position_ids" in _forward_params(model)
        self.n_forward = 0  # forward passes run (for tests / diagnostics)
        for op in order_parameters or ():
            self.validate(op)

    def __repr__(self) -> str:
        name = getattr(getattr(self.model, "config", None), "_name_or_path", None) or type(self.model).__name__
        return f"TransformersJudge(model={name!r}, batch_size={self.batch_size})"

    def config(self) -> dict[str, Any]:
        cfg = getattr(self.model, "config", None)
        return {
            "type": "TransformersJudge",
            "model": getattr(cfg, "_name_or_path", None) or type(self.model).__name__,
            "batch_size": self.batch_size,
            "min_mass": self.min_mass,
            "use_chat_template": self.use_chat_template,
            "max_length": self.max_length,
        }

    # ---- label tokens ----------------------------------------------------------------------
    def label_token_ids(self, scale: Scale) -> list[list[int]]:
        """For each label, the ids of the single tokens that decode to it (raises ValueError
        if some label is not a single token, or two labels share a token)."""
        cached = self._label_cache.get(scale)
        if cached is not None:
            return cached
        tok = self.tokenizer
        if self._vocab is None:
            try:
                self._vocab = dict(tok.get_vocab())
            except Exception:
                self._vocab = {}
        unk = getattr(tok, "unk_token_id", None)
        result: list[list[int]] = []
        owner: dict[int, str] = {}
        bad: list[str] = []
        for label in scale.labels:
            cands: set[int] = set()
            for variant in (label, " " + label):
                try:
                    ids = tok.encode(variant, add_special_tokens=False)
                except Exception:
                    ids = []
                if len(ids) == 1:
                    cands.add(int(ids[0]))
            for piece in (label, "\u2581" + label, "\u0120" + label):
                if piece in self._vocab:
                    cands.add(int(self._vocab[piece]))
            ids_ok = []
            for i in sorted(cands):
                if unk is not None and i == unk:
                    continue
                try:
                    text = tok.decode([i])
                except Exception:
                    continue
                if text.strip() == label:
                    ids_ok.append(i)
            if not ids_ok:
                bad.append(label)
                continue
            for i in ids_ok:
                if i in owner and owner[i] != label:
                    raise ValueError(
                        f"TransformersJudge: labels {owner[i]!r} and {label!r} map to the same token id {i}"
                    )
                owner[i] = label
            result.append(ids_ok)
        if bad:
            shown = ", ".join(repr(b) for b in bad[:8]) + (" ..." if len(bad) > 8 else "")
            raise ValueError(
                f"TransformersJudge: scale labels {shown} are not single tokens of this tokenizer; "
                "every label must be one token. Use Scale.digits() (0-9) or Scale.candidates() "
                "with single-token answers, e.g. op.with_scale(Scale.digits())."
            )
        self._label_cache[scale] = result
        return result

    def validate(self, order_parameter: OrderParameter) -> None:
        self.label_token_ids(order_parameter.scale)

    # ---- prompt ---------------------------------------------------------------------------
    def _prompt_ids(self, op: OrderParameter, prompt: str, response: str) -> tuple[list[int], bool]:
        tok = self.tokenizer
        if self.use_chat_template:
            text = tok.apply_chat_template(
                op.messages(prompt, response), tokenize=False, add_generation_prompt=True,
                **self.chat_template_kwargs,
            )
            ids = tok(text, add_special_tokens=False)["input_ids"]
        else:
            text = op.render_prompt(prompt, response) + "\n\nAnswer:"
            ids = tok(text)["input_ids"]
        ids = [int(i) for i in ids]
        truncated = False
        if self.max_length and len(ids) > self.max_length:
            ids, truncated = ids[-self.max_length:], True
        if not ids:
            raise ValueError("empty judge prompt after tokenization")
        return ids, truncated

    # ---- batched forward (worker thread) ---------------------------------------------------
    def _judge_batch(self, items: list[tuple[OrderParameter, str, str]]) -> list[Judgment]:
        import torch

        out: list[Judgment | None] = [None] * len(items)
        prepared: list[tuple[int, list[int], bool]] = []
        for i, (op, prompt, response) in enumerate(items):
            try:
                ids, truncated = self._prompt_ids(op, prompt, response)
                prepared.append((i, ids, truncated))
            except Exception as e:
                out[i] = Judgment.failure("judge_exception", f"prompt: {type(e).__name__}: {e}")
        if prepared:
            model = self.model
            pad_id = getattr(self.tokenizer, "pad_token_id", None)
            if pad_id is None:
                pad_id = getattr(self.tokenizer, "eos_token_id", None) or 0
            n, width = len(prepared), max(len(ids) for _, ids, _ in prepared)
            input_ids = torch.full((n, width), int(pad_id), dtype=torch.long)
            attn = torch.zeros((n, width), dtype=torch.long)
            for row, (_, ids, _) in enumerate(prepared):  # left padding
                input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
                attn[row, width - len(ids):] = 1
            try:
                device = next(model.parameters()).device
            except (StopIteration, AttributeError):
                device = torch.device("cpu")
            kwargs: dict[str, Any] = {
                "input_ids": input_ids.to(device),
                "attention_mask": attn.to(device),
                "use_cache": False,
            }
            if self._accepts_position_ids:
                kwargs["position_ids"] = (attn.cumsum(-1) - 1).clamp(min=0).to(device)
            with self._model_lock:
                modes = [(m, m.training) for m in model.modules()]
                try:
                    if any(t for _, t in modes):
                        model.eval()
                    with torch.inference_mode():
                        logits = model(**kwargs).logits[:, -1, :]
                        logp = torch.log_softmax(logits.float(), dim=-1).cpu().double().numpy()
                    self.n_forward += 1
                finally:
                    for m, t in modes:
                        m.training = t
            for row, (i, _, truncated) in enumerate(prepared):
                op = items[i][0]
                label_ids = self.label_token_ids(op.scale)
                probs = np.array([np.exp(logp[row, ids]).sum() for ids in label_ids])
                mass = float(probs.sum())
                raw = dumps_raw({"label_mass": round(mass, 6), "truncated": truncated})
                if not np.isfinite(mass) or mass <= 0.0 or mass < self.min_mass:
                    out[i] = Judgment.failure("low_mass", f"mass {mass:.3g} < min_mass {self.min_mass:g}", raw)
                else:
                    p = probs / mass
                    out[i] = Judgment(p, float(op.scale.expected(p)), None, raw)
        return [j if j is not None else Judgment.failure("judge_exception", "not judged") for j in out]

    # ---- async interface -------------------------------------------------------------------
    async def ajudge(self, order_parameter: OrderParameter, prompt: str, response: str) -> Judgment:
        self.validate(order_parameter)  # configuration error: raises ValueError
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        queue = self._queues.get(loop)
        if queue is None:
            queue = self._queues[loop] = []
        queue.append((order_parameter, str(prompt), str(response), fut))
        if loop not in self._flushing:
            self._flushing.add(loop)
            task = loop.create_task(self._flush(loop, queue))
            self._flush_tasks.add(task)
            task.add_done_callback(self._flush_tasks.discard)
        return await fut

    async def _flush(self, loop: asyncio.AbstractEventLoop, queue: list) -> None:
        try:
            # let concurrently scheduled ajudge calls join the first batch
            for _ in range(3):
                await asyncio.sleep(0)
            while queue:
                await self._run_one_batch(queue)
        finally:
            # no await between the last `while queue` check and this line: nothing is lost
            self._flushing.discard(loop)

    async def _run_one_batch(self, queue: list) -> None:
        batch = [x for x in queue[: self.batch_size] if not x[3].done()]
        del queue[: self.batch_size]
        if not batch:
            return
        try:
            results = await asyncio.to_thread(self._judge_batch, [(op, p, r) for op, p, r, _ in batch])
        except Exception as e:  # e.g. out of memory: fail this batch, keep going
            logger.warning("TransformersJudge: batch failed: %r", e)
            results = [Judgment.failure("judge_exception", f"{type(e).__name__}: {e}")] * len(batch)
        for (_, _, _, fut), j in zip(batch, results):
            if not fut.done():
                fut.set_result(j)


def _forward_params(model: Any) -> set[str]:
    fwd = getattr(model, "forward", None)
    if fwd is None:
        return set()
    try:
        return set(inspect.signature(fwd).parameters)
    except (TypeError, ValueError):
        return set()
