"""When to probe: a fixed grid, or an adaptive one steered by the drift sentinel.

Pure decisions, no torch and no Trainer: the live driver asks :meth:`ProbeSchedule.decide`
at every optimizer step and acts on the answer; the answer depends only on the step, the
probe steps so far, the detector's baseline and the last sentinel reading, so every rank
(and a resumed run) reaches the same one.

Adaptive schedule (``kind="adaptive"``):

1. *Baseline*: the first ``baseline_probes`` probes (step 0 included) come every
   ``min_interval`` steps, so the detector's baseline is as dense as a fixed grid of that
   interval would make it.
2. *Quiet*: afterwards a probe is due ``every_n_steps`` (the longest interval) after the
   last one; in between, the drift sentinel scores the last probe's samples under the
   current weights every ``sentinel_every_n_steps`` steps.
3. *Early*: a probe fires as soon as the sentinel's lower bound ``tv - z * stderr``
   exceeds the trigger: ``trigger_factor`` times the detector's onset level (the baseline
   mean plus the rise it calls an onset, in D per ``min_interval`` steps), or once an onset
   is seen times the fastest D_rate so far; at least ``min_trigger``. So the probes are
   spaced by distance travelled, not by steps: a model that moves at its baseline speed
   reaches the trigger after many reference intervals (the longest interval comes first),
   one that moves at the onset speed after ``trigger_factor`` of them, and a transition is
   sampled about ``trigger_factor`` reference intervals apart at its own peak speed. Not
   earlier than ``min_interval`` steps after the last probe.

While a transition is under way the callback also draws more samples per probe
(``focus_factor``); the schedule itself does not change.

On an uneven grid D(t_i) spans ``Δ_i`` steps, so D values are not comparable as they are.
The detector, the peak and the plots therefore read the *rate* ``D_rate = D * r / Δ_i``:
D per reference interval ``r`` (``min_interval``; on a fixed grid ``every_n_steps``, where
``D_rate == D`` exactly and nothing changes). For a model drifting at a steady speed TV grows
linearly with the interval, so the rate is the speed; for a random walk TV grows like
``sqrt(Δ)`` and long quiet intervals read *lower* than short ones, never higher, so they do
not raise false alarms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

__all__ = ["SCHEDULES", "ProbeSchedule", "ScheduleDecision", "interval_of", "rate"]

SCHEDULES = ("fixed", "adaptive")


class ScheduleDecision(NamedTuple):
    """What to do at a step: ``probe`` (full probe), ``sentinel`` (score only) or nothing."""

    action: str | None
    reason: str = ""


@dataclass(frozen=True)
class ProbeSchedule:
    """Where the probes go (see the module docstring); validated by the callback."""

    kind: str = "fixed"
    every_n_steps: int = 25
    min_interval: int | None = None  # adaptive: default max(1, every_n_steps // 4)
    sentinel_every_n_steps: int | None = None  # adaptive: default min_interval
    baseline_probes: int = 4  # probes at min_interval spacing at the start: enough for the detector's baseline
    trigger_factor: float = 2.0
    min_trigger: float = 0.01
    z: float = 2.0

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.kind!r}")
        if self.kind == "fixed":
            object.__setattr__(self, "min_interval", self.every_n_steps)
            return
        if self.min_interval is None:
            object.__setattr__(self, "min_interval", max(1, self.every_n_steps // 4))
        if not 1 <= self.min_interval <= self.every_n_steps:
            raise ValueError(f"min_interval must lie in [1, every_n_steps={self.every_n_steps}], got {self.min_interval}")
        if self.sentinel_every_n_steps is None:
            object.__setattr__(self, "sentinel_every_n_steps", self.min_interval)
        if not (self.trigger_factor > 0 and self.min_trigger >= 0 and self.z >= 0):
            raise ValueError("trigger_factor must be > 0, min_trigger and z >= 0")

    @classmethod
    def resolve(cls, schedule: "str | ProbeSchedule", every_n_steps: int, *, min_interval: int | None = None,
                sentinel_every_n_steps: int | None = None, baseline_probes: int = 4) -> "ProbeSchedule":
        """The schedule the callback's arguments describe: a ``ProbeSchedule`` as it is (it sets
        every knob, the interval included), or a kind name built with the separate arguments."""
        if isinstance(schedule, cls):
            if min_interval is not None or sentinel_every_n_steps is not None:
                raise ValueError("pass min_interval / sentinel_every_n_steps inside the ProbeSchedule")
            return schedule
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES} or a ProbeSchedule, got {schedule!r}")
        if min_interval is not None and schedule != "adaptive":
            raise ValueError("min_interval applies to schedule='adaptive' only")
        return cls(schedule, every_n_steps, min_interval=min_interval, sentinel_every_n_steps=sentinel_every_n_steps,
                   baseline_probes=baseline_probes)

    @property
    def adaptive(self) -> bool:
        return self.kind == "adaptive"

    @property
    def reference_interval(self) -> int:
        """The interval D_rate is expressed per (``D_rate == D`` on intervals of this length)."""
        return int(self.min_interval)

    def planned_probes(self, max_steps: int | None) -> int | None:
        """Probes a run of ``max_steps`` gets at least (the quiet case; a transition adds more)."""
        if not max_steps or max_steps <= 0:
            return None
        if not self.adaptive:
            return max_steps // self.every_n_steps + 1
        base_end = (self.baseline_probes - 1) * self.min_interval
        if max_steps <= base_end:
            return max_steps // self.min_interval + 1
        return self.baseline_probes + (max_steps - base_end) // self.every_n_steps

    def trigger(self, onset_level: float | None) -> float:
        """The sentinel TV (lower bound) that fires an early probe."""
        level = self.trigger_factor * onset_level if onset_level is not None and onset_level > 0 else 0.0
        return max(self.min_trigger, level)

    def decide(
        self,
        step: int,
        probe_steps: Sequence[int],
        *,
        onset_level: float | None = None,
        sentinel: tuple[float, float] | None = None,
    ) -> ScheduleDecision:
        """The action at ``step``. ``sentinel``: a reading (tv, stderr) taken at this step, when
        the previous call answered "sentinel"; ``onset_level``: the D_rate of TV the detector
        would call an onset (None before its baseline is complete)."""
        step = int(step)
        if probe_steps and step <= probe_steps[-1]:
            return ScheduleDecision(None)
        if not self.adaptive:  # the sentinel, if asked for, is only a diagnostic here
            if step % self.every_n_steps == 0:
                return ScheduleDecision("probe", "fixed")
            wanted = sentinel is None and probe_steps and self.sentinel_every_n_steps
            return ScheduleDecision("sentinel" if wanted and step % self.sentinel_every_n_steps == 0 else None)
        if not probe_steps:
            return ScheduleDecision("probe", "first")
        since = step - probe_steps[-1]
        if since >= self.every_n_steps:
            return ScheduleDecision("probe", "longest interval")
        if since < self.min_interval:
            return ScheduleDecision(None)
        if len(probe_steps) < self.baseline_probes:
            return ScheduleDecision("probe", "baseline")
        if sentinel is not None:
            tv, se = sentinel
            threshold = self.trigger(onset_level)
            if tv - self.z * se > threshold:
                return ScheduleDecision("probe", f"sentinel tv {tv:.3f} ± {se:.3f} > {threshold:.3f}")
            return ScheduleDecision(None)
        if self.sentinel_every_n_steps and since % self.sentinel_every_n_steps == 0:
            return ScheduleDecision("sentinel")
        return ScheduleDecision(None)


def interval_of(left_steps: Sequence[int], right_steps: Sequence[int]) -> float:
    """Steps between the centres of D's left and right windows (``t_{i+1} - t_i`` for w=1)."""
    return sum(right_steps) / len(right_steps) - sum(left_steps) / len(left_steps)


def rate(value: float, stderr: float, interval: float, reference: int) -> tuple[float, float]:
    """D and its stderr per ``reference`` steps, from D over ``interval`` steps."""
    scale = reference / interval
    return value * scale, stderr * scale
