"""The one on-disk example format every stage reads, and the split by image.

A prepared data folder holds::

    images/<image_id>.png         every image, once
    pretrain_train.jsonl          pool the base model learns from (empty at real scale)
    pretrain_test.jsonl           retention test: do post-trained models keep old skills?
    study_train.jsonl             the post-training data (the study's 1.6k LRV Chart train rows)
    study_test.jsonl              the held-out evaluation set
    report.json                   counts, skipped rows and why

Each JSONL row is one (image, question, answer) turn of a conversation, carrying the turns before it as
``history``; see `Example`. `group_conversations` puts the turns back together for training, which sees one
sequence per conversation (LLaVA-1.5's own format), while evaluation, preference sampling and DPO take each
turn as a prompt after its history.

Images are identified by a hash of their decoded pixels (`image_hash`): the same chart under two row ids is
one image, written once, and `split_by_image` keeps all of its conversations on one side of the split.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from posttrain.core.errors import DataError, MissingInputError
from posttrain.core.io import read_jsonl, write_jsonl

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
    """One (image, question, answer) turn of a conversation.

    Attributes:
        id: unique id of the turn, ``<conversation>-<turn>``.
        image: image path relative to the prepared folder (``images/<image_id>.png``).
        image_id: the image the turn belongs to (`image_hash` of its pixels); splits never separate an
            image's conversations.
        conversation: the conversation (an LRV row, a synthetic chart's questions) the turn belongs to.
        turn: its position in the conversation, from 0.
        history: the conversation's earlier turns, ``((question, reference answer), ...)``; a follow-up
            ("And the blue bar?") is only answerable with them.
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
    conversation: str
    turn: int
    question: str
    answer: str
    short_answer: str | None
    answer_type: AnswerType
    chart_type: str
    family: str
    negative: bool
    elements: tuple[str, ...] = field(default_factory=tuple)
    source: str = "synthetic"
    history: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    def to_json(self) -> dict:
        row = dataclasses.asdict(self)
        row["answer_type"] = self.answer_type.value
        row["elements"] = list(self.elements)
        row["history"] = [list(t) for t in self.history]
        return row

    @classmethod
    def from_json(cls, row: dict) -> Example:
        names = {f.name for f in dataclasses.fields(cls)}
        missing = names - set(row) - {"elements", "source", "history"}
        if missing:
            raise DataError(
                f"example {row.get('id', '?')!r} lacks fields {sorted(missing)}; data prepared by an older "
                "version? Run `dvc repro prepare`."
            )
        kwargs = {k: v for k, v in row.items() if k in names}
        kwargs["answer_type"] = AnswerType(row["answer_type"])
        kwargs["elements"] = tuple(row.get("elements", ()))
        kwargs["history"] = tuple((q, a) for q, a in row.get("history", ()))
        return cls(**kwargs)

    def asked_colour(self, colours) -> str | None:
        """The element a synthetic question asks about: the first of `colours` it names.

        None on LRV rows (their elements are not known) and for questions that name no colour ("How many
        bars are in the chart?").
        """
        if self.source != "synthetic":
            return None
        return next((w for w in re.findall(r"[a-z]+", self.question.lower()) if w in colours), None)

    def context_question(self) -> str:
        """The question as a judge without the conversation needs it: earlier turns first, then the question.

        A judge prompt holds one question; a follow-up ("And the blue bar?") means nothing there without the
        turns it follows, so they are quoted before it.
        """
        if not self.history:
            return self.question
        earlier = " ".join(f"USER: {q} ASSISTANT: {a}" for q, a in self.history)
        return f"(Earlier in this conversation: {earlier}) {self.question}"


@dataclass(frozen=True)
class Conversation:
    """All turns of one conversation about one image: what SFT trains on as a single sequence."""

    id: str
    image: str
    image_id: str
    turns: tuple[tuple[str, str], ...]


def group_conversations(examples: list[Example]) -> list[Conversation]:
    """Put turns back into their conversations, in order of first appearance.

    A conversation's turns are the history of its last turn plus that turn, so a conversation whose later
    turns were kept without the earlier ones is still whole.

    Raises:
        DataError: two turns of one conversation disagree (another image, or a history that is not the
            conversation's earlier turns); the message names the conversation.
    """
    by_id: dict[str, list[Example]] = {}
    for e in examples:
        by_id.setdefault(e.conversation, []).append(e)
    out = []
    for conv_id, turns in by_id.items():
        last = max(turns, key=lambda e: e.turn)
        full = (*last.history, (last.question, last.answer))
        for e in turns:
            if (
                e.image != last.image
                or e.turn != len(e.history)
                or full[: e.turn + 1]
                != (
                    *e.history,
                    (e.question, e.answer),
                )
            ):
                raise DataError(
                    f"conversation {conv_id!r}: turn {e.id!r} does not fit the conversation's other turns "
                    "(image or history differ). The prepared data is inconsistent: run `dvc repro prepare`."
                )
        out.append(Conversation(conv_id, last.image, last.image_id, full))
    return out


def image_hash(image) -> str:
    """Identity of an image by its decoded pixels (RGB): the same chart in two files or rows is one image.

    Returns:
        ``img-`` and the first 16 hex digits of the SHA-256 of the size and the RGB bytes.
    """
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    h = hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode())
    h.update(rgb.tobytes())
    return f"img-{h.hexdigest()[:16]}"


def write_examples(path: str | Path, examples: list[Example]) -> None:
    write_jsonl(path, [e.to_json() for e in examples])


def read_examples(path: str | Path) -> list[Example]:
    path = Path(path)
    if not path.exists():
        raise MissingInputError(f"{path} does not exist. Run `dvc repro prepare` first.")
    return [Example.from_json(r) for r in read_jsonl(path)]


def load_split(data_dir: str | Path, split: str) -> list[Example]:
    """Read one split of a prepared folder (one of `SPLITS`)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return read_examples(Path(data_dir) / f"{split}.jsonl")


def split_by_image(
    examples: list[Example], n_test_images: int, seed: int, key: str = "n_test_images"
) -> tuple[list[Example], list[Example]]:
    """Split into (train, test) so that all conversations of an image land on the same side.

    Images (by `image_hash` identity, so duplicates count once) are shuffled with `seed`; the first
    `n_test_images` go to test. Row order is kept. `key` is the params key of `n_test_images`, named by the
    error when the data has too few images for it.
    """
    image_ids = sorted({e.image_id for e in examples})
    if n_test_images >= len(image_ids):
        fix = (
            f"set {key} to at most {len(image_ids) - 1}"
            if len(image_ids) > 1
            else "a split needs at least 2 (one to test, one to train): use a larger data source"
        )
        raise DataError(
            f"{key}: {n_test_images}, but the data has {len(image_ids)} distinct images and at least one "
            f"must be left to train on; {fix}"
        )
    random.Random(seed).shuffle(image_ids)
    test_ids = set(image_ids[:n_test_images])
    train = [e for e in examples if e.image_id not in test_ids]
    test = [e for e in examples if e.image_id in test_ids]
    return train, test


def family_counts(examples: list[Example]) -> dict[str, int]:
    return dict(sorted(Counter(e.family for e in examples).items()))
