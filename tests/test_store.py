"""em_callbacks.store: every table round-trips, readers work beside a live writer (WAL), a probe
is written atomically, resume truncation, and secrets never reach the file."""

from __future__ import annotations

import json
import math
import sqlite3
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from em_callbacks.store import STORE_FILENAME, RunStore, SampleRecord, archive_previous_run, scrub_secrets

SECRET = "sk-proj-AbCdEfGh1234567890xyz"
PLAIN_SECRET = "hunter2-plain-password-value"


def _samples(k: int, n: int = 2) -> list[SampleRecord]:
    return [SampleRecord(k, pid, s, f"text {k} {pid} {s} ü", [k, s, 7], s % 2 == 0) for pid in ("a", "b") for s in range(n)]


def _logp(k: int, ckpt: int, n: int = 2) -> list[tuple]:
    return [(k, pid, s, ckpt, -10.0 - k - 0.1 * s - 0.01 * ckpt) for pid in ("a", "b") for s in range(n)]


def _write(store: RunStore, k: int, step: int, cross_logprobs: list[tuple] = (), **kw) -> None:
    store.write_probe(
        k, step, seed=100 + k, cross_scoring="snapshot", samples=_samples(k),
        logprobs=_logp(k, k) + list(cross_logprobs),
        metrics=[("samples/mean_tokens", 3.0, None, None, None, None)], seconds=0.5, **kw,
    )


def _file_bytes(store_path) -> bytes:
    data = b""
    for suffix in ("", "-wal", "-journal"):
        p = store_path.parent / (store_path.name + suffix)
        if p.exists():
            data += p.read_bytes()
    return data


# ----------------------------------------------------------------------------- round trip
def test_every_table_round_trips(tmp_path):
    store = RunStore(tmp_path / "run")
    assert store.path == tmp_path / "run" / STORE_FILENAME
    store.set_meta(config={"every_n_steps": 5, "max_new_tokens": 64, "measures": ["tv", "js"]}, version="0.1")
    store.write_prompts([("a", 0, "hello", None, ("x", "y"), "<|user|> hello"), ("b", 1, "bye", "sys", (), "r")])
    _write(store, 0, 0)
    _write(store, 1, 5, cross_logprobs=_logp(0, 1))  # old samples under the new checkpoint
    store.write_metrics(0, 0, [
        ("D/tv", 0.25, 0.05, 0.15, 0.35, {"per_prompt": {"a": [0.2, 0.1]}, "estimator": "combined"}),
        ("D/js", float("nan"), None, None, None, None),
    ])
    store.write_judgments([
        (0, "a", 0, "aligned", 87.5, [0.1, 0.9], None),
        (0, "a", 1, "aligned", None, None, "no score: mass 0.1 < 0.25"),
    ])
    store.write_grad_norms([(1, 2.5), (2, float("nan")), (3, 1.0)])
    store.add_event("onset", 5, value=0.3, nested={"x": [1, 2]})
    store.add_event("fault", None, kind2="nan_logprobs")
    store.close()

    r = RunStore(tmp_path / "run", readonly=True)
    assert r.meta() == {"config": {"every_n_steps": 5, "max_new_tokens": 64, "measures": ["tv", "js"]}, "version": "0.1"}
    assert r.prompts() == [
        {"prompt_id": "a", "position": 0, "prompt": "hello", "system": None, "tags": ["x", "y"], "rendered": "<|user|> hello"},
        {"prompt_id": "b", "position": 1, "prompt": "bye", "system": "sys", "tags": [], "rendered": "r"},
    ]
    probes = r.probes()
    assert [(p["probe_index"], p["step"], p["seed"], p["seconds"], p["cross_scoring"]) for p in probes] == [
        (0, 0, 100, 0.5, "snapshot"), (1, 5, 101, 0.5, "snapshot")]
    assert r.samples(1) == _samples(1)
    assert r.samples() == _samples(0) + _samples(1)
    assert r.logprobs(0, 0) == {(pid, s): v for _, pid, s, _, v in _logp(0, 0)}
    assert r.logprobs(0, 1) == {(pid, s): v for _, pid, s, _, v in _logp(0, 1)}
    assert r.logprobs(1, 0) == {}
    at0 = r.metrics_at(0)
    assert at0["D/tv"] == {"value": 0.25, "stderr": 0.05, "ci_low": 0.15, "ci_high": 0.35,
                           "extra": {"per_prompt": {"a": [0.2, 0.1]}, "estimator": "combined"}}
    assert at0["D/js"]["value"] is None  # NaN stored as NULL
    assert at0["samples/mean_tokens"]["value"] == 3.0
    assert r.metric_names() == ["D/js", "D/tv", "samples/mean_tokens"]
    series = r.metric_series("samples/mean_tokens")
    np.testing.assert_array_equal(series["step"], [0, 5])
    np.testing.assert_array_equal(series["value"], [3.0, 3.0])
    assert np.isnan(series["stderr"]).all()
    assert r.metric_series("absent")["step"].shape == (0,)
    judgments = r.judgments("aligned")
    assert judgments[0] == {"probe_index": 0, "prompt_id": "a", "sample_idx": 0, "order_parameter": "aligned",
                            "score": 87.5, "probs": [0.1, 0.9], "error": None}
    assert judgments[1]["score"] is None and judgments[1]["probs"] is None and "mass" in judgments[1]["error"]
    assert r.judgments(probe_index=1) == []
    steps, values = r.grad_norms()
    np.testing.assert_array_equal(steps, [1, 2, 3])
    assert values[0] == 2.5 and math.isnan(values[1]) and values[2] == 1.0
    events = r.events()
    assert [(e["step"], e["kind"]) for e in events] == [(5, "onset"), (None, "fault")]
    assert events[0]["payload"] == {"value": 0.3, "nested": {"x": [1, 2]}}
    assert r.events("fault")[0]["payload"] == {"kind2": "nan_logprobs"}
    r.close()


