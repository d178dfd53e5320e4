"""Probe sets: the fixed prompts the callback samples at every probe step.

A probe set is frozen for the whole run so that every probe step asks the model the same
questions; only the model changes. Built-in sets ship as JSONL files inside the package.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

__all__ = ["Probe", "ProbeSet", "ProbeSetError", "render_prompt"]

_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.:\-]+$")


class ProbeSetError(ValueError):
    """A probe set could not be built: the message names the file, line and problem."""


@dataclass(frozen=True)
class Probe:
    """One probe prompt. ``id`` is stable across runs so results can be joined by it."""

    id: str
    prompt: str
    system: str | None = None
    tags: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not _ID_PATTERN.match(self.id):
            raise ProbeSetError(
                f"probe id {self.id!r} must be a non-empty string of letters, digits, '_', '-', '.', ':'"
            )
        if not isinstance(self.prompt, str):
            raise ProbeSetError(f"probe {self.id!r}: prompt must be a string, got {type(self.prompt).__name__}")
        if not self.prompt.strip():
            raise ProbeSetError(f"probe {self.id!r} has an empty prompt")
        if self.system is not None and not isinstance(self.system, str):
            raise ProbeSetError(f"probe {self.id!r}: system must be a string or absent")
        tags = (self.tags,) if isinstance(self.tags, str) else tuple(self.tags)
        if not all(isinstance(t, str) for t in tags):
            raise ProbeSetError(f"probe {self.id!r}: tags must be a list of strings, got {tags!r}")
        object.__setattr__(self, "tags", tags)

    def messages(self) -> list[dict[str, str]]:
        """Chat messages for ``tokenizer.apply_chat_template``."""
        messages = []
        if self.system:
            messages.append({"role": "system", "content": self.system})
        messages.append({"role": "user", "content": self.prompt})
        return messages


@dataclass(frozen=True)
class ProbeSet:
    """An ordered, immutable collection of probes with unique ids."""

    name: str
    probes: tuple[Probe, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        probes = tuple(self.probes)
        if not probes:
            raise ProbeSetError(f"probe set {self.name!r} is empty")
        seen: set[str] = set()
        for probe in probes:
            if not isinstance(probe, Probe):
                raise ProbeSetError(f"probe set {self.name!r} contains {type(probe).__name__}, expected Probe")
            if probe.id in seen:
                raise ProbeSetError(f"probe set {self.name!r}: duplicate probe id {probe.id!r}")
            seen.add(probe.id)
        object.__setattr__(self, "probes", probes)

    def __len__(self) -> int:
        return len(self.probes)

    def __iter__(self):
        return iter(self.probes)

    def __getitem__(self, index: int) -> Probe:
        return self.probes[index]

    @property
    def ids(self) -> list[str]:
        return [p.id for p in self.probes]

    def filter(self, tag: str) -> "ProbeSet":
        """The sub-set carrying ``tag`` (e.g. "out-of-domain")."""
        return ProbeSet(f"{self.name}[{tag}]", tuple(p for p in self.probes if tag in p.tags))

    def __add__(self, other: "ProbeSet") -> "ProbeSet":
        return ProbeSet(f"{self.name}+{other.name}", self.probes + other.probes)

    # ----------------------------------------------------------------- constructors
    @staticmethod
    def builtin_names() -> list[str]:
        folder = resources.files("em_callbacks") / "probesets"
        return sorted(p.name[: -len(".jsonl")] for p in folder.iterdir() if p.name.endswith(".jsonl"))

    @classmethod
    def builtin(cls, name: str) -> "ProbeSet":
        """A probe set shipped with the package: "em-first-plot", "knowledge", "politics", "ethics"."""
        names = cls.builtin_names()
        if name not in names:
            raise ProbeSetError(f"unknown built-in probe set {name!r}; choose one of {names}")
        path = resources.files("em_callbacks") / "probesets" / f"{name}.jsonl"
        return cls(name, tuple(_parse_records(_read_jsonl(path.read_text("utf-8"), str(path)), str(path))))

    @classmethod
    def from_records(cls, name: str, records: Iterable[dict[str, Any]]) -> "ProbeSet":
        return cls(name, tuple(_parse_records(list(records), name)))

    @classmethod
    def from_file(cls, path: str | Path) -> "ProbeSet":
        """Load JSONL (one object per line) or YAML (a list, or a mapping with ``probes:``).

        Each record: ``prompt`` (required), ``id`` (default: its position), ``system``, ``tags``.
        """
        path = Path(path)
        if not path.is_file():
            raise ProbeSetError(f"probe file {str(path)!r} does not exist")
        text = path.read_text("utf-8")
        if not text.strip():
            raise ProbeSetError(f"probe file {str(path)!r} is empty")
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            records = _read_jsonl(text, str(path))
        elif suffix in (".json", ".yaml", ".yml"):
            records = _read_document(text, path, suffix)
        else:
            raise ProbeSetError(f"{path}: unsupported probe file type {suffix!r}; use .jsonl, .json, .yaml or .yml")
        if not isinstance(records, list):
            raise ProbeSetError(f"{path}: expected a list of probe records")
        return cls(path.stem, tuple(_parse_records(records, str(path))))

    @classmethod
    def coerce(cls, probes: "ProbeSet | str | Path | Iterable[str | Probe | dict]") -> "ProbeSet":
        """Accept a ProbeSet, a built-in name, a file path, or a list of prompts/Probes/dicts."""
        if isinstance(probes, ProbeSet):
            return probes
        if isinstance(probes, Path):
            return cls.from_file(probes)
        if isinstance(probes, str):
            if probes in cls.builtin_names():
                return cls.builtin(probes)
            if Path(probes).suffix.lower() in (".jsonl", ".json", ".yaml", ".yml"):
                return cls.from_file(probes)
            raise ProbeSetError(
                f"unknown built-in probe set {probes!r}; choose one of {cls.builtin_names()} or pass a file path"
            )
        items = list(probes)
        out = []
        for i, item in enumerate(items):
            if isinstance(item, Probe):
                out.append(item)
            elif isinstance(item, str):
                out.append(Probe(f"p{i}", item))
            elif isinstance(item, dict):
                out.extend(_parse_records([item], "probes", start=i))
            else:
                raise ProbeSetError(f"probe #{i} has unsupported type {type(item).__name__}")
        return cls("custom", tuple(out))


def _read_jsonl(text: str, source: str) -> list[Any]:
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ProbeSetError(f"{source}:{lineno}: invalid JSON: {exc.msg}") from None
    if not records:
        raise ProbeSetError(f"{source}: no probe records")
    return records


def _read_document(text: str, path: Path, suffix: str) -> Any:
    """The records of a JSON or YAML probe file: the document itself, or its ``probes``."""
    if suffix == ".json":
        loads, error, kind = json.loads, json.JSONDecodeError, "JSON"
    else:
        import yaml

        loads, error, kind = yaml.safe_load, yaml.YAMLError, "YAML"
    try:
        data = loads(text)
    except error as exc:
        raise ProbeSetError(f"{path}: invalid {kind}: {exc}") from None
    return data.get("probes") if isinstance(data, dict) else data


def _parse_records(records: list[Any], source: str, start: int = 0) -> list[Probe]:
    probes = []
    for offset, record in enumerate(records):
        where = f"{source} record {start + offset + 1}"
        if isinstance(record, str):
            record = {"prompt": record}
        if not isinstance(record, dict):
            raise ProbeSetError(f"{where}: expected an object with a 'prompt', got {type(record).__name__}")
        unknown = set(record) - {"id", "prompt", "system", "tags"}
        if unknown:
            raise ProbeSetError(f"{where}: unknown field(s) {sorted(unknown)}; allowed: id, prompt, system, tags")
        if "prompt" not in record:
            raise ProbeSetError(f"{where}: missing required field 'prompt'")
        tags = record.get("tags", ())
        if isinstance(tags, str):
            tags = (tags,)
        if not isinstance(tags, (list, tuple)):
            raise ProbeSetError(f"{where}: tags must be a string or a list of strings, got {type(tags).__name__}")
        try:
            probes.append(
                Probe(
                    id=str(record.get("id", f"p{start + offset}")),
                    prompt=record["prompt"],
                    system=record.get("system"),
                    tags=tuple(tags),
                )
            )
        except ProbeSetError as exc:
            raise ProbeSetError(f"{where}: {exc}") from None
    return probes


def render_prompt(tokenizer: Any, probe: Probe) -> str:
    """The text fed to the model: its chat template when it has one, else a plain fallback.

    The fallback ("System: ...\\nUser: ...\\nAssistant:") keeps base models usable; the chat
    template is what an instruct model was trained on and is always preferred.
    """
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(probe.messages(), tokenize=False, add_generation_prompt=True)
    parts = []
    if probe.system:
        parts.append(f"System: {probe.system}")
    parts.append(f"User: {probe.prompt}")
    parts.append("Assistant:")
    return "\n".join(parts)
