"""The run store: one SQLite file (WAL) holding everything a run measured.

Each probe step is written in one transaction, so a crash loses at most the probe in flight,
and a reader (``em-callbacks report``) can open the file while training is still writing it.
Only the main process writes. Secrets never reach it: configs are scrubbed before saving.
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
import threading
import time
from contextlib import closing, contextmanager
from datetime import datetime, timezone
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

__all__ = ["RunStore", "scrub_secrets", "STORE_FILENAME", "archive_previous_run", "RUN_FILES", "ARCHIVE_DIRNAME"]

STORE_FILENAME = "run.sqlite"
# What one run leaves in its run directory: the store with SQLite's side files, the summary,
# the callback's overview plot and the report (``report.REPORT_FILES``, next to the store or
# in ``report/``). Only these move when a run is archived: the directory may hold other things
# (the demo's trainer/ and wandb/ folders).
_SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")
RUN_FILES = (
    STORE_FILENAME, *(STORE_FILENAME + x for x in _SQLITE_SIDE_FILES), "summary.json",
    "overview.png", "order_parameters.png", "captured.png", "samples.md", "report.md", "report",
)
ARCHIVE_DIRNAME = "previous"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS probes (
    probe_index INTEGER PRIMARY KEY, step INTEGER NOT NULL UNIQUE, seed INTEGER NOT NULL,
    created_at REAL NOT NULL, seconds REAL, cross_scoring TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS prompts (
    prompt_id TEXT PRIMARY KEY, position INTEGER NOT NULL, prompt TEXT NOT NULL, system TEXT,
    tags TEXT NOT NULL, rendered TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS samples (
    probe_index INTEGER NOT NULL, prompt_id TEXT NOT NULL, sample_idx INTEGER NOT NULL,
    text TEXT NOT NULL, token_ids TEXT NOT NULL, n_tokens INTEGER NOT NULL, finished INTEGER NOT NULL,
    PRIMARY KEY (probe_index, prompt_id, sample_idx));
CREATE TABLE IF NOT EXISTS logprobs (
    sample_probe INTEGER NOT NULL, prompt_id TEXT NOT NULL, sample_idx INTEGER NOT NULL,
    checkpoint_probe INTEGER NOT NULL, logp REAL NOT NULL,
    PRIMARY KEY (sample_probe, prompt_id, sample_idx, checkpoint_probe));
CREATE TABLE IF NOT EXISTS metrics (
    probe_index INTEGER NOT NULL, step INTEGER NOT NULL, name TEXT NOT NULL, value REAL,
    stderr REAL, ci_low REAL, ci_high REAL, extra TEXT,
    PRIMARY KEY (probe_index, name));
CREATE TABLE IF NOT EXISTS judgments (
    probe_index INTEGER NOT NULL, prompt_id TEXT NOT NULL, sample_idx INTEGER NOT NULL,
    order_parameter TEXT NOT NULL, score REAL, probs TEXT, error TEXT, created_at REAL NOT NULL,
    PRIMARY KEY (probe_index, prompt_id, sample_idx, order_parameter));
CREATE TABLE IF NOT EXISTS grad_norms (step INTEGER PRIMARY KEY, value REAL);
CREATE TABLE IF NOT EXISTS sentinel (
    step INTEGER PRIMARY KEY, since_probe INTEGER NOT NULL, tv REAL, stderr REAL, n INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, step INTEGER, kind TEXT NOT NULL, payload TEXT NOT NULL,
    created_at REAL NOT NULL);
"""

# Key names whose values are secrets. "token" only as the whole name or its last part
# ("hf_token", "access-token"), so "max_new_tokens" or "pad_token" are kept.
_SECRET_KEY = re.compile(
    r"(api[_-]?key|secret|passw(or)?d|authorization|bearer|credential|private[_-]?key"
    r"|^(?!(pad|eos|bos|unk|sep|cls|mask)[_-]token$)(.*[_\-.])?token$)",
    re.I,
)
_SECRET_VALUE = re.compile(r"\b(sk-[A-Za-z0-9_\-]{8,}|hf_[A-Za-z0-9]{8,}|Bearer\s+\S+)")


