"""The reference critic: a model-free 0-100 rubric for the synthetic charts.

The synthetic examples know their true answer and chart elements, so `reference_score` judges a response
against them (correctness, no invented elements, ROUGE-L recall of the full answer) without any model.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

from posttrain.data.answers import names
from posttrain.data.declines import is_decline
from posttrain.data.examples import Example
from posttrain.evaluate.metrics import relaxed_match


@functools.lru_cache(maxsize=1)
def _rouge_l_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


@functools.lru_cache(maxsize=32)
def _color_regex(colors: tuple[str, ...]) -> re.Pattern[str] | None:
    """Match any colour name as whole words; longer names first so "dark blue" is not read as "blue"."""
    names = sorted({c.strip().lower() for c in colors if c.strip()}, key=lambda c: (-len(c), c))
    if not names:
        return None
    alternatives = "|".join(r"\s+".join(map(re.escape, name.split())) for name in names)
    return re.compile(rf"\b(?:{alternatives})\b", re.IGNORECASE)


def invented_colors(response: str, elements: Iterable[str], colors: Iterable[str]) -> list[str]:
    """Return the colour names of `colors` mentioned in `response` that are not among `elements`."""
    regex = _color_regex(tuple(colors))
    if regex is None:
        return []
    present = {e.strip().lower() for e in elements}
    found = (" ".join(m.group(0).lower().split()) for m in regex.finditer(response))
    return sorted({c for c in found if c not in present})


def reference_score(example: Example, response: str, extracted: str | None, colors: Iterable[str]) -> float:
    """Score a response to a synthetic example on a 0-100 rubric, knowing the true answer.

    The response must be about what was asked: where the question names a colour (`Example.asked_colour`),
    a decline or a correct answer must name it too.

    Negative example (the question asks about an element that is not in the chart): 100 if the response
    declines (`posttrain.data.declines.is_decline`) naming the asked element, else 0.

    Otherwise 0 if the response declines; else the sum of

    - 60 x correct: `posttrain.evaluate.metrics.relaxed_match` of `extracted` against ``example.short_answer``
      (0 when either is None, or when the response does not name the asked element);
    - 20 x no invented elements: the response names no colour of `colors` that is not in
      ``example.elements`` (granted when ``example.elements`` is empty: nothing is known to check against);
    - 20 x ROUGE-L recall of the response against ``example.answer`` (`rouge_score`, stemming on; 0..1).

    Args:
        example: The example answered.
        response: The model's full response.
        extracted: The short answer already extracted from `response` (None if extraction failed).
        colors: Every colour name the charts can use.

    Returns:
        The score in [0, 100].
    """
    declines = is_decline(response)
    asked = example.asked_colour(tuple(colors))
    on_topic = asked is None or names(response, asked)
    if example.negative:
        return 100.0 if declines and on_topic else 0.0
    if declines:
        return 0.0
    correct = (
        on_topic
        and extracted is not None
        and example.short_answer is not None
        and relaxed_match(extracted, example.short_answer)
    )
    faithful = not example.elements or not invented_colors(response, example.elements, colors)
    recall = _rouge_l_scorer().score(example.answer, response)["rougeL"].recall
    return 60.0 * float(correct) + 20.0 * float(faithful) + 20.0 * recall
