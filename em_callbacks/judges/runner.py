"""JudgeRunner: judge answers in the background while training continues.

The runner owns a daemon thread running an asyncio event loop. ``submit`` only hands the
items to that loop (it never waits for a judge); results are collected with ``poll`` (what
finished since the last poll) or ``drain`` (wait up to a timeout for everything).

Every submitted (item, order parameter) pair yields exactly one JudgeResult: a judgment,
a failure Judgment from the judge, ``drain_timeout`` ("timeout at drain") if ``drain``
gave up on it, or ``cancelled`` if the runner was closed first.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
import time
from typing import Any, Iterable, Sequence

from em_callbacks.judges.base import Judge, JudgeItem, JudgeResult, Judgment
from em_callbacks.order import OrderParameter

__all__ = ["JudgeRunner"]

logger = logging.getLogger(__name__)


class JudgeRunner:
    """Run ``judge`` on every submitted item for every order parameter, in the background.

    Thread-safe: ``submit``/``poll``/``pending``/``drain``/``stats`` may be called from any
    thread (typically the training loop's). ``max_concurrency`` bounds the judge calls in
    flight (the judge may have its own, lower limit; for TransformersJudge set it >= the
    judge's ``batch_size`` or batches will be capped at ``max_concurrency``).
    """

    def __init__(
        self,
        judge: Judge,
        order_parameters: Sequence[OrderParameter],
        max_concurrency: int = 8,
        *,
        thread_name: str = "em-judge-runner",
    ) -> None:
        if isinstance(order_parameters, OrderParameter):
            order_parameters = [order_parameters]
        ops = list(order_parameters)
        if not ops:
            raise ValueError("JudgeRunner needs at least one order parameter")
        names = [op.name for op in ops]
        if len(set(names)) != len(names):
            raise ValueError(f"JudgeRunner: duplicate order parameter names in {names}")
        if int(max_concurrency) < 1:
            raise ValueError("JudgeRunner: max_concurrency must be >= 1")
        check = getattr(judge, "check_order_parameters", None)
        if check is not None:
            check(ops)  # configuration errors surface here, in the caller's thread
        self.judge = judge
        self.order_parameters = tuple(ops)
        self.max_concurrency = int(max_concurrency)

        self._cond = threading.Condition()
        self._pending: dict[int, tuple[JudgeItem, OrderParameter]] = {}
        self._done: list[JudgeResult] = []
        self._ids = itertools.count()
        self._closed = False
        self._counts: collections.Counter[str] = collections.Counter()
        self._failures: collections.Counter[str] = collections.Counter()
        self._tasks: dict[int, asyncio.Task] = {}  # loop thread only

        self._loop = asyncio.new_event_loop()
        self._sem: asyncio.Semaphore | None = None
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            self._sem = asyncio.Semaphore(self.max_concurrency)
            self._loop.call_soon(ready.set)
            try:
                self._loop.run_forever()
            finally:
                try:
                    self._loop.run_until_complete(self._loop.shutdown_asyncgens())
                except Exception:  # pragma: no cover
                    pass
                self._loop.close()

        self._thread = threading.Thread(target=run, name=thread_name, daemon=True)
        self._thread.start()
        ready.wait()

    # ---- submission --------------------------------------------------------------------
    def submit(self, items: Iterable[JudgeItem]) -> int:
        """Schedule every item for every order parameter; returns at once (never waits
        for a judge). Returns the number of (item, order parameter) jobs added."""
        entries: list[tuple[int, JudgeItem, OrderParameter]] = []
        with self._cond:
            if self._closed:
                raise RuntimeError("JudgeRunner is closed")
            for item in items:
                for op in self.order_parameters:
                    eid = next(self._ids)
                    self._pending[eid] = (item, op)
                    entries.append((eid, item, op))
            self._counts["submitted"] += len(entries)
        if entries:
            self._loop.call_soon_threadsafe(self._start, entries)
        return len(entries)

    def _start(self, entries: list[tuple[int, JudgeItem, OrderParameter]]) -> None:  # loop thread
        with self._cond:
            live = [e for e in entries if e[0] in self._pending]
        for eid, item, op in live:
            task = self._loop.create_task(self._run(eid, item, op))
            self._tasks[eid] = task

    async def _run(self, eid: int, item: JudgeItem, op: OrderParameter) -> None:  # loop thread
        try:
            assert self._sem is not None
            async with self._sem:
                try:
                    judgment = await self.judge.ajudge(op, item.prompt, item.response)
                    if not isinstance(judgment, Judgment):
                        judgment = Judgment.failure(
                            "judge_exception", f"judge returned {type(judgment).__name__}, not a Judgment"
                        )
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    logger.debug("judge raised", exc_info=True)
                    judgment = Judgment.failure("judge_exception", f"{type(e).__name__}: {e}")
            self._finish(eid, judgment)
        finally:
            self._tasks.pop(eid, None)

    def _finish(self, eid: int, judgment: Judgment) -> bool:
        with self._cond:
            entry = self._pending.pop(eid, None)
            if entry is None:  # already given up on (drain timeout / close)
                return False
            self._record(JudgeResult(entry[0], entry[1].name, judgment))
            self._cond.notify_all()
            return True

    def _record(self, result: JudgeResult) -> None:  # under self._cond
        self._done.append(result)
        self._counts["completed"] += 1
        kind = result.judgment.error_kind
        if kind is None and result.judgment.score is not None:
            self._counts["ok"] += 1
        else:
            self._counts["failed"] += 1
            self._failures[kind or "no_score"] += 1

    def _cancel_tasks(self, eids: list[int]) -> None:  # loop thread
        for eid in eids:
            task = self._tasks.pop(eid, None)
            if task is not None:
                task.cancel()

    # ---- collection --------------------------------------------------------------------
    def poll(self) -> list[JudgeResult]:
        """Results completed since the last poll/drain (never blocks)."""
        with self._cond:
            out, self._done = self._done, []
        return out

    def pending(self) -> int:
        """Jobs submitted but not finished yet."""
        with self._cond:
            return len(self._pending)

    def drain(self, timeout: float) -> list[JudgeResult]:
        """Wait up to ``timeout`` seconds for every pending job, then return all results not
        yet polled. Jobs still unfinished are cancelled and returned as failures with error
        ``"drain_timeout: timeout at drain ..."``; a late answer for them is discarded."""
        deadline = time.monotonic() + max(0.0, float(timeout))
        with self._cond:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            late = list(self._pending)
            for eid in late:
                item, op = self._pending.pop(eid)
                self._record(JudgeResult(item, op.name, Judgment.failure(
                    "drain_timeout", f"timeout at drain (not finished within {float(timeout):g} s)")))
            out, self._done = self._done, []
        if late and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._cancel_tasks, late)
            except RuntimeError:  # loop closed concurrently
                pass
        return out

    def stats(self) -> dict[str, Any]:
        """Counters: submitted, completed, ok, failed, pending, failures_by_kind."""
        with self._cond:
            return {
                "submitted": self._counts["submitted"],
                "completed": self._counts["completed"],
                "ok": self._counts["ok"],
                "failed": self._counts["failed"],
                "pending": len(self._pending),
                "failures_by_kind": dict(self._failures),
            }

    # ---- shutdown ----------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    def close(self, timeout: float = 5.0) -> None:
        """Cancel unfinished jobs (recorded as ``cancelled`` failures, still returned by
        ``poll``), close the judge's resources on the runner loop, stop the thread."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            left = list(self._pending)
            for eid in left:
                item, op = self._pending.pop(eid)
                self._record(JudgeResult(item, op.name, Judgment.failure("cancelled", "runner closed")))
            self._cond.notify_all()
        if self._loop.is_closed():
            return

        async def shutdown() -> None:
            tasks = list(self._tasks.values())
            for t in tasks:
                t.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            aclose = getattr(self.judge, "aclose", None)
            if aclose is not None:
                try:
                    await asyncio.wait_for(aclose(), timeout)
                except Exception:
                    logger.debug("judge aclose failed", exc_info=True)

        try:
            fut = asyncio.run_coroutine_threadsafe(shutdown(), self._loop)
            fut.result(timeout)
        except Exception:
            logger.debug("JudgeRunner shutdown incomplete", exc_info=True)
        try:
            self._loop.call_soon_threadsafe(self._loop.stop)
        except RuntimeError:
            pass
        self._thread.join(timeout)

    def __enter__(self) -> "JudgeRunner":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"JudgeRunner(judge={self.judge!r}, order_parameters={[o.name for o in self.order_parameters]}, "
                f"max_concurrency={self.max_concurrency}, pending={self.pending()})")
