from __future__ import annotations

import io
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from posttrain.data import lrv
from posttrain.data.examples import AnswerType, group_conversations, image_hash, split_by_image
from posttrain.data.lrv import check_bad_fraction, flatten_rows, load_lrv_rows

SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        ("conversations", pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))),
        ("data_source", pa.string()),
    ]
)


def png_bytes(color: str, size: tuple[int, int] = (12, 8), mode: str = "RGB", level: int = 6) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG", compress_level=level)
    return buf.getvalue()


def pixel_id(color: str, size: tuple[int, int] = (12, 8), mode: str = "RGB") -> str:
    return image_hash(Image.new(mode, size, color).convert("RGB"))


def conv(*turns: tuple[str, str]) -> list[dict]:
    return [{"from": who, "value": value} for who, value in turns]


def row(id_: str, image: bytes | None, conversations: list[dict]) -> dict:
    return {
        "id": id_,
        "image": None if image is None else {"bytes": image, "path": f"{id_}.png"},
        "conversations": conversations,
        "data_source": "lrv_chart",
    }


def good_rows() -> list[dict]:
    return [
        row(
            "chart/001", png_bytes("red"), conv(("human", "<image>\nWhat is the value of A?"), ("gpt", "42."))
        ),
        row(
            "chart 002",
            png_bytes("blue", mode="RGBA"),
            conv(
                ("human", "<image>\n  Which bar is tallest?  "),
                ("gpt", "The tallest bar is B, at about 30 units."),
                ("human", "Is there a purple bar?"),
                ("gpt", "There is no purple bar in the chart."),
            ),
        ),
        row(
            "003",
            png_bytes("green", mode="L"),
            conv(("human", "How many bars?\n<image>"), ("gpt", "Three bars")),
        ),
        # same sanitised id as "chart/001" -> disambiguated
        row("chart_001", png_bytes("white"), conv(("human", "<image> Title?"), ("gpt", "Sales by region"))),
    ]


def bad_rows() -> list[dict]:
    return [
        row("bad-img", b"not a png at all", conv(("human", "<image>\nQ?"), ("gpt", "A."))),
        row("no-bytes", None, conv(("human", "<image>\nQ?"), ("gpt", "A."))),
        row("no-placeholder", png_bytes("red"), conv(("human", "What is shown?"), ("gpt", "A chart."))),
        row("empty-answer", png_bytes("red"), conv(("human", "<image>\nQ?"), ("gpt", "   "))),
        row("no-pair", png_bytes("red"), conv(("human", "<image>\nQ?"))),
        row(
            "not-alternating",
            png_bytes("red"),
            conv(("human", "<image>\nQ1?"), ("human", "Q2?"), ("gpt", "A."), ("gpt", "B.")),
        ),
    ]


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), path)
    return path


def test_flatten_examples_and_images(tmp_path: Path) -> None:
    src = write_parquet(tmp_path / "lrv.parquet", good_rows() + bad_rows())
    rows = list(load_lrv_rows(str(src), "unused/hub", "lrv_chart", "", "train"))
    assert len(rows) == 10 and rows[0]["image"]["bytes"][:4] == b"\x89PNG"

    image_dir = tmp_path / "images"
    examples, report = flatten_rows(rows, image_dir)

    assert [e.id for e in examples] == ["chart_001-0", "chart_002-0", "chart_002-1", "003-0", "chart_001_2-0"]
    by_id = {e.id: e for e in examples}

    e = by_id["chart_001-0"]
    assert (e.question, e.answer, e.short_answer) == ("What is the value of A?", "42.", "42")
    assert e.answer_type is AnswerType.NUMBER
    red = pixel_id("red")
    assert e.image == f"images/{red}.png" and e.image_id == red
    assert (e.conversation, e.turn, e.history) == ("chart_001", 0, ())
    assert (e.family, e.negative, e.chart_type, e.elements, e.source) == (
        "lrv",
        False,
        "unknown",
        (),
        "lrv_chart",
    )

    long = by_id["chart_002-0"]
    assert long.question == "Which bar is tallest?"
    assert (long.short_answer, long.answer_type) == ("30", AnswerType.NUMBER)  # the sentence's number
    neg = by_id["chart_002-1"]
    assert neg.question == "Is there a purple bar?"
    assert (neg.conversation, neg.turn) == ("chart_002", 1)
    assert neg.history == (("Which bar is tallest?", "The tallest bar is B, at about 30 units."),)
    assert (neg.negative, neg.answer_type, neg.family, neg.short_answer) == (
        True,
        AnswerType.DECLINE,
        "lrv_negative",
        None,
    )
    assert by_id["003-0"].question == "How many bars?" and by_id["003-0"].short_answer == "Three bars"
    assert (
        by_id["chart_001_2-0"].question == "Title?" and by_id["chart_001_2-0"].conversation == "chart_001_2"
    )

    # one PNG per distinct image, named by its pixels, RGB, readable
    expected = {
        pixel_id("red"),
        pixel_id("blue", mode="RGBA"),
        pixel_id("green", mode="L"),
        pixel_id("white"),
    }
    assert sorted(p.name for p in image_dir.iterdir()) == sorted(f"{i}.png" for i in expected)
    for e in examples:
        with Image.open(tmp_path / e.image) as img:
            assert img.mode == "RGB" and img.size == (12, 8)
    with Image.open(image_dir / f"{red}.png") as img:
        assert img.getpixel((0, 0)) == (255, 0, 0)

    assert report["rows_read"] == 10
    assert report["rows_kept"] == report["conversations"] == report["images"] == 4
    assert report["examples"] == 5 and report["negatives"] == 1
    assert report["duplicate_images"] == report["repeated_ids"] == 0
    assert report["skipped"] == {
        "empty_answer": 1,
        "missing_image": 1,
        "no_image_placeholder": 1,
        "no_qa_pair": 1,
        "turns_not_alternating": 1,
        "unreadable_image": 1,
    }
    assert report["skipped_ids"]["unreadable_image"] == ["bad-img"]
    assert report["skipped_ids"]["missing_image"] == ["no-bytes"]
    assert report["skipped_ids"]["no_image_placeholder"] == ["no-placeholder"]


