"""Short answers of sentences: what a reference answer states, and what a response commits to.

LRV Chart's answers are sentences ("The highest bar is blue.", "In 2019 the value was 45."), while relaxed
accuracy (ChartQA, Masry et al. 2022) compares short answers. `short_answer_of` derives the short answer of
a reference sentence and its type (a number or percentage, yes/no, a colour, a trend); `extract` reads the
candidate of the same type out of a response, as ChartQA's evaluation reads a prediction. A reference
without such an answer has none, and is left out of relaxed accuracy.
"""

from __future__ import annotations

import re

from posttrain.data.examples import AnswerType

# A number: optional sign (not when glued to a word, so "COVID-19" reads 19), optional "$", then
# either digits with thousands commas ("1,234.5"), plain digits ("5", "5.0"), or a bare fraction (".5").
_NUMBER = re.compile(
    r"(?P<sign>(?<![\w])[-\u2212\u2013])?\$?"
    r"(?P<digits>\d{1,3}(?:,\d{3})+(?:\.\d+)?(?!\d)|\d+(?:\.\d+)?|\.\d+)"
)
# A target that is a year: matched exactly, not within the relative tolerance.
YEAR = re.compile(r"(?:18|19|20)\d\d")

# Colour names charts use (the synthetic charts' seven among them).
COLOUR_WORDS = (
    "red",
    "blue",
    "green",
    "orange",
    "purple",
    "cyan",
    "pink",
    "yellow",
    "black",
    "white",
    "gray",
    "grey",
    "brown",
    "violet",
    "magenta",
    "teal",
    "navy",
    "maroon",
    "turquoise",
    "olive",
    "gold",
)
_TREND = {
    "increasing": re.compile(r"\b(?:increas\w*|ris(?:e|es|ing)|rose|grow\w*|grew|upward)\b", re.IGNORECASE),
    "decreasing": re.compile(r"\b(?:decreas\w*|fall\w*|fell|declin\w*|drop\w*|downward)\b", re.IGNORECASE),
}
_YES_NO = re.compile(r"^\W*(yes|no)\b", re.IGNORECASE)
_LABEL = re.compile(r"\b[A-Za-z]+-?\d+\b")  # "Q3", "COVID-19": labels, not values


def number_values(text: str) -> list[tuple[str, float]]:
    """Every number of `text` in order, as (its digits as written, its value); see
    `posttrain.evaluate.metrics.parse_number`.
    """
    out = []
    for m in _NUMBER.finditer(text):
        value = float(m.group("digits").replace(",", ""))
        out.append((m.group("digits"), -value if m.group("sign") else value))
    return out


def _values(text: str) -> list[tuple[str, float]]:
    return number_values(_LABEL.sub(" ", text))


def names(response: str, word: str) -> bool:
    """Whether `response` names `word` as a whole word, in any case ("The Cyan line" names cyan)."""
    return re.search(rf"\b{re.escape(word)}\b", response, re.IGNORECASE) is not None


def answer_number(text: str) -> float | None:
    """The number a sentence answers with: the first that is not a year, else the first year.

    "In 2019 the value was 45." -> 45; "2015 had the highest sales." -> 2015; "12.5%" -> 12.5. Numbers
    glued to a word are labels, not values ("Q3", "COVID-19").
    """
    values = _values(text)
    plain = [v for digits, v in values if not YEAR.fullmatch(digits)]
    if plain:
        return plain[0]
    return values[0][1] if values else None


def _colours(text: str) -> list[str]:
    words = re.findall(r"[a-z]+", text.lower())
    return [w for w in words if w in COLOUR_WORDS]


def _trend(text: str) -> str | None:
    """The trend word a text states first (increasing or decreasing), or None."""
    found = [(m.start(), name) for name, pattern in _TREND.items() if (m := pattern.search(text))]
    return min(found)[1] if found else None


def short_answer_of(answer: str) -> tuple[str | None, AnswerType]:
    """The short answer a reference sentence states, and how to read it out of a response.

    In order: a leading yes/no; a number that is not a year (percentages and thousands commas read, the
    years of "In 2019 the value was 45." skipped); one colour name; a trend word (increasing/decreasing);
    a lone year; a whole answer of at most 3 words (free text). Otherwise (None, TEXT): the item is left out
    of relaxed accuracy.
    """
    text = answer.strip()
    if m := _YES_NO.match(text):
        return m.group(1).lower(), AnswerType.YES_NO
    values = _values(text)
    plain = [v for digits, v in values if not YEAR.fullmatch(digits)]
    if plain:
        return f"{plain[0]:g}", AnswerType.NUMBER
    colours = sorted(set(_colours(text)))
    if len(colours) == 1:
        return colours[0], AnswerType.COLOR
    if trend := _trend(text):
        return trend, AnswerType.TREND
    if values:
        return f"{values[0][1]:g}", AnswerType.NUMBER
    if text and len(text.split()) <= 3:
        return text.rstrip(".").strip() or None, AnswerType.TEXT
    return None, AnswerType.TEXT


def extract(response: str, answer_type: AnswerType, colours: tuple[str, ...] = COLOUR_WORDS) -> str | None:
    """The short answer a response commits to, read as the reference's type asks.

    Numbers: `answer_number`. Yes/no: a leading yes/no, else the first yes/no word. Colours: the first
    colour name. Trends: the first trend word (rises, fell, decreasing...). Free text: the whole response
    without a trailing period. Declines have none (they are scored by declining).
    """
    if answer_type is AnswerType.DECLINE:
        return None
    if answer_type is AnswerType.NUMBER:
        number = answer_number(response)
        return None if number is None else f"{number:g}"
    if answer_type is AnswerType.TEXT:
        return response.strip().rstrip(".").strip()
    if answer_type is AnswerType.TREND:
        return _trend(response)
    words = re.findall(r"[a-z]+", response.lower())
    vocab = ("yes", "no") if answer_type is AnswerType.YES_NO else colours
    return next((w for w in words if w in vocab), None)
