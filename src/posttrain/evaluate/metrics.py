"""Text metrics (relaxed accuracy, ROUGE-L, BLEU) and bootstrap statistics over evaluation items.

Every score is on a 0-100 scale.

Bootstrapping works the same way for every metric: a metric is a per-item statistics matrix
``stats`` of shape ``(n, k)`` plus an aggregate that maps column sums (shape ``(..., k)``) to a
value. Resampling items with replacement then only needs the column sums of each resample, which
are one matrix product of a ``(B, n)`` count matrix with ``stats``. See `ItemStats`.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import Literal

import numpy as np
from rouge_score import rouge_scorer
from sacrebleu.metrics.bleu import BLEU

from posttrain.data.answers import _NUMBER, YEAR

# The metrics every evaluation computes on each split, with a bootstrap CI (`evaluation`), and the columns of
# the report's table (`posttrain.report.report`)
CORE_METRICS = (
    "loss",
    "perplexity",
    "bleu",
    "rouge_l",
    "critic",
    "relaxed_acc",
    "negative_acc",
    "declined_answerable",
    "decline_discrimination",
)

# A string that is a number and nothing else (units allowed: "$", "%", trailing period).
_WHOLE_NUMBER = re.compile(r"\s*\$?[-\u2212\u2013]?\$?[\d.,]+\s*%?\s*\.?\s*")

# Column layout of one row of `bleu_stats`.
BLEU_ORDER = 4
BLEU_COLUMNS = (
    *(f"correct_{n}" for n in range(1, BLEU_ORDER + 1)),
    *(f"total_{n}" for n in range(1, BLEU_ORDER + 1)),
    "hyp_len",
    "ref_len",
)


# --------------------------------------------------------------------------------------------
# Answer matching
# --------------------------------------------------------------------------------------------


def parse_number(text: str) -> float | None:
    """Return the first number in `text`, or None when it holds none.

    Reads thousands commas ("1,234" -> 1234.0), percentages ("12%" -> 12.0, the sign is dropped),
    currency ("$5" -> 5.0), decimals ("5.0", ".5"), and negatives written with "-", the unicode
    minus "\u2212" or an en dash. A dash glued to a preceding word or digit is a hyphen, not a
    sign ("COVID-19" -> 19.0, "2010-2015" -> 2010.0).

    Args:
        text: Any text.

    Returns:
        The first number as a float, or None.
    """
    m = _NUMBER.search(text)
    if m is None:
        return None
    value = float(m.group("digits").replace(",", ""))
    return -value if m.group("sign") else value


def _parse_whole_number(text: str) -> float | None:
    """Return the number `text` consists of ("12%", "$1,234", "-3.5."), or None if it is not one."""
    if _WHOLE_NUMBER.fullmatch(text) is None:
        return None
    return parse_number(text)


def _normalize_text(text: str) -> str:
    """Strip whitespace and one trailing period, then lower-case."""
    text = text.strip()
    if text.endswith("."):
        text = text[:-1].rstrip()
    return text.casefold()


def relaxed_match(prediction: str | None, target: str, tolerance: float = 0.05) -> bool:
    """ChartQA relaxed accuracy of one prediction (Masry et al. 2022, "ChartQA", Sec. 5).

    When the target is a number (the whole target, e.g. "12%", "1,234", "-3.5") and the
    prediction contains one (its first number, see `parse_number`), they match when
    ``|pred - target| <= tolerance * |target|``; a zero target needs an exact 0. The bound is
    inclusive, with a relative slack of 1e-9 so that float rounding does not reject an answer at
    exactly the tolerance (1.05 vs 1). Otherwise both are compared as text: case-insensitive,
    exact after stripping whitespace and one trailing period.

    The target must be a number in full so that a textual target such as "Q1 2019" is not read
    as 1; the prediction is searched for its first number so that "The answer is 42." matches 42. A
    target that is a year (1800-2099, four digits) must match exactly: 2016 is not "within 5%" of 2015.

    Args:
        prediction: The model's answer; None (nothing extracted) never matches.
        target: The gold short answer.
        tolerance: Allowed relative error for numeric answers.

    Returns:
        Whether the prediction counts as correct.
    """
    if prediction is None:
        return False
    target_num = _parse_whole_number(target)
    pred_num = parse_number(prediction) if target_num is not None else None
    if target_num is not None and pred_num is not None:
        if target_num == 0:
            return pred_num == 0
        if YEAR.fullmatch(target.strip().rstrip(".")):  # 2016 is not "within 5%" of 2015
            return pred_num == target_num
        return abs(pred_num - target_num) <= tolerance * abs(target_num) * (1 + 1e-9)
    return _normalize_text(prediction) == _normalize_text(target)


# --------------------------------------------------------------------------------------------
# ROUGE-L and BLEU
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _rouge_scorer() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 of one prediction against one reference, x100 (Lin 2004, "ROUGE", Sec. 3.1).

    F1 of precision LCS/len(prediction) and recall LCS/len(reference), where LCS is the longest
    common subsequence of tokens. Computed by `rouge_score` (lower-cased, non-alphanumerics
    dropped, Porter stemming on).

    Args:
        prediction: Model text.
        reference: Reference text.

    Returns:
        ROUGE-L F-measure in [0, 100].
    """
    return 100.0 * _rouge_scorer().score(reference, prediction)["rougeL"].fmeasure


