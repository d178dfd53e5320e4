"""The judge interface shared by all backends.

A judge maps (order parameter, prompt, response) to a :class:`Judgment`: a probability
distribution over the order parameter's :class:`~em_callbacks.order.Scale`, its expected
score, or an error. Judges never raise for a per-item failure (network error, unparsable
answer, low probability mass): they return a Judgment with ``error`` set. Configuration
errors (a scale label that is not a single token, no API key) raise ``ValueError``.

Error strings have the form ``"<kind>: <detail>"``; ``Judgment.error_kind`` is the kind.
Kinds used by the built-in backends:

``low_mass``        the judge's probability on valid labels was below ``min_mass``
``unparsable``      the answer is not a label of the scale
``no_score``        a rule returned None
``rate_limited``    HTTP 429 after all retries
``http_error``      other HTTP status (5xx after all retries, or a non-retryable 4xx)
``timeout``         request timed out after all retries
``connection_error`` server unreachable / connection dropped after all retries
``bad_response``    malformed JSON / missing fields in the server's answer
``judge_exception`` an unexpected exception inside a judge (bug or misconfiguration)
``drain_timeout``   JudgeRunner.drain() gave up waiting ("timeout at drain")
``cancelled``       the runner was closed before the item finished
"""

from __future__ import annotations

import abc
import asyncio
import json
import math
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Coroutine, Iterable, Sequence

import numpy as np

from em_callbacks.order import OrderParameter, Scale

__all__ = ["Judgment", "Judge", "JudgeItem", "JudgeResult", "error_kind"]


def error_kind(error: str | None) -> str | None:
    """The ``kind`` of an error string ``"kind: detail"`` (None for no error)."""
    if error is None:
        return None
    head, sep, _ = error.partition(":")
    head = head.strip()
    if sep and head and " " not in head:
        return head
    return "other"