def scrub_secrets(obj: Any) -> Any:
    """Drop values of secret-looking keys and redact secret-looking strings, recursively."""
    if isinstance(obj, dict):
        return {
            k: ("<redacted>" if _SECRET_KEY.search(str(k)) and v not in (None, "") else scrub_secrets(v))
            for k, v in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        return [scrub_secrets(v) for v in obj]
    if isinstance(obj, str):
        return _SECRET_VALUE.sub("<redacted>", obj)
    return obj


def _num(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


@dataclass(frozen=True)
class SampleRecord:
    probe_index: int
    prompt_id: str
    sample_idx: int
    text: str
    token_ids: list[int]
    finished: bool


class RunStore:
    """Writer and reader of one run's SQLite file. Thread-safe (one connection, one lock)."""

    def __init__(self, path: str | Path, readonly: bool = False):
        path = Path(path)
        if path.is_dir() or path.suffix == "":
            path = path / STORE_FILENAME
        if readonly and not path.exists():
            raise FileNotFoundError(f"no run store at {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        uri = f"file:{path}?mode=ro" if readonly else f"file:{path}"
        self._conn = sqlite3.connect(uri, uri=True, check_same_thread=False, timeout=30.0)
        self._lock = threading.RLock()
        if not readonly:
            with self._lock:
                self._conn.execute("PRAGMA journal_mode=WAL")
                self._conn.execute("PRAGMA synchronous=NORMAL")
                self._conn.executescript(_SCHEMA)
                self._conn.commit()

    # ----------------------------------------------------------------- writing
    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                yield self._conn
                self._conn.commit()
            except BaseException:
                self._conn.rollback()
                raise

    def set_meta(self, **values: Any) -> None:
        values = scrub_secrets(values)  # also catches a top-level key such as api_key=...
        with self.transaction() as c:
            c.executemany(
                "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                [(k, json.dumps(v, default=str)) for k, v in values.items()],
            )

    def write_prompts(self, rows: Iterable[tuple[str, int, str, str | None, Sequence[str], str]]) -> None:
        with self.transaction() as c:
            c.executemany(
                "INSERT OR REPLACE INTO prompts VALUES (?, ?, ?, ?, ?, ?)",
                [(pid, pos, prompt, system, json.dumps(list(tags)), rendered) for pid, pos, prompt, system, tags, rendered in rows],
            )

    def write_probe(
        self,
        probe_index: int,
        step: int,
        seed: int,
        cross_scoring: str,
        samples: Sequence[SampleRecord],
        logprobs: Iterable[tuple[int, str, int, int, float]],
        metrics: Iterable[tuple[str, float | None, float | None, float | None, float | None, dict | None]] = (),
        seconds: float | None = None,
    ) -> None:
        """Everything one probe step produced, atomically. Re-writing a probe index replaces it."""
        with self.transaction() as c:
            c.execute("DELETE FROM samples WHERE probe_index = ?", (probe_index,))
            c.execute("DELETE FROM metrics WHERE probe_index = ?", (probe_index,))
            c.execute("DELETE FROM logprobs WHERE checkpoint_probe = ?", (probe_index,))
            c.execute("DELETE FROM probes WHERE probe_index = ? OR step = ?", (probe_index, step))
            c.execute(
                "INSERT INTO probes VALUES (?, ?, ?, ?, ?, ?)",
                (probe_index, step, seed, time.time(), seconds, cross_scoring),
            )
            c.executemany(
                "INSERT INTO samples VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (s.probe_index, s.prompt_id, s.sample_idx, s.text, json.dumps(s.token_ids), len(s.token_ids), int(s.finished))
                    for s in samples
                ],
            )
            self._insert_logprobs(c, logprobs)
            self._insert_metrics(c, probe_index, step, metrics)

    def write_metrics(self, probe_index: int, step: int, metrics: Iterable[tuple]) -> None:
        with self.transaction() as c:
            self._insert_metrics(c, probe_index, step, metrics)

    @staticmethod
    def _insert_logprobs(c: sqlite3.Connection, rows: Iterable[tuple[int, str, int, int, float]]) -> None:
        c.executemany(
            "INSERT OR REPLACE INTO logprobs VALUES (?, ?, ?, ?, ?)",
            [(int(a), str(b), int(s), int(k), float(v)) for a, b, s, k, v in rows],
        )

    @staticmethod
    def _insert_metrics(c: sqlite3.Connection, probe_index: int, step: int, metrics: Iterable[tuple]) -> None:
        c.executemany(
            "INSERT OR REPLACE INTO metrics VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (probe_index, step, name, _num(v), _num(se), _num(lo), _num(hi), json.dumps(extra) if extra else None)
                for name, v, se, lo, hi, extra in metrics
            ],
        )

    def write_judgments(self, rows: Iterable[tuple[int, str, int, str, float | None, Sequence[float] | None, str | None]]) -> None:
        with self.transaction() as c:
            c.executemany(
                "INSERT OR REPLACE INTO judgments VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (int(p), str(pid), int(s), name, _num(score), json.dumps([float(x) for x in probs]) if probs is not None else None,
                     scrub_secrets(error) if error is not None else None, time.time())
                    for p, pid, s, name, score, probs, error in rows
                ],
            )

    def write_grad_norms(self, rows: Iterable[tuple[int, float]]) -> None:
        with self.transaction() as c:
            c.executemany("INSERT OR REPLACE INTO grad_norms VALUES (?, ?)", [(int(s), _num(v)) for s, v in rows])

    def write_sentinel(self, step: int, since_probe: int, tv: float, stderr: float, n: int) -> None:
        """The drift sentinel at training step ``step``: one-sided TV since probe ``since_probe``."""
        with self.transaction() as c:
            c.execute("INSERT OR REPLACE INTO sentinel VALUES (?, ?, ?, ?, ?)",
                      (int(step), int(since_probe), _num(tv), _num(stderr), int(n)))

    def sentinel(self) -> dict[str, np.ndarray]:
        """The sentinel series: ``step``, ``since_probe``, ``tv``, ``stderr`` (NaN for None)."""
        rows = self._rows("SELECT step, since_probe, tv, stderr FROM sentinel ORDER BY step")
        cols = list(zip(*rows)) if rows else [(), (), (), ()]
        return {"step": np.array(cols[0], dtype=np.int64), "since_probe": np.array(cols[1], dtype=np.int64),
                "tv": np.array([np.nan if v is None else v for v in cols[2]], dtype=float),
                "stderr": np.array([np.nan if v is None else v for v in cols[3]], dtype=float)}

    def add_event(self, kind: str, step: int | None = None, **payload: Any) -> None:
        with self.transaction() as c:
            c.execute(
                "INSERT INTO events(step, kind, payload, created_at) VALUES (?, ?, ?, ?)",
                (step, kind, json.dumps(scrub_secrets(payload), default=str), time.time()),
            )

    def truncate_after(self, step: int) -> None:
        """Forget probes after ``step`` (used on resume from an earlier checkpoint)."""
        with self.transaction() as c:
            late = [r[0] for r in c.execute("SELECT probe_index FROM probes WHERE step > ?", (step,))]
            for k in late:
                c.execute("DELETE FROM samples WHERE probe_index = ?", (k,))
                c.execute("DELETE FROM metrics WHERE probe_index = ?", (k,))
                c.execute("DELETE FROM judgments WHERE probe_index = ?", (k,))
                c.execute("DELETE FROM logprobs WHERE sample_probe = ? OR checkpoint_probe = ?", (k, k))
                c.execute("DELETE FROM probes WHERE probe_index = ?", (k,))
            c.execute("DELETE FROM grad_norms WHERE step > ?", (step,))
            c.execute("DELETE FROM sentinel WHERE step > ?", (step,))
            if late:
                c.execute(
                    "INSERT INTO events(step, kind, payload, created_at) VALUES (?, 'resume_truncate', ?, ?)",
                    (step, json.dumps({"dropped_probe_indices": late}), time.time()),
                )

    def close(self) -> None:
        with self._lock:
            try:
                self._conn.commit()
                self._conn.close()
            except sqlite3.ProgrammingError:
                pass

    # ----------------------------------------------------------------- reading
    def _rows(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return list(self._conn.execute(sql, args))

    def meta(self) -> dict[str, Any]:
        return {k: json.loads(v) for k, v in self._rows("SELECT key, value FROM meta")}

    def probes(self) -> list[dict[str, Any]]:
        cols = ("probe_index", "step", "seed", "created_at", "seconds", "cross_scoring")
        return [dict(zip(cols, r)) for r in self._rows(f"SELECT {', '.join(cols)} FROM probes ORDER BY probe_index")]

    def prompts(self) -> list[dict[str, Any]]:
        rows = self._rows("SELECT prompt_id, position, prompt, system, tags, rendered FROM prompts ORDER BY position")
        return [
            {"prompt_id": a, "position": b, "prompt": c, "system": d, "tags": json.loads(e), "rendered": f}
            for a, b, c, d, e, f in rows
        ]

    def samples(self, probe_index: int | None = None) -> list[SampleRecord]:
        sql = "SELECT probe_index, prompt_id, sample_idx, text, token_ids, finished FROM samples"
        args: tuple = ()
        if probe_index is not None:
            sql += " WHERE probe_index = ?"
            args = (probe_index,)
        rows = self._rows(sql + " ORDER BY probe_index, prompt_id, sample_idx", args)
        return [SampleRecord(a, b, c, d, json.loads(e), bool(f)) for a, b, c, d, e, f in rows]

    def logprobs(self, sample_probe: int, checkpoint_probe: int) -> dict[tuple[str, int], float]:
        rows = self._rows(
            "SELECT prompt_id, sample_idx, logp FROM logprobs WHERE sample_probe = ? AND checkpoint_probe = ?",
            (sample_probe, checkpoint_probe),
        )
        return {(pid, s): v for pid, s, v in rows}

    def metric_names(self) -> list[str]:
        return [r[0] for r in self._rows("SELECT DISTINCT name FROM metrics ORDER BY name")]

    def metric_series(self, name: str) -> dict[str, np.ndarray]:
        """A metric over probe steps as arrays: step, value, stderr, ci_low, ci_high (NaN where absent)."""
        rows = self._rows(
            "SELECT step, value, stderr, ci_low, ci_high FROM metrics WHERE name = ? ORDER BY step", (name,)
        )
        arr = np.array([[np.nan if v is None else v for v in r] for r in rows], dtype=float).reshape(-1, 5)
        return {
            "step": arr[:, 0].astype(int),
            "value": arr[:, 1],
            "stderr": arr[:, 2],
            "ci_low": arr[:, 3],
            "ci_high": arr[:, 4],
        }

    def metrics_at(self, probe_index: int) -> dict[str, dict[str, Any]]:
        rows = self._rows(
            "SELECT name, value, stderr, ci_low, ci_high, extra FROM metrics WHERE probe_index = ?", (probe_index,)
        )
        return {
            n: {"value": v, "stderr": se, "ci_low": lo, "ci_high": hi, "extra": json.loads(x) if x else None}
            for n, v, se, lo, hi, x in rows
        }

    def captured_rows(self, probe_index: int) -> dict[str, dict[str, Any]]:
        """{order parameter: its ``captured/<name>`` metrics row} at a probe."""
        return {name.split("/", 1)[1]: m for name, m in self.metrics_at(probe_index).items()
                if name.startswith("captured/")}

    def captured_at(self, probe_index: int) -> dict[str, dict[str, Any]]:
        """{order parameter: {value, stderr, noise_floor[, resolved, why_unresolved]}} of the
        captured fractions at a probe; ``resolved`` when the decomposition recorded it (a ratio
        over a full D within its noise is no share of anything, and readers must say so)."""
        out = {}
        for name, m in self.captured_rows(probe_index).items():
            extra = m["extra"] or {}
            out[name] = {"value": m["value"], "stderr": m["stderr"], "noise_floor": extra.get("noise_floor")}
            if "resolved" in extra:
                out[name].update(resolved=extra["resolved"], why_unresolved=extra.get("why_unresolved"))
        return out

    def judgments(self, order_parameter: str | None = None, probe_index: int | None = None) -> list[dict[str, Any]]:
        clauses, args = [], []
        if order_parameter is not None:
            clauses.append("order_parameter = ?")
            args.append(order_parameter)
        if probe_index is not None:
            clauses.append("probe_index = ?")
            args.append(probe_index)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = self._rows(
            "SELECT probe_index, prompt_id, sample_idx, order_parameter, score, probs, error FROM judgments"
            + where
            + " ORDER BY probe_index, prompt_id, sample_idx",
            tuple(args),
        )
        return [
            {
                "probe_index": a, "prompt_id": b, "sample_idx": c, "order_parameter": d, "score": e,
                "probs": json.loads(f) if f else None, "error": g,
            }
            for a, b, c, d, e, f, g in rows
        ]

    def grad_norms(self) -> tuple[np.ndarray, np.ndarray]:
        rows = self._rows("SELECT step, value FROM grad_norms ORDER BY step")
        steps = np.array([r[0] for r in rows], dtype=int)
        values = np.array([np.nan if r[1] is None else r[1] for r in rows], dtype=float)
        return steps, values

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT step, kind, payload, created_at FROM events"
        args: tuple = ()
        if kind:
            sql += " WHERE kind = ?"
            args = (kind,)
        return [
            {"step": s, "kind": k, "payload": json.loads(p), "created_at": t}
            for s, k, p, t in self._rows(sql + " ORDER BY id", args)
        ]


# --------------------------------------------------------------------------------------------
# Archiving a previous run
# --------------------------------------------------------------------------------------------


def _run_started_at(run_dir: Path, present: Sequence[Path]) -> float:
    """When the previous run started: its first probe or event in the store, else the oldest
    modification time of its files."""
    store = run_dir / STORE_FILENAME
    if store.is_file():
        try:
            with closing(sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=5.0)) as conn:
                times = [r[0] for table in ("probes", "events")
                         for r in conn.execute(f"SELECT MIN(created_at) FROM {table}") if r[0] is not None]
            if times:
                return float(min(times))
        except sqlite3.Error:
            pass  # not a store we can read (corrupt, foreign): the file times will do
    return min(p.stat().st_mtime for p in present)


