"""The real LRV Chart data: read the parquet rows and turn each conversation into its `Example` turns.

Source: the ``lrv_chart`` config of the Hugging Face dataset ``lmms-lab/LLaVA-OneVision-Data`` (split
``train``, 1,776 rows) at a pinned revision, or a local parquet file / folder in the same schema:

- ``id`` (str): the row id, used as the image id.
- ``image`` (struct ``{bytes: binary, path: str}``, as the ``datasets`` Image feature stores it in parquet).
- ``conversations`` (list of ``{from: "human" | "gpt", value: str}``): alternating turns; the human turns
  carry an ``<image>`` placeholder (usually only the first one).
- ``data_source`` (str).

Only parquet files are read (with pyarrow); no dataset script is ever run. Bad rows are skipped and counted
by reason (see `flatten_rows`); `check_bad_fraction` turns too many of them into an error. Each row is one
conversation; its turns keep their history (a follow-up such as "And in 2011?" needs it). Images are
identified by their pixels, so the same chart under two ids is one image (written once, on one side of the
split), and counted in the report.
"""

from __future__ import annotations

import io
import logging
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from posttrain.core.errors import DataError, MissingInputError
from posttrain.data.answers import short_answer_of
from posttrain.data.declines import is_decline
from posttrain.data.examples import AnswerType, Example, image_hash

logger = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"
SOURCE = "lrv_chart"

# Reasons a row is skipped (keys of the report's ``skipped``).
SKIP_MISSING_IMAGE = "missing_image"
SKIP_UNREADABLE_IMAGE = "unreadable_image"
SKIP_NO_PLACEHOLDER = "no_image_placeholder"
SKIP_EMPTY_QUESTION = "empty_question"
SKIP_EMPTY_ANSWER = "empty_answer"
SKIP_NO_PAIR = "no_qa_pair"
SKIP_NOT_ALTERNATING = "turns_not_alternating"
SKIP_EXTRA_PLACEHOLDER = "second_image_placeholder"
SKIP_EMPTY_IMAGE = "empty_image"
SKIP_MALFORMED = "malformed_conversations"

_MAX_SKIPPED_IDS = 20
_REQUIRED_COLUMNS = ("id", "image", "conversations")
_UNSAFE_ID_CHARS = re.compile(r"[^A-Za-z0-9_.-]")
_PLACEHOLDER_RE = re.compile(r"\s*" + re.escape(IMAGE_PLACEHOLDER) + r"\s*")


class _SkipRow(Exception):
    """A row that cannot be used; ``reason`` is one of the ``SKIP_*`` keys."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _parquet_files(path: Path) -> list[Path]:
    """Return the parquet file itself, or the sorted ``*.parquet`` files of a folder."""
    if path.is_dir():
        files = sorted(path.glob("*.parquet"))
        if not files:
            raise MissingInputError(f"no *.parquet files in folder {path}")
        return files
    if not path.exists():
        raise MissingInputError(f"LRV parquet source {path} does not exist")
    return [path]


def _iter_parquet_rows(files: list[Path], batch_size: int = 256) -> Iterator[dict]:
    """Yield rows of the parquet `files` in order, as plain dicts, a record batch at a time.

    Raises:
        DataError: A file is empty, truncated or not parquet (the message names it), or lacks a column.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    for file in files:
        try:
            pf = pq.ParquetFile(file)
            missing = [c for c in _REQUIRED_COLUMNS if c not in pf.schema_arrow.names]
            if missing:
                raise DataError(
                    f"{file}: missing columns {missing}; expected the LLaVA-OneVision-Data schema "
                    f"(id, image{{bytes, path}}, conversations[{{from, value}}], data_source), found "
                    f"{pf.schema_arrow.names}"
                )
            for batch in pf.iter_batches(batch_size=batch_size):
                yield from batch.to_pylist()
        except (pa.ArrowException, OSError) as e:  # pyarrow's messages name no file
            empty = file.stat().st_size == 0
            what = "is empty (0 bytes)" if empty else "is truncated, damaged or not parquet"
            raise DataError(
                f"{file}: cannot be read as parquet: it {what} (pyarrow: {e}). Download it again, or point "
                "prepare.lrv.local_parquet at complete parquet files."
            ) from e