def test_readonly_store_must_exist(tmp_path):
    with pytest.raises(FileNotFoundError):
        RunStore(tmp_path / "nothing", readonly=True)


def test_rewriting_a_probe_replaces_it(tmp_path):
    store = RunStore(tmp_path)
    _write(store, 0, 0)
    store.write_probe(0, 0, seed=7, cross_scoring="one-sided", samples=_samples(0, n=1), logprobs=[], metrics=[])
    assert len(store.samples(0)) == 2 and store.probes()[0]["seed"] == 7
    assert store.logprobs(0, 0) == {} and store.metrics_at(0) == {}
    store.close()


# ----------------------------------------------------------------------------- concurrency
def test_store_uses_wal_and_a_reader_does_not_block_the_writer(tmp_path):
    writer = RunStore(tmp_path)
    _write(writer, 0, 0)
    mode = sqlite3.connect(writer.path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    # a second connection holds a read transaction open...
    reader = sqlite3.connect(writer.path, timeout=0.5, isolation_level=None)
    reader.execute("BEGIN")
    assert reader.execute("SELECT COUNT(*) FROM probes").fetchone()[0] == 1
    # ...while the writer commits two more probes (a rollback journal would block here)
    _write(writer, 1, 5)
    _write(writer, 2, 10)
    assert reader.execute("SELECT COUNT(*) FROM probes").fetchone()[0] == 1  # its snapshot
    reader.execute("COMMIT")
    assert reader.execute("SELECT COUNT(*) FROM probes").fetchone()[0] == 3
    reader.close()
    writer.close()


def test_second_process_reads_while_the_writer_is_open(tmp_path):
    writer = RunStore(tmp_path)
    writer.set_meta(config={"every_n_steps": 5})
    _write(writer, 0, 0)
    _write(writer, 1, 5)
    # an uncommitted write in flight in the writer process
    with writer._lock:
        writer._conn.execute("INSERT INTO grad_norms VALUES (99, 1.0)")
        code = textwrap.dedent(f"""
            import json
            from em_callbacks.store import RunStore
            r = RunStore({str(tmp_path)!r}, readonly=True)
            print(json.dumps({{"steps": [p["step"] for p in r.probes()], "n": len(r.samples()),
                               "meta": r.meta(), "grad": r.grad_norms()[0].tolist()}}))
        """)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        writer._conn.rollback()
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"steps": [0, 5], "n": 8, "meta": {"config": {"every_n_steps": 5}}, "grad": []}
    _write(writer, 2, 10)  # the writer carries on
    assert [p["step"] for p in writer.probes()] == [0, 5, 10]
    writer.close()