@dataclass(frozen=True, eq=False)
class Judgment:
    """One judge verdict.

    ``probs``: distribution over the scale's outcomes (float array of length K, sums to 1)
    or None; ``score``: its expected outcome or None; ``error``: ``"kind: detail"`` or
    None; ``raw``: backend-specific raw output (JSON text or the answer) for debugging.
    """

    probs: np.ndarray | None
    score: float | None
    error: str | None
    raw: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.score is not None

    @property
    def error_kind(self) -> str | None:
        return error_kind(self.error)

    @classmethod
    def failure(cls, kind: str, detail: str = "", raw: str | None = None) -> "Judgment":
        msg = f"{kind}: {detail}" if detail else f"{kind}:"
        return cls(None, None, msg, raw)

    @classmethod
    def from_probs(cls, scale: Scale, probs: Any, raw: str | None = None) -> "Judgment":
        p = np.asarray(probs, dtype=float).reshape(-1)
        if p.shape != (len(scale),):
            return cls.failure("judge_exception", f"probs of length {p.size} for a scale of {len(scale)}", raw)
        if not np.all(np.isfinite(p)) or np.any(p < 0) or p.sum() <= 0:
            return cls.failure("unparsable", "invalid probability vector", raw)
        p = p / p.sum()
        return cls(p, float(scale.expected(p)), None, raw)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (for the run store)."""
        return {
            "probs": None if self.probs is None else [float(x) for x in self.probs],
            "score": None if self.score is None else float(self.score),
            "error": self.error,
            "raw": self.raw,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Judgment":
        probs = d.get("probs")
        return cls(None if probs is None else np.asarray(probs, dtype=float), d.get("score"),
                   d.get("error"), d.get("raw"))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Judgment):
            return NotImplemented
        if (self.probs is None) != (other.probs is None):
            return False
        if self.probs is not None and other.probs is not None and not np.array_equal(self.probs, other.probs):
            return False
        same_score = self.score == other.score or (
            self.score is not None and other.score is not None
            and math.isnan(self.score) and math.isnan(other.score)
        )
        return same_score and self.error == other.error and self.raw == other.raw

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        probs = "None" if self.probs is None else f"<{len(self.probs)} probs>"
        raw = None if self.raw is None else (self.raw if len(self.raw) <= 60 else self.raw[:57] + "...")
        return f"Judgment(score={self.score!r}, error={self.error!r}, probs={probs}, raw={raw!r})"


@dataclass(frozen=True)
class JudgeItem:
    """One sampled answer to be judged (identifiers are carried through untouched)."""

    probe_index: int
    prompt_id: str
    sample_idx: int
    prompt: str
    response: str


@dataclass(frozen=True)
class JudgeResult:
    item: JudgeItem
    order_parameter: str
    judgment: Judgment


class Judge(abc.ABC):
    """Async judge interface. Subclasses implement :meth:`ajudge`.

    ``judge()`` is a blocking convenience that runs ``ajudge`` on a private event-loop
    thread owned by the judge (so async clients and their connection pools are reused
    across calls, and it also works when called from inside a running event loop).
    """

    _sync_loop: asyncio.AbstractEventLoop | None = None
    _sync_thread: threading.Thread | None = None
    _sync_lock = threading.Lock()  # class-level: guards lazy creation only

    @abc.abstractmethod
    async def ajudge(self, order_parameter: OrderParameter, prompt: str, response: str) -> Judgment:
        """Judge one answer. Must not raise for per-item failures."""

    async def ajudge_many(
        self, order_parameter: OrderParameter, pairs: Sequence[tuple[str, str]]
    ) -> list[Judgment]:
        """Judge many (prompt, response) pairs concurrently (order preserved)."""
        return list(await asyncio.gather(*(self.ajudge(order_parameter, p, r) for p, r in pairs)))

    def check_order_parameters(self, order_parameters: Iterable[OrderParameter]) -> None:
        """Raise ValueError, saying why, if this judge cannot score one of ``order_parameters``.

        Called once before judging starts, so a misconfiguration fails at construction and
        not as a failed judgment per sample. The default runs :meth:`validate` on each (a
        no-op on this base class); override to report all problems at once.
        """
        for op in order_parameters:
            self.validate(op)

    def validate(self, order_parameter: OrderParameter) -> None:
        """Raise ValueError if this judge cannot score ``order_parameter`` (default: ok).
        The per-order-parameter hook behind :meth:`check_order_parameters`."""

    def config(self) -> dict[str, Any]:
        """JSON-able description of the judge (never contains secrets)."""
        return {"type": type(self).__name__}

    # ---- sync conveniences -------------------------------------------------------------
    def _run_sync(self, coro: Coroutine[Any, Any, Any], timeout: float | None = None) -> Any:
        with Judge._sync_lock:
            if self._sync_loop is None or self._sync_loop.is_closed():
                loop = asyncio.new_event_loop()
                ready = threading.Event()

                def run() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(ready.set)
                    loop.run_forever()

                t = threading.Thread(target=run, name=f"{type(self).__name__}-sync-loop", daemon=True)
                t.start()
                ready.wait()
                self._sync_loop, self._sync_thread = loop, t
        fut: Future = asyncio.run_coroutine_threadsafe(coro, self._sync_loop)
        return fut.result(timeout)

    def judge(self, order_parameter: OrderParameter, prompt: str, response: str) -> Judgment:
        """Blocking :meth:`ajudge`."""
        return self._run_sync(self.ajudge(order_parameter, prompt, response))

    def judge_many(self, order_parameter: OrderParameter, pairs: Sequence[tuple[str, str]]) -> list[Judgment]:
        """Blocking :meth:`ajudge_many`."""
        return self._run_sync(self.ajudge_many(order_parameter, list(pairs)))

    async def aclose(self) -> None:
        """Release per-loop resources of the *current* loop (override in backends)."""

    def close(self) -> None:
        """Stop the private sync loop (if started). Safe to call twice."""
        loop, thread = self._sync_loop, self._sync_thread
        if loop is None or loop.is_closed():
            return
        try:
            asyncio.run_coroutine_threadsafe(self.aclose(), loop).result(5)
        except Exception:
            pass
        loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(5)
        if not loop.is_running():
            loop.close()
        self._sync_loop = None
        self._sync_thread = None

    def __enter__(self) -> "Judge":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def dumps_raw(obj: Any) -> str:
    """Compact JSON for ``Judgment.raw``."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
