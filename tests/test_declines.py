"""The decline detector on the committed, labelled phrasings (tests/data/declines.tsv)."""

from pathlib import Path

import pytest

from posttrain.data.declines import is_decline

PHRASINGS = Path(__file__).parent / "data" / "declines.tsv"


def labelled() -> list[tuple[bool, str]]:
    rows = []
    for line in PHRASINGS.read_text(encoding="utf-8").splitlines():
        if line.startswith("#") or not line.strip():
            continue
        label, text = line.split("\t", 1)
        assert label in ("decline", "answer"), f"bad label {label!r} in {PHRASINGS}"
        rows.append((label == "decline", text))
    return rows


def test_the_labelled_set_is_large_and_balanced_enough():
    rows = labelled()
    assert len(rows) >= 60
    assert sum(d for d, _ in rows) >= 30 and sum(not d for d, _ in rows) >= 20
    assert len({t for _, t in rows}) == len(rows), "duplicate phrasings"


def test_precision_and_recall_on_the_labelled_set(capsys):
    rows = labelled()
    predicted = [(d, is_decline(t), t) for d, t in rows]
    tp = sum(d and p for d, p, _ in predicted)
    fp = [t for d, p, t in predicted if p and not d]
    fn = [t for d, p, t in predicted if d and not p]
    precision, recall = tp / (tp + len(fp)), tp / (tp + len(fn))
    with capsys.disabled():
        print(f"\ndecline detector on {len(rows)} phrasings: precision {precision:.3f}, recall {recall:.3f}")
    assert not fp, f"look-alikes read as declines: {fp}"
    assert not fn, f"declines missed: {fn}"
    assert precision == recall == 1.0


@pytest.mark.parametrize(
    ("text", "declines"),
    [
        ("There is no purple bar in the chart.", True),  # the synthetic references
        ("There is no in, the chart.", False),  # the tiny base's garbled near-declines
        ("There is no purple.", False),
        ("THE DATA FOR 2016 IS NOT AVAILABLE.", True),
        ("", False),
    ],
)
def test_synthetic_and_degenerate_responses(text, declines):
    assert is_decline(text) is declines