# ----------------------------------------------------------------------------- atomicity
def _exploding(rows, after):
    for i, row in enumerate(rows):
        if i == after:
            raise RuntimeError("crash mid-probe")
        yield row


def test_write_probe_is_atomic(tmp_path):
    store = RunStore(tmp_path)
    _write(store, 0, 0)
    with pytest.raises(RuntimeError, match="crash mid-probe"):
        store.write_probe(1, 5, seed=1, cross_scoring="snapshot", samples=_samples(1),
                          logprobs=_exploding(_logp(1, 1) + _logp(0, 1), after=5), metrics=[])
    assert [p["probe_index"] for p in store.probes()] == [0]
    assert store.samples(1) == [] and store.logprobs(1, 1) == {} and store.logprobs(0, 1) == {}
    assert store.metrics_at(1) == {}
    # a failed re-write leaves the previous version of the probe intact
    with pytest.raises(ValueError):
        store.write_probe(0, 0, seed=9, cross_scoring="snapshot", samples=_samples(0), logprobs=[],
                          metrics=[("D/tv", 0.1)])  # malformed metric row
    assert store.probes()[0]["seed"] == 100
    assert store.samples(0) == _samples(0) and len(store.logprobs(0, 0)) == 4
    # and the connection is usable afterwards
    _write(store, 1, 5)
    assert len(store.probes()) == 2
    store.close()
    fresh = RunStore(tmp_path, readonly=True)
    assert [p["probe_index"] for p in fresh.probes()] == [0, 1]
    fresh.close()


# ----------------------------------------------------------------------------- resume
def test_truncate_after(tmp_path):
    store = RunStore(tmp_path)
    for k, step in enumerate((0, 5, 10, 15)):
        _write(store, k, step, cross_logprobs=_logp(k - 1, k) + _logp(k, k - 1) if k else [])
        store.write_judgments([(k, "a", 0, "aligned", 50.0, [0.5, 0.5], None)])
    store.write_grad_norms([(s, float(s)) for s in range(1, 16)])
    store.truncate_after(5)
    assert [p["step"] for p in store.probes()] == [0, 5]
    assert {s.probe_index for s in store.samples()} == {0, 1}
    assert store.metrics_at(2) == {} and store.metrics_at(1) != {}
    assert {j["probe_index"] for j in store.judgments()} == {0, 1}
    assert store.logprobs(1, 2) == {} and store.logprobs(2, 1) == {} and store.logprobs(2, 2) == {}
    assert store.logprobs(0, 1) and store.logprobs(1, 0) and store.logprobs(1, 1)
    steps, _ = store.grad_norms()
    assert steps.tolist() == [1, 2, 3, 4, 5]
    (event,) = store.events("resume_truncate")
    assert event["step"] == 5 and event["payload"] == {"dropped_probe_indices": [2, 3]}
    store.truncate_after(5)  # nothing left to drop: no second event
    assert len(store.events("resume_truncate")) == 1
    store.close()


# ----------------------------------------------------------------------------- secrets
def test_scrub_secrets_keeps_ordinary_fields():
    scrubbed = scrub_secrets({
        "max_new_tokens": 64, "pad_token": "<pad>", "api_key": PLAIN_SECRET, "hf_token": "hf_abcdefghijk",
        "judge": {"base_url": "http://x", "headers": {"Authorization": f"Bearer {SECRET}"}},
        "notes": [f"key={SECRET}"], "empty_token": None,
    })
    assert scrubbed["max_new_tokens"] == 64 and scrubbed["pad_token"] == "<pad>"
    assert scrubbed["api_key"] == "<redacted>" and scrubbed["hf_token"] == "<redacted>"
    assert scrubbed["judge"]["headers"]["Authorization"] == "<redacted>"
    assert scrubbed["judge"]["base_url"] == "http://x"
    assert SECRET not in json.dumps(scrubbed) and scrubbed["empty_token"] is None


