import pytest

from posttrain.core.config import CriticParams, Judge, PairKeep, PreferencesParams
from posttrain.data.examples import AnswerType, Example, load_split
from posttrain.train.preferences import (
    VERDICTS,
    Candidate,
    NoPairsError,
    build_pairs,
    make_preferences,
    reference_verdict,
    self_verdicts,
)


def _ex(i=0):
    return Example(
        id=f"x-{i}",
        image="images/x.png",
        image_id="x",
        conversation=f"x{i}",
        turn=0,
        question="What is the value of the red bar?",
        answer="The red bar has a value of 7.",
        short_answer="7",
        answer_type=AnswerType.NUMBER,
        chart_type="bar",
        family="bar_value",
        negative=False,
        elements=("red",),
    )


def test_reference_verdict_prefers_correct_then_closer():
    e = _ex()
    assert reference_verdict(e, "The red bar has a value of 7.", "The red bar has a value of 3.") == "first"
    assert reference_verdict(e, "It is 3.", "The red bar has a value of 7.") == "second"
    # both wrong: the one closer to the reference sentence wins
    assert reference_verdict(e, "The red bar has a value of 5.", "5") == "first"
    assert reference_verdict(e, "same", "same") == "tie"


def test_build_pairs_by_hand():
    """4 candidates: one identical pair (dropped, never judged), one inconsistent ('first' in both orders:
    position bias), one tie, one consistent win for b.
    judged = 3, consistent = 2 (tie + win) -> 66.67%, ties 1/3, kept 1; reference agrees (b is correct)."""
    e = _ex()
    cands = [
        Candidate(e, "same answer", "same answer"),
        Candidate(e, "The red bar has a value of 1.", "The red bar has a value of 2."),
        Candidate(e, "The red bar has a value of 3.", "The red bar has a value of 4."),
        Candidate(e, "The red bar has a value of 9.", "The red bar has a value of 7."),
    ]
    verdicts = [("first", "second"), ("first", "first"), ("tie", "tie"), ("second", "first")]
    pairs, stats = build_pairs(cands, verdicts)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [(cands[3].b, cands[3].a)]
    assert stats == {
        "prompts": 4,
        "identical_rate": 25.0,
        "judged_pairs": 3,
        "order_consistency_rate": 66.6667,
        "tie_rate": 33.3333,
        "pairs_kept": 1,
        "reference_agreement": 100.0,
        "reference_decisive_rate": 100.0,
        "dropped_by_keep": 0,
        "dropped_truncated": 0,
    }


def test_a_pair_with_a_side_cut_at_max_new_tokens_is_never_kept():
    """DPO appends an EOS to each completion: a sample cut at max_new_tokens would teach the model to end on
    cut-off text. Such candidates are counted and never judged into a pair, whichever side won."""
    e = _ex()  # the red bar is 7
    right, wrong = "The red bar has a value of 7.", "The red bar has a value of 3."
    cands = [Candidate(e, right, wrong), Candidate(e, right, "The red bar has a", truncated=True)]
    verdicts = [("first", "second"), ("first", "second")]
    pairs, stats = build_pairs(cands, verdicts)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [(right, wrong)]
    assert stats["dropped_truncated"] == 1 and stats["judged_pairs"] == 1 and stats["prompts"] == 2


