"""Read the records of an offline W&B run (``run-*.wandb``) without the network.

wandb >= 0.18 moved its LevelDB-log ``DataStore`` into the Go core, so there is no Python
reader to import any more (and ``wandb.Api`` cannot see offline runs). The format is small:

* a 7-byte file header ``<4sHB``: ident ``b":W&B"``, magic ``0xBEE1``, version 0;
* 32 KiB blocks of records, each a 7-byte header ``<IHB`` (CRC-32 (IEEE, seeded with the
  record-type byte), data length, type) followed by the data; a block tail shorter than a
  header is zero padding; a payload larger than the block rest is split FIRST/MIDDLE.../LAST;
* every reassembled payload is a serialized ``wandb.proto.wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from pathlib import Path
from typing import Any, Iterator

HEADER_IDENT = b":W&B"
HEADER_MAGIC = 0xBEE1
HEADER = struct.Struct("<4sHB")
RECORD_HEADER = struct.Struct("<IHB")
BLOCK_LEN = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4
_TYPE_CRC = {t: zlib.crc32(bytes([t])) for t in range(LAST + 1)}


class WandbLogError(ValueError):
    pass


def iter_payloads(path: str | Path) -> Iterator[bytes]:
    """Reassembled record payloads, checksums verified."""
    data = Path(path).read_bytes()
    if len(data) < HEADER.size:
        raise WandbLogError(f"{path}: too short for a W&B header")
    ident, magic, version = HEADER.unpack_from(data, 0)
    if ident != HEADER_IDENT or magic != HEADER_MAGIC:
        raise WandbLogError(f"{path}: not a W&B LevelDB log (ident={ident!r}, magic={magic:#x})")
    pos = HEADER.size
    pending: list[bytes] | None = None
    while pos < len(data):
        left = BLOCK_LEN - pos % BLOCK_LEN
        if left < RECORD_HEADER.size:
            if data[pos : pos + left].strip(b"\x00"):
                raise WandbLogError(f"{path}: non-zero block padding at {pos}")
            pos += left
            continue
        if pos + RECORD_HEADER.size > len(data):
            break  # truncated tail (writer still running)
        checksum, length, kind = RECORD_HEADER.unpack_from(data, pos)
        if kind == 0 and length == 0 and checksum == 0:  # zero-filled tail of a preallocated block
            pos += left
            continue
        body = data[pos + RECORD_HEADER.size : pos + RECORD_HEADER.size + length]
        if len(body) < length:
            break  # truncated record at the end
        if kind not in _TYPE_CRC or zlib.crc32(body, _TYPE_CRC[kind]) & 0xFFFFFFFF != checksum:
            raise WandbLogError(f"{path}: bad checksum or record type {kind} at offset {pos}")
        pos += RECORD_HEADER.size + length
        if kind == FULL:
            yield body
        elif kind == FIRST:
            pending = [body]
        elif kind == MIDDLE and pending is not None:
            pending.append(body)
        elif kind == LAST and pending is not None:
            pending.append(body)
            yield b"".join(pending)
            pending = None
        else:
            raise WandbLogError(f"{path}: record fragment of type {kind} out of order at {pos}")


def iter_records(path: str | Path) -> Iterator[Any]:
    """``wandb_internal_pb2.Record`` objects of the file, in order."""
    from wandb.proto import wandb_internal_pb2

    for payload in iter_payloads(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        yield record


def _items(items: Any) -> dict[str, Any]:
    """History/summary items as a dict. wandb-core splits a logged dict (e.g. a Table's
    ``{"_type": "table-file", ...}``) into items with ``nested_key = [top, field]``; they are
    folded back into one nested dict under ``top``."""
    out: dict[str, Any] = {}
    for item in items:
        path = [item.key] if item.key else list(item.nested_key)
        value = json.loads(item.value_json)
        target = out
        for part in path[:-1]:
            target = target.setdefault(part, {})
        target[path[-1]] = value
    return out


def history_rows(path: str | Path) -> list[dict[str, Any]]:
    """Every ``run.log`` row as a dict of key -> decoded JSON value, in logging order."""
    return [_items(r.history.item) for r in iter_records(path) if r.WhichOneof("record_type") == "history"]


def summary_updates(path: str | Path) -> dict[str, Any]:
    """The run summary as the sequence of summary records leaves it."""
    out: dict[str, Any] = {}
    for record in iter_records(path):
        if record.WhichOneof("record_type") == "summary":
            out.update(_items(record.summary.update))
            for item in record.summary.remove:
                out.pop(item.key if item.key else item.nested_key[0], None)
    return out


def record_types(path: str | Path) -> list[str]:
    return [r.WhichOneof("record_type") for r in iter_records(path)]


def find_run_files(root: str | Path) -> list[Path]:
    return sorted(Path(root).rglob("run-*.wandb"))


def wait_for_exit_record(path: str | Path, timeout: float = 60.0) -> list[str]:
    """Record types of the file once its ``exit`` record is there (wandb-core may still be
    flushing the file for a moment after ``wandb.finish()`` returns). Raises on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            types = record_types(path)
        except WandbLogError:
            types = []
        if "exit" in types:
            return types
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path}: no exit record after {timeout}s; records so far: {types}")
        time.sleep(0.2)
