"""Small helpers every stage shares: one copy each (blocking coroutine runner, JSON
sanitiser, normal quantile, random generator)."""

from __future__ import annotations

import asyncio
import math
import threading
from typing import Any, Awaitable, Callable

import numpy as np
from scipy import stats

__all__ = ["run_blocking", "json_safe", "normal_quantile", "two_sided_z", "is_finite", "opt_int", "as_generator"]


def run_blocking(coro_factory: Callable[[], Awaitable[Any]], thread_name: str = "em-callbacks-blocking") -> Any:
    """Run a coroutine to completion from synchronous code.

    ``asyncio.run`` refuses to start inside a running event loop (a Jupyter cell, an async
    trainer); there the coroutine runs on a fresh loop in a helper thread and this call waits
    for it. Exceptions reach the caller unchanged. ``coro_factory`` builds the coroutine only
    where it will run, so no "never awaited" warning is left behind.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro_factory())
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(coro_factory())
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            box["error"] = exc

    thread = threading.Thread(target=target, name=thread_name, daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def json_safe(obj: Any) -> Any:
    """``obj`` with numpy scalars/arrays turned into Python values and non-finite floats into
    ``None`` (strict JSON has no NaN); objects with ``to_dict`` are expanded; anything else
    unknown becomes its ``str``."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(float(obj)) else None
    if obj is None or isinstance(obj, (str, int)):
        return obj
    if hasattr(obj, "to_dict"):
        return json_safe(obj.to_dict())
    return str(obj)


def normal_quantile(p: float) -> float:
    """The standard normal quantile (inverse CDF) at ``p``."""
    return float(stats.norm.ppf(p))


def two_sided_z(confidence_level: float) -> float:
    """z such that ``value +- z * stderr`` covers ``confidence_level`` under a normal law."""
    if not (0.0 < confidence_level < 1.0):
        raise ValueError(f"confidence_level must be in (0, 1), got {confidence_level!r}")
    return normal_quantile(0.5 + confidence_level / 2.0)


def is_finite(x: Any) -> bool:
    """True for a number (or numeric string) that is neither NaN nor infinite."""
    try:
        return x is not None and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def opt_int(x: Any) -> int | None:
    """``int(x)`` for a finite number, else None (JSON nulls, NaN steps)."""
    return int(x) if is_finite(x) else None


def as_generator(rng: Any) -> np.random.Generator:
    """``rng`` as a numpy Generator: a Generator as is, else a seed; None means seed 0, so
    estimates are reproducible unless the caller asks otherwise."""
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(0 if rng is None else rng)
