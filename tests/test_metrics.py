from __future__ import annotations

import math
import time

import numpy as np
import pytest
import sacrebleu

from posttrain.evaluate.metrics import (
    BLEU_COLUMNS,
    ItemStats,
    bleu_from_stats,
    bleu_item_stats,
    bleu_stats,
    bootstrap_ci,
    mean_stats,
    paired_bootstrap,
    parse_number,
    relaxed_match,
    rouge_l,
)

# ------------------------------------------------------------------ parse_number


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1,234", 1234.0),
        ("about 1,234,567.5 units", 1234567.5),
        ("12%", 12.0),
        ("-3.5", -3.5),
        ("$5", 5.0),
        ("-$5", -5.0),
        ("5.0", 5.0),
        ("\u22122.5", -2.5),  # unicode minus
        (".5", 0.5),
        ("The answer is 42.", 42.0),
        ("COVID-19", 19.0),  # a hyphen glued to a word is not a sign
        ("2010-2015", 2010.0),
        ("no digits here", None),
        ("", None),
    ],
)
def test_parse_number(text, expected):
    assert parse_number(text) == expected


# ------------------------------------------------------------------ relaxed_match


@pytest.mark.parametrize(
    ("prediction", "target", "expected"),
    [
        ("12%", "12", True),  # percent sign ignored
        ("12", "12%", True),
        ("1,234", "1234", True),  # thousands commas
        ("1234", "1,234", True),
        ("-3.5", "-3.5", True),  # negatives
        ("3.5", "-3.5", False),  # |3.5 - (-3.5)| = 7 > 0.175
        ("105", "100", True),  # exactly 5%: |105-100| = 5 <= 0.05*100
        ("1.05", "1", True),  # exactly 5% again, where float rounding gives 0.050000000000000044
        ("105.01", "100", False),  # just over 5%
        ("94.99", "100", False),
        ("95", "100", True),
        ("0", "0", True),  # zero target: exact equality
        ("0.001", "0", False),
        ("The answer is 42.", "42", True),  # first number of the prediction
        ("Yes", "yes", True),  # text: case-insensitive
        ("  Paris. ", "paris", True),  # whitespace and a trailing period stripped
        ("Paris", "Paris.", True),
        ("Paris..", "paris", False),  # only one trailing period
        ("Lyon", "Paris", False),
        (None, "42", False),  # nothing extracted
        ("Q1 2019", "Q1 2019", True),  # textual target compared as text
        ("1", "Q1 2019", False),  # ... and not read as the number 1
        ("forty-two", "42", False),  # no number in the prediction: text comparison fails
    ],
)
def test_relaxed_match(prediction, target, expected):
    assert relaxed_match(prediction, target) is expected


def test_relaxed_match_tolerance_argument():
    assert relaxed_match("110", "100", tolerance=0.1)
    assert not relaxed_match("110", "100", tolerance=0.05)
    assert not relaxed_match("100.5", "100", tolerance=0.0)


# ------------------------------------------------------------------ rouge_l


def test_rouge_l_hand_computed():
    """prediction "the cat sat", reference "the cat sat on the mat".

    LCS = "the cat sat" = 3 tokens; P = 3/3 = 1, R = 3/6 = 0.5; F1 = 2*1*0.5/1.5 = 2/3 -> 66.67.
    """
    assert rouge_l("the cat sat", "the cat sat on the mat") == pytest.approx(200 / 3)


def test_rouge_l_reordered():
    """prediction "a b c d", reference "d c b a": LCS has length 1, P = R = 1/4, F1 = 0.25 -> 25."""
    assert rouge_l("a b c d", "d c b a") == pytest.approx(25.0)


def test_rouge_l_stemming_case_and_empty():
    """Porter stemming maps cats->cat, running->run; case and punctuation are dropped."""
    assert rouge_l("Cats running!", "cat run") == pytest.approx(100.0)
    assert rouge_l("", "the cat") == 0.0
    assert rouge_l("dog", "the cat") == 0.0