def test_a_second_image_placeholder_and_an_empty_image_are_skipped(tmp_path: Path, monkeypatch) -> None:
    """A later human turn asking for a second image, and an image of 0×0 pixels, are skipped by reason.

    PIL refuses to open the 0×0 files it can identify (they count as unreadable_image); the guard is for a
    decoder that returns an empty image, faked here.
    """
    rows = [
        row(
            "two-images",
            png_bytes("red"),
            conv(("human", "<image>\nQ1?"), ("gpt", "A."), ("human", "<image>\nQ2?"), ("gpt", "B.")),
        ),
        row("empty", b"EMPTY", conv(("human", "<image>\nQ?"), ("gpt", "A."))),
        row("fine", png_bytes("blue"), conv(("human", "<image>\nQ?"), ("gpt", "A."))),
    ]
    real_open = lrv_open = Image.open

    def fake_open(fp, *args, **kwargs):
        if isinstance(fp, io.BytesIO) and fp.getvalue() == b"EMPTY":
            return Image.new("RGB", (0, 0))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", fake_open)
    examples, report = flatten_rows(rows, tmp_path / "images")
    monkeypatch.setattr(Image, "open", lrv_open)
    assert [e.id for e in examples] == ["fine-0"]
    assert report["skipped"] == {"empty_image": 1, "second_image_placeholder": 1}
    assert report["skipped_ids"] == {"empty_image": ["empty"], "second_image_placeholder": ["two-images"]}


def test_duplicate_images_and_ids_never_straddle_the_split(tmp_path: Path) -> None:
    """The same pixels under other ids (and other bytes), and a repeated id, are one image on one side."""
    rows = []
    for i in range(8):
        colour = f"#{(i * 30) % 256:02x}{(i * 70) % 256:02x}40"
        rows.append(row(f"img{i}", png_bytes(colour), conv(("human", "<image>\nQ?"), ("gpt", f"A{i}"))))
        # the same chart again under another id, encoded with another compression level: other bytes
        copy = png_bytes(colour, level=1)
        assert copy != rows[-1]["image"]["bytes"]
        rows.append(row(f"copy{i}", copy, conv(("human", "<image>\nQ again?"), ("gpt", f"B{i}"))))
    rows.append(row("img0", png_bytes("white"), conv(("human", "<image>\nQ?"), ("gpt", "C"))))  # repeated id
    examples, report = flatten_rows(rows, tmp_path / "images")
    assert report["images"] == 9 and report["conversations"] == 17
    assert report["duplicate_images"] == 8 and report["repeated_ids"] == 1
    assert len(list((tmp_path / "images").iterdir())) == 9  # each image written once
    by_conv = {e.conversation: e for e in examples}
    assert by_conv["img3"].image_id == by_conv["copy3"].image_id
    assert by_conv["img0_2"].image_id != by_conv["img0"].image_id
    for seed in range(5):
        train, test = split_by_image(examples, n_test_images=3, seed=seed)
        assert {e.image_id for e in train}.isdisjoint({e.image_id for e in test})
        assert len({e.image_id for e in test}) == 3
        test_conversations = {e.conversation for e in test}
        for i in range(8):
            assert (f"img{i}" in test_conversations) == (f"copy{i}" in test_conversations)


