"""em-callbacks: watch a fine-tune for behavioural phase transitions, live.

Implements "Decomposing Behavioral Phase Transitions in LLMs: Order Parameters for Emergent
Misalignment" (Arnold & Lörch, 2025) as a ``transformers.TrainerCallback``.
"""

from .probes import Probe, ProbeSet
from .schedule import ProbeSchedule

__version__ = "0.1.0"

__all__ = ["PhaseTransitionCallback", "analyze_checkpoints", "ProbeSet", "Probe", "ProbeSchedule", "OrderParameter",
           "Scale", "__version__"]


def __getattr__(name: str):
    # Heavy modules (torch, transformers) load on first use, so `import em_callbacks` stays cheap.
    if name == "PhaseTransitionCallback":
        from .callback import PhaseTransitionCallback

        return PhaseTransitionCallback
    if name == "analyze_checkpoints":
        from .analyze import analyze_checkpoints

        return analyze_checkpoints
    if name in ("OrderParameter", "Scale"):
        from . import order

        return getattr(order, name)
    raise AttributeError(f"module 'em_callbacks' has no attribute {name!r}")
