"""The real LRV Chart data: read the parquet rows and flatten conversations into `Example` turns.

Source: the ``lrv_chart`` config of the Hugging Face dataset ``lmms-lab/LLaVA-OneVision-Data`` (split
``train``, 1,776 rows) at a pinned revision, or a local parquet file / folder in the same schema:

- ``id`` (str): the row id, used as the image id.
- ``image`` (struct ``{bytes: binary, path: str}``, as the ``datasets`` Image feature stores it in parquet).
- ``conversations`` (list of ``{from: "human" | "gpt", value: str}``): alternating turns; the human turns
  carry an ``<image>`` placeholder (usually only the first one).
- ``data_source`` (str).

Only parquet files are read (with pyarrow); no dataset script is ever run. Bad rows are skipped and counted
by reason (see `flatten_rows`); `check_bad_fraction` turns too many of them into an error.
"""

from __future__ import annotations

import io
import logging
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from posttrain.data import AnswerType, Example

logger = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"
SOURCE = "lrv_chart"

# An answer (or a model response) that says the asked-about element is not in the chart. LRV's negative
# instructions ask about things that are absent; their reference answers decline with phrases like these.
# Reused by the critic and the evaluation to recognise declines in model responses.
DECLINE_PATTERN = re.compile(
    r"\b(?:"
    r"there\s+(?:is|are|was|were)\s+no"
    r"|there's\s+no"
    r"|(?:does|do|did)\s+not\s+(?:contain|show|have|include|display|depict|mention|provide)"
    r"|(?:doesn't|don't|didn't)\s+(?:contain|show|have|include|display|depict|mention|provide)"
    r"|not\s+(?:present|shown|mentioned|visible|depicted|displayed|included|provided)"
    r"|no\s+such"
    r"|(?:cannot|can\s*not|can't)\s+be\s+determined"
    r")\b",
    re.IGNORECASE,
)

# Reasons a row is skipped (keys of the report's ``skipped``).
SKIP_MISSING_IMAGE = "missing_image"
SKIP_UNREADABLE_IMAGE = "unreadable_image"
SKIP_NO_PLACEHOLDER = "no_image_placeholder"
SKIP_EMPTY_QUESTION = "empty_question"
SKIP_EMPTY_ANSWER = "empty_answer"
SKIP_NO_PAIR = "no_qa_pair"
SKIP_NOT_ALTERNATING = "turns_not_alternating"
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
            raise FileNotFoundError(f"no *.parquet files in folder {path}")
        return files
    if not path.exists():
        raise FileNotFoundError(f"LRV parquet source {path} does not exist")
    return [path]