# ------------------------------------------------------------------ BLEU


BLEU_CASES = [
    (
        ["the cat sat on the mat", "a dog barked loudly at night"],
        ["the cat sat on a mat", "the dog barked at night"],
    ),
    (["", "hello world"], ["something else entirely here", "hello there world"]),  # an empty hypothesis
    (["", ""], ["a b c", "d e f"]),  # all empty: BLEU 0
    (["identical sentence here , with punctuation ."], ["identical sentence here , with punctuation ."]),
    (["x"], ["y z w"]),  # no matches at all
    (["The quick brown fox jumps over the lazy dog."] * 3, ["A quick brown fox jumped over a lazy dog."] * 3),
]


@pytest.mark.parametrize(("hyps", "refs"), BLEU_CASES)
def test_bleu_from_stats_matches_sacrebleu(hyps, refs):
    stats = bleu_stats(hyps, refs)
    assert stats.shape == (len(hyps), 10) == (len(hyps), len(BLEU_COLUMNS))
    assert bleu_from_stats(stats.sum(0)) == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score, abs=1e-9)


def test_bleu_random_corpus_matches_sacrebleu():
    rng = np.random.default_rng(1)
    words = "the of a cat dog sat on mat , . ran".split()

    def sent(lo):
        return " ".join(rng.choice(words, size=rng.integers(lo, 12)))

    hyps = [sent(0) for _ in range(200)]
    refs = [sent(1) for _ in range(200)]
    expected = sacrebleu.corpus_bleu(hyps, [refs]).score
    assert bleu_item_stats("bleu", hyps, refs).value() == pytest.approx(expected, abs=1e-9)


def test_bleu_stats_column_layout():
    """hyp "a b c" vs ref "a b d e": 1-grams a, b match (2 of 3), 2-gram "a b" (1 of 2), 3-gram 0 of 1.

    Lengths: hyp 3, ref 4.
    """
    row = bleu_stats(["a b c"], ["a b d e"])[0]
    assert row.tolist() == [2, 1, 0, 0, 3, 2, 1, 0, 3, 4]


def test_bleu_stats_length_mismatch():
    with pytest.raises(ValueError):
        bleu_stats(["a"], ["a", "b"])


# ------------------------------------------------------------------ ItemStats


def test_mean_stats_mask():
    """Values [100, None, 0, nan, 50]: scored items 100, 0, 50 -> mean 50."""
    s = mean_stats("m", [100.0, None, 0.0, float("nan"), 50.0])
    assert s.n == 5
    assert s.value() == pytest.approx(50.0)
    assert s.stats[:, 1].tolist() == [1, 0, 1, 0, 1]


def test_mean_stats_nothing_scored_is_nan():
    s = mean_stats("m", [None, None])
    assert math.isnan(s.value())
    lo, hi = bootstrap_ci(s)
    assert math.isnan(lo) and math.isnan(hi)


# ------------------------------------------------------------------ bootstrap_ci


def test_bootstrap_ci_constant_is_degenerate():
    lo, hi = bootstrap_ci(mean_stats("c", [37.5] * 50), n_resamples=200)
    assert lo == pytest.approx(37.5) and hi == pytest.approx(37.5)


def test_bootstrap_ci_contains_point_estimate_and_is_reproducible():
    values = np.random.default_rng(3).uniform(0, 100, size=300)
    s = mean_stats("r", values)
    lo, hi = bootstrap_ci(s, seed=7)
    assert lo < s.value() < hi
    # sd of the mean ~ 28.9/sqrt(300) = 1.67, so the 95% interval is about +-3.3 wide
    assert 4 < hi - lo < 9
    assert bootstrap_ci(s, seed=7) == (lo, hi)
    assert bootstrap_ci(s, seed=8) != (lo, hi)


def test_bootstrap_ci_level():
    s = mean_stats("r", np.random.default_rng(0).normal(50, 10, size=200))
    lo90, hi90 = bootstrap_ci(s, level=0.90)
    lo99, hi99 = bootstrap_ci(s, level=0.99)
    assert lo99 < lo90 < hi90 < hi99


