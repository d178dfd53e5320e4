"""Numerically honest scoring: teacher-forced log-probabilities in float32 whatever the model's
dtype, and an estimate of the numerical noise floor of D.

Why: D compares log-probabilities of the same samples under two nearby checkpoints. In bfloat16
every forward pass rounds each activation and logit to 8 significant bits; two checkpoints that
differ a little round differently, so log q - log p gains noise of the same order as the real
change. Measured on the organism with its base in bf16 (benchmarks/precision.py): a sample's
log-prob moves by 0.026 on average between a bf16 and a float32 forward, the one-sided TV between
two nearby checkpoints reads 0.027 instead of 0.020 (+40%), and a callback run's baseline D reads
2.6x the float32 run's. The noise does not average out: TV and JS are convex in log q - log p,
so it inflates D. Where it comes from: the logits written in bf16 (8 significant bits of values
around 10) are most of it; with only the LM head in float32 the nearby-checkpoint TV was +1%
off, with the last block too +0%, the rest of the rounding (mean |dlogp| 0.005) is the trunk's.
A 2-layer model says little about a 28-layer one, so the default is the whole forward.

How: :func:`computed_in` runs a forward pass with every floating-point operand narrower than the
scoring dtype cast to it *at the operation* (a ``TorchFunctionMode``), and with autocast switched
off for each operation (accelerate wraps a mixed-precision model's ``forward`` in autocast, which
would otherwise round float32 weights to bf16 again). Casting bf16/fp16 to float32 is exact, so
the pass computes exactly what a float32 copy of the model computes (tests/test_precision.py
checks bit equality), without the copy: each weight exists in float32 only while its operation
runs (the largest extra tensor is one float32 weight matrix, in practice the LM head's; an
embedding lookup casts only the rows it gathers). It acts on whatever tensors reach each
operation, so PEFT adapters, tied heads and logit soft-capping need nothing special (tested);
weights that FSDP/ZeRO-3 gather for an operation should be no different (not tested here).
Quantized weights (int8/4-bit) are not floating point and keep their kernels' compute dtype.

What it costs: the arithmetic of a float32 forward (on a GPU's tensor cores float32 without
TF32 runs at a small fraction of bf16's rate, so the scoring passes of a large bf16 model get
several times slower; not measured here: no GPU. On this AVX2 CPU, which has no bf16 units,
float32 scoring was 9x *faster* than bf16), a cast of each weight per forward pass
(memory-bound, small next to the matmul it feeds), Python overhead per operation (a few
microseconds), float32 activations (2x bf16's) and float32 logits (2x bf16's; batches are
capped in logit *elements*, so the logits of a batch take the bytes a float32 model's take:
1057 vs 530 MiB peak for 32 rows at a 151,936 vocabulary, benchmarks/vocab_cost.py).
Generation is untouched: samples are drawn by the model as it is.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["SCORING_DTYPES", "ScoringPrecision", "computed_in", "resolve_scoring_dtype", "check_scoring_precision"]

# "float32": score in float32 (exact upcast of narrower weights, autocast off); "model": score in
# whatever the model computes in (its own dtype, or autocast's).
SCORING_DTYPES = ("float32", "model")

# Reads of a tensor's metadata: no cast (a weight's ``.size()`` must not copy the weight).
_METADATA = frozenset({
    "size", "dim", "ndimension", "numel", "nelement", "stride", "storage_offset", "is_contiguous", "data_ptr",
    "element_size", "is_floating_point", "is_complex", "get_device", "__len__", "__repr__", "__format__",
})
# In-place operations must act on their own tensor, never on a cast copy.
_IN_PLACE_DUNDERS = frozenset({
    "__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__",
    "__ipow__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__", "__imatmul__",
})


def resolve_scoring_dtype(name: str) -> torch.dtype | None:
    """``"float32"`` -> ``torch.float32``; ``"model"`` -> ``None`` (no change)."""
    if name not in SCORING_DTYPES:
        raise ValueError(f"scoring_dtype must be one of {SCORING_DTYPES}, got {name!r}")
    return None if name == "model" else getattr(torch, name)


class _Upcast(TorchFunctionMode):
    """Cast floating-point tensor operands narrower than ``dtype`` to ``dtype`` at every torch
    operation, with autocast off for the operation. Counts what it changed."""

    def __init__(self, dtype: torch.dtype, device_type: str):
        super().__init__()
        self.dtype = dtype
        self.device_type = device_type
        self.casts = 0  # operands cast
        self.autocast_ops = 0  # operations autocast would have rounded (run with it off)
        self.narrow_seen: set[torch.dtype] = set()

    def _cast(self, x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            if x.is_floating_point() and x.dtype.itemsize < self.dtype.itemsize:
                self.casts += 1
                self.narrow_seen.add(x.dtype)
                return x.to(self.dtype)
            return x
        if isinstance(x, (list, tuple)) and x and any(isinstance(v, (torch.Tensor, list, tuple)) for v in x):
            return type(x)(self._cast(v) for v in x)
        return x

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if (name == "__get__" or name in _METADATA or name in _IN_PLACE_DUNDERS
                or (name.endswith("_") and not name.endswith("__"))):
            return func(*args, **kwargs)  # attribute and metadata reads, in-place updates: untouched
        if func is torch.nn.functional.embedding:  # gather rows, then cast them: exact, and the
            return self._cast(func(*args, **kwargs))  # (vocab x width) table is never copied whole
        args = tuple(self._cast(a) for a in args)
        if kwargs:
            kwargs = {key: self._cast(v) for key, v in kwargs.items()}
        if torch.is_autocast_enabled(self.device_type):
            self.autocast_ops += 1
            with torch.autocast(self.device_type, enabled=False):
                return func(*args, **kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def computed_in(dtype: torch.dtype | str | None, device_type: str = "cpu") -> Iterator[_Upcast | None]:
    """Forward passes inside compute in ``dtype`` at least (``None`` or ``"model"``: unchanged).
    Yields the mode (its ``casts`` / ``autocast_ops`` say whether anything was changed)."""
    if isinstance(dtype, str):
        dtype = resolve_scoring_dtype(dtype)
    if dtype is None:
        yield None
        return
    mode = _Upcast(dtype, device_type)
    with mode:
        yield mode


@dataclass
class ScoringPrecision:
    """How a run's teacher-forced scoring computes, decided once per run by
    :func:`check_scoring_precision`.

    ``dtype``: the dtype :func:`computed_in` raises scoring to (``None``: the model's own
    numerics). ``native``: what the model computes in by itself (e.g. ``"bfloat16"``,
    ``"float32"``, ``"float32 under bfloat16 autocast"``). ``computed``: the narrowest dtype
    scoring effectively computes in (the noise floor's reference is float32 when it is
    narrower). ``note``: why float32 scoring was given up, if it was."""

    dtype: torch.dtype | None
    native: str
    computed: torch.dtype
    note: str | None = None

    @property
    def changes_numerics(self) -> bool:
        """Scoring computes differently from the model's own forward (and so from the sampler):
        the sampler's own log-probs are then not the scoring path's."""
        return self.dtype is not None

    def to_dict(self) -> dict[str, Any]:
        return {"scoring_dtype": str(self.dtype).replace("torch.", "") if self.dtype is not None else "model",
                "native": self.native, "computed": str(self.computed).replace("torch.", ""), "note": self.note}


def _floating_param_dtypes(model: torch.nn.Module) -> set[torch.dtype]:
    return {p.dtype for p in model.parameters() if p.is_floating_point()}


@torch.no_grad()
def check_scoring_precision(model: torch.nn.Module, scoring_dtype: str, input_ids: list[int]) -> ScoringPrecision:
    """Decide, with one tiny forward pass, how scoring computes for this model (every rank calls
    it at the same time: sharded models gather weights in it).

    The pass runs under :func:`computed_in` and records what the mode had to change: operands
    narrower than float32 (bf16/fp16 weights) or operations under autocast (a mixed-precision
    ``forward``). If nothing changed, the model already computes in float32 and scoring runs
    without the mode (no overhead). If the pass fails (e.g. a kernel that only takes bf16, such
    as flash-attention), scoring stays in the model's numerics and ``note`` says why."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    params = _floating_param_dtypes(model)
    narrowest = min(params, key=lambda d: d.itemsize) if params else torch.float32
    target = resolve_scoring_dtype(scoring_dtype)
    ids = torch.tensor([list(input_ids)[:8] or [0]], device=device)
    if target is None:  # scoring in the model's own numerics: only find out what they are
        seen: dict[str, Any] = {}
        hook = _autocast_probe(model, device.type, seen)
        try:
            model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
        finally:
            hook.remove()
        native = _describe(params, seen.get("autocast"))
        computed = seen.get("autocast") or narrowest
        return ScoringPrecision(None, native, computed)
    try:
        with computed_in(target, device.type) as mode:
            model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    except Exception as exc:  # noqa: BLE001 - any failure: keep the model's numerics, say why
        note = (f"float32 scoring failed ({type(exc).__name__}: {exc}); scoring in the model's own dtype, "
                "so D carries its rounding noise (see D_numerical_floor)")
        warnings.warn(f"em-callbacks: {note}", stacklevel=3)
        return ScoringPrecision(None, _describe(params, None), narrowest, note=note)
    autocast = _autocast_dtype(device.type) if mode.autocast_ops else None
    native = _describe(params, autocast)
    if mode.casts == 0 and mode.autocast_ops == 0:
        return ScoringPrecision(None, native, narrowest)  # already float32: nothing to change
    return ScoringPrecision(target, native, target)


def _autocast_dtype(device_type: str) -> torch.dtype:
    """The dtype autocast uses on ``device_type`` (its default when not readable)."""
    getter = getattr(torch, "get_autocast_dtype", None)
    try:
        if getter is not None:
            return getter(device_type)
    except Exception:  # noqa: BLE001 - older torch
        pass
    return torch.bfloat16 if device_type == "cpu" else torch.float16


def _autocast_probe(model: torch.nn.Module, device_type: str, seen: dict[str, Any]):
    """Forward pre-hook on the input embeddings that records autocast's dtype if it is on."""
    module = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else model

    def hook(_module, _args):
        if torch.is_autocast_enabled(device_type):
            seen["autocast"] = _autocast_dtype(device_type)

    return module.register_forward_pre_hook(hook)


def _describe(params: set[torch.dtype], autocast: torch.dtype | None) -> str:
    names = "/".join(sorted(str(d).replace("torch.", "") for d in params)) or "float32"
    if autocast is not None:
        return f"{names} under {str(autocast).replace('torch.', '')} autocast"
    return names
