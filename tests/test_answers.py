"""Short answers of sentences (LRV Chart's answers are sentences) and their extraction from responses."""

import pytest

from posttrain.data.answers import extract, short_answer_of
from posttrain.data.examples import AnswerType
from posttrain.evaluate.metrics import relaxed_match

N, Y, C, T, X = AnswerType.NUMBER, AnswerType.YES_NO, AnswerType.COLOR, AnswerType.TREND, AnswerType.TEXT

# (reference sentence, its short answer and type, a response, whether the response is right)
PAIRS = [
    ("In 2019 the value was 45.", "45", N, "It was 45 in 2019.", True),
    ("In 2019 the value was 45.", "45", N, "In 2019 it reached 50.", False),
    ("The highest value, 1,234, was reached in 2015.", "1234", N, "About 1,230.", True),
    ("The share of renewables was 12.5% in 2020.", "12.5", N, "12.5%", True),
    ("The share of renewables was 12.5% in 2020.", "12.5", N, "It was 20% in 2020.", False),
    ("2015 had the highest sales.", "2015", N, "The peak came in 2015.", True),
    ("2015 had the highest sales.", "2015", N, "Sales peaked in 2016.", False),
    ("The difference between A and B is 7 points.", "7", N, "B trails A by 7.", True),
    ("There were 3 categories above 50 in 2010.", "3", N, "Three.", False),
    ("The revenue in Q3 was $4.2 million.", "4.2", N, "About $4.2 million.", True),
    ("The revenue in Q3 was $4.2 million.", "4.2", N, "Q3: 3.", False),
    ("Yes, the blue bar is taller than the red one.", "yes", Y, "Yes.", True),
    ("Yes, the blue bar is taller than the red one.", "yes", Y, "No, it is shorter.", False),
    ("No, sales did not rise in 2012.", "no", Y, "No.", True),
    ("No, sales did not rise in 2012.", "no", Y, "Yes, they rose.", False),
    ("The highest bar is blue.", "blue", C, "Blue", True),
    ("The highest bar is blue.", "blue", C, "The tallest one is the green bar.", False),
    ("The largest slice is the yellow one.", "yellow", C, "Yellow is the largest.", True),
    ("The line for exports is drawn in orange.", "orange", C, "It is orange.", True),
    ("The line is drawn in grey.", "grey", C, "Gray.", False),
    ("Sales are increasing over the decade.", "increasing", T, "They rose steadily.", True),
    ("Sales are increasing over the decade.", "increasing", T, "Sales fell.", False),
    ("The number of users decreased between 2010 and 2015.", "decreasing", T, "It declined.", True),
    ("The number of users decreased between 2010 and 2015.", "decreasing", T, "It grew.", False),
    ("Prices show a falling trend.", "decreasing", T, "A downward trend.", True),
    ("Prices rose from 2001 to 2005.", "increasing", T, "Increasing.", True),
    ("Germany.", "Germany", X, "Germany", True),
    ("Sales by region", "Sales by region", X, "sales by region.", True),
    ("Three bars", "Three bars", X, "Three bars.", True),
    ("Three bars", "Three bars", X, "There are three bars.", False),
    ("The chart compares the market share of several smartphone brands.", None, X, "Brands.", False),
    ("The title is Annual Sales Report for the region.", None, X, "Annual Sales Report", False),
    ("The red and blue bars are the same height.", None, X, "Same height.", False),
]


def test_at_least_thirty_sentence_pairs():
    assert len(PAIRS) >= 30 and len({(r, resp) for r, _, _, resp, _ in PAIRS}) == len(PAIRS)


@pytest.mark.parametrize(("reference", "short", "atype", "response", "right"), PAIRS)
def test_sentence_short_answers_and_relaxed_accuracy(reference, short, atype, response, right):
    assert short_answer_of(reference) == (short, atype)
    if short is None:  # no short answer: the item is left out of relaxed accuracy
        return
    assert relaxed_match(extract(response, atype), short) is right


def test_the_synthetic_answer_types_read_as_before():
    assert extract("The red bar has a value of 7.", N) == "7"
    assert extract("The pie chart has 4 slices.", N) == "4"
    assert extract("The tallest bar is purple.", C) == "purple"
    assert extract("No, the red bar is shorter than the blue bar.", Y) == "no"
    assert extract("The cyan line is decreasing.", T) == "decreasing"
    assert extract("There is no red bar.", AnswerType.DECLINE) is None