def archive_previous_run(run_dir: str | Path) -> Path | None:
    """Move a previous run's files out of ``run_dir`` so a new run cannot overwrite them.

    A previous run is a ``run.sqlite`` or a ``summary.json`` in ``run_dir``. Its files
    (:data:`RUN_FILES`: the store with its ``-wal``/``-shm`` side files, which hold committed
    data not yet checkpointed, the summary, plots and report) move to
    ``run_dir/previous/<UTC start time>/`` (``YYYYmmddTHHMMSSZ`` of the old run's first probe;
    ``-2``, ``-3`` ... when taken). A child folder rather than a sibling: the report's
    ``find_store(output_dir)`` looks one level down and would then see two runs. Other files in
    ``run_dir`` stay. Close the old run's :class:`RunStore` first. Returns the archive folder,
    or None when there was nothing to archive.
    """
    run_dir = Path(run_dir)
    if not ((run_dir / STORE_FILENAME).is_file() or (run_dir / "summary.json").is_file()):
        return None
    present = [run_dir / name for name in RUN_FILES if (run_dir / name).exists()]
    started = _run_started_at(run_dir, present)
    stamp = datetime.fromtimestamp(started, tz=timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    parent = run_dir / ARCHIVE_DIRNAME
    parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        dest = parent / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            dest.mkdir()  # atomic claim: never reuses an existing archive
            break
        except FileExistsError:
            continue
    else:  # pragma: no cover - 10k runs started within one second
        raise FileExistsError(f"no free archive folder for {stamp} under {parent}")
    # side files exist only while a connection is open or after a crash; the names are
    # re-listed here because reading the start time may have created a -shm
    for name in RUN_FILES:
        src = run_dir / name
        if src.exists():
            src.rename(dest / name)
    return dest
