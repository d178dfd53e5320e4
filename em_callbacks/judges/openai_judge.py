"""Judge backend for OpenAI-compatible chat-completions servers (OpenAI, vLLM, ...).

The judge answers with ONE token (``max_tokens=1, temperature=0``) and we read the
``top_logprobs`` of that token: the probability mass on tokens that parse as labels of the
order parameter's scale gives a distribution over the scale; the score is its expected
value (Betley et al. 2025). Below ``min_mass`` there is no score (error ``low_mass``).
If the server returns no logprobs, the answer token itself is parsed (one-hot).
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import logging
import math
import os
import random
import threading
import time
import urllib.parse
import weakref
from collections import OrderedDict
from typing import Any

import numpy as np

from em_callbacks.judges.base import Judge, Judgment, dumps_raw
from em_callbacks.order import OrderParameter

__all__ = ["OpenAIJudge", "OpenAIProposer"]

logger = logging.getLogger(__name__)

_CACHEABLE_KINDS = (None, "low_mass", "unparsable")


class _Secret:
    """Holds an API key; its repr/str never show the value."""

    __slots__ = ("_value",)

    def __init__(self, value: str | None) -> None:
        self._value = value

    def reveal(self) -> str | None:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return "'***'" if self._value else "None"

    __str__ = __repr__

    def __reduce__(self):  # never pickle the key
        return (_Secret, (None,))


def _resolve_key(api_key: str | None, api_key_env: str | None, base_url: str | None) -> tuple[_Secret, str]:
    if api_key:
        return _Secret(api_key), "argument"
    if api_key_env and os.environ.get(api_key_env):
        return _Secret(os.environ[api_key_env]), f"env:{api_key_env}"
    if base_url:  # local vLLM / compatible servers usually ignore the key
        return _Secret("EMPTY"), "none"
    raise ValueError(
        f"no API key: pass api_key=... or set the {api_key_env or 'OPENAI_API_KEY'} environment "
        "variable (or pass base_url=... for a server that needs no key)"
    )


def _redact_url(url: str | None) -> str | None:
    if not url:
        return url
    try:
        parts = urllib.parse.urlsplit(str(url))
    except ValueError:
        return "<unparsable url>"
    if parts.password or parts.username:
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        parts = parts._replace(netloc=f"***@{host}")
    query = parts.query
    if query:
        q = urllib.parse.parse_qsl(query, keep_blank_values=True)
        q = [(k, "***" if any(s in k.lower() for s in ("key", "token", "secret", "sig")) else v) for k, v in q]
        parts = parts._replace(query=urllib.parse.urlencode(q))
    return urllib.parse.urlunsplit(parts)


def _retry_after_seconds(response: Any) -> float | None:
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    for name, div in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        v = headers.get(name)
        if v is None:
            continue
        try:
            x = float(v) / div
            if math.isfinite(x):
                return max(0.0, x)
        except ValueError:
            pass
        if name == "retry-after":
            try:
                dt = email.utils.parsedate_to_datetime(v)
                return max(0.0, dt.timestamp() - time.time())
            except (TypeError, ValueError, IndexError):
                pass
    return None


class _LoopState:
    """Per-event-loop resources (an async HTTP client, semaphore and in-flight table are
    bound to the loop they were created on)."""

    def __init__(self, client: Any, max_concurrency: int) -> None:
        self.client = client
        self.sem = asyncio.Semaphore(max_concurrency)
        self.inflight: dict[str, asyncio.Future] = {}


class OpenAIJudge(Judge):
    """Logprob-based judge on any OpenAI-compatible chat-completions endpoint.

    Args:
        model: judge model name ("gpt-4o-mini", or the model a vLLM server serves).
        base_url: endpoint, e.g. "http://localhost:8000/v1" (None: the SDK default).
        api_key: the key; else the ``api_key_env`` environment variable. Never logged and
            never shown in ``repr`` or :meth:`config`. Not needed when ``base_url`` is set.
        top_logprobs: how many alternatives to request for the answer token.
        min_mass: minimum probability on valid labels; below it the Judgment has no score.
        max_concurrency: at most this many HTTP requests in flight (per event loop).
        timeout: per-request timeout (seconds).
        max_retries: retries (after the first attempt) on 429 / 5xx / 408 / timeouts /
            connection errors, with exponential backoff; 429 honours Retry-After.
        cache: True (unbounded LRU of 1e6 entries), False, or an int max size. Keyed by
            (model, statement, scale, judge prompt template, prompt, response). Transport
            failures are not cached; identical concurrent requests are deduplicated.
    """

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key: str | None = None,
        top_logprobs: int = 20,
        min_mass: float = 0.25,
        max_concurrency: int = 8,
        timeout: float = 30.0,
        max_retries: int = 4,
        cache: bool | int = True,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        backoff_base: float = 0.5,
        backoff_max: float = 20.0,
        max_retry_after: float = 60.0,
        system_prompt: str | None = None,
        extra_body: dict[str, Any] | None = None,
    ) -> None:
        if not model or not isinstance(model, str):
            raise ValueError("OpenAIJudge: model must be a non-empty string")
        if int(top_logprobs) < 1:
            raise ValueError("OpenAIJudge: top_logprobs must be >= 1")
        if not (0.0 <= float(min_mass) <= 1.0):
            raise ValueError("OpenAIJudge: min_mass must be in [0, 1]")
        if int(max_concurrency) < 1:
            raise ValueError("OpenAIJudge: max_concurrency must be >= 1")
        if int(max_retries) < 0:
            raise ValueError("OpenAIJudge: max_retries must be >= 0")
        if not float(timeout) > 0:
            raise ValueError("OpenAIJudge: timeout must be > 0")
        self.model = model
        self.base_url = base_url
        self.top_logprobs = int(top_logprobs)
        self.min_mass = float(min_mass)
        self.max_concurrency = int(max_concurrency)
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.backoff_base = float(backoff_base)
        self.backoff_max = float(backoff_max)
        self.max_retry_after = float(max_retry_after)
        self.system_prompt = system_prompt
        self.extra_body = dict(extra_body) if extra_body else None
        self._api_key, self._key_source = _resolve_key(api_key, api_key_env, base_url)
        if cache is True:
            self._cache_size: int | None = 1_000_000
        elif cache is False or cache is None:
            self._cache_size = None
        else:
            self._cache_size = int(cache)
        self._cache: OrderedDict[str, Judgment] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._states: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState]" = weakref.WeakKeyDictionary()
        self._states_lock = threading.Lock()
        self._rand = random.Random()  # private: never touch the global RNGs of the training run
        self._counters = {"requests": 0, "cache_hits": 0, "deduplicated": 0, "retries": 0}
        self._counters_lock = threading.Lock()

    # ---- presentation (no secrets) -----------------------------------------------------
    def validate(self, order_parameter: OrderParameter) -> None:
        """Warn when a multi-token label scale meets a server that is probably not OpenAI's.

        Open models' tokenizers (Qwen, Llama) split "85" into "8" + "5": the one judged token
        would read 8. OpenAI's own models encode 0..100 as single tokens.
        """
        if self.base_url and any(len(label) > 1 and label.isdigit() for label in order_parameter.scale.labels):
            logger.warning(
                "OpenAIJudge(base_url=%s): order parameter %r uses multi-digit labels; open models split "
                "numbers into several tokens and only the first is scored. Prefer "
                "order_parameter.with_scale(Scale.digits()) for such judges.",
                _redact_url(self.base_url), order_parameter.name,
            )

    def __repr__(self) -> str:
        return (
            f"OpenAIJudge(model={self.model!r}, base_url={_redact_url(self.base_url)!r}, "
            f"top_logprobs={self.top_logprobs}, min_mass={self.min_mass}, "
            f"max_concurrency={self.max_concurrency})"
        )

    def config(self) -> dict[str, Any]:
        return {
            "type": "OpenAIJudge",
            "model": self.model,
            "base_url": _redact_url(self.base_url),
            "api_key_source": self._key_source,
            "top_logprobs": self.top_logprobs,
            "min_mass": self.min_mass,
            "max_concurrency": self.max_concurrency,
            "timeout": self.timeout,
            "max_retries": self.max_retries,
            "cache": self._cache_size is not None,
            "system_prompt": self.system_prompt,
            "max_tokens": 1,
            "temperature": 0,
        }

    def stats(self) -> dict[str, int]:
        """HTTP requests made, cache hits, deduplicated in-flight requests, retries."""
        with self._counters_lock:
            return dict(self._counters)

    def _count(self, name: str, n: int = 1) -> None:
        with self._counters_lock:
            self._counters[name] += n

    # ---- per-loop resources ------------------------------------------------------------
    def _state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        with self._states_lock:
            st = self._states.get(loop)
            if st is None:
                import openai

                client = openai.AsyncOpenAI(
                    api_key=self._api_key.reveal(),
                    base_url=self.base_url,
                    timeout=self.timeout,
                    max_retries=0,  # retries are ours (429 Retry-After, backoff, counters)
                )
                st = _LoopState(client, self.max_concurrency)
                self._states[loop] = st
            return st

    async def aclose(self) -> None:
        loop = asyncio.get_running_loop()
        with self._states_lock:
            st = self._states.pop(loop, None)
        if st is not None:
            try:
                await st.client.close()
            except Exception:  # pragma: no cover - best effort
                pass

    # ---- cache -------------------------------------------------------------------------
    def _cache_key(self, op: OrderParameter, prompt: str, response: str) -> str:
        payload = json.dumps(
            [self.model, self.top_logprobs, self.system_prompt, op.statement, list(op.scale.labels),
             list(op.scale.outcomes), op.judge_prompt, prompt, response],
            ensure_ascii=False,
        )
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def _cache_get(self, key: str) -> Judgment | None:
        if self._cache_size is None:
            return None
        with self._cache_lock:
            j = self._cache.get(key)
            if j is not None:
                self._cache.move_to_end(key)
            return j

    def _cache_put(self, key: str, j: Judgment) -> None:
        if self._cache_size is None or j.error_kind not in _CACHEABLE_KINDS:
            return
        with self._cache_lock:
            self._cache[key] = j
            self._cache.move_to_end(key)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    def clear_cache(self) -> None:
        with self._cache_lock:
            self._cache.clear()

    # ---- judging -----------------------------------------------------------------------
    async def ajudge(self, order_parameter: OrderParameter, prompt: str, response: str) -> Judgment:
        try:
            key = self._cache_key(order_parameter, prompt, response)
            hit = self._cache_get(key)
            if hit is not None:
                self._count("cache_hits")
                return hit
            st = self._state()
            while True:
                fut = st.inflight.get(key)
                if fut is None:
                    break
                self._count("deduplicated")
                try:
                    return await asyncio.shield(fut)
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    cancelling = getattr(task, "cancelling", None)  # Python >= 3.11
                    if task is None or cancelling is None or cancelling():
                        raise
                    # the leader was cancelled, not us: try again (maybe become the leader)
            fut = asyncio.get_running_loop().create_future()
            st.inflight[key] = fut
            try:
                j = await self._request(st, order_parameter, prompt, response)
            except BaseException:
                fut.cancel()
                raise
            finally:
                if st.inflight.get(key) is fut:
                    del st.inflight[key]
            fut.set_result(j)
            self._cache_put(key, j)
            return j
        except asyncio.CancelledError:
            raise
        except Exception as e:  # never raise per item
            logger.debug("OpenAIJudge: unexpected error", exc_info=True)
            return Judgment.failure("judge_exception", f"{type(e).__name__}: {e}")

    def _backoff(self, attempt: int) -> float:
        d = min(self.backoff_max, self.backoff_base * (2.0**attempt))
        return d * (0.5 + 0.5 * self._rand.random())

    async def _request(self, st: _LoopState, op: OrderParameter, prompt: str, response: str) -> Judgment:
        import openai

        messages = op.messages(prompt, response)
        if self.system_prompt:
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        kwargs: dict[str, Any] = dict(
            model=self.model,
            messages=messages,
            logprobs=True,
            top_logprobs=self.top_logprobs,
            max_tokens=1,
            temperature=0,
        )
        if self.extra_body:
            kwargs["extra_body"] = self.extra_body
        attempt = 0
        while True:
            delay: float | None = None
            try:
                async with st.sem:
                    self._count("requests")
                    completion = await st.client.chat.completions.create(**kwargs)
            except openai.RateLimitError as e:
                kind, detail = "rate_limited", "HTTP 429"
                ra = _retry_after_seconds(getattr(e, "response", None))
                if ra is not None:
                    delay = min(ra, self.max_retry_after)
            except openai.APIStatusError as e:
                status = getattr(e, "status_code", None) or 0
                kind, detail = "http_error", f"HTTP {status}"
                if not (status >= 500 or status in (408, 409)):
                    return Judgment.failure(kind, f"{detail}: {_short(e)}")
                ra = _retry_after_seconds(getattr(e, "response", None))
                if ra is not None:
                    delay = min(ra, self.max_retry_after)
            except openai.APITimeoutError:
                kind, detail = "timeout", f"no answer within {self.timeout:g} s"
            except openai.APIConnectionError as e:
                kind, detail = "connection_error", _short(e)
                cause = e.__cause__
                if isinstance(cause, (json.JSONDecodeError, UnicodeDecodeError)):
                    return Judgment.failure("bad_response", f"malformed response: {_short(cause)}")
            except openai.APIResponseValidationError as e:
                return Judgment.failure("bad_response", _short(e))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                return Judgment.failure("bad_response", f"malformed response: {_short(e)}")
            else:
                return self._parse(op, completion)
            if attempt >= self.max_retries:
                return Judgment.failure(kind, f"{detail} (after {attempt + 1} attempts)")
            if delay is None:
                delay = self._backoff(attempt)
            attempt += 1
            self._count("retries")
            logger.debug("OpenAIJudge: %s, retry %d in %.2f s", kind, attempt, delay)
            await asyncio.sleep(delay)

    def _parse(self, op: OrderParameter, completion: Any) -> Judgment:
        scale = op.scale
        try:
            choices = getattr(completion, "choices", None)
            if not choices:
                return Judgment.failure("bad_response", "no choices in the response")
            choice = choices[0]
            message = getattr(choice, "message", None)
            content = getattr(message, "content", None) if message is not None else None
            lp = getattr(choice, "logprobs", None)
            tokens = getattr(lp, "content", None) if lp is not None else None
            if not tokens:
                raw = dumps_raw({"content": content, "top_logprobs": None})
                idx = scale.index_of(content)
                if idx is None:
                    return Judgment.failure(
                        "unparsable", f"answer {str(content)[:40]!r} is not a label (server returned no logprobs)", raw
                    )
                return Judgment(scale.one_hot(idx), float(scale.outcomes[idx]), None, raw)
            first = tokens[0]
            top = getattr(first, "top_logprobs", None) or []
            entries = [(t.token, float(t.logprob)) for t in top] or [(first.token, float(first.logprob))]
            raw = dumps_raw({"content": content, "top_logprobs": [[t, round(l, 6)] for t, l in entries]})
            probs = np.zeros(len(scale))
            for tok, logprob in entries:
                idx = scale.index_of(tok)
                if idx is not None and math.isfinite(logprob):
                    probs[idx] += math.exp(min(logprob, 0.0))
            mass = float(probs.sum())
            if mass <= 0.0 or mass < self.min_mass:
                return Judgment.failure("low_mass", f"mass {mass:.3f} < min_mass {self.min_mass:g}", raw)
            probs /= mass
            return Judgment(probs, float(scale.expected(probs)), None, raw)
        except Exception as e:
            return Judgment.failure("bad_response", f"{type(e).__name__}: {e}")


def _short(e: BaseException, n: int = 200) -> str:
    s = f"{type(e).__name__}: {e}"
    return s if len(s) <= n else s[: n - 3] + "..."


class OpenAIProposer:
    """Text completion for discovery (:func:`em_callbacks.order.apropose`): a callable
    ``(prompt) -> str`` backed by a chat-completions endpoint. Key handling as OpenAIJudge.
    Holds one HTTP client, made on first use; :meth:`close` (or ``with``) releases it."""

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        temperature: float = 0.7,
        max_tokens: int = 1024,
        timeout: float = 120.0,
        max_retries: int = 4,
    ) -> None:
        self.model = model
        self.base_url = base_url
        self.temperature = float(temperature)
        self.max_tokens = int(max_tokens)
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self._api_key, self._key_source = _resolve_key(api_key, api_key_env, base_url)
        self._client: Any = None

    def __repr__(self) -> str:
        return f"OpenAIProposer(model={self.model!r}, base_url={_redact_url(self.base_url)!r})"

    def config(self) -> dict[str, Any]:
        return {"type": "OpenAIProposer", "model": self.model, "base_url": _redact_url(self.base_url),
                "api_key_source": self._key_source, "temperature": self.temperature,
                "max_tokens": self.max_tokens}

    def __call__(self, prompt: str) -> str:
        import openai

        if self._client is None:
            self._client = openai.OpenAI(api_key=self._api_key.reveal(), base_url=self.base_url,
                                         timeout=self.timeout, max_retries=self.max_retries)
        out = self._client.chat.completions.create(
            model=self.model,
            messages=[{"role": "user", "content": prompt}],
            temperature=self.temperature,
            max_tokens=self.max_tokens,
        )
        return out.choices[0].message.content or ""

    def close(self) -> None:
        """Release the HTTP client (a later call makes a new one). Safe to call twice."""
        client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:  # pragma: no cover - best effort
                pass

    def __enter__(self) -> "OpenAIProposer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