def _hub_parquet_files(hub_id: str, config: str, revision: str, split: str) -> list[Path]:
    """Download only the parquet shards of `config`/`split` at `revision`; return them sorted.

    The dataset repo stores each config as ``<config>/<split>-XXXXX-of-YYYYY.parquet``; the auto-converted
    ``refs/convert/parquet`` branch uses ``<config>/<split>/NNNN.parquet``. Both layouts are accepted.
    """
    from huggingface_hub import snapshot_download

    patterns = [f"{config}/{split}-*.parquet", f"{config}/{split}/*.parquet"]
    root = Path(
        snapshot_download(repo_id=hub_id, repo_type="dataset", revision=revision, allow_patterns=patterns)
    )
    files = sorted(set(root.glob(patterns[0])) | set(root.glob(patterns[1])))
    if not files:
        raise DataError(
            f"no parquet files matching {patterns} in dataset {hub_id} at revision {revision}; "
            "check the config, split and revision."
        )
    return files


def load_lrv_rows(
    local_parquet: str | None, hub_id: str, config: str, revision: str, split: str
) -> Iterable[dict]:
    """Read the raw LRV Chart rows from a local parquet file/folder or from the Hub.

    Args:
        local_parquet: A parquet file, or a folder whose ``*.parquet`` files are read in sorted order. When
            given, the Hub is not contacted.
        hub_id: Dataset repo id on the Hub (``lmms-lab/LLaVA-OneVision-Data``).
        config: Dataset config, a folder of the repo (``lrv_chart``).
        revision: Pinned revision (commit hash) of the dataset repo.
        split: Split name (``train``).

    Returns:
        An iterator over raw rows: dicts with ``id``, ``image`` ({bytes, path}), ``conversations`` and
        ``data_source``.

    Raises:
        MissingInputError: The local parquet file or folder is missing.
        DataError: A file lacks the expected columns, is empty, truncated or not parquet (the message names
            the file), or the Hub revision has no parquet files.
        ValueError: No revision is given for the Hub.
    """
    if local_parquet:
        files = _parquet_files(Path(local_parquet))
    else:
        if not revision:
            raise ValueError(f"a pinned revision of {hub_id} is required to download {config}/{split}")
        files = _hub_parquet_files(hub_id, config, revision, split)
    logger.info("reading LRV rows from %d parquet file(s): %s", len(files), [str(f) for f in files])
    return _iter_parquet_rows(files)


# --------------------------------------------------------------------------------------------
# Flattening
# --------------------------------------------------------------------------------------------


def _image_bytes(image: object) -> bytes:
    """Return the encoded bytes of a row's ``image`` cell (struct {bytes, path} or raw bytes)."""
    if isinstance(image, dict):
        data = image.get("bytes")
    else:
        data = image
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) == 0:
        raise _SkipRow(SKIP_MISSING_IMAGE)
    return bytes(data)