@functools.lru_cache(maxsize=1)
def _bleu() -> BLEU:
    """Return sacrebleu's default BLEU, the one `sacrebleu.corpus_bleu` uses (13a, exp smoothing, n <= 4)."""
    return BLEU()


def bleu_stats(hypotheses: list[str], references: list[str]) -> np.ndarray:
    """Per-item BLEU sufficient statistics (Papineni et al. 2002), as sacrebleu 2.6.0 computes them.

    Uses ``BLEU()._extract_corpus_statistics`` (tokenizer 13a, one reference per item), then
    reorders sacrebleu's ``[hyp_len, ref_len, correct_1..4, total_1..4]`` into the columns of
    `BLEU_COLUMNS`.

    Args:
        hypotheses: One hypothesis per item.
        references: One reference per item.

    Returns:
        Array of shape (n, 10): clipped n-gram matches for n=1..4, hypothesis n-gram counts for
        n=1..4, hypothesis length, reference length.

    Raises:
        ValueError: If the lists differ in length.
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"bleu_stats: {len(hypotheses)} hypotheses but {len(references)} references.")
    if not hypotheses:
        return np.zeros((0, len(BLEU_COLUMNS)))
    raw = np.asarray(_bleu()._extract_corpus_statistics(list(hypotheses), [list(references)]), dtype=float)
    return np.concatenate([raw[:, 2:], raw[:, :2]], axis=1)


def bleu_from_stats(summed: np.ndarray) -> float:
    """Corpus BLEU (0-100) from column sums of `bleu_stats` (Papineni et al. 2002).

    Delegates to ``sacrebleu.metrics.bleu.BLEU.compute_bleu`` with exp smoothing (Chen & Cherry
    2014, method 3), the default of `sacrebleu.corpus_bleu`.

    Args:
        summed: Vector of length 10 in the layout of `BLEU_COLUMNS`.

    Returns:
        The BLEU score.
    """
    s = [int(round(float(x))) for x in summed]
    return BLEU.compute_bleu(
        correct=s[:BLEU_ORDER],
        total=s[BLEU_ORDER : 2 * BLEU_ORDER],
        sys_len=s[2 * BLEU_ORDER],
        ref_len=s[2 * BLEU_ORDER + 1],
        smooth_method="exp",
        max_ngram_order=BLEU_ORDER,
    ).score


# --------------------------------------------------------------------------------------------
# Per-item statistics and the bootstrap
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ItemStats:
    """A metric as per-item statistics whose column sums determine its value.

    ``kind == "mean"``: ``stats`` is (n, 2) with columns ``(value if scored else 0, 1 if scored
    else 0)``; the value is ``sum(values * mask) / sum(mask)``, NaN when no item is scored.
    ``kind == "bleu"``: ``stats`` is (n, 10) from `bleu_stats`; the value is `bleu_from_stats`.

    Attributes:
        name: Metric name, e.g. "rouge_l".
        stats: Per-item statistics, one row per item.
        kind: How column sums become a value.
    """

    name: str
    stats: np.ndarray
    kind: Literal["mean", "bleu"]

    @property
    def n(self) -> int:
        """Number of items (scored or not)."""
        return int(self.stats.shape[0])

    def aggregate(self, sums: np.ndarray) -> np.ndarray:
        """Metric values from column sums of shape (..., k); NaN where no item is scored."""
        sums = np.asarray(sums, dtype=float)
        if self.kind == "mean":
            with np.errstate(invalid="ignore", divide="ignore"):
                return np.where(sums[..., 1] > 0, sums[..., 0] / sums[..., 1], np.nan)
        flat = sums.reshape(-1, sums.shape[-1])
        return np.array([bleu_from_stats(row) for row in flat]).reshape(sums.shape[:-1])

    def value(self) -> float:
        """Point estimate on all items."""
        return float(self.aggregate(self.stats.sum(axis=0)))


def mean_stats(name: str, values: list[float | None] | np.ndarray) -> ItemStats:
    """Build a mean metric; items whose value is None or NaN are not scored (masked out).

    Args:
        name: Metric name.
        values: One value per item (already on the 0-100 scale), None/NaN for "not scored".

    Returns:
        `ItemStats` of kind "mean".
    """
    v = np.array([np.nan if x is None else float(x) for x in values], dtype=float).reshape(-1)
    mask = ~np.isnan(v)
    return ItemStats(name, np.stack([np.where(mask, v, 0.0), mask.astype(float)], axis=1), "mean")


def bleu_item_stats(name: str, hyps: list[str], refs: list[str]) -> ItemStats:
    """Corpus BLEU as per-item statistics (see `bleu_stats`).

    Args:
        name: Metric name.
        hyps: One hypothesis per item.
        refs: One reference per item.

    Returns:
        `ItemStats` of kind "bleu".
    """
    return ItemStats(name, bleu_stats(hyps, refs), "bleu")


def _resample_counts(n: int, n_resamples: int, seed: int) -> np.ndarray:
    """(B, n) matrix: how often each item is drawn in each of B resamples of n items with replacement."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_resamples, n))
    flat = idx + (np.arange(n_resamples) * n)[:, None]
    return np.bincount(flat.ravel(), minlength=n_resamples * n).reshape(n_resamples, n).astype(float)