def test_conversation_turns_carry_their_history(tmp_path: Path) -> None:
    """A follow-up keeps the turns it follows; the conversation regroups into one training sequence."""
    rows = [
        row(
            "fu",
            png_bytes("red"),
            conv(
                ("human", "<image>\nWhat was the revenue in 2010?"),
                ("gpt", "The revenue in 2010 was 45 million."),
                ("human", "And in 2011?"),
                ("gpt", "It was 52 million."),
                ("human", "What about 2016?"),
                ("gpt", "The data for the revenue in 2016 is not available."),
            ),
        )
    ]
    examples, _ = flatten_rows(rows, tmp_path / "images")
    assert [e.turn for e in examples] == [0, 1, 2]
    assert examples[1].history == (("What was the revenue in 2010?", "The revenue in 2010 was 45 million."),)
    assert examples[2].history == (*examples[1].history, ("And in 2011?", "It was 52 million."))
    assert [e.negative for e in examples] == [False, False, True]
    assert "revenue in 2010" in examples[1].context_question() and examples[1].context_question().endswith(
        "And in 2011?"
    )
    (c,) = group_conversations(examples)
    assert c.id == "fu" and c.turns == (*examples[2].history, (examples[2].question, examples[2].answer))


def test_skipped_ids_capped_at_20(tmp_path: Path) -> None:
    rows = [
        row(f"r{i}", png_bytes("red"), conv(("human", "no placeholder"), ("gpt", "x"))) for i in range(25)
    ]
    _, report = flatten_rows(rows, tmp_path / "images")
    assert report["skipped"] == {"no_image_placeholder": 25}
    assert report["skipped_ids"]["no_image_placeholder"] == [f"r{i}" for i in range(20)]


def test_multi_turn_row_stays_on_one_side_of_split(tmp_path: Path) -> None:
    rows = [
        row(
            f"img{i}",
            png_bytes(f"#{i * 20:02x}0000"),
            conv(("human", "<image>\nQ1?"), ("gpt", f"A{i}"), ("human", "Q2?"), ("gpt", f"B{i}")),
        )
        for i in range(10)
    ]
    examples, _ = flatten_rows(rows, tmp_path / "images")
    assert len(examples) == 20
    assert examples[0].image_id == examples[1].image_id
    assert examples[0].image == examples[1].image
    for seed in range(5):
        train, test = split_by_image(examples, n_test_images=3, seed=seed)
        assert len(test) == 6 and len(train) == 14
        assert not {e.image_id for e in train} & {e.image_id for e in test}
        for part in (train, test):
            ids = [e.image_id for e in part]
            assert all(ids.count(i) == 2 for i in ids)


def test_folder_of_shards_is_read_in_sorted_order(tmp_path: Path) -> None:
    rows = good_rows()
    folder = tmp_path / "shards"
    folder.mkdir()
    write_parquet(folder / "train-00001-of-00002.parquet", rows[2:])
    write_parquet(folder / "train-00000-of-00002.parquet", rows[:2])
    (folder / "README.md").write_text("not parquet")
    read = list(load_lrv_rows(str(folder), "unused/hub", "lrv_chart", "", "train"))
    assert [r["id"] for r in read] == [r["id"] for r in rows]
    examples, report = flatten_rows(read, tmp_path / "images")
    assert report["rows_kept"] == 4 and report["skipped"] == {}
    assert len(examples) == 5