def _decode_image(data: bytes):
    """Decode image bytes to an RGB PIL image; undecodable bytes skip the row."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            image = img.convert("RGB")
    except Exception as e:  # PIL raises many types for bad data
        logger.debug("unreadable image: %s", e)
        raise _SkipRow(SKIP_UNREADABLE_IMAGE) from e
    if image.width == 0 or image.height == 0:
        raise _SkipRow(SKIP_EMPTY_IMAGE)
    return image


def _qa_pairs(conversations: object) -> list[tuple[str, str]]:
    """Pair consecutive human -> gpt turns; strip the ``<image>`` placeholder from questions.

    LLaVA puts the row's one image before the first question, wherever the placeholder stood; a second
    placeholder would ask for a second image the row does not have.

    Raises:
        _SkipRow: The conversation is malformed, has no pair, does not alternate, lacks the image
            placeholder or has more than one, or has an empty question or answer.
    """
    if not isinstance(conversations, list):
        raise _SkipRow(SKIP_MALFORMED)
    turns = []
    for turn in conversations:
        if not isinstance(turn, dict) or turn.get("from") not in ("human", "gpt"):
            raise _SkipRow(SKIP_MALFORMED)
        value = turn.get("value")
        turns.append((turn["from"], value if isinstance(value, str) else ""))
    roles = [role for role, _ in turns]
    if "human" not in roles or "gpt" not in roles:
        raise _SkipRow(SKIP_NO_PAIR)
    expected = ["human", "gpt"] * (len(turns) // 2 + 1)
    if len(turns) % 2 or roles != expected[: len(turns)]:
        raise _SkipRow(SKIP_NOT_ALTERNATING)
    placeholders = sum(value.count(IMAGE_PLACEHOLDER) for role, value in turns if role == "human")
    if placeholders == 0:
        raise _SkipRow(SKIP_NO_PLACEHOLDER)
    if placeholders > 1:
        raise _SkipRow(SKIP_EXTRA_PLACEHOLDER)
    pairs = []
    for i in range(0, len(turns), 2):
        question = _PLACEHOLDER_RE.sub(" ", turns[i][1]).strip()
        answer = turns[i + 1][1].strip()
        if not answer:
            raise _SkipRow(SKIP_EMPTY_ANSWER)
        if not question:
            raise _SkipRow(SKIP_EMPTY_QUESTION)
        pairs.append((question, answer))
    return pairs


def _conversation_id(raw_id: object, row_index: int, used: set[str]) -> str:
    """Sanitise a row id to ``[A-Za-z0-9_.-]``; disambiguate repeats with ``_2``, ``_3``... in row order."""
    base = _UNSAFE_ID_CHARS.sub("_", raw_id) if isinstance(raw_id, str) else ""
    if not base.strip("."):
        base = f"row{row_index}"
    image_id, k = base, 2
    while image_id in used:
        image_id = f"{base}_{k}"
        k += 1
    return image_id


def conversation_examples(
    conversation: str, image_id: str, pairs: list[tuple[str, str]], source: str = SOURCE
) -> list[Example]:
    """The turns of one LRV conversation as examples, each with its history.

    A reference answer that declines (`posttrain.data.declines.is_decline`) makes the turn a negative
    (``AnswerType.DECLINE``, family ``lrv_negative``, no short answer); otherwise the short answer and its
    type are what the sentence states (`posttrain.data.answers.short_answer_of`: a number, yes/no, a colour, a
    trend, or a whole answer of at most 3 words), or None.
    """
    examples = []
    for turn, (question, answer) in enumerate(pairs):
        negative = is_decline(answer)
        short, answer_type = (None, AnswerType.DECLINE) if negative else short_answer_of(answer)
        examples.append(
            Example(
                id=f"{conversation}-{turn}",
                image=f"images/{image_id}.png",
                image_id=image_id,
                conversation=conversation,
                turn=turn,
                question=question,
                answer=answer,
                short_answer=short,
                answer_type=answer_type,
                chart_type="unknown",
                family="lrv_negative" if negative else "lrv",
                negative=negative,
                elements=(),
                source=source,
                history=tuple(pairs[:turn]),
            )
        )
    return examples


def flatten_rows(rows: Iterable[dict], image_dir: Path) -> tuple[list[Example], dict]:
    """Turn LRV rows into conversations of `Example` turns and write each distinct image once.

    Each row is one conversation; its consecutive human -> gpt pairs become `Example` turns with id
    ``<conversation>-<turn>`` (turn = 0, 1, ...), each carrying the earlier turns as its history. The
    conversation id is the row ``id`` sanitised to ``[A-Za-z0-9_.-]``; a repeated id gets ``_2``, ``_3``...
    in row order. The image id is `posttrain.data.examples.image_hash` of the decoded pixels: rows with the
    same chart share one ``image_dir/<image_id>.png`` (RGB), and the split keeps them together. Questions lose
    the ``<image>`` placeholder and the whitespace around it; negatives are labelled by
    `conversation_examples`.

    A bad row is skipped, not raised, and counted under one reason: ``malformed_conversations``,
    ``no_qa_pair``, ``turns_not_alternating``, ``no_image_placeholder``, ``second_image_placeholder``,
    ``empty_answer``, ``empty_question``, ``missing_image`` (no bytes), ``unreadable_image`` (bytes PIL
    cannot decode), ``empty_image`` (decodes to 0 pixels). Conversations are checked before the image is
    decoded.

    Args:
        rows: Raw rows, as yielded by `load_lrv_rows`.
        image_dir: Folder the PNG images are written to (created if needed); examples refer to them as
            ``images/<image_id>.png``.

    Returns:
        ``(examples, report)`` where report is ``{"rows_read", "rows_kept", "examples", "conversations",
        "images", "duplicate_images", "repeated_ids", "negatives", "skipped": {reason: count},
        "skipped_ids": {reason: [first 20 row ids]}}``; ``duplicate_images`` counts kept rows whose image
        an earlier kept row already had, ``repeated_ids`` kept rows whose id an earlier row already had.
    """
    image_dir = Path(image_dir)
    image_dir.mkdir(parents=True, exist_ok=True)
    examples: list[Example] = []
    skipped: Counter[str] = Counter()
    skipped_ids: dict[str, list[str]] = {}
    used_ids: set[str] = set()
    seen_images: set[str] = set()
    seen_raw_ids: set[object] = set()
    rows_read = rows_kept = duplicate_images = repeated_ids = 0
    for index, row in enumerate(rows):
        rows_read += 1
        raw_id = row.get("id")
        try:
            pairs = _qa_pairs(row.get("conversations"))
            image = _decode_image(_image_bytes(row.get("image")))
        except _SkipRow as skip:
            skipped[skip.reason] += 1
            ids = skipped_ids.setdefault(skip.reason, [])
            if len(ids) < _MAX_SKIPPED_IDS:
                ids.append(str(raw_id))
            continue
        conversation = _conversation_id(raw_id, index, used_ids)
        used_ids.add(conversation)
        repeated_ids += raw_id in seen_raw_ids
        seen_raw_ids.add(raw_id)
        image_id = image_hash(image)
        if image_id in seen_images:
            duplicate_images += 1
        else:
            seen_images.add(image_id)
            image.save(image_dir / f"{image_id}.png", format="PNG")
        rows_kept += 1
        examples.extend(conversation_examples(conversation, image_id, pairs))
    if skipped:
        logger.warning("LRV: skipped %d of %d rows: %s", sum(skipped.values()), rows_read, dict(skipped))
    report = {
        "rows_read": rows_read,
        "rows_kept": rows_kept,
        "examples": len(examples),
        "conversations": rows_kept,
        "images": len(seen_images),
        "duplicate_images": duplicate_images,
        "repeated_ids": repeated_ids,
        "negatives": sum(e.negative for e in examples),
        "skipped": dict(sorted(skipped.items())),
        "skipped_ids": dict(sorted(skipped_ids.items())),
    }
    return examples, report


def check_bad_fraction(report: dict, max_bad_fraction: float) -> None:
    """Fail when too many rows were skipped.

    Args:
        report: The report of `flatten_rows`.
        max_bad_fraction: Largest allowed skipped rows / rows read (``prepare.max_bad_fraction``).

    Raises:
        DataError: No rows were read, or skipped / read exceeds `max_bad_fraction`; the message gives the
            counts by reason and the first skipped ids.
    """
    rows_read = report["rows_read"]
    skipped = report.get("skipped", {})
    n_bad = sum(skipped.values())
    if rows_read == 0:
        raise DataError(
            "LRV Chart: no rows were read. Check the source (local parquet path or hub revision)."
        )
    fraction = n_bad / rows_read
    if fraction <= max_bad_fraction:
        return
    reasons = ", ".join(f"{reason}={count}" for reason, count in sorted(skipped.items()))
    examples = "; ".join(
        f"{reason}: {ids[:5]}" for reason, ids in sorted(report.get("skipped_ids", {}).items()) if ids
    )
    raise DataError(
        f"LRV Chart: {n_bad} of {rows_read} rows ({fraction:.1%}) were skipped as bad, above the allowed "
        f"prepare.max_bad_fraction={max_bad_fraction} ({max_bad_fraction:.1%}). "
        f"Skipped by reason: {reasons}. First skipped ids: {examples}. Check the source (the parquet "
        f"files or the pinned revision: is it the lrv_chart config in the expected schema?); if these "
        f"losses are acceptable, raise "
        f"`prepare.max_bad_fraction` in params.yaml."
    )