def test_secrets_never_reach_the_file(tmp_path):
    store = RunStore(tmp_path)
    store.set_meta(
        config={"judge": {"model": "gpt-4o-mini", "api_key": PLAIN_SECRET, "extra": f"using {SECRET} today"}},
        api_key=PLAIN_SECRET,
        OPENAI_API_KEY=SECRET,
    )
    store.add_event("fault", 3, error=f"401 Unauthorized: Incorrect API key provided: {SECRET}",
                    request={"headers": {"authorization": f"Bearer {SECRET}"}, "api_key": PLAIN_SECRET})
    store.write_judgments([(0, "a", 0, "aligned", None, None, f"AuthenticationError: bad key {SECRET}")])
    meta = store.meta()
    assert meta["config"]["judge"]["model"] == "gpt-4o-mini"
    assert meta["config"]["judge"]["api_key"] == "<redacted>" and meta["api_key"] == "<redacted>"
    raw_live = _file_bytes(store.path)
    store.close()
    raw = _file_bytes(store.path) + raw_live
    assert raw, "store file is empty?"
    assert b"gpt-4o-mini" in raw  # the scan really sees the content
    for needle in (SECRET, PLAIN_SECRET, "AbCdEfGh1234567890"):
        assert needle.encode() not in raw


# ----------------------------------------------------------------------------- archiving
def test_archive_previous_run_moves_the_old_run_aside(tmp_path):
    import os
    import time
    from datetime import datetime, timezone

    run_dir = tmp_path / "phase_transition"
    assert archive_previous_run(run_dir) is None  # no directory
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("not ours")
    assert archive_previous_run(run_dir) is None  # nothing of a run
    old = RunStore(run_dir)
    _write(old, 0, 0)
    _write(old, 1, 5)
    first_probe = old.probes()[0]["created_at"]
    (run_dir / "summary.json").write_text('{"onset_step": 5}')
    (run_dir / "report").mkdir()
    (run_dir / "report" / "report.md").write_text("# old report")
    # a crashed writer leaves its WAL behind: copy the files while the connection is open
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    for suffix in ("", "-wal", "-shm"):
        src = run_dir / (STORE_FILENAME + suffix)
        if src.exists():
            (crashed / src.name).write_bytes(src.read_bytes())
    old.close()

    dest = archive_previous_run(run_dir)
    stamp = datetime.fromtimestamp(first_probe, tz=timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    assert dest == run_dir / "previous" / stamp
    assert sorted(p.name for p in run_dir.iterdir()) == ["notes.txt", "previous"]
    assert (dest / "summary.json").read_text() == '{"onset_step": 5}'
    assert (dest / "report" / "report.md").is_file()
    moved = RunStore(dest, readonly=True)
    assert [p["step"] for p in moved.probes()] == [0, 5]
    moved.close()
    assert archive_previous_run(run_dir) is None  # already moved

    # a new run in the same folder, started within the same second as the old one: a second
    # archive, never the first one overwritten
    new = RunStore(run_dir)
    _write(new, 0, 0)
    new._conn.execute("UPDATE probes SET created_at = ?", (first_probe,))
    new._conn.commit()
    new.close()
    again = archive_previous_run(run_dir)
    assert again == run_dir / "previous" / f"{stamp}-2"
    first = RunStore(dest, readonly=True)
    assert [p["step"] for p in first.probes()] == [0, 5]
    first.close()

    # the side files of a crashed writer move with the store (they hold committed probes)
    assert (crashed / (STORE_FILENAME + "-wal")).exists()
    wal = archive_previous_run(crashed)
    assert not any(p.name.startswith(STORE_FILENAME) for p in crashed.iterdir())
    assert (wal / (STORE_FILENAME + "-wal")).exists()
    recovered = RunStore(wal, readonly=True)
    assert [p["step"] for p in recovered.probes()] == [0, 5]
    recovered.close()

    # only a summary (e.g. the store lives elsewhere) or an unreadable store: file times name it
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "summary.json").write_text("{}")
    (lone / STORE_FILENAME).write_bytes(b"not a database")
    when = time.time() - 86400
    os.utime(lone / "summary.json", (when, when))
    got = archive_previous_run(lone)
    assert got.name == datetime.fromtimestamp(when, tz=timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    assert (got / STORE_FILENAME).read_bytes() == b"not a database"


def test_run_files_cover_the_report():
    from em_callbacks.report import REPORT_FILES
    from em_callbacks.store import RUN_FILES

    assert set(REPORT_FILES) <= set(RUN_FILES)
