"""A real HTTP server on 127.0.0.1 speaking the OpenAI chat-completions wire format, with
logprobs, programmable per test. Reusable by any test (import it, or use the fixture).

    server = WireServer().start()
    server.set_probs({"7": 0.6, "8": 0.3, "Hello": 0.1})   # the top-logprob table
    server.fail(500, times=2)                                 # next two calls: HTTP 500
    server.rate_limit(times=1, retry_after=1)                 # then one 429 + Retry-After
    server.latency = 0.2                                      # every call sleeps 0.2 s
    OpenAIJudge(model="m", base_url=server.url, api_key="sk-test")
    server.calls, server.max_in_flight, server.requests       # counters / recorded bodies
    server.stop()

Faults are consumed first-in first-out, one per call; a call with no queued fault answers
normally. ``responder`` (a callable ``body -> table | None``) picks the table per request,
e.g. from the text being judged.
"""

from __future__ import annotations

import collections
import json
import math
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterable, Mapping

import pytest

Table = list  # list of (token, logprob)


def probs_to_table(probs: Mapping[str, float] | Iterable[tuple[str, float]]) -> Table:
    items = list(probs.items()) if isinstance(probs, Mapping) else list(probs)
    return [(tok, math.log(p) if p > 0 else -1e4) for tok, p in items]


