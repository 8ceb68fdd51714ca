"""The one on-disk example format every stage reads, and the split by image.

A prepared data folder holds::

    images/<image_id>.png         every image, once
    pretrain_train.jsonl          pool the base model learns from (empty at real scale)
    pretrain_test.jsonl           retention test: do post-trained models keep old skills?
    study_train.jsonl             the post-training data (the study's 1.6k LRV Chart train rows)
    study_test.jsonl              the held-out evaluation set
    report.json                   counts, skipped rows and why

Each JSONL row is one (image, question, answer) turn; see `Example`.
"""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from posttrain.io import read_jsonl, write_jsonl

SPLITS = ("pretrain_train", "pretrain_test", "study_train", "study_test")


class AnswerType(str, Enum):
    """How the short answer is read back out of a free-form response."""

    NUMBER = "number"
    COLOR = "color"
    YES_NO = "yes_no"
    TREND = "trend"
    DECLINE = "decline"  # negative question: the right answer says the element is not there
    TEXT = "text"  # no structure known (real LRV rows): the short answer is compared whole


@dataclass(frozen=True)
class Example:
    """One (image, question, answer) turn.

    Attributes:
        id: unique id of the turn, ``<image_id>-<turn>``.
        image: image path relative to the prepared folder (``images/<image_id>.png``).
        image_id: the image the turn belongs to; splits never separate an image's turns.
        question: the user's question, without the ``<image>`` placeholder.
        answer: the reference answer, a sentence.
        short_answer: the value a correct answer must contain (relaxed accuracy); None if unknown.
        answer_type: how to extract the short answer from a response.
        chart_type: bar, line, pie, or unknown.
        family: question family (e.g. ``bar_value``); ``lrv`` for real rows.
        negative: True for LRV-style questions about an element that is not in the chart.
        elements: colours present in the chart (for the reference critic); empty if unknown.
        source: ``synthetic`` or ``lrv_chart``.
    """

    id: str
    image: str
    image_id: str
    question: str
    answer: str
    short_answer: str | None
    answer_type: AnswerType
    chart_type: str
    family: str
    negative: bool
    elements: tuple[str, ...] = field(default_factory=tuple)
    source: str = "synthetic"

    def to_json(self) -> dict:
        row = dataclasses.asdict(self)
        row["answer_type"] = self.answer_type.value
        row["elements"] = list(self.elements)
        return row

    @classmethod
    def from_json(cls, row: dict) -> Example:
        names = {f.name for f in dataclasses.fields(cls)}
        missing = names - set(row) - {"elements", "source"}
        if missing:
            raise ValueError(f"example {row.get('id', '?')!r} lacks fields {sorted(missing)}")
        kwargs = {k: v for k, v in row.items() if k in names}
        kwargs["answer_type"] = AnswerType(row["answer_type"])
        kwargs["elements"] = tuple(row.get("elements", ()))
        return cls(**kwargs)


def write_examples(path: str | Path, examples: list[Example]) -> None:
    write_jsonl(path, [e.to_json() for e in examples])


def read_examples(path: str | Path) -> list[Example]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist. Run `dvc repro prepare` first.")
    return [Example.from_json(r) for r in read_jsonl(path)]


def load_split(data_dir: str | Path, split: str) -> list[Example]:
    """Read one split of a prepared folder (one of `SPLITS`)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return read_examples(Path(data_dir) / f"{split}.jsonl")


def split_by_image(
    examples: list[Example], n_test_images: int, seed: int
) -> tuple[list[Example], list[Example]]:
    """Split into (train, test) so that all turns of an image land on the same side.

    Images are shuffled with `seed`; the first `n_test_images` go to test. Row order is kept.
    """
    image_ids = sorted({e.image_id for e in examples})
    if n_test_images >= len(image_ids):
        raise ValueError(f"asked for {n_test_images} test images but only {len(image_ids)} exist")
    random.Random(seed).shuffle(image_ids)
    test_ids = set(image_ids[:n_test_images])
    train = [e for e in examples if e.image_id not in test_ids]
    test = [e for e in examples if e.image_id in test_ids]
    return train, test


def family_counts(examples: list[Example]) -> dict[str, int]:
    return dict(sorted(Counter(e.family for e in examples).items()))
