"""Generation memory estimated before loading (posttrain.models.memory.estimate_generation) and the batch that
``batch_size: auto`` takes from it for the preferences and evaluate stages."""

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from posttrain.core.config import BatchSize, PreferencesParams
from posttrain.data.examples import load_split
from posttrain.models.architectures import load_config
from posttrain.models.memory import (
    GB,
    GenerationTooLargeError,
    InferenceEstimate,
    Phase,
    choose_generation_batch,
    estimate_generation,
    inference_weight_bytes,
    kv_bytes_per_token,
)


def test_the_kv_cache_term_is_the_cache_transformers_allocates(tiny, prepared, monkeypatch):
    """The static cache `_generate_batch` fills for 3 prompts × 2 samples, measured in bytes on the tiny model
    (fp32 here), equals rows · (prompt + new tokens) · `kv_bytes_per_token`; the estimate adds one layer."""
    from posttrain.evaluate import generation
    from posttrain.models.loading import image_token_count
    from posttrain.models.template import encode_prompt

    model, processor = tiny
    examples = load_split(prepared, "study_test")[:3]
    n = image_token_count(processor)
    prompts = [encode_prompt(processor.tokenizer, e.history, e.question, n) for e in examples]
    ids, mask = generation._left_padded(prompts, processor.tokenizer.pad_token_id, "cpu")
    pixels = torch.zeros(3, 3, 84, 84)
    seen = {}

    def capture(**kwargs):
        seen["kv"] = kwargs["past_key_values"]
        return kwargs["input_ids"]

    monkeypatch.setattr(model, "generate", capture)
    new = 7
    generation._generate_batch(
        model, ids, mask, pixels, samples=2, max_new_tokens=new, cache="static", generate_kwargs={}
    )
    allocated = sum(
        t.numel() * t.element_size() for layer in seen["kv"].layers for t in (layer.keys, layer.values)
    )
    config = model.config
    assert allocated == 6 * (ids.shape[1] + new) * kv_bytes_per_token(config, dtype_bytes=4)
    layers = config.text_config.num_hidden_layers
    estimate = estimate_generation(
        config, prompts=3, phase=Phase("sampling", 2, ids.shape[1], new), weights=0.0
    )
    assert estimate.cache == pytest.approx(allocated / 2 * (1 + 1 / layers))  # bf16 on a GPU: half of fp32


def test_the_prompt_writes_its_cache_once_into_the_static_one(tiny, prepared, monkeypatch):
    """Sampling 2 per prompt with the static cache holds one cache of the prompt, the static one: the prompt's
    forward pass writes each prompt's keys and values into its samples' rows, and no cache layer is filled
    with the prompt by copy (before: a B-row cache of the prompt, then a repeated copy of it per layer, whose
    freed blocks fragmented the GPU's memory: issue 33). Only the decoding steps update the static layers,
    one position at a time."""
    from transformers.cache_utils import DynamicLayer, StaticLayer

    from posttrain.evaluate import generation
    from posttrain.models.loading import image_token_count
    from posttrain.models.template import encode_prompt

    model, processor = tiny
    examples = load_split(prepared, "study_test")[:3]
    prompts = [
        encode_prompt(processor.tokenizer, e.history, e.question, image_token_count(processor))
        for e in examples
    ]
    ids, mask = generation._left_padded(prompts, processor.tokenizer.pad_token_id, "cpu")
    updates = []  # (layer class, positions) of every update that stores keys in a cache layer
    for cls in (DynamicLayer, StaticLayer):
        real = cls.update

        def spy(self, key_states, value_states, *a, _real=real, _cls=cls, **k):
            updates.append((_cls.__name__, key_states.shape[0], key_states.shape[-2]))
            return _real(self, key_states, value_states, *a, **k)

        monkeypatch.setattr(cls, "update", spy)
    tok = processor.tokenizer
    new = generation._generate_batch(
        model,
        ids,
        mask,
        torch.zeros(3, 3, 84, 84),
        samples=2,
        max_new_tokens=5,
        cache="static",
        generate_kwargs={
            "pad_token_id": tok.pad_token_id,
            "eos_token_id": tok.eos_token_id,
            "do_sample": False,
        },
    )
    layers = model.config.text_config.num_hidden_layers
    assert new.shape[0] == 6 and updates, "the batch decoded"
    assert {u for u in updates} == {("StaticLayer", 6, 1)}, "only decoding steps update a cache layer"
    assert len(updates) == layers * new.shape[1]  # one step a new token, the first one fed the prompt's last