def test_bootstrap_ci_masked_resamples_with_nothing_scored_are_dropped():
    """One scored item in 20: ~(19/20)^20 = 36% of resamples score nothing; the rest all give 80."""
    s = mean_stats("m", [80.0] + [None] * 19)
    assert bootstrap_ci(s) == (pytest.approx(80.0), pytest.approx(80.0))


def test_bootstrap_ci_bleu_is_fast_and_contains_estimate():
    rng = np.random.default_rng(0)
    words = "the of a cat dog sat on mat big small ran fast".split()
    refs = [" ".join(rng.choice(words, size=rng.integers(5, 20))) for _ in range(400)]
    hyps = [" ".join(r.split()[: len(r.split()) - 1] + ["dog"]) for r in refs]
    s = bleu_item_stats("bleu", hyps, refs)
    start = time.perf_counter()
    lo, hi = bootstrap_ci(s, n_resamples=1000)
    elapsed = time.perf_counter() - start
    assert lo <= s.value() <= hi
    assert elapsed < 0.5


# ------------------------------------------------------------------ paired_bootstrap


def test_paired_bootstrap_identical_models():
    s = mean_stats("r", np.random.default_rng(0).uniform(0, 100, size=100))
    out = paired_bootstrap(s, s)
    assert out["delta"] == 0.0
    assert out["ci"] == [0.0, 0.0]
    assert out["p"] == 1.0


def test_paired_bootstrap_identical_bleu():
    hyps, refs = ["a b c d", "e f g"], ["a b c x", "e f g"]
    s = bleu_item_stats("bleu", hyps, refs)
    out = paired_bootstrap(s, bleu_item_stats("bleu", hyps, refs), n_resamples=100)
    assert out == {"delta": 0.0, "ci": [0.0, 0.0], "p": 1.0}


def test_paired_bootstrap_clearly_better():
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 60, size=200)
    b = a + rng.uniform(5, 15, size=200)  # b beats a on every item
    out = paired_bootstrap(mean_stats("a", a), mean_stats("b", b))
    assert out["delta"] == pytest.approx(b.mean() - a.mean())
    assert out["delta"] > 0
    assert out["p"] < 0.01
    assert 0 < out["ci"][0] <= out["delta"] <= out["ci"][1]
    # direction: a vs b gives the negative delta and the same p
    rev = paired_bootstrap(mean_stats("b", b), mean_stats("a", a))
    assert rev["delta"] == pytest.approx(-out["delta"])
    assert rev["p"] == out["p"]


def test_paired_bootstrap_no_difference_is_not_significant():
    """Two independent 0/100 models of equal true accuracy, 300 items; here the means are 48.3 vs 45.3.

    Normal approximation: sd(delta) ~ 100 * sqrt(2 * 0.25 / 300) = 4.08, z = 3.0 / 4.08 = 0.73,
    two-sided p ~ 0.46. The bootstrap p should be close to that and the CI should contain 0.
    """
    rng = np.random.default_rng(5)
    a, b = rng.integers(0, 2, size=300) * 100.0, rng.integers(0, 2, size=300) * 100.0
    out = paired_bootstrap(mean_stats("a", a), mean_stats("b", b), seed=1)
    assert out["delta"] == pytest.approx(-3.0)
    assert out["ci"][0] < 0 < out["ci"][1]
    assert out["p"] == pytest.approx(0.46, abs=0.1)


def test_paired_bootstrap_same_seed_same_result():
    rng = np.random.default_rng(2)
    a, b = mean_stats("a", rng.uniform(size=50)), mean_stats("b", rng.uniform(size=50))
    assert paired_bootstrap(a, b, seed=3) == paired_bootstrap(a, b, seed=3)


