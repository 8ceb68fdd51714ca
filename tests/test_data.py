import json
import random

import pytest
from PIL import Image

from posttrain.core.config import load_params
from posttrain.data.charts import (
    CAPTION_FAMILY,
    COLORS,
    POOL_FAMILIES,
    PRESENCE_FAMILY,
    Chart,
    _describe,
    draw_chart,
    generate_pool,
    random_chart,
)
from posttrain.data.examples import (
    SPLITS,
    AnswerType,
    Example,
    group_conversations,
    image_hash,
    load_split,
    read_examples,
    split_by_image,
    write_examples,
)
from posttrain.data.prepare import prepare_data


def test_generation_is_deterministic_by_seed(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir(), (tmp_path / "c").mkdir()
    a = generate_pool("study", 12, 84, 3, 0.3, seed=1, image_dir=tmp_path / "a")
    b = generate_pool("study", 12, 84, 3, 0.3, seed=1, image_dir=tmp_path / "b")
    c = generate_pool("study", 12, 84, 3, 0.3, seed=2, image_dir=tmp_path / "c")
    assert a == b and a != c
    image = a[3].image
    assert (tmp_path / "a" / image[7:]).read_bytes() == (tmp_path / "b" / image[7:]).read_bytes()


def test_pools_ask_disjoint_families(tmp_path):
    pre = generate_pool("pretrain", 30, 84, 3, 0.3, 0, tmp_path)
    study = generate_pool("study", 30, 84, 3, 0.3, 0, tmp_path)
    assert {e.family for e in pre}.isdisjoint({e.family for e in study})
    assert {e.chart_type for e in pre} == {e.chart_type for e in study} == {"bar", "line", "pie"}
    for pool in POOL_FAMILIES.values():
        assert set(pool) == {"bar", "line", "pie"}


def test_presence_asks_about_present_and_absent_colours_of_pretrain_charts_only(tmp_path):
    """prepare.synthetic.presence: "Is there a <colour> bar/line/slice in the chart?" on every pretrain chart
    type, yes when the colour is drawn and no when it is not, in about equal shares; the "no" answer is an
    answer, not a decline. The study pool is untouched, and off (the default) the pretrain pool is too."""
    from posttrain.data.declines import is_decline

    for d in "abcd":
        (tmp_path / d).mkdir()
    plain = generate_pool("pretrain", 90, 84, 3, 0.3, 0, tmp_path / "a", 0.5)
    assert PRESENCE_FAMILY not in {e.family for e in plain}
    pre = generate_pool("pretrain", 90, 84, 3, 0.3, 0, tmp_path / "b", 0.5, presence=True)
    asked = [e for e in pre if e.family == PRESENCE_FAMILY]
    assert {e.chart_type for e in asked} == {"bar", "line", "pie"}
    element = {"bar": "bar", "line": "line", "pie": "slice"}
    for e in asked:
        colour = e.question.split()[3]
        assert e.question == f"Is there a {colour} {element[e.chart_type]} in the chart?"
        assert e.short_answer == ("yes" if colour in e.elements else "no"), e
        assert e.answer.startswith(("Yes, the chart has a", "No, the chart has no")) and colour in e.answer
        assert e.answer_type is AnswerType.YES_NO and not e.negative and not is_decline(e.answer)
    yes = sum(e.short_answer == "yes" for e in asked)
    assert 0.3 < yes / len(asked) < 0.7
    study = generate_pool("study", 30, 84, 3, 0.3, 0, tmp_path / "c", 0.5, presence=True)
    assert study == generate_pool("study", 30, 84, 3, 0.3, 0, tmp_path / "d", 0.5)


def test_captions_describe_every_element_of_pretrain_charts_only(tmp_path):
    """prepare.synthetic.captions: each pretrain chart type also gets "Describe the chart.", whose answer
    names every colour in drawing order (bars with their values, the line with its direction and ends);
    the study pool is untouched, and off (the default) the pretrain pool is too."""
    for d in "abcd":
        (tmp_path / d).mkdir()
    plain = generate_pool("pretrain", 60, 84, 3, 0.3, 0, tmp_path / "a", 0.5)
    assert CAPTION_FAMILY not in {e.family for e in plain}
    pre = generate_pool("pretrain", 60, 84, 3, 0.3, 0, tmp_path / "b", 0.5, captions=True)
    captions = [e for e in pre if e.family == CAPTION_FAMILY]
    assert {e.chart_type for e in captions} == {"bar", "line", "pie"}
    for e in captions:
        assert e.question == "Describe the chart." and e.short_answer is None and not e.negative
        assert e.answer_type is AnswerType.TEXT
        named = [w.strip(",.") for w in e.answer.split() if w.strip(",.") in COLORS]
        assert tuple(named) == e.elements, e.answer
    bars = [e for e in captions if e.chart_type == "bar"]
    chart = random_chart(random.Random(0), "bar")
    assert (
        _describe(chart)
        == f"A bar chart with {len(chart.values)} bars: "
        + ", ".join(f"{c} {v}" for c, v in zip(chart.colors, chart.values))
        + "."
    )
    assert bars and all(f"{len(e.elements)} bars:" in e.answer for e in bars)
    line = _describe(Chart("line", ("orange",), (2, 3, 5, 6, 8)))
    assert line == "An orange line going up from 2 to 8."
    assert _describe(Chart("line", ("red",), (8, 6, 5, 3, 1))) == "A red line going down from 8 to 1."
    study = generate_pool("study", 30, 84, 3, 0.3, 0, tmp_path / "c", 0.5, captions=True)
    assert study == generate_pool("study", 30, 84, 3, 0.3, 0, tmp_path / "d", 0.5)


def test_answers_match_the_drawn_ground_truth(tmp_path):
    examples = generate_pool("study", 60, 84, 3, 0.0, 0, tmp_path)
    for e in examples:
        assert e.short_answer is not None and not e.negative
        if e.answer_type is AnswerType.COLOR:
            assert e.short_answer in e.elements
        if e.family == "pie_count":
            assert e.short_answer == str(len(e.elements))
        assert e.short_answer.lower() in e.answer.lower()


def test_negative_questions_ask_about_absent_colours(tmp_path):
    examples = generate_pool("study", 90, 84, 3, 1.0, 0, tmp_path)
    negatives = [e for e in examples if e.negative]
    assert negatives, "negative_fraction=1 must produce negatives"
    for e in negatives:
        asked = [c for c in COLORS if c in e.question.split()]
        assert asked and asked[0] not in e.elements
        assert e.answer.startswith("There is no") and e.short_answer is None
        assert e.answer_type is AnswerType.DECLINE and e.family.endswith("_negative")


def test_charts_are_conversations_with_followups_that_need_the_previous_turn(tmp_path):
    examples = generate_pool("study", 90, 84, 3, 0.35, 0, tmp_path, followup_fraction=1.0)
    conversations = group_conversations(examples)
    assert len(conversations) == 90 and max(len(c.turns) for c in conversations) >= 3
    followups = [e for e in examples if e.question.startswith("And the ")]
    assert followups and any(e.negative for e in followups) and any(not e.negative for e in followups)
    for e in followups:
        previous_q, previous_a = e.history[-1]
        assert previous_q.startswith("What is the value of the ")  # bar_value in the study pool
        assert e.family in ("bar_value", "bar_value_negative")
        asked = e.question.split()[2]
        assert asked not in previous_q  # another bar than the one just asked about
        if e.negative:
            assert asked not in e.elements and e.answer == f"There is no {asked} bar in the chart."
        else:
            assert e.answer == f"The {asked} bar has a value of {e.short_answer}."
    for e in examples:  # ids, turns and histories fit their conversation
        assert e.id == f"{e.conversation}-{e.turn}" and len(e.history) == e.turn
    pretrain = generate_pool("pretrain", 60, 84, 3, 0.0, 0, tmp_path, followup_fraction=1.0)
    compare = [e for e in pretrain if e.question.startswith("And the ")]
    assert compare and all(e.family == "bar_compare" for e in compare)
    for e in compare:  # "And the green bar?" compares with the second bar of the previous question
        other = e.history[-1][0].rstrip("?").split()[-2]
        assert e.answer.endswith(f"than the {other} bar.")
    no_followups = generate_pool("study", 30, 84, 3, 0.35, 0, tmp_path, followup_fraction=0.0)
    assert not any(e.question.startswith("And the ") for e in no_followups)


def test_identical_charts_are_one_image(tmp_path):
    """Images are named by their pixels: two draws of one chart are one file and one image id."""
    chart = Chart("bar", ("red", "blue"), (3, 5))
    a, b = draw_chart(chart, 84), draw_chart(chart, 84)
    assert image_hash(a) == image_hash(b) != image_hash(draw_chart(Chart("bar", ("red", "blue"), (3, 6)), 84))
    assert image_hash(a) == image_hash(a.convert("RGBA"))
    examples = generate_pool("pretrain", 600, 84, 3, 0.3, 0, tmp_path)
    conversations = {e.conversation: e.image_id for e in examples}
    assert len(set(conversations.values())) < len(conversations), "small charts repeat in 600 draws"
    assert len(list(tmp_path.iterdir())) == len(set(conversations.values()))


def test_bar_heights_encode_values():
    """A taller value draws more coloured pixels in its column: the chart carries the answer."""
    chart = random_chart(random.Random(0), "bar")
    img = draw_chart(chart, 84).convert("RGB")
    counts = {c: sum(1 for px in img.getdata() if px == COLORS[c]) for c in chart.colors}
    order_by_pixels = sorted(chart.colors, key=counts.get)
    order_by_value = sorted(chart.colors, key=lambda c: chart.values[chart.colors.index(c)])
    assert order_by_pixels == order_by_value


def _ex(image_id, turn):
    return Example(
        id=f"{image_id}-{turn}",
        image=f"images/{image_id}.png",
        image_id=image_id,
        conversation=image_id,
        turn=turn,
        question="q?",
        answer="a.",
        short_answer="a",
        answer_type=AnswerType.TEXT,
        chart_type="bar",
        family="f",
        negative=False,
    )


def test_prepare_never_trains_on_a_test_chart(prepared):
    """The pools are drawn independently: a chart that comes up in both is never trained on if tested."""
    test = {e.image_id for split in ("pretrain_test", "study_test") for e in load_split(prepared, split)}
    for split in ("pretrain_train", "study_train"):
        assert test.isdisjoint(e.image_id for e in load_split(prepared, split))
    report = json.loads((prepared / "report.json").read_text())
    assert report["load"]["images"] <= report["load"]["conversations"]
    assert report["load"]["duplicate_images"] == report["load"]["conversations"] - report["load"]["images"]


def test_split_by_image_never_separates_turns():
    examples = [_ex(f"img{i}", t) for i in range(20) for t in range(3)]
    train, test = split_by_image(examples, 5, seed=0)
    assert len({e.image_id for e in test}) == 5 and len(test) == 15
    assert {e.image_id for e in train}.isdisjoint({e.image_id for e in test})
    assert split_by_image(examples, 5, seed=0) == (train, test)
    assert split_by_image(examples, 5, seed=1) != (train, test)
    with pytest.raises(
        ValueError, match="n_test_images: 20, but the data has 20 distinct images .* at most 19"
    ):
        split_by_image(examples, 20, seed=0)


def test_example_roundtrip_and_bad_row(tmp_path):
    ex = [_ex("a", 0), _ex("a", 1)]
    write_examples(tmp_path / "x.jsonl", ex)
    assert read_examples(tmp_path / "x.jsonl") == ex
    (tmp_path / "bad.jsonl").write_text(json.dumps({"id": "z"}) + "\n")
    with pytest.raises(ValueError, match="lacks fields"):
        read_examples(tmp_path / "bad.jsonl")
    with pytest.raises(FileNotFoundError, match="dvc repro prepare"):
        read_examples(tmp_path / "missing.jsonl")


def test_prepare_writes_every_split_and_report(prepared):
    report = json.loads((prepared / "report.json").read_text())
    for split in SPLITS:
        examples = load_split(prepared, split)
        assert report["splits"][split]["examples"] == len(examples) > 0
        for e in examples[:5]:
            assert Image.open(prepared / e.image).size == (84, 84)
    train_imgs = {e.image_id for e in load_split(prepared, "study_train")}
    assert train_imgs.isdisjoint({e.image_id for e in load_split(prepared, "study_test")})


def test_prepare_failure_leaves_no_half_written_folder(tmp_path, micro_params_file, monkeypatch):
    import posttrain.data.prepare as prep

    def boom(*a, **k):
        raise RuntimeError("disk full")

    out = tmp_path / "prepared"
    monkeypatch.setattr(prep, "write_json_atomic", boom)
    with pytest.raises(RuntimeError):
        prepare_data(load_params(micro_params_file).prepare, out)
    assert not out.exists() and list(tmp_path.iterdir()) == []