def test_missing_local_source_and_bad_schema(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        list(load_lrv_rows(str(tmp_path / "nope.parquet"), "h", "lrv_chart", "", "train"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no \\*.parquet"):
        list(load_lrv_rows(str(empty), "h", "lrv_chart", "", "train"))
    pq.write_table(pa.table({"id": ["a"], "text": ["b"]}), tmp_path / "wrong.parquet")
    with pytest.raises(ValueError, match="missing columns"):
        list(load_lrv_rows(str(tmp_path / "wrong.parquet"), "h", "lrv_chart", "", "train"))


def _damaged(kind: str, good: bytes) -> bytes:
    """A parquet file's bytes spoilt as downloads and copies spoil them."""
    footer = 8 + int.from_bytes(good[-8:-4], "little")  # thrift footer, its length, b"PAR1"
    return {
        "empty": b"",
        "truncated": good[: len(good) // 2],
        "not parquet": b"id,image,conversations\nchart/001,,\n",
        "pages zeroed": good[:4] + bytes(len(good) - 4 - footer) + good[-footer:],  # footer intact
    }[kind]


@pytest.mark.parametrize("kind", ["empty", "truncated", "not parquet", "pages zeroed"])
def test_an_unreadable_parquet_shard_is_named(tmp_path: Path, kind: str) -> None:
    folder = tmp_path / "shards"
    folder.mkdir()
    good = write_parquet(folder / "train-00000-of-00002.parquet", good_rows()).read_bytes()
    bad = folder / "train-00001-of-00002.parquet"
    bad.write_bytes(_damaged(kind, good))
    rows = load_lrv_rows(str(folder), "h", "lrv_chart", "", "train")
    with pytest.raises(ValueError, match=rf"{re.escape(str(bad))}: .*parquet") as raised:
        list(rows)
    assert "empty (0 bytes)" in str(raised.value) if kind == "empty" else "truncated" in str(raised.value)


def test_hub_download_only_fetches_the_config_parquet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    snapshot = tmp_path / "snapshot"
    (snapshot / "lrv_chart").mkdir(parents=True)
    write_parquet(snapshot / "lrv_chart" / "train-00000-of-00001.parquet", good_rows())
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    rows = list(load_lrv_rows(None, "lmms-lab/LLaVA-OneVision-Data", "lrv_chart", "abc123", "train"))
    assert len(rows) == 4
    ((repo_id, kwargs),) = calls
    assert repo_id == "lmms-lab/LLaVA-OneVision-Data"
    assert kwargs["repo_type"] == "dataset" and kwargs["revision"] == "abc123"
    assert all(p.startswith("lrv_chart/") and p.endswith(".parquet") for p in kwargs["allow_patterns"])

    with pytest.raises(ValueError, match="pinned revision"):
        list(load_lrv_rows(None, "lmms-lab/LLaVA-OneVision-Data", "lrv_chart", "", "train"))


def test_check_bad_fraction(tmp_path: Path) -> None:
    _, report = flatten_rows(good_rows() + bad_rows(), tmp_path / "images")
    check_bad_fraction(report, max_bad_fraction=0.6)  # 6/10 skipped: allowed
    with pytest.raises(ValueError) as err:
        check_bad_fraction(report, max_bad_fraction=0.5)
    msg = str(err.value)
    assert "6 of 10 rows" in msg
    assert "prepare.max_bad_fraction=0.5" in msg
    assert "unreadable_image=1" in msg and "empty_answer=1" in msg
    assert "bad-img" in msg
    assert "Check the source" in msg
    with pytest.raises(ValueError, match="no rows"):
        check_bad_fraction({"rows_read": 0, "skipped": {}}, 0.1)


def test_short_answer_rule() -> None:
    assert lrv.short_answer_of("Yes.") == ("yes", AnswerType.YES_NO)
    assert lrv.short_answer_of(" 12.5% ") == ("12.5", AnswerType.NUMBER)
    assert lrv.short_answer_of("one two three.") == ("one two three", AnswerType.TEXT)
    assert lrv.short_answer_of("one two three four") == (None, AnswerType.TEXT)


def test_more_test_images_than_the_parquet_has_names_the_key_and_the_largest_that_works(
    tmp_path: Path,
) -> None:
    """prepare.lrv.test_images: 200 (the study's split) on a parquet of 40 charts: fails before writing."""
    from posttrain.core.config import parse_params
    from posttrain.core.errors import DataError
    from posttrain.data.prepare import prepare_data

    rows = [
        row(
            f"c{i}",
            png_bytes((i, 0, 0)),
            conv(("human", "<image>\nWhat is the value of A?"), ("gpt", f"{i}.")),
        )
        for i in range(40)
    ]
    src = write_parquet(tmp_path / "lrv.parquet", rows)
    params = parse_params(
        {
            "base": {"model": "hub", "hub_id": str(tmp_path)},
            "prepare": {"source": "lrv_chart", "lrv": {"local_parquet": str(src), "test_images": 200}},
        }
    ).prepare
    with pytest.raises(DataError) as e:
        prepare_data(params, tmp_path / "prepared")
    assert str(e.value) == (
        "prepare.lrv.test_images: 200, but the data has 40 distinct images and at least one must be left to "
        "train on; set prepare.lrv.test_images to at most 39"
    )
    assert not (tmp_path / "prepared").exists()