def test_paired_bootstrap_mismatched_lengths_raise():
    with pytest.raises(ValueError, match="items"):
        paired_bootstrap(mean_stats("a", [1.0, 2.0]), mean_stats("b", [1.0, 2.0, 3.0]))


def test_paired_bootstrap_mismatched_kinds_raise():
    bleu = bleu_item_stats("bleu", ["a", "b"], ["a", "b"])
    with pytest.raises(ValueError):
        paired_bootstrap(mean_stats("a", [1.0, 2.0]), bleu)


def test_item_stats_is_frozen():
    s = ItemStats("x", np.zeros((2, 2)), "mean")
    with pytest.raises(AttributeError):
        s.name = "y"  # type: ignore[misc]


def test_holm_adjust_by_hand():
    """p = (0.01, 0.04, 0.03, 0.005), m = 4. Sorted: 0.005, 0.01, 0.03, 0.04 ->
    4*0.005 = 0.02; 3*0.01 = 0.03; 2*0.03 = 0.06; max(0.06, 1*0.04) = 0.06 (monotone).
    Back in input order: 0.03, 0.06, 0.06, 0.02. Raw 0.04 and 0.03 were "significant" at 5%; not after."""
    from posttrain.evaluate.metrics import holm_adjust

    adjusted = holm_adjust([0.01, 0.04, 0.03, 0.005])
    assert adjusted == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm_adjust([0.5, None, 0.9]) == [1.0, None, 1.0]  # m = 2; monotone: max(2 * 0.5, 0.9)
    assert holm_adjust([0.4, 0.4]) == pytest.approx([0.8, 0.8])
    assert holm_adjust([]) == []


def test_wilson_interval_by_hand():
    """Wilson (1927) score interval, z = 1.959964 (z² = 3.841459), d = 1 + z²/n.
    0 of 15: d = 1.256097; centre (z²/30)/d = 0.101942, half-width z·sqrt(z²/900)/d = 0.101942
    -> [0, 0.203883]: not the bootstrap's [0, 0]. 15 of 15 mirrors it: [0.796117, 1].
    8 of 10: d = 1.384146; centre (0.8 + 0.192073)/d = 0.716740; half z·sqrt(0.016 + 0.0096037)/d = 0.226578
    -> [0.490162, 0.943318]."""
    from posttrain.evaluate.metrics import wilson_interval

    assert wilson_interval(0, 15) == pytest.approx((0.0, 0.20390), abs=1e-4)
    assert wilson_interval(15, 15) == pytest.approx((0.79610, 1.0), abs=1e-4)
    assert wilson_interval(8, 10) == pytest.approx((0.49016, 0.94332), abs=1e-4)
    assert wilson_interval(0, 0) == (None, None)


def test_newcombe_interval_matches_newcombe_1998():
    """Newcombe (1998), "Interval estimation for the difference between independent proportions", Stat. Med.
    17:873-890, Table II, method 10 (the hybrid score interval, from the two Wilson intervals):
    (a) 56/70 - 48/80 = 0.2: [0.0524, 0.3339]; (e) 5/56 - 0/29: [-0.0381, 0.1926]; (f) 0/10 - 0/20:
    [-0.1611, 0.2775]. Swapping the groups negates and swaps the bounds."""
    from posttrain.evaluate.metrics import newcombe_interval

    assert newcombe_interval(56, 70, 48, 80) == pytest.approx((0.0524, 0.3339), abs=1e-4)
    assert newcombe_interval(5, 56, 0, 29) == pytest.approx((-0.0381, 0.1926), abs=1e-4)
    assert newcombe_interval(0, 10, 0, 20) == pytest.approx((-0.1611, 0.2775), abs=1e-4)
    lo, hi = newcombe_interval(48, 80, 56, 70)
    assert (lo, hi) == pytest.approx((-0.3339, -0.0524), abs=1e-4)
    assert newcombe_interval(10, 10, 0, 20)[1] == 1.0 and newcombe_interval(0, 10, 5, 5)[0] == -1.0
    assert newcombe_interval(3, 10, 0, 0) == (None, None)
