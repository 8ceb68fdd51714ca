import math

import numpy as np
import pytest

from posttrain.data.charts import COLORS
from posttrain.data.examples import AnswerType, Example
from posttrain.evaluate.evaluation import (
    aggregate,
    chance_lines,
    extract_short_answer,
    family_accuracy,
    is_correct,
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


def _negative():
    """A negative question: the green bar is absent, the answer declines."""
    return _ex(
        family="bar_value_negative",
        short=None,
        atype=AnswerType.DECLINE,
        negative=True,
        answer="There is no green bar in the chart.",
    )


def test_correctness_rules():
    pos = _ex()
    assert is_correct(pos, "The red bar has a value of 7.", "7")
    assert not is_correct(pos, "The red bar has a value of 8.", "8")
    neg = _negative()
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


def test_chance_line_is_the_best_constant_answer_on_the_test_split():
    from posttrain.report.compare import answer_spread

    """Test answers 3,3,3,7,1: the best constant, "3", is right 3 of 5 = 60, whatever training held
    (a training majority of "7" would have drawn the line at 20)."""
    test = [_ex(short=s) for s in ("3", "3", "3", "7", "1")]
    assert chance_lines(test) == {"bar_value": 60.0}
    rows = score_items(test, ["The value is 3."] * 4 + ["The value is 7."], [1.0] * 5, [1] * 5, [0.0] * 5)
    assert answer_spread(rows) == {"bar_value": {"distinct": 2, "top_share": 0.8}}


def test_aggregate_by_hand():
    """Two items. NLL sums 2 and 6 over 1 and 3 tokens: loss = 8/4 = 2 (token-weighted, not (2+2)/2 by luck:
    use 2/1 and 3/3 -> 5/4 = 1.25, item mean would be 1.5). Perplexity = e^1.25.
    Item 1 exact (ROUGE-L 100), item 2 negative declined -> relaxed_acc 100 over 1 item, negative_acc 100."""
    e1 = _ex()
    e2 = _negative()
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


def test_declined_answerable_counts_answerable_questions_turned_down():
    """The cost side of declining: of two answerable questions one is declined (50%), and the declined
    negative question does not count (it is scored by negative_acc)."""
    e1, e2 = _ex(), _ex()
    neg = _negative()
    declined = "There is no green bar in the chart."
    rows = score_items([e1, e2, neg], [e1.answer, declined, declined], [1.0] * 3, [1] * 3, [50.0] * 3)
    m = aggregate(rows, "", resamples=20, seed=0)
    assert m["declined_answerable"] == 50.0
    assert m["declined_answerable_ci_low"] < 50.0 < m["declined_answerable_ci_high"]
    assert aggregate([], "retain_", resamples=20, seed=0)["retain_declined_answerable"] is None


def test_decline_discrimination_is_zero_for_a_constant_policy():
    """decline_discrimination: declines on negatives minus declines on the answerable questions of the same
    families (Youden's J, points). Declining everything scores 100 on negative_acc and 0 here; declining only
    the negatives scores 100; an answerable question of a family without negatives does not count."""
    declined = "There is no green bar in the chart."
    answers = [_ex(), _ex(short="3")]  # bar_value, the family the negatives belong to
    other = _ex(family="bar_tallest", short="red", atype=AnswerType.COLOR)
    negatives = [_negative(), _negative()]
    items = [*answers, other, *negatives]

    def metrics(responses):
        rows = score_items(items, responses, [1.0] * 5, [1] * 5, [50.0] * 5)
        return aggregate(rows, "", resamples=20, seed=0)

    always = metrics([declined] * 5)
    assert always["negative_acc"] == 100.0 and always["decline_discrimination"] == 0.0
    assert always["decline_discrimination_ci_low"] < 0.0 < always["decline_discrimination_ci_high"]
    exact = metrics([answers[0].answer, answers[1].answer, declined, declined, declined])
    assert exact["decline_discrimination"] == 100.0  # bar_tallest's decline is not in the comparison
    assert exact["decline_discrimination_ci_low"] < 100.0 == exact["decline_discrimination_ci_high"]
    half = metrics([declined, answers[1].answer, other.answer, declined, "The green bar has a value of 2."])
    assert half["decline_discrimination"] == 0.0  # 1 of 2 negatives, 1 of 2 answerable bar_value questions
    rows = score_items(answers, [declined] * 2, [1.0] * 2, [1] * 2, [50.0] * 2)
    no_negatives = aggregate(rows, "", resamples=20, seed=0)
    assert no_negatives["decline_discrimination"] is None
    assert no_negatives["decline_discrimination_ci_low"] is None


def test_free_text_families_get_no_accuracy():
    """A caption (or an LRV row without a short answer) can be neither matched nor declined: its family gets
    no acc_ row, where it used to read 0% whatever the model said; negatives and short answers keep theirs."""
    from posttrain.evaluate.evaluation import scored_families

    caption = _ex(
        family="describe", short=None, atype=AnswerType.TEXT, answer="A bar chart with 2 bars: red 3, blue 5."
    )
    negative = _ex(family="bar_value_negative", short=None, atype=AnswerType.DECLINE, negative=True)
    assert scored_families([caption, negative, _ex()]) == ["bar_value", "bar_value_negative"]


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


def test_unparsable_critic_replies_are_kept_counted_and_shown():
    """A critic reply without a score keeps its text in the row, is left out of the mean, and the
    report lists it per model with examples."""
    from posttrain.evaluate.critic import parse_score
    from posttrain.report.report import unparsable_section

    replies = ["Final Score: 80", "the red bar is 35, but the chart shows 40 and", "Score: 6/10"]
    scores = [parse_score(r) for r in replies]
    assert scores == [80.0, None, 60.0]
    examples = [_ex(short=str(i)) for i in range(3)]
    rows = score_items(examples, ["a", "b", "c"], [1.0] * 3, [1] * 3, scores, replies)
    assert [r["critic_reply"] for r in rows] == replies
    m = aggregate(rows, "", resamples=50, seed=0)
    assert m["critic"] == 70.0 and m["critic_unparsable"] == 1  # the mean of the two scored items
    assert "critic_reply" not in score_items(examples[:1], ["a"], [1.0], [1], [5.0])[0]  # reference critic
    section = "\n".join(unparsable_section({"base": rows, "sft1": rows[:1]}))
    assert "| base | 1 of 3 | the red bar is 35, but the chart shows 40 and |" in section
    assert "| sft1 | 0 of 1 |  |" in section


def test_report_says_whether_dpo_learned():
    from posttrain.report.report import dpo_signal_section

    learned = {
        "round": 1,
        "training": {
            "pairs": 100,
            "steps": 7,
            "loss": 0.61,
            "rewards/accuracies": 0.8,
            "rewards/margins": 0.2,
        },
    }
    flat = {
        "round": 2,
        "training": {
            "pairs": 50,
            "steps": 3,
            "loss": 0.6929,
            "rewards/accuracies": 0.43,
            "rewards/margins": 0.001,
        },
    }
    learned["training"]["heldout"] = {
        "pairs": 12,
        "loss": 0.66,
        "reward_accuracy": 0.75,
        "reward_margin": 0.1,
    }
    learned["training"]["last_step_pairs"] = 4  # 100 pairs at 16 a step: the last step saw 4
    text = "\n".join(dpo_signal_section([learned, flat]))
    assert "| 1 | 100 | 7 | 0.610 | 80.0% (4 pairs) | 0.200 | 12 | 0.660 | 75.0% | 0.100 |" in text
    assert "| 2 | 50 | 3 | 0.693 | 43.0% | 0.001 | n/a | n/a | n/a | n/a |" in text
    assert "Round 2: the loss stayed at ln 2 (0.693)" in text and "Round 1:" not in text
    chance = {"round": 1, "training": {"loss": 0.65, "rewards/accuracies": 0.5}}
    assert "50.0% (in training) is no better than chance" in "\n".join(dpo_signal_section([chance]))
    # the held-out accuracy is the one judged: high in training, at chance on unseen charts
    overfit = {
        "round": 1,
        "training": {"loss": 0.4, "rewards/accuracies": 0.9, "heldout": {"reward_accuracy": 0.45}},
    }
    assert "45.0% (held out) is no better than chance" in "\n".join(dpo_signal_section([overfit]))


def test_proportions_get_wilson_intervals_not_degenerate_bootstraps():
    """15 negatives never declined: 0 with [0, 20.39] (Wilson), not the bootstrap's [0, 0]; per family too."""
    neg = _ex(family="bar_value_negative", short=None, atype=AnswerType.DECLINE, negative=True)
    rows = score_items([neg] * 15, ["The red bar has a value of 7."] * 15, [1.0] * 15, [1] * 15, [0.0] * 15)
    m = aggregate(rows, "", resamples=50, seed=0)
    assert (m["negative_acc"], m["negative_acc_ci_low"]) == (0.0, 0.0)
    assert m["negative_acc_ci_high"] == pytest.approx(20.3883, abs=1e-3)
    fam = family_accuracy(rows, ["bar_value_negative"], 50, 0)
    assert fam["acc_bar_value_negative_ci_high"] == pytest.approx(20.3883, abs=1e-3)


def test_family_table_shows_n_chance_line_and_constant_answerers():
    from posttrain.report.report import family_table

    metrics = {
        m: {
            "acc_line_trend": acc,
            "acc_line_trend_ci_low": 40.0,
            "acc_line_trend_ci_high": 70.0,
            "chance_line_trend": 62.0,
        }
        for m, acc in (("base", 62.0), ("sft1", 55.0))
    }
    spread = {
        "base": {"line_trend": {"distinct": 1, "top_share": 1.0}},
        "sft1": {"line_trend": {"distinct": 2, "top_share": 0.6}},
    }
    table = family_table(metrics, spread, {"line_trend": 37}, {"line_trend": "study"})
    assert "| family | pool | n | chance line | base | sft1 |" in table
    row = next(line for line in table.splitlines() if line.startswith("| line_trend"))
    assert row.startswith("| line_trend | study | 37 | 62.0 |") and row.count("(constant)") == 1


def test_preference_statistics_read_as_percentages_with_the_judge_named():
    from posttrain.report.report import preferences_section

    stats = {
        "prompts": 1357,
        "identical_rate": 4.9374,
        "judged_pairs": 1290,
        "order_consistency_rate": 100.0,
        "tie_rate": 11.3953,
        "pairs_kept": 240,
        "reference_agreement": 100.0,
        "reference_decisive_rate": 100.0,
        "dropped_by_keep": 903,
    }
    text = "\n".join(preferences_section(stats, "reference"))
    assert (
        "Judge: `reference`" in text
        and "| ties | 11.4% |" in text
        and "| decisive pairs left out by preferences.keep | 903 |" in text
        and "| pairs kept for DPO | 240 |" in text
    )
    older = {k: v for k, v in stats.items() if k != "dropped_by_keep"}  # a stage run before keep existed
    assert "| decisive pairs left out by preferences.keep | n/a |" in "\n".join(
        preferences_section(older, "reference")
    )
    assert "100% by construction" in text
    assert "by construction" not in "\n".join(preferences_section(stats, "self"))


GREEN_VALUE = "What is the value of the green bar?"
CYAN_TREND = "Is the cyan line increasing or decreasing?"


@pytest.mark.parametrize(
    ("question", "negative", "short", "atype", "response", "correct"),
    [
        (CYAN_TREND, False, "increasing", AnswerType.TREND, "The orange line is increasing.", False),
        (CYAN_TREND, False, "increasing", AnswerType.TREND, "The cyan line is increasing.", True),
        (GREEN_VALUE, True, None, AnswerType.DECLINE, "There is no in, the chart.", False),
        (GREEN_VALUE, True, None, AnswerType.DECLINE, "There is no purple bar.", False),
        (GREEN_VALUE, True, None, AnswerType.DECLINE, "There is no green bar in the chart.", True),
        ("And the blue bar?", False, "5", AnswerType.NUMBER, "The purple bar has a value of 5.", False),
        ("How many bars are in the chart?", False, "3", AnswerType.NUMBER, "There are 3 bars.", True),
    ],
)
def test_an_answer_counts_only_if_it_is_about_what_was_asked(
    question, negative, short, atype, response, correct
):
    from dataclasses import replace

    from posttrain.evaluate.reference import reference_score

    e = replace(
        _ex(short=short, atype=atype, negative=negative), question=question, elements=("cyan", "blue")
    )
    extracted = None if negative else extract_short_answer(response, atype)
    (row,) = score_items([e], [response], [1.0], [1], [0.0])
    assert row["correct"] is correct
    if negative:
        assert row["declined"] is correct
    score = reference_score(e, response, extracted, COLORS)
    assert (score >= 60.0) is correct  # the rubric gives the 60 (or the decline's 100) only on topic
    lrv = replace(e, source="lrv_chart")  # the asked element of an LRV row is unknown: no such check
    assert lrv.asked_colour(COLORS) is None


def test_report_table_shows_what_declining_costs_and_whether_it_reads_the_chart():
    """The report's table puts negative_acc beside declined_answerable and decline_discrimination, each with
    its interval: a model that declines everything reads 100 / 100 / 0 there, not a lone 100."""
    from posttrain.report.report import metrics_table

    declined = "There is no green bar in the chart."
    items = [_ex(), _ex(short="3"), _negative(), _negative()]
    rows = score_items(items, [declined] * 4, [1.0] * 4, [1] * 4, [50.0] * 4)
    table = metrics_table({"always_declines": aggregate(rows, "", resamples=20, seed=0)})
    header, _, row = table.splitlines()
    cells = dict(zip(*([c.strip() for c in line.strip("|").split("|")] for line in (header, row))))
    assert cells["negative_acc"].startswith("100.00 [")
    assert cells["declined_answerable"].startswith("100.00 [")
    assert cells["decline_discrimination"].startswith("0.00 [-")


def test_headline_pairs_negative_acc_with_decline_discrimination():
    """`dvc metrics show/diff` rows carry decline_discrimination beside negative_acc, so a diff between two
    runs shows whether a gain in declining follows the chart."""
    from posttrain.evaluate.evaluation import headline

    declined = "There is no green bar in the chart."
    rows = score_items([_ex(), _negative()], [declined] * 2, [1.0] * 2, [1] * 2, [50.0] * 2)
    row = headline(aggregate(rows, "", resamples=20, seed=0))
    assert row["negative_acc"] == 100.0 and row["decline_discrimination"] == 0.0
