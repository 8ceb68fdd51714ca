"""The judging language of LLaVA-Critic: its prompts, and the parsing of a judge's reply.

LLaVA-Critic (Xiong et al. 2024, "LLaVA-Critic: Learning to Evaluate Multimodal Models") is a
LLaVA-OneVision model trained to judge responses, either pointwise (a 0-100 score with reasons) or
pairwise (which of two responses is better). Its prompts are kept verbatim below, including the
"answer answers" typo of the pointwise prompt: that is the text the critic was trained on.

This module loads no model: `posttrain.evaluate.llava_critic.LlavaCriticJudge` runs the critic on these
prompts and parses its replies with `parse_score`, `parse_verdict` and `combine_orders`.
"""

from __future__ import annotations

import re
from typing import Literal

Verdict = Literal["first", "second", "tie"]
Winner = Literal["a", "b", "tie"]

POINTWISE = (
    "Given an image and a corresponding question, please serve as an unbiased and fair judge to evaluate the "
    "quality of answer answers provided by a Large Multimodal Model (LMM). Score the response out of 100 and "
    "explain your reasoning with specific details. Your task is provided as follows:\n"
    "Question: [{question}]\nThe LMM response: [{response}]\nASSISTANT:\n "
)
PAIRWISE = (
    "Given an image and a corresponding question, please serve as an unbiased and fair judge to evaluate the "
    "quality of the answers provided by a Large Multimodal Model (LMM). Determine which answer is better and "
    "explain your reasoning with specific details. Your task is provided as follows:\n"
    "Question: [{question}]\nThe first response: [{r1}]\nThe second response: [{r2}]\nASSISTANT:\n"
)
QWEN_TEMPLATE = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n<image>\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
)
IMAGE_TOKEN = "<image>"


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------


def pointwise_prompt(question: str, response: str) -> str:
    """Return LLaVA-Critic's pointwise prompt (score out of 100) for one response."""
    return POINTWISE.format(question=question, response=response)


def pairwise_prompt(question: str, r1: str, r2: str) -> str:
    """Return LLaVA-Critic's pairwise prompt; `r1` is shown as the first response, `r2` as the second."""
    return PAIRWISE.format(question=question, r1=r1, r2=r2)


def qwen_render(prompt: str) -> str:
    """Wrap a critic prompt in the Qwen chat template, with one ``<image>`` before it, ready to generate."""
    return QWEN_TEMPLATE.format(prompt=prompt)


# --------------------------------------------------------------------------------------------
# Parsing critic outputs
# --------------------------------------------------------------------------------------------

_NUMBER = r"(\d+(?:\.\d+)?)"
# "out of 100", "/100", "/ 10": the scale a score is given on (100 before 10, so 100 is not read as 10)
_SCALE = r"\s*(?:/|out\s+of)\s*(100|10)(?![\d/]|\.\d)"
# An explicit score statement: "Final Score: 85", "score of 20 (out of 100)", "Score: 8/10", or a number
# given on a scale: "75/100", "7 out of 10", or given to the response: "I would give it an 85",
# "it scores 85", "I'd rate it 80 points". A bare number ("the bar is 35") is never a score; nor is a
# given or scored number that a noun follows ("give it 2 more tries", "scores 3 bars correctly"): that
# form needs a scale, "points" or the end of the sentence after the number.
_STATEMENT_END = r"(?=\s*(?:points?\b|[.,;:!?)\]]|$))"
_SCORE_STATEMENT = re.compile(
    rf"(?:\bscore\b\W{{0,3}}(?:is\s+|of\s+|=\s*)?\**\s*{_NUMBER}(?:{_SCALE})?)"
    rf"|(?:(?<![\w./]){_NUMBER}{_SCALE})"
    rf"|(?:\b(?:(?:give|gives|gave|giving|rate|rates|rated|rating)\s+(?:it|this|the\s+response|the\s+answer)"
    rf"|scores|scored|scoring)\s+(?:an?\s+)?{_NUMBER}(?:{_SCALE}|{_STATEMENT_END}))",
    re.IGNORECASE,
)