def _iter_parquet_rows(files: list[Path], batch_size: int = 256) -> Iterator[dict]:
    """Yield rows of the parquet `files` in order, as plain dicts, a record batch at a time."""
    import pyarrow.parquet as pq

    for file in files:
        pf = pq.ParquetFile(file)
        missing = [c for c in _REQUIRED_COLUMNS if c not in pf.schema_arrow.names]
        if missing:
            raise ValueError(
                f"{file}: missing columns {missing}; expected the LLaVA-OneVision-Data schema "
                f"(id, image{{bytes, path}}, conversations[{{from, value}}], data_source), found "
                f"{pf.schema_arrow.names}"
            )
        for batch in pf.iter_batches(batch_size=batch_size):
            yield from batch.to_pylist()


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
        raise FileNotFoundError(
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
        FileNotFoundError: No parquet file found.
        ValueError: A file lacks the expected columns, or no revision is given for the Hub.
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
            return img.convert("RGB")
    except Exception as e:  # PIL raises many types for bad data
        logger.debug("unreadable image: %s", e)
        raise _SkipRow(SKIP_UNREADABLE_IMAGE) from e


def _qa_pairs(conversations: object) -> list[tuple[str, str]]:
    """Pair consecutive human -> gpt turns; strip the ``<image>`` placeholder from questions.

    Raises:
        _SkipRow: The conversation is malformed, has no pair, does not alternate, lacks the image
            placeholder, or has an empty question or answer.
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
    if not any(IMAGE_PLACEHOLDER in value for role, value in turns if role == "human"):
        raise _SkipRow(SKIP_NO_PLACEHOLDER)
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


def _image_id(raw_id: object, row_index: int, used: set[str]) -> str:
    """Sanitise a row id to ``[A-Za-z0-9_.-]``; disambiguate repeats with ``_2``, ``_3``... in row order."""
    base = _UNSAFE_ID_CHARS.sub("_", raw_id) if isinstance(raw_id, str) else ""
    if not base.strip("."):
        base = f"row{row_index}"
    image_id, k = base, 2
    while image_id in used:
        image_id = f"{base}_{k}"
        k += 1
    return image_id


def short_answer_of(answer: str) -> str | None:
    """Return the whole answer without a trailing period when it has at most 3 words, else None."""
    text = answer.strip()
    if not text or len(text.split()) > 3:
        return None
    text = text[:-1].rstrip() if text.endswith(".") else text
    return text or None


def is_decline(text: str) -> bool:
    """Whether `text` declines, i.e. says the asked-about element is not there (`DECLINE_PATTERN`)."""
    return DECLINE_PATTERN.search(text) is not None


def _example(image_id: str, turn: int, question: str, answer: str) -> Example:
    negative = is_decline(answer)
    return Example(
        id=f"{image_id}-{turn}",
        image=f"images/{image_id}.png",
        image_id=image_id,
        question=question,
        answer=answer,
        short_answer=None if negative else short_answer_of(answer),
        answer_type=AnswerType.DECLINE if negative else AnswerType.TEXT,
        chart_type="unknown",
        family="lrv_negative" if negative else "lrv",
        negative=negative,
        elements=(),
        source=SOURCE,
    )


def flatten_rows(rows: Iterable[dict], image_dir: Path) -> tuple[list[Example], dict]:
    """Turn LRV rows into (image, question, answer) examples and write each row's image once.

    Each consecutive human -> gpt pair of a row becomes one `Example` with id ``<image_id>-<turn>``
    (turn = 0, 1, ... within the row); all of a row's examples share its image, written as
    ``image_dir/<image_id>.png`` (RGB). The image id is the row ``id`` sanitised to ``[A-Za-z0-9_.-]``;
    a repeated id gets ``_2``, ``_3``... in row order. Questions lose the ``<image>`` placeholder and the
    whitespace around it. An answer matching `DECLINE_PATTERN` makes a negative example
    (``AnswerType.DECLINE``, family ``lrv_negative``, no short answer); otherwise the short answer is the
    answer itself, without a trailing period, when it has at most 3 words.

    A bad row is skipped, not raised, and counted under one reason: ``malformed_conversations``,
    ``no_qa_pair``, ``turns_not_alternating``, ``no_image_placeholder``, ``empty_answer``,
    ``empty_question``, ``missing_image`` (no bytes), ``unreadable_image`` (bytes PIL cannot decode).
    Conversations are checked before the image is decoded.

    Args:
        rows: Raw rows, as yielded by `load_lrv_rows`.
        image_dir: Folder the PNG images are written to (created if needed); examples refer to them as
            ``images/<image_id>.png``.

    Returns:
        ``(examples, report)`` where report is ``{"rows_read", "rows_kept", "examples", "skipped":
        {reason: count}, "skipped_ids": {reason: [first 20 row ids]}}``.
    """
    image_dir = Path(image_dir)
    image_dir.mkdir(parents=True, exist_ok=True)
    examples: list[Example] = []
    skipped: Counter[str] = Counter()
    skipped_ids: dict[str, list[str]] = {}
    used_ids: set[str] = set()
    rows_read = rows_kept = 0
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
        image_id = _image_id(raw_id, index, used_ids)
        used_ids.add(image_id)
        image.save(image_dir / f"{image_id}.png", format="PNG")
        rows_kept += 1
        examples.extend(_example(image_id, turn, q, a) for turn, (q, a) in enumerate(pairs))
    if skipped:
        logger.warning("LRV: skipped %d of %d rows: %s", sum(skipped.values()), rows_read, dict(skipped))
    report = {
        "rows_read": rows_read,
        "rows_kept": rows_kept,
        "examples": len(examples),
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
        ValueError: No rows were read, or skipped / read exceeds `max_bad_fraction`; the message gives the
            counts by reason and the first skipped ids.
    """
    rows_read = report["rows_read"]
    skipped = report.get("skipped", {})
    n_bad = sum(skipped.values())
    if rows_read == 0:
        raise ValueError(
            "LRV Chart: no rows were read. Check the source (local parquet path or hub revision)."
        )
    fraction = n_bad / rows_read
    if fraction <= max_bad_fraction:
        return
    reasons = ", ".join(f"{reason}={count}" for reason, count in sorted(skipped.items()))
    examples = "; ".join(
        f"{reason}: {ids[:5]}" for reason, ids in sorted(report.get("skipped_ids", {}).items()) if ids
    )
    raise ValueError(
        f"LRV Chart: {n_bad} of {rows_read} rows ({fraction:.1%}) were skipped as bad, above the allowed "
        f"prepare.max_bad_fraction={max_bad_fraction} ({max_bad_fraction:.1%}). "
        f"Skipped by reason: {reasons}. First skipped ids: {examples}. Check the source (the parquet "
        f"files or the pinned revision: is it the lrv_chart config in the expected schema?); if these "
        f"losses are acceptable, raise "
        f"`prepare.max_bad_fraction` in params.yaml."
    )
