"""Generation: the prompt computed once for several samples, static and dynamic caches, same answers as
transformers' own `generate`."""

import copy

import pytest
import torch

from posttrain.data import load_split
from posttrain.generation import generate
from posttrain.images import load_pixels
from posttrain.models import image_token_count
from posttrain.template import encode_prompt, pad_batch


@pytest.fixture(scope="module")
def prompts(tiny, prepared):
    """Twelve test turns after their histories: prompts of several lengths, so batches are left-padded."""
    _, processor = tiny
    examples = load_split(prepared, "study_test")[:12]
    n = image_token_count(processor)
    ids = [encode_prompt(processor.tokenizer, e.history, e.question, n) for e in examples]
    assert len({len(p) for p in ids}) > 1, "the check needs prompts of different lengths"
    pixel_map = load_pixels(processor, prepared, [e.image for e in examples])
    return ids, [pixel_map[e.image] for e in examples]


@pytest.fixture(scope="module")
def model(tiny):
    """The tiny LLaVA with large random weights (freshly initialised it answers every prompt alike, which
    would hide a sample answering another prompt)."""
    m = copy.deepcopy(tiny[0])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return m.eval()


def hf_new_tokens(model, tokenizer, pixels, prompts, batch_size, max_new_tokens) -> list[torch.Tensor]:
    """The plain path: transformers' `generate` on the whole prompt, dynamic cache; each row's new tokens."""
    out = []
    for s in range(0, len(prompts), batch_size):
        batch = prompts[s : s + batch_size]
        ids = pad_batch(batch, tokenizer.pad_token_id, "left")
        mask = pad_batch([[1] * len(p) for p in batch], 0, "left")
        new = model.generate(
            input_ids=ids,
            attention_mask=mask,
            pixel_values=torch.stack(pixels[s : s + batch_size]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )[:, ids.shape[1] :]
        out += list(new)
    return out


def hf_generate(model, tokenizer, pixels, prompts, batch_size, max_new_tokens):
    new = hf_new_tokens(model, tokenizer, pixels, prompts, batch_size, max_new_tokens)
    return [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]


def test_greedy_answers_equal_transformers_generate_with_either_cache(model, tiny, prompts):
    processor = tiny[1]
    ids, pixels = prompts
    expected = hf_generate(model, processor.tokenizer, pixels, ids, 5, 12)
    for cache in ("static", "dynamic"):
        got = generate(model, processor.tokenizer, pixels, ids, batch_size=5, max_new_tokens=12, cache=cache)
        assert got == expected, cache


def test_samples_share_one_prompt_computation_and_keep_their_prompt(model, tiny, prompts):
    """Greedy, every sample of a prompt is that prompt's single answer: the repeated cache rows belong to the
    right prompt, with left padding counted as `generate` counts it."""
    processor = tiny[1]
    ids, pixels = prompts
    single = generate(model, processor.tokenizer, pixels, ids, batch_size=5, max_new_tokens=12)
    pairs = generate(model, processor.tokenizer, pixels, ids, batch_size=5, max_new_tokens=12, samples=2)
    assert len(pairs) == len(ids) and all(len(p) == 2 for p in pairs)
    assert [p[0] for p in pairs] == single and [p[1] for p in pairs] == single
    assert len(set(single)) > 1, "the check can fail only if prompts get different answers"


def test_sampled_pairs_are_seeded_and_differ_within_a_pair(model, tiny, prompts):
    processor = tiny[1]
    ids, pixels = prompts
    kwargs = dict(batch_size=6, max_new_tokens=12, do_sample=True, temperature=1.0, top_p=1.0, samples=2)
    first = generate(model, processor.tokenizer, pixels, ids, seed=3, **kwargs)
    again = generate(model, processor.tokenizer, pixels, ids, seed=3, **kwargs)
    other = generate(model, processor.tokenizer, pixels, ids, seed=4, **kwargs)
    assert first == again
    assert first != other
    assert sum(a != b for a, b in first) > len(ids) // 2, "the two samples of a prompt must be drawn apart"


def test_throughput_counts_answer_tokens_and_every_decoded_row_position(tiny, prompts, monkeypatch):
    """`throughput` gives two counts: the tokens of each answer up to its EOS, and the positions the batch
    decoded for every row (a row that ended waits for the batch's longest): the cost a projection of answers
    of max_new_tokens needs."""
    from posttrain import generation

    tok = tiny[1].tokenizer
    ids, pixels = prompts
    eos, pad, word = tok.eos_token_id, tok.pad_token_id, 5
    decoded = {  # batch size -> what the model decoded: one row ends after 2 tokens, one runs all 4
        2: torch.tensor([[word, eos, pad, pad], [word, word, word, word]]),
        1: torch.tensor([[word, word, eos]]),
    }
    monkeypatch.setattr(generation, "_generate_batch", lambda m, input_ids, *a, **k: decoded[len(input_ids)])
    generation._TOTALS.clear()
    generate(tiny[0], tok, pixels[:3], ids[:3], batch_size=2, max_new_tokens=4)
    counts = generation.throughput()["generate"]
    assert counts["new_tokens"] == 2 + 4 + 3 and counts["computed_tokens"] == 8 + 3
    assert counts["computed_tokens_per_s"] > counts["new_tokens_per_s"] > 0


def test_with_ends_marks_the_answers_cut_at_max_new_tokens(model, tiny, prompts):
    """An answer ended iff transformers' own `generate` emits an EOS for it within max_new_tokens. The random
    model's EOS row is pushed up so that some answers end and others run to the limit; texts are those
    without `with_ends`."""
    tok = tiny[1].tokenizer
    ids, pixels = prompts
    m = copy.deepcopy(model)
    with torch.no_grad():
        m.lm_head.weight[tok.eos_token_id] *= EOS_BOOST
    limit = 12
    plain = generate(m, tok, pixels, ids, batch_size=5, max_new_tokens=limit)
    marked = generate(m, tok, pixels, ids, batch_size=5, max_new_tokens=limit, with_ends=True)
    assert [t for t, _ in marked] == plain
    new = hf_new_tokens(m, tok, pixels, ids, 5, limit)
    expected = [bool((row == tok.eos_token_id).any()) for row in new]
    assert [e for _, e in marked] == expected
    assert True in expected and False in expected, "the check needs answers of both kinds"
    pairs = generate(m, tok, pixels, ids, batch_size=5, max_new_tokens=limit, samples=2, with_ends=True)
    assert [p[0][1] for p in pairs] == expected and [p[1][1] for p in pairs] == expected


EOS_BOOST = 2.0  # some of the twelve answers end within 12 tokens, some do not
