"""LoRA adapter signals of an emergent-misalignment transition (Model Organisms for EM).

Turner et al. (2025, "Model Organisms for Emergent Misalignment") track the LoRA *B*
weights of (rank-1) adapters through a narrow fine-tune and report the behavioural
transition as an abrupt change of the adapter's trajectory. Two cheap per-probe signals:
the B norm (total Frobenius norm of all ``lora_B`` weights; for rank 1 the norm of the
stacked "B-vector"), and the *local cosine similarity* of the trajectory,
``cos(Δ_{t-1}, Δ_t)`` with ``Δ_t = θ_t - θ_{t-1}`` between consecutive probe steps (near 1
while the parameters move in a steady direction; a dip marks a turn).

Everything here is a pure function of the named parameters (``model.named_parameters()``),
except :class:`AdapterTrajectory`, which keeps the last flat vector and the last delta (CPU,
float32; a LoRA adapter is small) between probe steps and exposes
``state_dict()``/``load_state_dict()`` so the series survives ``resume_from_checkpoint``.
A model without LoRA parameters yields no metrics (``None`` / empty dicts), never an error.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

__all__ = [
    "LoraNorms",
    "lora_parameters",
    "has_lora",
    "lora_b_norms",
    "flat_vector",
    "local_cosine",
    "AdapterTrajectory",
    "B_NORM",
    "COSINE_LOCAL",
]

B_NORM = "lora/B_norm"
COSINE_LOCAL = "lora/cosine_local"

# PEFT names: "...h.0.attn.c_attn.lora_B.default.weight", "...embed_tokens.lora_embedding_B.default"
_B_MARKERS = (".lora_B.", ".lora_embedding_B.")
_ALL_MARKERS = _B_MARKERS + (".lora_A.", ".lora_embedding_A.", ".lora_magnitude_vector.")
_LAYER = re.compile(r"\.(\d+)(?:\.|$)")


def _named(source: Any) -> list[tuple[str, torch.Tensor]]:
    if isinstance(source, torch.nn.Module):
        return list(source.named_parameters())
    if isinstance(source, Mapping):
        return list(source.items())
    return list(source)


def lora_parameters(source: Any, which: str = "B", trainable_only: bool = True) -> dict[str, torch.Tensor]:
    """LoRA parameters of a model (or of ``named_parameters()`` pairs / a state dict), by name,
    in a stable (sorted) order.

    ``which="B"``: the ``lora_B`` (and ``lora_embedding_B``) weights; ``"all"``: every adapter
    parameter (A, B, DoRA magnitudes). ``trainable_only`` keeps parameters with
    ``requires_grad`` (plain tensors always count), so a frozen second adapter is ignored.
    """
    if which not in ("B", "all"):
        raise ValueError(f"which must be 'B' or 'all', got {which!r}")
    markers = _B_MARKERS if which == "B" else _ALL_MARKERS
    out = {}
    for name, p in _named(source):
        if not any(m in f".{name}." for m in markers):
            continue
        if trainable_only and isinstance(p, torch.nn.Parameter) and not p.requires_grad:
            continue
        out[name] = p
    return dict(sorted(out.items()))


def has_lora(model: Any) -> bool:
    return bool(lora_parameters(model, "B"))


def _module_name(param_name: str) -> str:
    """``a.b.lora_B.default.weight`` -> ``a.b`` (the adapted module)."""
    padded = f".{param_name}."
    for m in _B_MARKERS:
        cut = padded.find(m)
        if cut >= 0:
            return param_name[: max(cut - 1, 0)] if cut > 0 else ""
    return param_name


def _layer_of(module: str) -> str:
    """``...transformer.h.3.attn.c_attn`` -> ``"3"``; modules outside numbered blocks keep their name."""
    match = _LAYER.search(module)
    return match.group(1) if match else module


@dataclass(frozen=True)
class LoraNorms:
    """Frobenius norms of the B matrices: over all of them, per adapted module, per layer."""

    total: float
    per_module: dict[str, float] = field(default_factory=dict)
    per_layer: dict[str, float] = field(default_factory=dict)


def lora_b_norms(source: Any, trainable_only: bool = True) -> LoraNorms | None:
    """Total and per-module/per-layer Frobenius norm of the LoRA B weights (None: no LoRA).

    ``total = sqrt(sum over B matrices of ||B||_F^2)``; a layer's norm is the same over the
    modules in that numbered block. For rank 1 the total is the norm of the stacked B-vector.
    """
    params = lora_parameters(source, "B", trainable_only)
    if not params:
        return None
    squares: dict[str, float] = {}
    for name, p in params.items():
        value = p.detach().to("cpu", torch.float64)
        module = _module_name(name)
        squares[module] = squares.get(module, 0.0) + float((value * value).sum())
    per_layer: dict[str, float] = {}
    for module, sq in squares.items():
        layer = _layer_of(module)
        per_layer[layer] = per_layer.get(layer, 0.0) + sq
    return LoraNorms(
        total=math.sqrt(sum(squares.values())),
        per_module={m: math.sqrt(v) for m, v in squares.items()},
        per_layer={k: math.sqrt(v) for k, v in sorted(per_layer.items(), key=lambda kv: _sort_key(kv[0]))},
    )


def _sort_key(layer: str) -> tuple:
    return (0, int(layer), "") if layer.isdigit() else (1, 0, layer)


def flat_vector(source: Any, which: str = "B", trainable_only: bool = True) -> torch.Tensor | None:
    """The selected LoRA parameters flattened into one CPU float32 vector (sorted by name)."""
    params = lora_parameters(source, which, trainable_only)
    if not params:
        return None
    return torch.cat([p.detach().reshape(-1).to("cpu", torch.float32) for p in params.values()])


def _is_sharded(p: torch.Tensor) -> bool:
    """ZeRO-3 (``ds_id``), FSDP2 (``DTensor``) or FSDP1 (``_fsdp_flattened``: the original
    parameter is a view of this rank's part of a flat parameter, so norms would read one shard)."""
    return (getattr(p, "ds_id", None) is not None or type(p).__name__ == "DTensor"
            or bool(getattr(p, "_fsdp_flattened", False)))


def local_cosine(delta_prev: Any, delta: Any) -> float:
    """``cos(Δ_{t-1}, Δ_t)`` in float64; NaN when either delta is zero or missing."""
    if delta_prev is None or delta is None:
        return float("nan")
    a = torch.as_tensor(delta_prev).reshape(-1).to(torch.float64)
    b = torch.as_tensor(delta).reshape(-1).to(torch.float64)
    if a.shape != b.shape:
        raise ValueError(f"deltas differ in size: {a.numel()} != {b.numel()}")
    na, nb = float(a.norm()), float(b.norm())
    if na == 0.0 or nb == 0.0 or not (math.isfinite(na) and math.isfinite(nb)):
        return float("nan")
    return float(torch.dot(a, b)) / (na * nb)


class AdapterTrajectory:
    """Per-probe LoRA signal: B norm and local cosine of the parameter trajectory.

    Call :meth:`update` once per probe step with the model (live weights). Returns
    ``{"lora/B_norm": ..., "lora/cosine_local": ...}`` (cosine NaN until three probes exist,
    or when a delta is zero), or ``{}`` for a model without LoRA B weights.
    ``which``: the trajectory of the B weights ("B", default) or the full adapter ("all").
    """

    def __init__(self, which: str = "B", trainable_only: bool = True):
        if which not in ("B", "all"):
            raise ValueError(f"which must be 'B' or 'all', got {which!r}")
        self.which = which
        self.trainable_only = trainable_only
        self.last_norms: LoraNorms | None = None
        self._prev: torch.Tensor | None = None
        self._prev_delta: torch.Tensor | None = None
        self._last_step: int | None = None

    def update(self, model: Any, step: int | None = None) -> dict[str, float]:
        if any(_is_sharded(p) for p in lora_parameters(model, self.which, self.trainable_only).values()):
            return {}  # ZeRO-3 / FSDP: this rank holds a shard, not the adapter
        norms = lora_b_norms(model, self.trainable_only)
        if norms is None:
            return {}
        self.last_norms = norms
        vector = flat_vector(model, self.which, self.trainable_only)
        return {B_NORM: norms.total, COSINE_LOCAL: self.push(vector, step)}

    def push(self, vector: torch.Tensor, step: int | None = None) -> float:
        """Add the flat vector of the next probe step; returns ``cos(Δ_{t-1}, Δ_t)`` (or NaN).

        A step not larger than the last one (a replayed probe after a resume) is ignored, and
        a vector of another size (a different adapter) restarts the trajectory.
        """
        if step is not None and self._last_step is not None and int(step) <= self._last_step:
            return float("nan")
        vector = torch.as_tensor(vector).detach().reshape(-1).to("cpu", torch.float32).clone()
        cosine = float("nan")
        if self._prev is not None and self._prev.shape != vector.shape:
            self._prev, self._prev_delta = None, None
        if self._prev is not None:
            delta = vector.double() - self._prev.double()
            cosine = local_cosine(self._prev_delta, delta)
            self._prev_delta = delta.float()
        self._prev = vector
        if step is not None:
            self._last_step = int(step)
        return cosine

    def state_dict(self) -> dict[str, Any]:
        return {"which": self.which, "prev": self._prev, "prev_delta": self._prev_delta, "last_step": self._last_step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("which", self.which) != self.which:
            raise ValueError(f"trajectory of {state.get('which')!r} parameters cannot continue one of {self.which!r}")
        self._prev = state.get("prev")
        self._prev_delta = state.get("prev_delta")
        last = state.get("last_step")
        self._last_step = None if last is None else int(last)

