"""LLM and rule judges behind one async interface (see :mod:`em_callbacks.judges.base`).

    from em_callbacks.judges import Judge, Judgment, OpenAIJudge, TransformersJudge, RuleJudge, Rule
    from em_callbacks.judges import JudgeItem, JudgeResult, JudgeRunner

Importing this package does not import torch or openai; backends import them on first use.
"""

from em_callbacks.judges.base import Judge, JudgeItem, JudgeResult, Judgment, error_kind
from em_callbacks.judges.openai_judge import OpenAIJudge, OpenAIProposer
from em_callbacks.judges.rule import Rule, RuleJudge
from em_callbacks.judges.runner import JudgeRunner
from em_callbacks.judges.transformers_judge import TransformersJudge

__all__ = [
    "Judge",
    "Judgment",
    "JudgeItem",
    "JudgeResult",
    "JudgeRunner",
    "OpenAIJudge",
    "OpenAIProposer",
    "Rule",
    "RuleJudge",
    "TransformersJudge",
    "error_kind",
]