def parse_score(text: str) -> float | None:
    """Read a 0-100 score out of a pointwise critic output, only where the critic states one.

    Accepted statements (any case): ``Final Score: 85`` (LLaVA-Critic's), ``Score: 85``, ``a score of 20
    out of 100``, ``75/100``, ``75 out of 100``, ``I would give it an 85``, ``it scores 85``; a 0-10 scale
    (``Score: 8/10``, ``7 out of 10``) is rescaled to 0-100. When the text holds several, the LAST one
    counts (the critic's conclusion follows its reasoning). A number that is not stated as a score ("the red
    bar is 35") is never read, so a reply cut off by ``max_new_tokens`` before its score is None, as is a
    stated score outside its scale.

    Args:
        text: The critic's generated text.

    Returns:
        The score as a float in [0, 100], or None when the text states none.
    """
    matches = list(_SCORE_STATEMENT.finditer(text))
    if not matches:
        return None
    groups = matches[-1].groups()  # (number, scale) of the alternative that matched, None elsewhere
    at = next(i for i in range(0, len(groups), 2) if groups[i] is not None)
    number, scale = groups[at], groups[at + 1]
    value = float(number)
    top = float(scale) if scale else 100.0
    if not 0 <= value <= top:
        return None
    return value * 100.0 / top


_BETTER = r"(?:better|superior|preferred|preferable|stronger)"
_VERDICT_PATTERNS: tuple[tuple[Verdict, re.Pattern[str]], ...] = (
    ("first", re.compile(r"\[\s*first\s*\]", re.IGNORECASE)),
    ("first", re.compile(rf"\bfirst\s+(?:response|answer|one)\s+is\s+(?:the\s+)?{_BETTER}", re.IGNORECASE)),
    ("first", re.compile(rf"\b(?:response|answer)\s+(?:1|one)\s+is\s+(?:the\s+)?{_BETTER}", re.IGNORECASE)),
    ("second", re.compile(r"\[\s*second\s*\]", re.IGNORECASE)),
    ("second", re.compile(rf"\bsecond\s+(?:response|answer|one)\s+is\s+(?:the\s+)?{_BETTER}", re.IGNORECASE)),
    ("second", re.compile(rf"\b(?:response|answer)\s+(?:2|two)\s+is\s+(?:the\s+)?{_BETTER}", re.IGNORECASE)),
    ("tie", re.compile(r"\bequally\b", re.IGNORECASE)),
    ("tie", re.compile(r"\btie\b", re.IGNORECASE)),
)


def parse_verdict(text: str) -> Verdict | None:
    """Read which response a pairwise critic output prefers.

    Decisive phrases: ``[first]`` / ``[second]``, "the first (or second) response / answer is better"
    (also "superior", "preferred", "preferable", "stronger", and "response 1 / 2 is better"), and
    "equally" or "tie" for a tie. When a text holds several (it discusses both responses), the one that
    starts EARLIEST in the text wins; LLaVA-Critic states its verdict first and then explains it. Case is
    ignored.

    Args:
        text: The critic's generated text.

    Returns:
        ``"first"``, ``"second"``, ``"tie"``, or None when no decisive phrase is found.
    """
    best: tuple[int, Verdict] | None = None
    for verdict, pattern in _VERDICT_PATTERNS:
        m = pattern.search(text)
        if m is not None and (best is None or m.start() < best[0]):
            best = (m.start(), verdict)
    return None if best is None else best[1]


def combine_orders(v_ab: Verdict | None, v_ba: Verdict | None) -> Winner | None:
    """Combine two pairwise verdicts, asked with A first and then with B first, into a winner.

    Asking both orders cancels the critic's position bias: A wins only if it is preferred in both,
    i.e. ``("first", "second")``; B wins on ``("second", "first")``; ``("tie", "tie")`` is a tie.
    Anything else (inconsistent, one tie, or unparsable) is None.

    Args:
        v_ab: Verdict with A shown as the first response.
        v_ba: Verdict with B shown as the first response.

    Returns:
        ``"a"``, ``"b"``, ``"tie"``, or None.
    """
    return {("first", "second"): "a", ("second", "first"): "b", ("tie", "tie"): "tie"}.get((v_ab, v_ba))