def _resampled_values(item_stats: ItemStats, counts: np.ndarray) -> np.ndarray:
    """Metric value of each resample described by the count matrix `counts` (B, n)."""
    return item_stats.aggregate(counts @ item_stats.stats)


def _percentile_interval(samples: np.ndarray, level: float) -> tuple[float, float]:
    """Equal-tailed percentile interval of the finite samples; (nan, nan) if there are none."""
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return (math.nan, math.nan)
    alpha = 1.0 - level
    lo, hi = np.quantile(finite, [alpha / 2, 1 - alpha / 2])
    return (float(lo), float(hi))


def bootstrap_ci(
    item_stats: ItemStats, n_resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval (Efron & Tibshirani 1993, Ch. 13).

    Draws `n_resamples` resamples of the n items with replacement, computes the metric on each
    from its column sums, and returns the (1-level)/2 and (1+level)/2 quantiles (linear
    interpolation). A resample in which no item is scored (possible for masked mean metrics) has
    an undefined value (NaN) and is left out of the quantiles.

    Args:
        item_stats: The metric.
        n_resamples: Number of bootstrap resamples B.
        seed: Seed of the numpy generator that draws the resamples.
        level: Coverage of the interval.

    Returns:
        (lo, hi); (nan, nan) when there are no items or no resample has a scored item.
    """
    if item_stats.n == 0:
        return (math.nan, math.nan)
    counts = _resample_counts(item_stats.n, n_resamples, seed)
    return _percentile_interval(_resampled_values(item_stats, counts), level)


def paired_bootstrap(
    a: ItemStats, b: ItemStats, n_resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> dict:
    """Paired bootstrap comparison of two systems on the same items (Koehn 2004).

    Koehn, "Statistical significance tests for machine translation evaluation", EMNLP 2004:
    both systems are scored on the SAME resampled item sets, giving B resampled differences
    ``delta* = b* - a*``. Resamples where either value is undefined (no scored item) are dropped.

    The p-value is two-sided: ``p = min(1, 2 * min(P(delta* <= 0), P(delta* >= 0)))``, with P the
    fraction of (kept) resamples. Koehn's one-sided quantity is the fraction of resamples in which
    the better system does not win; doubling the smaller tail makes the test two-sided without
    knowing in advance which system is better, and makes it agree with the percentile CI: for
    level = 1 - alpha, p < alpha exactly when the percentile interval of delta* excludes 0 (up
    to quantile interpolation). Ties count against significance on both sides, so identical
    systems (delta* = 0 everywhere) get p = 1. The resolution is 1/B: p = 0 means that no
    resample reversed (or tied) the observed sign, i.e. p < 1/B.

    Args:
        a: Metric of the reference system (e.g. the baseline).
        b: The same metric of the other system, items aligned with `a`.
        n_resamples: Number of bootstrap resamples B.
        seed: Seed of the numpy generator that draws the resamples.
        level: Coverage of the interval for the difference.

    Returns:
        ``{"delta": b.value() - a.value(), "ci": [lo, hi], "p": p}``; ci and p are NaN when no
        resample is defined for both systems.

    Raises:
        ValueError: If a and b have different numbers of items or different kinds.
    """
    if a.n != b.n:
        raise ValueError(f"paired_bootstrap: {a.name!r} has {a.n} items but {b.name!r} has {b.n}.")
    if a.kind != b.kind:
        raise ValueError(f"paired_bootstrap: cannot pair a {a.kind!r} metric with a {b.kind!r} metric.")
    delta = b.value() - a.value()
    if a.n == 0:
        return {"delta": delta, "ci": [math.nan, math.nan], "p": math.nan}
    counts = _resample_counts(a.n, n_resamples, seed)
    deltas = _resampled_values(b, counts) - _resampled_values(a, counts)
    deltas = deltas[np.isfinite(deltas)]
    lo, hi = _percentile_interval(deltas, level)
    if deltas.size == 0:
        p = math.nan
    else:
        p = min(1.0, 2.0 * min(float(np.mean(deltas <= 0)), float(np.mean(deltas >= 0))))
    return {"delta": delta, "ci": [lo, hi], "p": p}


def holm_adjust(p_values: list[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values (Holm 1979, "A simple sequentially rejective multiple test
    procedure", Scand. J. Statist. 6:65-70); controls the family-wise error rate over the m tests.

    Sort the m defined p-values ascending, p_(1) <= ... <= p_(m); the adjusted value of the i-th is
    ``max_{j <= i} min(1, (m - j + 1) * p_(j))``. Rejecting where the adjusted value is below alpha is
    Holm's procedure at level alpha. None (an undefined test) stays None and does not count in m.

    Args:
        p_values: Raw p-values, in any order.

    Returns:
        Adjusted p-values in the same order.
    """
    defined = sorted((p, i) for i, p in enumerate(p_values) if p is not None and not math.isnan(p))
    m = len(defined)
    out: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(defined):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


Z_95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float | None, float | None]:
    """Wilson score interval for a proportion (Wilson 1927, "Probable inference, the law of succession,
    and statistical inference", JASA 22:209-212).

    With p = successes/n and d = 1 + z²/n: centre (p + z²/2n)/d, half-width z·sqrt(p(1-p)/n + z²/4n²)/d.
    Unlike the percentile bootstrap it does not collapse to [0, 0] or [1, 1] at 0 or n successes, and it
    keeps its coverage on small groups.

    Args:
        successes: Items counted as correct.
        n: Items.
        z: Normal quantile of the coverage (1.96 for 95%).

    Returns:
        (lo, hi) as proportions in [0, 1]; (None, None) when n is 0.
    """
    if n == 0:
        return (None, None)
    p = successes / n
    d = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, centre - half), min(1.0, centre + half))


def newcombe_interval(
    k1: int, n1: int, k2: int, n2: int, z: float = Z_95
) -> tuple[float | None, float | None]:
    """Interval for the difference of two independent proportions k1/n1 − k2/n2, from their Wilson intervals.

    Newcombe's hybrid score interval (Newcombe 1998, "Interval estimation for the difference between
    independent proportions", Stat. Med. 17:873-890, method 10): with d = p1 − p2 and (l_i, u_i) the Wilson
    interval of p_i, lo = d − sqrt((p1 − l1)² + (u2 − p2)²), hi = d + sqrt((u1 − p1)² + (p2 − l2)²). Like
    Wilson's, it stays inside [−1, 1] and does not collapse when a group is all or none.

    Returns:
        (lo, hi) in [−1, 1]; (None, None) when either group is empty.
    """
    if n1 == 0 or n2 == 0:
        return (None, None)
    p1, p2 = k1 / n1, k2 / n2
    (l1, u1), (l2, u2) = wilson_interval(k1, n1, z), wilson_interval(k2, n2, z)
    d = p1 - p2
    lo = d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    hi = d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return (max(-1.0, lo), min(1.0, hi))
