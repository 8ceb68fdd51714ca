"""Generation: the prompt computed once for several samples, static and dynamic caches, same answers as
transformers' own `generate`."""

import copy

import pytest
import torch

from posttrain.data.examples import load_split
from posttrain.evaluate.generation import generate
from posttrain.models.images import load_pixels
from posttrain.models.loading import image_token_count
from posttrain.models.template import encode_prompt, pad_batch


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
    from posttrain.evaluate import generation

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


def test_a_sampled_answer_is_the_same_at_any_batch_size(model, tiny, prompts):
    """Sampling is seeded per (prompt, sample), not per batch: batches of 12, 5 and 1 prompts (other left
    padding, other neighbours) give the same answers, and a prompt's first sample is the same whether one or
    two are drawn. The old per-batch seed gave other answers at another batch size."""
    tok = tiny[1].tokenizer
    ids, pixels = prompts
    kwargs = dict(max_new_tokens=10, do_sample=True, temperature=1.0, top_p=0.95, seed=7, samples=2)
    by_size = {b: generate(model, tok, pixels, ids, batch_size=b, **kwargs) for b in (12, 5, 1)}
    assert by_size[12] == by_size[5] == by_size[1]
    single = generate(model, tok, pixels, ids, batch_size=4, **{**kwargs, "samples": 1})
    assert single == [pair[0] for pair in by_size[12]]


def test_seeded_sampling_draws_from_the_warped_distribution():
    """The Gumbel-max pick of `SeededSampling` over 40,000 rows (one key each) matches softmax(scores / T)
    within 0.01 per token, and never draws a token that top-p or top-k removed."""
    from posttrain.evaluate.generation import SeededSampling, row_keys

    scores = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -6.0]])
    rows = 40_000
    keys = row_keys(3, list(range(rows)), 1)
    ids = torch.zeros(rows, 4, dtype=torch.long)  # a prompt of 4 tokens: step 0

    def frequencies(**warp):
        picked = SeededSampling(keys, 4, **warp)(ids, scores.expand(rows, -1).clone()).argmax(1)
        return torch.bincount(picked, minlength=scores.shape[1]).float() / rows

    p = torch.softmax(scores[0] / 0.7, 0)
    assert torch.allclose(frequencies(temperature=0.7, top_p=1.0, top_k=0), p, atol=0.01)
    # p = 0.56, 0.21, 0.13, 0.08, ...: the nucleus of 0.8 is the first three (transformers drops the tail
    # whose mass is at most 1 - top_p: 0.08 + 0.03 + 0.0002)
    nucleus = frequencies(temperature=1.0, top_p=0.8, top_k=0)
    assert nucleus[3:].sum() == 0
    assert torch.allclose(nucleus[:3], torch.softmax(scores[0, :3], 0), atol=0.01)
    top2 = frequencies(temperature=1.0, top_p=1.0, top_k=2)
    kept = torch.softmax(scores[0, :2], 0)
    assert top2[2:].sum() == 0 and torch.allclose(top2[:2], kept, atol=0.01)


def test_noise_is_a_function_of_the_key_step_and_token_only():
    """The same key gives the same noise at a step wherever its row sits; other steps and keys differ."""
    from posttrain.evaluate.generation import gumbel_noise, row_keys

    keys = row_keys(0, [0, 1, 2, 3], 2)
    assert len(set(keys.tolist())) == 8, "every (prompt, sample) row has its own key"
    noise = gumbel_noise(keys, 5, 50)
    assert torch.equal(gumbel_noise(keys[[6, 1]], 5, 50), noise[[6, 1]])
    assert not torch.equal(gumbel_noise(keys, 6, 50), noise)
    assert torch.equal(row_keys(0, [2], 2), keys[4:6])  # prompt 2 alone keys its rows as in the batch
    assert not torch.equal(row_keys(1, [2], 2), keys[4:6])  # another seed


def test_out_of_memory_halves_the_batch_and_keeps_the_answers(model, tiny, prompts, monkeypatch, capsys):
    """A fake CUDA out-of-memory above 3 prompts a batch: the batch of 12 is decoded again as 6, then 3 (the
    size printed), with the answers of a direct run at batch 3; at one prompt it is an error that says so."""
    from posttrain.evaluate import generation

    tok = tiny[1].tokenizer
    ids, pixels = prompts
    kwargs = dict(max_new_tokens=8, do_sample=True, temperature=1.0, top_p=1.0, seed=1, samples=2)
    direct = generate(model, tok, pixels, ids, batch_size=3, **kwargs)
    real = generation._generate_batch
    tried = []

    def limited(m, input_ids, *a, **k):
        tried.append(len(input_ids))
        if len(input_ids) > 3:
            raise torch.OutOfMemoryError("CUDA out of memory (fake)")
        return real(m, input_ids, *a, **k)

    monkeypatch.setattr(generation, "_generate_batch", limited)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    assert generate(model, tok, pixels, ids, batch_size=12, progress="samples", **kwargs) == direct
    assert tried == [12, 6, 3, 3, 3, 3]
    assert "out of GPU memory at 12 prompts × 2 sample(s); going on at 6" in capsys.readouterr().out
    monkeypatch.setattr(
        generation, "_generate_batch", lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError())
    )
    with pytest.raises(generation.GenerationMemoryError, match="not even one prompt"):
        generate(model, tok, pixels, ids[:2], batch_size=2, **kwargs)