def test_keep_correctness_keeps_only_correct_over_wrong_pairs():
    """keep: correctness drops the decisive pairs that ROUGE-L alone decided (both wrong, or both right), and
    counts them; keep: decisive keeps every decisive pair, as the seed study does."""
    e = _ex()  # the red bar is 7
    right, wrong = "The red bar has a value of 7.", "The red bar has a value of 3."
    cands = [
        Candidate(e, wrong, right),  # b is correct, a is not: a real margin
        Candidate(e, "The red bar has a value of 5.", "5"),  # both wrong, a closer by ROUGE-L
        Candidate(e, right, "The red bar is 7."),  # both right, a closer by ROUGE-L
        Candidate(e, right, wrong),  # a correct over wrong
    ]
    verdicts = [(reference_verdict(e, c.a, c.b), reference_verdict(e, c.b, c.a)) for c in cands]
    verdicts = [(ab, {"first": "second", "second": "first", "tie": "tie"}[ab]) for ab, _ in verdicts]
    decisive, stats = build_pairs(cands, verdicts)
    assert len(decisive) == 4 and stats["dropped_by_keep"] == 0
    kept, stats = build_pairs(cands, verdicts, keep=PairKeep.CORRECTNESS)
    assert [(p["chosen"], p["rejected"]) for p in kept] == [(right, wrong), (right, wrong)]
    assert stats["pairs_kept"] == 2 and stats["dropped_by_keep"] == 2
    assert stats["reference_agreement"] == 100.0


def test_keep_correctness_needs_the_reference_judge():
    from posttrain.core.config import ParamsError, parse_params

    with pytest.raises(ParamsError, match=r"preferences\.keep: 'correctness'.*judge: self"):
        parse_params({"preferences": {"judge": "self", "keep": "correctness"}})
    assert parse_params({"preferences": {"keep": "correctness"}}).preferences.keep.value == "correctness"


def test_self_judge_returns_a_verdict_per_order(tiny, prepared):
    from posttrain.models.images import load_pixels
    from posttrain.models.loading import image_token_count

    model, processor = tiny
    examples = load_split(prepared, "study_train")[:3]
    pix = load_pixels(processor, prepared, [e.image for e in examples])
    cands = [Candidate(e, e.answer, "wrong") for e in examples]
    out = self_verdicts(
        model,
        processor.tokenizer,
        [pix[e.image] for e in examples],
        cands,
        image_token_count(processor),
        batch_size=4,
    )
    assert len(out) == 3 and all(v in VERDICTS for pair in out for v in pair)


def test_continuation_nll_equals_scoring_each_whole_sequence(tiny, prepared):
    """The self-judge's prompt-once scoring gives what teacher-forcing every prompt + sentence gives:
    prompts of different lengths (left padding), two batches, each sentence's tokens and EOS. Comparing the
    verdict *chosen* would hide a wrong sum that keeps the order; the sums themselves must agree."""
    from posttrain.evaluate.critic import PAIRWISE
    from posttrain.evaluate.generation import answer_nll, continuation_nll
    from posttrain.models.images import load_pixels
    from posttrain.models.loading import image_token_count
    from posttrain.models.template import encode_conversation, encode_prompt
    from posttrain.train.preferences import verdict_continuations

    model, processor = tiny
    tok, n_img = processor.tokenizer, image_token_count(processor)
    examples = load_split(prepared, "study_train")[:5]
    pix = load_pixels(processor, prepared, [e.image for e in examples])
    pixels = [pix[e.image] for e in examples]
    texts = [
        PAIRWISE.format(question=e.context_question(), r1=e.answer, r2="no" * i)
        for i, e in enumerate(examples)
    ]
    prompts = [encode_prompt(tok, (), t, n_img) for t in texts]
    assert len({len(p) for p in prompts}) == 5  # every row padded differently
    conts = verdict_continuations(tok, n_img)
    got = continuation_nll(model, tok, pixels, prompts, conts, batch_size=3)
    sequences, seq_pixels = [], []
    for t, p in zip(texts, pixels):
        for sentence in VERDICTS.values():
            sequences.append(encode_conversation(tok, (), t, sentence, n_img))
            seq_pixels.append(p)
    want, counts = answer_nll(model, tok, seq_pixels, sequences, batch_size=4)
    assert counts == [len(c) for c in conts] * 5
    flat = [x for row in got for x in row]
    assert flat == pytest.approx(want, rel=1e-4, abs=1e-4)
    assert len({round(x, 3) for x in flat}) > 5  # distinct sums: the check can tell rows apart


