"""Synthetic charts with ground truth: the embedded default's stand-in for LRV Chart.

Three chart types (bar, line, pie) drawn with PIL, and question families with sentence answers, a short
answer, and LRV-style *negative* questions about an element that is not in the chart. Families come in two
pools: `pretrain` (what the base model is trained on) and `study` (held out from base training: the
"unseen but not out-of-scope" post-training data of the study). Each chart's questions form one
conversation, as LRV's rows do, and some turns are follow-ups that only the previous turn makes answerable
("What is the value of the red bar?" … "And the blue bar?"). Everything is a function of the seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from posttrain.data.examples import AnswerType, Example, image_hash

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "blue": (40, 80, 220),
    "green": (40, 170, 60),
    "orange": (250, 150, 20),
    "purple": (140, 60, 180),
    "cyan": (0, 190, 200),
    "pink": (240, 120, 190),
}
Y_MAX = 10  # bar values are integers 1..9 on a fixed 0..10 axis

# Families each pool asks, by chart type. Negative variants ask a colour-referent family about an
# absent colour.
POOL_FAMILIES: dict[str, dict[str, tuple[str, ...]]] = {
    "pretrain": {
        "bar": ("bar_count", "bar_tallest", "bar_compare"),
        "line": ("line_color",),
        "pie": ("pie_largest",),
    },
    "study": {
        "bar": ("bar_value", "bar_shortest"),
        "line": ("line_trend",),
        "pie": ("pie_count", "pie_smallest"),
    },
}
NEGATIVE_FAMILIES = ("bar_compare", "bar_value", "line_trend")  # families with a colour referent
FOLLOWUP_FAMILIES = ("bar_compare", "bar_value")  # may be followed by "And the <colour> bar?"
CAPTION_FAMILY = "describe"  # "Describe the chart.": a pretrain family with prepare.synthetic.captions
PRESENCE_FAMILY = "presence"  # "Is there a <colour> bar in the chart?": a pretrain family with .presence
ELEMENTS = {"bar": "bar", "line": "line", "pie": "slice"}  # what one colour draws, by chart type
CHART_TYPES = ("bar", "line", "pie")


@dataclass(frozen=True)
class Chart:
    """Ground truth of one chart: its type and (colour, value) series."""

    kind: str
    colors: tuple[str, ...]
    values: tuple[int, ...]


def random_chart(rng: random.Random, kind: str) -> Chart:
    if kind == "bar":
        n = rng.randint(2, 5)
        colors = tuple(rng.sample(list(COLORS), n))
        values = list(rng.sample(range(1, Y_MAX), n))  # distinct: the tallest bar is unique
        return Chart(kind, colors, tuple(values))
    if kind == "line":
        n = 5
        increasing = rng.random() < 0.5
        start, end = (
            (rng.randint(1, 4), rng.randint(6, 9)) if increasing else (rng.randint(6, 9), rng.randint(1, 4))
        )
        values = [round(start + (end - start) * i / (n - 1) + rng.uniform(-0.8, 0.8)) for i in range(n)]
        values = [min(max(v, 1), Y_MAX - 1) for v in values]
        values[0], values[-1] = start, end
        return Chart(kind, (rng.choice(list(COLORS)),), tuple(values))
    if kind == "pie":
        n = rng.randint(2, 5)
        colors = tuple(rng.sample(list(COLORS), n))
        while True:
            values = [rng.randint(1, 9) for _ in range(n)]
            if (
                values.count(max(values)) == 1 and values.count(min(values)) == 1
            ):  # unique largest and smallest
                return Chart(kind, colors, tuple(values))
    raise ValueError(f"unknown chart type {kind!r}")


def draw_chart(chart: Chart, size: int) -> Image.Image:
    """Render a chart as an RGB image of `size`×`size` pixels."""
    img = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(img)
    pad = max(size // 12, 3)
    left, right, top, bottom = pad, size - pad // 2, pad // 2, size - pad
    height = bottom - top
    if chart.kind in ("bar", "line"):
        d.line([(left, top), (left, bottom), (right, bottom)], fill="black", width=1)
        for tick in range(0, Y_MAX + 1, 2):  # y ticks every 2 units
            y = bottom - height * tick / Y_MAX
            d.line([(left - 2, y), (left, y)], fill="black")
    if chart.kind == "bar":
        slot = (right - left) / len(chart.values)
        for i, (c, v) in enumerate(zip(chart.colors, chart.values)):
            x0 = left + i * slot + slot * 0.15
            d.rectangle([x0, bottom - height * v / Y_MAX, x0 + slot * 0.7, bottom - 1], fill=COLORS[c])
    elif chart.kind == "line":
        n = len(chart.values)
        pts = [
            (left + 2 + (right - left - 4) * i / (n - 1), bottom - height * v / Y_MAX)
            for i, v in enumerate(chart.values)
        ]
        d.line(pts, fill=COLORS[chart.colors[0]], width=max(size // 20, 2))
    elif chart.kind == "pie":
        total = sum(chart.values)
        angle = -90.0
        box = [pad, pad, size - pad, size - pad]
        for c, v in zip(chart.colors, chart.values):
            sweep = 360.0 * v / total
            d.pieslice(box, angle, angle + sweep, fill=COLORS[c])
            angle += sweep
    return img


def _value_answer(colour: str, value: int) -> str:
    return f"The {colour} bar has a value of {value}."


def _compare_answer(colour: str, other: str, taller: bool) -> str:
    if taller:
        return f"Yes, the {colour} bar is taller than the {other} bar."
    return f"No, the {colour} bar is shorter than the {other} bar."


def _describe(chart: Chart) -> str:
    """A dense caption: every element's colour in drawing order, with bar values and the line's ends.

    "A bar chart with 3 bars: red 3, blue 5, green 2." / "A cyan line going up from 2 to 8." /
    "A pie chart with 4 slices: red, blue, green, pink." It names what the study families ask about (colours
    present, values, direction) without their question or answer form.
    """
    c, v = chart.colors, chart.values
    if chart.kind == "bar":
        return f"A bar chart with {len(v)} bars: " + ", ".join(f"{x} {y}" for x, y in zip(c, v)) + "."
    if chart.kind == "line":
        way = "up" if v[-1] > v[0] else "down"
        article = "An" if c[0][0] in "aeiou" else "A"
        return f"{article} {c[0]} line going {way} from {v[0]} to {v[-1]}."
    return f"A pie chart with {len(v)} slices: " + ", ".join(c) + "."


def _qa(family: str, chart: Chart, rng: random.Random) -> tuple[str, str, str | None, AnswerType]:
    """(question, answer sentence, short answer, answer type) for a positive question."""
    c, v = chart.colors, chart.values
    if family == CAPTION_FAMILY:
        return "Describe the chart.", _describe(chart), None, AnswerType.TEXT
    if family == PRESENCE_FAMILY:  # half the time about a colour the chart has, half about one it lacks
        element, present = ELEMENTS[chart.kind], rng.random() < 0.5
        colour = rng.choice(c) if present else rng.choice([name for name in COLORS if name not in c])
        answer = f"Yes, the chart has a {colour}" if present else f"No, the chart has no {colour}"
        q = f"Is there a {colour} {element} in the chart?"
        return q, f"{answer} {element}.", "yes" if present else "no", AnswerType.YES_NO
    if family == "bar_count":
        return (
            "How many bars are in the chart?",
            f"There are {len(v)} bars in the chart.",
            str(len(v)),
            AnswerType.NUMBER,
        )
    if family == "bar_tallest":
        top = c[v.index(max(v))]
        return "What colour is the tallest bar?", f"The tallest bar is {top}.", top, AnswerType.COLOR
    if family == "bar_shortest":
        low = c[v.index(min(v))]
        return "What colour is the shortest bar?", f"The shortest bar is {low}.", low, AnswerType.COLOR
    if family == "bar_compare":
        i, j = rng.sample(range(len(c)), 2)
        yes = v[i] > v[j]
        q = f"Is the {c[i]} bar taller than the {c[j]} bar?"
        return q, _compare_answer(c[i], c[j], yes), "yes" if yes else "no", AnswerType.YES_NO
    if family == "bar_value":
        i = rng.randrange(len(c))
        return (
            f"What is the value of the {c[i]} bar?",
            _value_answer(c[i], v[i]),
            str(v[i]),
            AnswerType.NUMBER,
        )
    if family == "line_color":
        return "What colour is the line?", f"The line is {c[0]}.", c[0], AnswerType.COLOR
    if family == "line_trend":
        trend = "increasing" if v[-1] > v[0] else "decreasing"
        return (
            f"Is the {c[0]} line increasing or decreasing?",
            f"The {c[0]} line is {trend}.",
            trend,
            AnswerType.TREND,
        )
    if family == "pie_largest":
        top = c[v.index(max(v))]
        return (
            "Which colour is the largest slice of the pie?",
            f"The largest slice is {top}.",
            top,
            AnswerType.COLOR,
        )
    if family == "pie_smallest":
        low = c[v.index(min(v))]
        return (
            "Which colour is the smallest slice of the pie?",
            f"The smallest slice is {low}.",
            low,
            AnswerType.COLOR,
        )
    if family == "pie_count":
        return (
            "How many slices does the pie chart have?",
            f"The pie chart has {len(v)} slices.",
            str(len(v)),
            AnswerType.NUMBER,
        )
    raise ValueError(f"unknown family {family!r}")


def _negative_qa(family: str, chart: Chart, rng: random.Random) -> tuple[str, str]:
    """(question, declining answer) about a colour that is not in the chart."""
    absent = rng.choice([name for name in COLORS if name not in chart.colors])
    if family == "bar_compare":
        other = rng.choice(chart.colors)
        return f"Is the {absent} bar taller than the {other} bar?", f"There is no {absent} bar in the chart."
    if family == "bar_value":
        return f"What is the value of the {absent} bar?", f"There is no {absent} bar in the chart."
    if family == "line_trend":
        return f"Is the {absent} line increasing or decreasing?", f"There is no {absent} line in the chart."
    raise ValueError(f"family {family!r} has no negative form")


def _followup_qa(
    family: str, chart: Chart, asked: list[str], rng: random.Random, negative: bool
) -> tuple[str, str, str | None, AnswerType] | None:
    """A follow-up to a `FOLLOWUP_FAMILIES` question: "And the <colour> bar?", answerable only in context.

    `asked` are the colours the previous question named: a bar_value follow-up asks the value of another
    bar; a bar_compare follow-up compares another bar with the previous question's second bar. None when the
    chart has no bar left to ask about.
    """
    c, v = chart.colors, chart.values
    if negative:
        absent = rng.choice([name for name in COLORS if name not in c and name not in asked])
        return f"And the {absent} bar?", f"There is no {absent} bar in the chart.", None, AnswerType.DECLINE
    fresh = [x for x in c if x not in asked]
    if not fresh:
        return None
    colour = rng.choice(fresh)
    i = c.index(colour)
    if family == "bar_value":
        return f"And the {colour} bar?", _value_answer(colour, v[i]), str(v[i]), AnswerType.NUMBER
    if family == "bar_compare":
        other = asked[1]
        yes = v[i] > v[c.index(other)]
        return (
            f"And the {colour} bar?",
            _compare_answer(colour, other, yes),
            "yes" if yes else "no",
            AnswerType.YES_NO,
        )
    raise ValueError(f"family {family!r} has no follow-up")


def _asked_colours(question: str) -> list[str]:
    """The colour names a question mentions, in order."""
    return [w for w in question.rstrip("?").split() if w in COLORS]


def generate_pool(
    pool: str,
    n_images: int,
    image_size: int,
    questions_per_image: int,
    negative_fraction: float,
    seed: int,
    image_dir: Path,
    followup_fraction: float = 0.0,
    captions: bool = False,
    presence: bool = False,
) -> list[Example]:
    """Draw `n_images` charts of one pool into `image_dir` and hold one conversation about each.

    Each chart gets up to `questions_per_image` distinct families of its chart type (fewer where the pool has
    fewer); each question is replaced, with probability `negative_fraction`, by a negative question where the
    family allows one. With probability `followup_fraction` a `FOLLOWUP_FAMILIES` question is followed by
    "And the <colour> bar?" (itself negative with probability `negative_fraction`). With `captions`, the
    pretrain pool also asks `CAPTION_FAMILY` of every chart type ("Describe the chart.": `_describe`), as
    LLaVA's base learns from dense captions before it answers questions. With `presence`, the pretrain pool
    also asks `PRESENCE_FAMILY` of every chart type ("Is there a <colour> bar in the chart?", yes or no in
    equal shares): the one colour-referent question whose answer is the check itself. The conversation id is
    ``<pool>-<k>``; the image id is the chart's `posttrain.data.examples.image_hash`, so two identical charts
    are one image.
    """
    rng = random.Random(f"{pool}-{seed}")
    families = POOL_FAMILIES[pool]
    if captions and pool == "pretrain":
        families = {kind: (*f, CAPTION_FAMILY) for kind, f in families.items()}
    if presence and pool == "pretrain":
        families = {kind: (*f, PRESENCE_FAMILY) for kind, f in families.items()}
    examples = []
    for k in range(n_images):
        kind = CHART_TYPES[k % len(CHART_TYPES)]
        chart = random_chart(rng, kind)
        conversation = f"{pool}-{k:05d}"
        image = draw_chart(chart, image_size)
        image_id = image_hash(image)
        rel = f"images/{image_id}.png"
        if not (image_dir / f"{image_id}.png").exists():
            image.save(image_dir / f"{image_id}.png", optimize=False)
        chosen = rng.sample(families[kind], min(questions_per_image, len(families[kind])))
        history: list[tuple[str, str]] = []
        for family in chosen:
            negative = family in NEGATIVE_FAMILIES and rng.random() < negative_fraction
            if negative:
                q, a = _negative_qa(family, chart, rng)
                short, atype = None, AnswerType.DECLINE
            else:
                q, a, short, atype = _qa(family, chart, rng)
            turns = [(family, q, a, short, atype, negative)]
            if family in FOLLOWUP_FAMILIES and rng.random() < followup_fraction:
                follow_negative = rng.random() < negative_fraction
                followup = _followup_qa(family, chart, _asked_colours(q), rng, follow_negative)
                if followup is not None:
                    turns.append((family, *followup, follow_negative))
            for fam, q, a, short, atype, neg in turns:
                examples.append(
                    Example(
                        id=f"{conversation}-{len(history)}",
                        image=rel,
                        image_id=image_id,
                        conversation=conversation,
                        turn=len(history),
                        question=q,
                        answer=a,
                        short_answer=short,
                        answer_type=atype,
                        chart_type=kind,
                        family=f"{fam}_negative" if neg else fam,
                        negative=neg,
                        elements=chart.colors,
                        source="synthetic",
                        history=tuple(history),
                    )
                )
                history.append((q, a))
    return examples