class WireServer:
    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.reset()

    # ---- programming -----------------------------------------------------------------
    def reset(self) -> None:
        with self._lock:
            self.table: Table = probs_to_table({"7": 0.9, "8": 0.1})
            self.content: str | None = None  # default: the most likely token of the table
            self.responder: Callable[[dict], Table | Mapping[str, float] | None] | None = None
            self.latency: float = 0.0
            self.logprobs_enabled = True
            self._faults: collections.deque = collections.deque()
            self._die_after: int | None = None
            self.dead = False
            self.calls = 0
            self.in_flight = 0
            self.max_in_flight = 0
            self.requests: list[dict] = []
            self.headers: list[dict] = []  # request headers, names lower-cased
            self.call_times: list[float] = []
            self.statuses: list[int] = []

    def set_probs(self, probs: Mapping[str, float] | Iterable[tuple[str, float]]) -> None:
        """Top-logprob table from probabilities (order kept; sorted by the server)."""
        self.table = probs_to_table(probs)

    def set_logprobs(self, table: Iterable[tuple[str, float]]) -> None:
        self.table = [(t, float(lp)) for t, lp in table]

    def fail(self, status: int = 500, times: int = 1, retry_after: float | str | None = None,
             body: str | None = None) -> None:
        for _ in range(times):
            self._faults.append({"kind": "status", "status": status, "retry_after": retry_after, "body": body})

    def rate_limit(self, times: int = 1, retry_after: float | str | None = 1) -> None:
        self.fail(429, times, retry_after=retry_after)

    def malformed(self, times: int = 1, body: str = '{"id": "x", "choices": [ {"index": 0, ') -> None:
        for _ in range(times):
            self._faults.append({"kind": "malformed", "body": body})

    def delay(self, seconds: float, times: int = 1) -> None:
        """The next ``times`` calls sleep ``seconds`` before answering (e.g. to force timeouts)."""
        for _ in range(times):
            self._faults.append({"kind": "delay", "seconds": seconds})

    def drop(self, times: int = 1) -> None:
        """Close the connection without answering."""
        for _ in range(times):
            self._faults.append({"kind": "drop"})

    def shutdown_after(self, n_calls: int) -> None:
        """Stop listening after ``n_calls`` answered calls; later requests on open
        connections are dropped and new connections refused (server going away mid-run)."""
        self._die_after = n_calls

    # ---- lifecycle -------------------------------------------------------------------
    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> "WireServer":
        server = self

        class Handler(_Handler):
            wire = server

        httpd = _Server((self.host, 0), Handler)
        httpd.daemon_threads = True
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="openai-wire-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        httpd = self._httpd
        if httpd is not None:
            try:
                httpd.shutdown()
            except Exception:
                pass
            httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def _die(self) -> None:
        self.dead = True
        httpd = self._httpd
        if httpd is None:
            return

        def kill() -> None:
            try:
                httpd.shutdown()
            finally:
                httpd.server_close()

        threading.Thread(target=kill, daemon=True).start()

    def __enter__(self) -> "WireServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ---- answering ---------------------------------------------------------------------
    def _next_fault(self) -> dict | None:
        with self._lock:
            return self._faults.popleft() if self._faults else None

    def _completion(self, body: dict) -> dict:
        table = None
        if self.responder is not None:
            table = self.responder(body)
            if isinstance(table, Mapping):
                table = probs_to_table(table)
        if table is None:
            table = self.table
        table = sorted(table, key=lambda t: -t[1])
        n = int(body.get("top_logprobs") or 0)
        top = table[: max(n, 1)] if table else []
        content = self.content if self.content is not None else (top[0][0] if top else "")
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": content, "refusal": None},
            "finish_reason": "length",
            "logprobs": None,
        }
        if self.logprobs_enabled and body.get("logprobs") and top:
            entry = lambda tok, lp: {"token": tok, "logprob": lp, "bytes": list(tok.encode("utf-8"))}
            first_lp = next((lp for tok, lp in top if tok == content), top[0][1])
            choice["logprobs"] = {
                "content": [{**entry(content, first_lp), "top_logprobs": [entry(t, lp) for t, lp in top]}],
                "refusal": None,
            }
        return {
            "id": f"chatcmpl-{self.calls}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "test-model"),
            "choices": [choice],
            "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11},
        }


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # listen backlog: the default 5 drops SYNs under a burst (1 s stalls)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    wire: WireServer

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def _send(self, status: int, payload: bytes, headers: Mapping[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(payload)
        self.wfile.flush()

    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def do_GET(self) -> None:  # /v1/models, for completeness
        self._send(200, json.dumps({"object": "list", "data": [{"id": "test-model", "object": "model"}]}).encode())

    def do_POST(self) -> None:
        w = self.wire
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if w.dead:
            self._drop()
            return
        if not self.path.rstrip("/").endswith("/chat/completions"):
            self._send(404, b'{"error": {"message": "not found"}}')
            return
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            self._send(400, b'{"error": {"message": "bad json"}}')
            return
        with w._lock:
            w.calls += 1
            call_no = w.calls
            w.in_flight += 1
            w.max_in_flight = max(w.max_in_flight, w.in_flight)
            w.requests.append(body)
            w.headers.append({k.lower(): v for k, v in self.headers.items()})
            w.call_times.append(time.monotonic())
        status = 0
        try:
            fault = w._next_fault()
            latency = w.latency
            if fault and fault["kind"] == "delay":
                latency += fault["seconds"]
            if latency > 0 and w._stopping.wait(latency):
                self._drop()
                return
            if w.dead:
                self._drop()
                return
            if fault is None or fault["kind"] == "delay":
                status = 200
                self._send(200, json.dumps(w._completion(body)).encode())
            elif fault["kind"] == "status":
                status = fault["status"]
                headers = {}
                if fault.get("retry_after") is not None:
                    headers["Retry-After"] = str(fault["retry_after"])
                msg = fault.get("body") or json.dumps(
                    {"error": {"message": f"injected {status}", "type": "server_error", "code": None}})
                self._send(status, msg.encode(), headers)
            elif fault["kind"] == "malformed":
                status = 200
                self._send(200, fault["body"].encode())
            elif fault["kind"] == "drop":
                self._drop()
        finally:
            with w._lock:
                w.in_flight -= 1
                w.statuses.append(status)
                die = w._die_after is not None and call_no >= w._die_after and not w.dead
            if die:
                w._die()


@pytest.fixture
def wire_server():
    """A started :class:`WireServer`, stopped after the test."""
    server = WireServer().start()
    try:
        yield server
    finally:
        server.stop()