def test_sampled_answers_are_the_same_with_either_cache(tiny, prepared):
    """The static cache's rows, written by the prompt's pass per sample, hold what the dynamic cache's
    repeated rows hold: seeded samples agree token for token."""
    from posttrain.evaluate.generation import generate
    from posttrain.models.loading import image_token_count
    from posttrain.models.template import encode_prompt

    model, processor = tiny
    examples = load_split(prepared, "study_test")[:5]
    prompts = [
        encode_prompt(processor.tokenizer, e.history, e.question, image_token_count(processor))
        for e in examples
    ]
    pixels = [torch.rand(3, 84, 84, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    kwargs = dict(batch_size=5, max_new_tokens=10, do_sample=True, seed=1, samples=2)
    static = generate(model, processor.tokenizer, pixels, prompts, cache="static", **kwargs)
    dynamic = generate(model, processor.tokenizer, pixels, prompts, cache="dynamic", **kwargs)
    assert static == dynamic
    assert sum(a != b for a, b in static) >= 2, "the two samples of a prompt differ"


def test_llava_7b_by_hand():
    """llava-1.5-7b: 512 KiB of bf16 KV cache a token (32 layers × 2 × 32 heads × 128); the bf16 weights are
    2 bytes of each of its 7,063,427,072 parameters (bench/results/h100.json's count)."""
    config = load_config("llava-1.5-7b")
    assert kv_bytes_per_token(config) == 2 * 32 * 32 * 128 * 2 == 524_288
    weights = inference_weight_bytes(config, adapter_bytes=0.5 * GB)
    assert weights == 2 * 7_063_427_072 + 0.5 * GB
    e = estimate_generation(config, prompts=64, phase=Phase("sampling", 2, 640, 128), weights=weights)
    assert e.cache == 128 * 768 * 524_288 * (1 + 1 / 32)  # 51.9 GB
    assert e.activations == 64 * 640 * 11008 * 12.0 + 128 * 32064 * 16.0
    scoring = estimate_generation(config, prompts=64, phase=Phase("scoring", 1, 700, 0, 80), weights=weights)
    assert scoring.activations == 64 * 700 * 11008 * 12.0 + 64 * 32064 * 16.0 + 64 * 80 * 32064 * 12.0
    assert e.total == e.weights + e.cache + e.activations + e.overhead


@pytest.fixture()
def linear_estimate(monkeypatch):
    """An estimate of 10 GB plus 1 GB a prompt per sample (a 40 GB card's budget, 38 GB, holds 28 prompts of
    one sample, 14 of two)."""
    import posttrain.models.memory as memory

    def estimate(config, *, prompts, phase, weights):
        return InferenceEstimate(weights=9.4 * GB, cache=prompts * phase.samples * GB, activations=0.0)

    monkeypatch.setattr(memory, "estimate_generation", estimate)


ONE = [Phase("answers", 1, 600, 128)]


@pytest.mark.parametrize(
    "prompts, processes, phases, expected",
    [
        (100, 1, ONE, 25),  # 28 fit: 4 batches, evened to 25 each
        (20, 1, ONE, 20),  # all of them fit in one batch
        (100, 1, ONE + [Phase("sampling", 2, 600, 128)], 13),  # the two-sample phase binds: 14 fit, 8 × 13
        (1000, 1, [Phase("answers", 1, 600, 128)], 28),  # 36 batches of 28 (27.8 evened up)
        (40, 2, ONE, 20),  # two processes: each takes one batch of 20
    ],
)
def test_auto_takes_the_largest_batch_that_fits_and_evens_the_batches(
    linear_estimate, prompts, processes, phases, expected
):
    batch, line = choose_generation_batch(
        "evaluate",
        BatchSize.AUTO,
        phases,
        config=None,
        weights=0.0,
        prompts=prompts,
        capacity=40 * GB,
        processes=processes,
    )
    assert batch == expected
    assert line.startswith(f"evaluate.batch_size auto: {expected} prompts a batch (")


def test_auto_caps_at_128_prompts_and_takes_64_on_the_cpu(linear_estimate):
    big = dict(config=None, weights=0.0, prompts=1000, processes=1)
    assert (
        choose_generation_batch("evaluate", BatchSize.AUTO, ONE, capacity=1000 * GB, **big)[0] == 125
    )  # 8 batches
    cpu = choose_generation_batch("evaluate", BatchSize.AUTO, ONE, capacity=None, **big)
    assert cpu[0] == 63 and "on the CPU" in cpu[1]  # 16 batches of up to 64, evened: 63 (62.5 up)


def test_an_integer_runs_as_given_and_warns_when_it_cannot_fit(linear_estimate):
    kwargs = dict(config=None, weights=0.0, prompts=100, capacity=40 * GB)
    batch, line = choose_generation_batch("preferences", 20, ONE, **kwargs)
    assert batch == 20 and line.startswith("preferences.batch_size 20: ~30.0 GB (weights 9.4, KV cache 20.0")
    batch, line = choose_generation_batch("preferences", 40, ONE, **kwargs)
    assert batch == 40
    assert line.startswith("warning: preferences.batch_size 40 needs ~50.0 GB")
    assert "decoded again in halves" in line and line.endswith("batch_size: auto would take 28")


def test_auto_fails_before_loading_when_not_one_prompt_fits(linear_estimate):
    with pytest.raises(
        GenerationTooLargeError,
        match=r"not even one prompt fits this GPU: ~11\.0 GB \(weights 9\.4, KV cache 1\.0",
    ):
        choose_generation_batch(
            "preferences", BatchSize.AUTO, ONE, config=None, weights=0.0, prompts=8, capacity=10 * GB
        )


@pytest.fixture()
def card_of_80_gb(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=80 * GB))


def test_the_stages_size_their_batches_from_the_base_without_its_weights(
    models, prepared, card_of_80_gb, monkeypatch, capsys
):
    """preference_batch and evaluation_batch read the base's config and processor only (loading weights
    fails here), take the longest prompt of the data (and with judge: self the longer pairwise prompt)."""
    from transformers import LlavaForConditionalGeneration

    import posttrain.models.memory as memory
    from posttrain.core.config import EvaluateParams, Judge
    from posttrain.evaluate.evaluation import evaluation_batch
    from posttrain.train.preferences import preference_batch

    def no_weights(*a, **k):
        raise AssertionError("the batch must be sized before any weight loads")

    monkeypatch.setattr(LlavaForConditionalGeneration, "from_pretrained", no_weights)
    asked = []
    real = memory.estimate_generation

    def spy(config, *, prompts, phase, weights):
        asked.append(phase)
        return real(config, prompts=prompts, phase=phase, weights=weights)

    monkeypatch.setattr(memory, "estimate_generation", spy)
    examples = load_split(prepared, "study_train")
    params = PreferencesParams(batch_size=BatchSize.AUTO, judge=Judge.SELF, max_new_tokens=20)
    batch = preference_batch(params, models / "base", None, False, examples)
    assert batch == -(-len(examples) // -(-len(examples) // 128))  # the tiny model fits any batch
    assert "preferences.batch_size auto:" in capsys.readouterr().out
    sampling = next(p for p in asked if p.name == "sampling")
    judge = next(p for p in asked if p.name == "self-judge")
    assert (sampling.samples, sampling.new_tokens) == (2, 20)
    assert judge.prompt_tokens > sampling.prompt_tokens + 2 * 20 and judge.scored_tokens > 0
    asked.clear()
    assert evaluation_batch(EvaluateParams(batch_size=48), models / "base", None, False, prepared) == 48
    assert {p.name for p in asked} == {"answers", "scoring"}
    assert "evaluate.batch_size 48: ~" in capsys.readouterr().out


@pytest.mark.parametrize("section", ["evaluate", "preferences"])
def test_max_new_tokens_past_the_context_is_refused_before_any_weight_loads(
    section, models, prepared, monkeypatch
):
    """The tiny base reads 512 positions: a prompt and 1,000,000 new tokens cannot fit. The message names
    the key and the largest value that fits (512 minus the longest prompt)."""
    from transformers import LlavaForConditionalGeneration

    from posttrain.core.config import EvaluateParams
    from posttrain.core.errors import InputError
    from posttrain.evaluate.evaluation import evaluation_batch, evaluation_phases
    from posttrain.models.loading import base_config_and_processor, image_token_count
    from posttrain.train.preferences import preference_batch, preference_phases

    def no_weights(*a, **k):
        raise AssertionError("the context must be checked before any weight loads")

    monkeypatch.setattr(LlavaForConditionalGeneration, "from_pretrained", no_weights)
    config, processor = base_config_and_processor(models / "base")
    n_image = image_token_count(processor)
    examples = load_split(prepared, "study_train")
    if section == "evaluate":
        params = EvaluateParams(max_new_tokens=1_000_000)
        (answers, _) = evaluation_phases(processor.tokenizer, prepared, n_image, params)
        longest = answers.prompt_tokens
        run = lambda p: evaluation_batch(p, models / "base", None, False, prepared)  # noqa: E731
    else:
        params = PreferencesParams(max_new_tokens=1_000_000)
        longest = preference_phases(processor.tokenizer, examples, n_image, params)[0].prompt_tokens
        run = lambda p: preference_batch(p, models / "base", None, False, examples)  # noqa: E731
    positions = config.text_config.max_position_embeddings
    assert positions == 512 and 0 < longest < positions
    with pytest.raises(InputError) as e:
        run(params)
    assert str(e.value) == (
        f"{section}.max_new_tokens: 1000000, but the base model reads at most 512 positions "
        f"(max_position_embeddings) and the longest prompt takes {longest}; set {section}.max_new_tokens "
        f"to at most {512 - longest}"
    )
    fits = dataclasses.replace(params, max_new_tokens=512 - longest)
    assert run(fits) == params.batch_size  # on the CPU an integer batch runs as given


def test_the_estimate_bounds_the_peaks_measured_on_an_h100():
    """bench/results/generation_memory_h100.json (`bench/generation_memory.py` on one H100 80GB, 7B random
    weights, 637-token prompts, 128 new tokens): every measured peak above the weights is at most the
    estimate and at least 1/1.2 of it (sampling two per prompt with the static cache, and teacher-forced
    scoring); the batch that ran out of memory is one the estimate says cannot fit."""
    import json
    from pathlib import Path

    bench = json.loads(
        (Path(__file__).resolve().parents[1] / "bench/results/generation_memory_h100.json").read_text()
    )
    config = load_config("llava-1.5-7b")
    for row in bench["rows"]:
        phase = (
            Phase("scoring", 1, row["prompt_tokens"] + row["new_tokens"], 0, row["new_tokens"] + 1)
            if row["cache"] == "scoring"
            else Phase("sampling", row["samples"], row["prompt_tokens"], row["new_tokens"])
        )
        e = estimate_generation(config, prompts=row["batch"], phase=phase, weights=bench["weights_gb"] * GB)
        if row["peak_above_weights_gb"] == "oom":
            assert e.total > 0.95 * bench["capacity_gb"] * GB, row
        else:
            above = (e.total - e.weights) / GB
            assert row["peak_above_weights_gb"] <= above <= 1.2 * row["peak_above_weights_gb"], row
