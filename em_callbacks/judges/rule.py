"""Deterministic rule judge: a Python callable, or a regex whose meaning is stated.

A regex only says *whether* something occurs; whether an occurrence makes the order
parameter's statement true or false is the user's choice and is easy to get backwards
("aligned" with a regex for dangerous words). So a regex must come wrapped in a
:class:`Rule` that states it: ``Rule.true_if(...)`` or ``Rule.false_if(...)``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Union

import numpy as np

from em_callbacks.judges.base import Judge, Judgment
from em_callbacks.order import OrderParameter, Scale

__all__ = ["Rule", "RuleJudge"]

Predicate = Callable[[str, str], Any]


@dataclass(frozen=True)
class Rule:
    """A yes/no test on one answer, with what a match means for the statement.

    ``test``: a regex (searched in the response) or a predicate ``(prompt, response) -> bool``.
    ``match_means_true``: when the test matches, the order parameter's statement is true
    (the scale's highest outcome) if True, false (its lowest outcome) if False; no match
    gives the other end. Build it with :meth:`true_if` / :meth:`false_if`.

    The flagged side follows from the order parameter: "aligned" flags scores below 30, so
    ``Rule.false_if(r"dangerous")`` puts every match in ``flagged_rate``; "refusal" flags
    "yes", so ``Rule.true_if(r"\\bsorry\\b")`` does.
    """

    test: "re.Pattern[str] | Predicate"
    match_means_true: bool

    def __post_init__(self) -> None:
        if isinstance(self.test, str):
            object.__setattr__(self, "test", re.compile(self.test))
        elif not isinstance(self.test, re.Pattern) and not callable(self.test):
            raise TypeError(f"Rule: test must be a regex or a (prompt, response) predicate, "
                            f"got {type(self.test).__name__}")
        if not isinstance(self.match_means_true, (bool, np.bool_)):
            raise TypeError("Rule: match_means_true must be True or False")
        object.__setattr__(self, "match_means_true", bool(self.match_means_true))

    @classmethod
    def true_if(cls, test: "str | re.Pattern[str] | Predicate", *, flags: int = 0) -> "Rule":
        """A match means the statement is true (e.g. ``"refusal": Rule.true_if(r"\\bsorry\\b")``).
        ``flags`` (``re.IGNORECASE``...) apply to a regex given as a string."""
        return cls(_compile(test, flags), True)

    @classmethod
    def false_if(cls, test: "str | re.Pattern[str] | Predicate", *, flags: int = 0) -> "Rule":
        """A match means the statement is false (e.g. ``"aligned": Rule.false_if(r"dangerous")``).
        ``flags`` apply to a regex given as a string."""
        return cls(_compile(test, flags), False)

    def evaluate(self, prompt: str, response: str) -> tuple[bool | None, str | None]:
        """(statement true?, raw) for one answer; None when a predicate returned None."""
        if isinstance(self.test, re.Pattern):
            m = self.test.search(str(response))
            return (m is not None) == self.match_means_true, (m.group(0)[:200] if m else None)
        matched = self.test(prompt, response)
        if matched is None:
            return None, None
        return bool(matched) == self.match_means_true, str(bool(matched))

    def describe(self) -> str:
        kind = "true_if" if self.match_means_true else "false_if"
        return f"{kind}({_describe(self.test)})"


def _compile(test: Any, flags: int) -> Any:
    if isinstance(test, str):
        return re.compile(test, flags)
    return test


RuleSpec = Union[Rule, Predicate]


class RuleJudge(Judge):
    """Judge by a deterministic rule; Judgments are one-hot over the scale (or the rule's
    probabilities).

    ``rules`` is one of
      * a :class:`Rule`: a regex or predicate with its meaning stated, ``Rule.true_if(...)``
        (a match -> the scale's highest outcome, i.e. the statement holds) or
        ``Rule.false_if(...)`` (a match -> the lowest outcome);
      * a callable ``(prompt, response) -> score``: a number is snapped to the nearest scale
        outcome; a label of the scale is that outcome; a length-K sequence is a probability
        vector over the scale (renormalised); ``True`` / ``False`` mean the statement is
        true / false (highest / lowest outcome); None -> no score;
      * a mapping ``{order_parameter_name: Rule or callable}``, one judge for several order
        parameters (:meth:`check_order_parameters` names those without a rule).
    A bare regex (a string or compiled pattern) is rejected with ValueError: it does not
    say whether a match makes the statement true or false. Exceptions raised by a rule
    become Judgments with error kind ``rule_exception``.
    """

    def __init__(self, rules: RuleSpec | Mapping[str, RuleSpec], *, name: str | None = None) -> None:
        if isinstance(rules, Mapping):
            self._rules: dict[str, RuleSpec] = {str(k): _check_rule(v, str(k)) for k, v in rules.items()}
            self._default: RuleSpec | None = None
        else:
            self._rules = {}
            self._default = _check_rule(rules, None)
        self.name = name
        self._desc = _describe(rules)

    def __repr__(self) -> str:
        return f"RuleJudge({self._desc})"

    def config(self) -> dict[str, Any]:
        return {"type": "RuleJudge", "rule": self._desc, "name": self.name}

    def check_order_parameters(self, order_parameters: Iterable[OrderParameter]) -> None:
        """Raise ValueError naming every order parameter this judge has no rule for."""
        if self._default is not None:
            return
        missing = [op.name for op in order_parameters if op.name not in self._rules]
        if missing:
            raise ValueError(
                f"RuleJudge has no rule for order parameter(s) {', '.join(map(repr, missing))}; "
                f"it has rules for {', '.join(map(repr, self._rules)) or 'none'}"
            )

    def validate(self, order_parameter: OrderParameter) -> None:
        self.check_order_parameters([order_parameter])

    def judge_now(self, order_parameter: OrderParameter, prompt: str, response: str) -> Judgment:
        """Synchronous, loop-free evaluation (what :meth:`ajudge` returns)."""
        rule = self._rules.get(order_parameter.name, self._default)
        if rule is None:
            return Judgment.failure("no_rule", f"no rule for order parameter {order_parameter.name!r}")
        scale = order_parameter.scale
        try:
            if isinstance(rule, Rule):
                true, raw = rule.evaluate(prompt, response)
                if true is None:
                    return Judgment.failure("no_score", "rule returned None")
                return _end(scale, true, raw)
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


def _check_rule(rule: Any, name: str | None) -> RuleSpec:
    where = f" for {name!r}" if name is not None else ""
    if isinstance(rule, (str, re.Pattern)):
        pattern = rule if isinstance(rule, str) else rule.pattern
        raise ValueError(
            f"RuleJudge: the bare regex {pattern!r}{where} does not say what a match means. Write "
            f"Rule.true_if({pattern!r}) if a match makes the order parameter's statement true "
            f"(scored at the top of the scale), or Rule.false_if({pattern!r}) if it makes it false "
            f"(e.g. a regex for dangerous advice under \"aligned\")."
        )
    if isinstance(rule, Rule) or callable(rule):
        return rule
    raise TypeError(f"RuleJudge: expected a Rule or a callable{where}, got {type(rule).__name__}")


def _end(scale: Scale, true: bool, raw: str | None) -> Judgment:
    """The scale's highest outcome when the statement is true, else its lowest."""
    idx = int(np.argmax(scale.values)) if true else int(np.argmin(scale.values))
    return Judgment(scale.one_hot(idx), float(scale.outcomes[idx]), None, raw)


def _to_judgment(scale: Scale, value: Any) -> Judgment:
    if value is None:
        return Judgment.failure("no_score", "rule returned None")
    if isinstance(value, Judgment):
        return value
    if isinstance(value, (bool, np.bool_)):
        return _end(scale, bool(value), str(bool(value)))
    if isinstance(value, (int, float, np.integer, np.floating)):
        v = float(value)
        if not math.isfinite(v):
            return Judgment.failure("no_score", f"rule returned {v}")
        idx = scale.snap(v)
        return Judgment(scale.one_hot(idx), float(scale.outcomes[idx]), None, repr(v))
    if isinstance(value, str):
        label = scale.index_of(value)
        if label is None:
            return Judgment.failure("unparsable", f"rule returned {value[:40]!r}, not a label of the scale")
        return Judgment(scale.one_hot(label), float(scale.outcomes[label]), None, value)
    try:
        arr = np.asarray(value, dtype=float)
    except (TypeError, ValueError):
        return Judgment.failure("unparsable", f"rule returned {type(value).__name__}")
    return Judgment.from_probs(scale, arr)


def _describe(rule: Any) -> str:
    if isinstance(rule, Mapping):
        return "{" + ", ".join(f"{k!r}: {_describe(v)}" for k, v in rule.items()) + "}"
    if isinstance(rule, Rule):
        return rule.describe()
    if isinstance(rule, str):
        return f"regex {rule!r}"
    if isinstance(rule, re.Pattern):
        return f"regex {rule.pattern!r}"
    return getattr(rule, "__qualname__", None) or type(rule).__name__
