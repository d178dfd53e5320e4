"""Deterministic rule judge: a Python callable or a regular expression."""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Mapping, Union

import numpy as np

from em_callbacks.judges.base import Judge, Judgment
from em_callbacks.order import OrderParameter, Scale

__all__ = ["RuleJudge"]

Rule = Union[Callable[[str, str], Any], str, "re.Pattern[str]"]


class RuleJudge(Judge):
    """Judge by a deterministic rule; Judgments are one-hot over the scale.

    ``fn_or_regex`` is one of
      * a callable ``(prompt, response) -> float | bool | probs | None``:
        a number is snapped to the nearest scale outcome; ``True`` -> the scale's top
        outcome, ``False`` -> its bottom outcome; a length-K sequence / array is taken as a
        probability vector over the scale (renormalised, not one-hot); None -> no score;
      * a regular expression (string or compiled): ``re.search`` on the response; a match
        gives the top outcome, no match the bottom outcome (``flags`` apply to strings);
      * a mapping ``{order_parameter_name: rule}`` to use one judge for several order
        parameters (an order parameter without a rule gets error "no_rule").
    Exceptions raised by a rule become Judgments with error kind ``rule_exception``.
    """

    def __init__(self, fn_or_regex: Rule | Mapping[str, Rule], *, flags: int = 0, name: str | None = None) -> None:
        if isinstance(fn_or_regex, Mapping):
            self._rules = {str(k): self._compile(v, flags) for k, v in fn_or_regex.items()}
            self._default = None
        else:
            self._rules = {}
            self._default = self._compile(fn_or_regex, flags)
        self.name = name
        self._desc = _describe(fn_or_regex)

    @staticmethod
    def _compile(rule: Rule, flags: int) -> Any:
        if isinstance(rule, str):
            return re.compile(rule, flags)
        if isinstance(rule, re.Pattern) or callable(rule):
            return rule
        raise TypeError(f"RuleJudge: expected a callable or a regex, got {type(rule).__name__}")

    def __repr__(self) -> str:
        return f"RuleJudge({self._desc})"

    def config(self) -> dict[str, Any]:
        return {"type": "RuleJudge", "rule": self._desc, "name": self.name}

    def validate(self, order_parameter: OrderParameter) -> None:
        if self._default is None and order_parameter.name not in self._rules:
            raise ValueError(f"RuleJudge has no rule for order parameter {order_parameter.name!r}")

    def judge_now(self, order_parameter: OrderParameter, prompt: str, response: str) -> Judgment:
        """Synchronous, loop-free evaluation (what :meth:`ajudge` returns)."""
        rule = self._rules.get(order_parameter.name, self._default)
        if rule is None:
            return Judgment.failure("no_rule", f"no rule for order parameter {order_parameter.name!r}")
        scale = order_parameter.scale
        top, bottom = int(np.argmax(scale.values)), int(np.argmin(scale.values))
        try:
            if isinstance(rule, re.Pattern):
                m = rule.search(str(response))
                idx = top if m else bottom
                return Judgment(scale.one_hot(idx), float(scale.outcomes[idx]), None,
                                m.group(0)[:200] if m else None)
            value = rule(prompt, response)
        except Exception as e:
            return Judgment.failure("rule_exception", f"{type(e).__name__}: {e}")
        return _to_judgment(scale, value)

    async def ajudge(self, order_parameter: OrderParameter, prompt: str, response: str) -> Judgment:
        return self.judge_now(order_parameter, prompt, response)

    def judge(self, order_parameter: OrderParameter, prompt: str, response: str) -> Judgment:
        return self.judge_now(order_parameter, prompt, response)

    def judge_many(self, order_parameter: OrderParameter, pairs: Any) -> list[Judgment]:
        return [self.judge_now(order_parameter, p, r) for p, r in pairs]


def _to_judgment(scale: Scale, value: Any) -> Judgment:
    if value is None:
        return Judgment.failure("no_score", "rule returned None")
    if isinstance(value, Judgment):
        return value
    if isinstance(value, (bool, np.bool_)):
        idx = int(np.argmax(scale.values)) if value else int(np.argmin(scale.values))
        return Judgment(scale.one_hot(idx), float(scale.outcomes[idx]), None, str(bool(value)))
    if isinstance(value, (int, float, np.integer, np.floating)):
        v = float(value)
        if not math.isfinite(v):
            return Judgment.failure("no_score", f"rule returned {v}")
        idx = scale.snap(v)
        return Judgment(scale.one_hot(idx), float(scale.outcomes[idx]), None, repr(v))
    if isinstance(value, str):
        idx = scale.index_of(value)
        if idx is None:
            return Judgment.failure("unparsable", f"rule returned {value[:40]!r}, not a label of the scale")
        return Judgment(scale.one_hot(idx), float(scale.outcomes[idx]), None, value)
    try:
        arr = np.asarray(value, dtype=float)
    except (TypeError, ValueError):
        return Judgment.failure("unparsable", f"rule returned {type(value).__name__}")
    return Judgment.from_probs(scale, arr)


def _describe(rule: Any) -> str:
    if isinstance(rule, Mapping):
        return "{" + ", ".join(f"{k!r}: {_describe(v)}" for k, v in rule.items()) + "}"
    if isinstance(rule, str):
        return f"regex {rule!r}"
    if isinstance(rule, re.Pattern):
        return f"regex {rule.pattern!r}"
    return getattr(rule, "__qualname__", None) or type(rule).__name__
