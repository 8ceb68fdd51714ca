import math

import numpy as np
import pytest

from posttrain.data import AnswerType, Example
from posttrain.evaluation import (
    aggregate,
    extract_short_answer,
    family_accuracy,
    is_correct,
    majority_baselines,
    score_items,
)


@pytest.mark.parametrize(
    "response, atype, expected",
    [
        ("The red bar has a value of 7.", AnswerType.NUMBER, "7"),
        ("There are 1,200 bars.", AnswerType.NUMBER, "1200"),
        ("It is -3.5 percent", AnswerType.NUMBER, "-3.5"),
        ("no digits here", AnswerType.NUMBER, None),
        ("The tallest bar is Purple, not red.", AnswerType.COLOR, "purple"),
        ("The blue line is decreasing.", AnswerType.TREND, "decreasing"),
        ("No, the red bar is shorter.", AnswerType.YES_NO, "no"),
        ("Paris.", AnswerType.TEXT, "Paris"),
        ("There is no red bar.", AnswerType.DECLINE, None),
    ],
)
def test_extract_short_answer(response, atype, expected):
    assert extract_short_answer(response, atype) == expected


def _ex(
    family="bar_value",
    short="7",
    atype=AnswerType.NUMBER,
    negative=False,
    answer="The red bar has a value of 7.",
):
    return Example(
        id=f"{family}-{short}",
        image="images/x.png",
        image_id="x",
        conversation=f"{family}-{short}",
        turn=0,
        question="What is the value?",
        answer=answer,
        short_answer=short,
        answer_type=atype,
        chart_type="bar",
        family=family,
        negative=negative,
        elements=("red", "blue"),
    )


def test_correctness_rules():
    pos = _ex()
    assert is_correct(pos, "The red bar has a value of 7.", "7")
    assert not is_correct(pos, "The red bar has a value of 8.", "8")
    neg = _ex(
        family="bar_value_negative",
        short=None,
        atype=AnswerType.DECLINE,
        negative=True,
        answer="There is no green bar in the chart.",
    )
    assert is_correct(neg, "There is no green bar in the chart.", None)
    assert not is_correct(neg, "The green bar has a value of 3.", None)


def test_declined_positive_question_commits_to_no_answer():
    rows = score_items(
        [_ex(family="bar_tallest", short="red", atype=AnswerType.COLOR)],
        ["There is no red bar in the chart."],
        [1.0],
        [2],
        [0.0],
    )
    assert rows[0]["extracted"] is None and rows[0]["declined"] and not rows[0]["correct"]


def test_majority_baseline_by_hand():
    """Train answers for bar_value: 7,7,3 -> guess 7. Test answers 7,3,7,1 -> 2 of 4 right = 50."""
    train = [_ex(short=s) for s in ("7", "7", "3")]
    test = [_ex(short=s) for s in ("7", "3", "7", "1")]
    assert majority_baselines(train, test) == {"bar_value": 50.0}


def test_aggregate_by_hand():
    """Two items. NLL sums 2 and 6 over 1 and 3 tokens: loss = 8/4 = 2 (token-weighted, not (2+2)/2 by luck:
    use 2/1 and 3/3 -> 5/4 = 1.25, item mean would be 1.5). Perplexity = e^1.25.
    Item 1 exact (ROUGE-L 100), item 2 negative declined -> relaxed_acc 100 over 1 item, negative_acc 100."""
    e1 = _ex()
    e2 = _ex(
        family="bar_value_negative",
        short=None,
        atype=AnswerType.DECLINE,
        negative=True,
        answer="There is no green bar in the chart.",
    )
    rows = score_items(
        [e1, e2], [e1.answer, "There is no green bar in the chart."], [2.0, 3.0], [1, 3], [100.0, 50.0]
    )
    m = aggregate(rows, "", resamples=50, seed=0)
    assert m["loss"] == pytest.approx(1.25) and m["perplexity"] == pytest.approx(math.exp(1.25), rel=1e-3)
    assert m["rouge_l"] == pytest.approx(100.0) and m["bleu"] == pytest.approx(100.0)
    assert m["critic"] == 75.0 and m["relaxed_acc"] == 100.0 and m["negative_acc"] == 100.0
    assert m["n_items"] == 2 and m["critic_unparsable"] == 0
    for key in ("loss", "bleu", "rouge_l", "critic", "relaxed_acc", "negative_acc", "perplexity"):
        assert m[f"{key}_ci_low"] <= m[key] <= m[f"{key}_ci_high"]
    fam = family_accuracy(rows, ["bar_value", "bar_value_negative"], 50, 0)
    assert fam["acc_bar_value"] == 100.0 and fam["acc_bar_value_negative"] == 100.0


def test_aggregate_of_an_empty_split_has_the_same_keys():
    rows = score_items([_ex()], ["x"], [1.0], [1], [10.0])
    full, empty = aggregate(rows, "retain_", 20, 0), aggregate([], "retain_", 20, 0)
    assert set(full) == set(empty)
    assert all(v is None for k, v in empty.items() if k != "retain_n_items")


def test_bootstrap_ci_is_deterministic():
    rows = score_items(
        [_ex(short=str(i)) for i in range(30)],
        [f"value {i % 3}" for i in range(30)],
        list(np.linspace(1, 3, 30)),
        [2] * 30,
        [float(i) for i in range(30)],
    )
    assert aggregate(rows, "", 200, 7) == aggregate(rows, "", 200, 7)