@pytest.mark.parametrize("judge", [Judge.REFERENCE, Judge.SELF])
def test_make_preferences_end_to_end(tiny, prepared, judge):
    model, processor = tiny
    examples = load_split(prepared, "study_train")[:12]
    params = PreferencesParams(
        judge=judge, keep=PairKeep.DECISIVE, temperature=1.5, max_new_tokens=24, batch_size=8, min_pairs=1
    )
    try:
        pairs, stats = make_preferences(model, processor, examples, prepared, params, CriticParams())
    except NoPairsError as e:  # a random model may produce no decisive pair; the error must carry the counts
        assert "prompts" in str(e) and "preferences.min_pairs" in str(e)
        return
    assert stats["prompts"] == 12 and stats["pairs_kept"] == len(pairs) >= 1
    for p in pairs:
        assert p["chosen"].strip() != p["rejected"].strip()
        assert {"image", "prompt", "chosen", "rejected"} <= set(p)


def test_no_surviving_pair_is_a_clear_error(tiny, prepared):
    model, processor = tiny
    examples = load_split(prepared, "study_train")[:4]
    params = PreferencesParams(
        judge=Judge.REFERENCE, temperature=0.01, top_p=0.01, max_new_tokens=6, batch_size=4, min_pairs=50
    )
    with pytest.raises(NoPairsError, match=r"only \d+ preference pairs survived.*4 prompts.*identical"):
        make_preferences(model, processor, examples, prepared, params, CriticParams())


EOS_BIAS = 3.0  # at temperature 1.5 the samples end after a few to over 24 tokens


def test_self_judge_builds_pairs_when_its_verdicts_are_consistent(tiny, prepared, monkeypatch):
    """The self-judge path end to end, with a judge that reads the pairwise prompt: it prefers the first
    response exactly when that one is the longer. Both orders then agree, so every pair of distinct samples
    of different length is kept, longer answer chosen, with its turn's history."""
    import copy

    import torch

    import posttrain.train.preferences as prefs

    model, processor = tiny
    tok = processor.tokenizer
    # a copy whose samples end (EOS) after different lengths, as a trained model's do: cut-off ones are never
    # pairs. A bias on the EOS logit of the randomly initialised head
    model = copy.deepcopy(model)
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[tok.eos_token_id] = EOS_BIAS
    model.lm_head = head

    def judge_by_length(model_, tokenizer, pixels, prompts, continuations, *, batch_size):
        assert len(pixels) == len(prompts) and len(continuations) == len(prefs.VERDICTS)
        sentences = [tok.decode(c, skip_special_tokens=True).strip() for c in continuations]
        nll = []
        for ids in prompts:
            text = tok.decode(ids, skip_special_tokens=True)
            first = text.split("The first response: [", 1)[1].split("]\nThe second response: [", 1)
            second = first[1].split("]\nASSISTANT:", 1)[0]
            want = (
                "first" if len(first[0]) > len(second) else "second" if len(second) > len(first[0]) else "tie"
            )
            nll.append([0.0 if s == prefs.VERDICTS[want] else 10.0 for s in sentences])
        return nll

    monkeypatch.setattr(prefs, "continuation_nll", judge_by_length)
    examples = [e for e in load_split(prepared, "study_train") if e.history][:8]
    params = PreferencesParams(
        judge=Judge.SELF,
        keep=PairKeep.DECISIVE,
        temperature=1.5,
        max_new_tokens=24,
        batch_size=8,
        min_pairs=1,
    )
    pairs, stats = make_preferences(model, processor, examples, prepared, params, CriticParams())
    assert stats["order_consistency_rate"] == 100.0 and stats["pairs_kept"] == len(pairs) >= 1
    by_id = {e.id: e for e in examples}
    for p in pairs:
        assert len(p["chosen"]) > len(p["rejected"])
        assert p["history"] == [list(t) for t in by_id[p["id"]].history] and p["history"]
