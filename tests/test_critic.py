from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from posttrain.data.examples import AnswerType, Example
from posttrain.evaluate import llava_critic
from posttrain.evaluate.critic import (
    combine_orders,
    pairwise_prompt,
    parse_score,
    parse_verdict,
    pointwise_prompt,
    qwen_render,
)
from posttrain.evaluate.llava_critic import LlavaCriticJudge
from posttrain.evaluate.reference import invented_colors, reference_score
from posttrain.models.critic_checkpoint import is_transformers_onevision

# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------


def test_pointwise_prompt_verbatim() -> None:
    expected = (
        "Given an image and a corresponding question, please serve as an unbiased and fair judge to evaluate "
        "the quality of answer answers provided by a Large Multimodal Model (LMM). Score the response out of "
        "100 and explain your reasoning with specific details. Your task is provided as follows:\n"
        "Question: [What is the value of A?]\nThe LMM response: [It is 42.]\nASSISTANT:\n "
    )
    assert pointwise_prompt("What is the value of A?", "It is 42.") == expected


def test_pairwise_prompt_verbatim() -> None:
    expected = (
        "Given an image and a corresponding question, please serve as an unbiased and fair judge to evaluate "
        "the quality of the answers provided by a Large Multimodal Model (LMM). Determine which answer is "
        "better and explain your reasoning with specific details. Your task is provided as follows:\n"
        "Question: [Q?]\nThe first response: [one]\nThe second response: [two]\nASSISTANT:\n"
    )
    assert pairwise_prompt("Q?", "one", "two") == expected


def test_qwen_render() -> None:
    assert qwen_render("PROMPT") == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nPROMPT<|im_end|>\n<|im_start|>assistant\n"
    )


def test_prompts_keep_braces_in_fields() -> None:
    assert "[a {b} c]" in pointwise_prompt("a {b} c", "x")


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "score"),
    [
        ("Final Score: 85", 85.0),
        ("final score:90/100", 90.0),
        ("The answer is right. FINAL SCORE : 7", 7.0),
        ("I give it 75 out of 100", 75.0),
        ("no number", None),
        ("", None),
        ("The value 42 is right. Final Score: 95", 95.0),
        ("Final Score: 120", None),
        ("0 out of 100", 0.0),
        ("Score: 85.", 85.0),
        ("**Final Score:** 70", 70.0),
        # only explicit score statements count: numbers about the chart are not scores
        ("the red bar is 35, but the chart shows 40. I would give it a score of 20 out of 100", 20.0),
        ("Mentions 2019 and 3.5 and Qwen2 but then 60.", None),
        ("score 150 then 40", None),
        ("The response says the value in 2019 was 45", None),
        # a 0-10 scale is rescaled to 0-100
        ("Score: 8/10", 80.0),
        ("I rate it 7 out of 10.", 70.0),
        ("7.5/10", 75.0),
        # several statements: the last one (the critic's conclusion)
        ("A first guess would be 60/100, but after checking the axis: Final Score: 40", 40.0),
        # a reply cut off by max_new_tokens before its score
        ("The response correctly identifies the red bar as the tallest, but its value of 35 is", None),
        ("The response is wrong about 3/10/2020 dates", None),
        # a score given to the response, the last statement counting as above
        ("I would give it an 85", 85.0),
        ("The response scores 85.", 85.0),
        ("It is mostly right, so I'd rate it 80 points.", 80.0),
        ("I would give it a 7 out of 10", 70.0),
        ("It scores 60/100 at first sight, but I would give it a 40.", 40.0),
        # look-alikes: a number given or scored that is not a score
        ("I would give it 2 more tries before judging", None),
        ("The model scores 3 bars correctly and misses the fourth", None),
        ("It scored 45% of the points", None),
        ("I would give it an example: the bar is 35", None),
        ("The chart gives it 2019 as the year", None),
    ],
)
def test_parse_score(text: str, score: float | None) -> None:
    assert parse_score(text) == score


@pytest.mark.parametrize(
    ("text", "verdict"),
    [
        ("[first]", "first"),
        ("The first response is better because it reads the axis.", "first"),
        ("[Second] Overall...", "second"),
        ("After checking the bars, the second response is better.", "second"),
        ("Response 2 is better.", "second"),
        ("Both responses are equally accurate.", "tie"),
        ("It's a tie.", "tie"),
        ("I cannot decide.", None),
        ("The first response mentions red; the second response mentions blue.", None),
        # several decisive phrases: the earliest wins
        ("The second response is better. Had it erred, the first response is better would hold.", "second"),
        ("The first response is better, although both are equally fluent.", "first"),
        ("Both are equally fluent, but the first response is better.", "tie"),
        ("", None),
    ],
)
def test_parse_verdict(text: str, verdict: str | None) -> None:
    assert parse_verdict(text) == verdict


@pytest.mark.parametrize(
    ("v_ab", "v_ba", "winner"),
    [
        ("first", "second", "a"),
        ("second", "first", "b"),
        ("tie", "tie", "tie"),
        ("first", "first", None),  # position bias: always prefers whatever is shown first
        ("second", "second", None),
        ("first", "tie", None),
        ("tie", "second", None),
        (None, "second", None),
        ("first", None, None),
        (None, None, None),
    ],
)
def test_combine_orders(v_ab: str | None, v_ba: str | None, winner: str | None) -> None:
    assert combine_orders(v_ab, v_ba) == winner


# --------------------------------------------------------------------------------------------
# Reference critic
# --------------------------------------------------------------------------------------------

COLORS = ["red", "blue", "green", "dark blue"]


def make_example(negative: bool = False, elements: tuple[str, ...] = ("red", "blue")) -> Example:
    return Example(
        id="img-0",
        image="images/img.png",
        image_id="img",
        conversation="img",
        turn=0,
        question="What is the value of the green bar?" if negative else "What is the value of the red bar?",
        answer="The red bar is 42.",
        short_answer=None if negative else "42",
        answer_type=AnswerType.DECLINE if negative else AnswerType.NUMBER,
        chart_type="bar",
        family="bar_value",
        negative=negative,
        elements=elements,
    )


def test_reference_score_cases() -> None:
    ex = make_example()
    # correct, faithful, ROUGE-L recall 1
    assert reference_score(ex, "The red bar is 42.", "42", COLORS) == pytest.approx(100.0)
    # relaxed match (within 5%) still counts as correct
    assert reference_score(ex, "The red bar is 43.", "43", COLORS) == pytest.approx(60 + 20 + 20 * 4 / 5)
    # about another bar (invented colour "green", the asked red not named): not correct, not faithful;
    # LCS(the red bar is 42 / the green bar is 42) = 4 of 5 reference tokens
    assert reference_score(ex, "The green bar is 42.", "42", COLORS) == pytest.approx(0 + 0 + 20 * 4 / 5)
    # wrong value: only faithfulness and recall ("is": 1 of 5)
    assert reference_score(ex, "It is 30.", "30", COLORS) == pytest.approx(0 + 20 + 20 * 1 / 5)
    # nothing extracted
    assert reference_score(ex, "It is 30.", None, COLORS) == pytest.approx(20 + 4)
    # declining a positive question scores 0 even if the numbers appear
    assert reference_score(ex, "There is no red bar, 42.", "42", COLORS) == 0.0
    # no elements known: faithfulness granted (the asked red is still not named: not correct)
    ex_unknown = make_example(elements=())
    assert reference_score(ex_unknown, "The green bar is 42.", "42", COLORS) == pytest.approx(0 + 20 + 16)
    assert reference_score(ex_unknown, "The red bar is 42.", "42", COLORS) == pytest.approx(60 + 20 + 20)


def test_reference_score_multiword_colour() -> None:
    ex = make_example(elements=("dark blue", "red"))
    # "dark blue" is present; the word "blue" inside it is not a separate mention
    assert reference_score(ex, "The red bar is 42, the dark blue one 10.", "42", COLORS) >= 80
    assert invented_colors("The dark  blue bar", ex.elements, COLORS) == []
    assert invented_colors("The Blue bar and the GREEN bar", ex.elements, COLORS) == ["blue", "green"]


def test_reference_score_negative() -> None:
    ex = make_example(negative=True)
    assert reference_score(ex, "There is no green bar in this chart.", None, COLORS) == 100.0
    assert reference_score(ex, "The chart does not show a green bar.", None, COLORS) == 100.0
    assert reference_score(ex, "The green bar is 10.", "10", COLORS) == 0.0
    # a decline of another element does not decline the asked one
    assert reference_score(ex, "There is no blue bar in this chart.", None, COLORS) == 0.0


# --------------------------------------------------------------------------------------------
# Tiny LLaVA-OneVision critic, built from config
# --------------------------------------------------------------------------------------------

TINY_IMAGE_SIZE = 32  # vision tower input side
TINY_PATCH_SIZE = 8  # -> (32 / 8)^2 = 16 image features per 32x32 tile
TINY_PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]  # anyres tiles, multiples of the image size


def build_tiny_onevision(folder: Path, seed: int = 0) -> Path:
    """Save a random tiny LLaVA-OneVision model + processor in transformers format to `folder`, offline.

    - Tokenizer: byte-level BPE trained with `tokenizers` on a few sentences, wrapped in
      `Qwen2TokenizerFast` with specials ``<|endoftext|>`` (pad, id 0), ``<|im_start|>``,
      ``<|im_end|>`` (eos), ``<image>``, ``<video>``.
    - Image processor: `LlavaOnevisionImageProcessorPil` (no torchvision needed) with size 32x32 and
      grid pinpoints that are multiples of 32.
    - processor_config.json: ``num_image_tokens = (32 / 8)^2 = 16`` and
      ``vision_feature_select_strategy = "full"``, consistent with the model config, so the processor expands
      ``<image>`` to exactly as many tokens as the model produces image features (base tile + anyres tiles +
      newline tokens).
    - Model: `LlavaOnevisionConfig` with a 1-layer SigLIP vision config (hidden 32, image 32, patch 8, no
      head) and a 1-layer Qwen2 text config (hidden 32, vocab = tokenizer size); image/video token ids from
      the tokenizer; saved as safetensors.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        Qwen2TokenizerFast,
        SiglipVisionConfig,
    )
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    folder.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [pointwise_prompt("What is the value?", "It is 42."), pairwise_prompt("Q", "a", "b")]
    corpus += ["Final Score: 85. The first response is better. The second response is better."]
    bpe.train_from_iterator(corpus * 5, trainer)
    tokenizer = Qwen2TokenizerFast(
        tokenizer_object=bpe,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    tokenizer.save_pretrained(folder)

    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}, image_grid_pinpoints=TINY_PINPOINTS
    )
    image_processor.save_pretrained(folder)
    processor_config = {
        "processor_class": "LlavaOnevisionProcessor",
        "num_image_tokens": (TINY_IMAGE_SIZE // TINY_PATCH_SIZE) ** 2,
        "vision_feature_select_strategy": "full",
        "vision_aspect_ratio": "anyres_max_9",
        "image_token": "<image>",
        "video_token": "<video>",
    }
    (folder / "processor_config.json").write_text(json.dumps(processor_config, indent=2))

    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=TINY_IMAGE_SIZE,
        patch_size=TINY_PATCH_SIZE,
        vision_use_head=False,
    )
    text = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=1024,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=TINY_PINPOINTS,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
    )
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def tiny_critic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_onevision(tmp_path_factory.mktemp("tiny_critic"))


def images() -> list[Image.Image]:
    return [
        Image.new("RGB", (50, 30), "red"),  # wide -> 32x64 pinpoint
        Image.new("RGBA", (20, 70), "blue"),  # tall, needs RGB conversion
        Image.new("L", (64, 64), 128),
    ]


def test_tiny_folder_is_transformers_format(tiny_critic_dir: Path) -> None:
    assert is_transformers_onevision(tiny_critic_dir)
    assert (tiny_critic_dir / "model.safetensors").exists()


def test_tiny_critic_end_to_end(tiny_critic_dir: Path) -> None:
    judge = LlavaCriticJudge(str(tiny_critic_dir), dtype="float32", device="cpu")
    questions = ["What is the value of A?", "Which bar is <image> tallest?", "Is there a red bar?"]
    responses = ["It is 42.", "B", "There is no red bar."]
    scores, raw = judge.score(images(), questions, responses, batch_size=2, max_new_tokens=6)
    assert len(scores) == len(raw) == 3
    assert all(isinstance(t, str) for t in raw)
    # random weights: whatever was generated, the score is exactly what the parser reads from it
    assert scores == [parse_score(t) for t in raw]
    assert all(s is None or 0 <= s <= 100 for s in scores)

    # greedy decoding is deterministic, and batching with left padding does not change the outputs
    scores1, raw1 = judge.score(images(), questions, responses, batch_size=1, max_new_tokens=6)
    assert raw1 == raw and scores1 == scores

    verdicts, pairs = judge.judge_pairs_raw(
        images()[:2], questions[:2], ["a1", "b1"], ["a2", "b2 longer"], batch_size=4, max_new_tokens=5
    )
    assert len(verdicts) == len(pairs) == 2
    assert verdicts == [combine_orders(parse_verdict(ab), parse_verdict(ba)) for ab, ba in pairs]
    assert judge.judge_pairs(
        images()[:2], questions[:2], ["a1", "b1"], ["a2", "b2 longer"], max_new_tokens=5
    ) == (verdicts)

    # zero the final norm: all logits are 0, greedy picks token 0 (the pad token) -> empty, unparsable replies
    import torch

    with torch.no_grad():
        judge.model.model.language_model.norm.weight.zero_()
    scores, raw = judge.score(images(), questions, responses, batch_size=3, max_new_tokens=4)
    assert raw == ["", "", ""] and scores == [None, None, None]
    assert judge.judge_pairs(images()[:2], questions[:2], ["a", "b"], ["c", "d"], max_new_tokens=3) == [
        None,
        None,
    ]

    with pytest.raises(ValueError, match="same length"):
        judge.score(images(), questions[:2], responses)


# --------------------------------------------------------------------------------------------
# LLaVA-NeXT layout is refused before weights are loaded
# --------------------------------------------------------------------------------------------


def write_next_layout(folder: Path, config: dict, weight_names: list[str]) -> Path:
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file({name: torch.zeros(2, 2) for name in weight_names}, str(folder / "model.safetensors"))
    return folder


NEXT_CONFIG = {
    "architectures": ["LlavaQwenForCausalLM"],
    "model_type": "llava_qwen",
    "mm_vision_tower": "google/siglip-so400m-patch14-384",
    "mm_projector_type": "mlp2x_gelu",
    "hidden_size": 3584,
}
NEXT_WEIGHTS = [
    "model.mm_projector.0.weight",
    "model.vision_tower.vision_tower.vision_model.embeddings.patch_embedding.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "lm_head.weight",
]


@pytest.fixture
def no_weight_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    def fail(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(transformers.LlavaOnevisionForConditionalGeneration, "from_pretrained", fail)
    monkeypatch.setattr(llava_critic, "load_onevision_processor", fail)


def test_next_layout_rejected_before_loading(tmp_path: Path, no_weight_loading: None) -> None:
    folder = write_next_layout(tmp_path / "next", NEXT_CONFIG, NEXT_WEIGHTS)
    assert not is_transformers_onevision(folder)
    with pytest.raises(ValueError) as err:
        LlavaCriticJudge(str(folder), device="cpu")
    msg = str(err.value)
    assert "LlavaOnevisionForConditionalGeneration" in msg and "onvert" in msg
    assert "llava_qwen" in msg and "model.mm_projector" in msg


def test_onevision_config_with_next_weight_names_rejected(tmp_path: Path, no_weight_loading: None) -> None:
    config = {"model_type": "llava_onevision", "vision_config": {}, "text_config": {}}
    folder = write_next_layout(tmp_path / "mixed", config, NEXT_WEIGHTS)
    assert not is_transformers_onevision(folder)
    with pytest.raises(ValueError, match="LlavaOnevisionForConditionalGeneration"):
        LlavaCriticJudge(folder, device="cpu")
    # missing vision_config alone is enough
    folder2 = write_next_layout(
        tmp_path / "novision", {"model_type": "llava_onevision", "text_config": {}}, []
    )
    assert not is_transformers_onevision(folder2)
    assert not is_transformers_onevision(tmp_path / "does-not-exist")


def test_hub_next_layout_rejected_before_weights_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_weight_loading: None
) -> None:
    import huggingface_hub

    folder = tmp_path / "snapshot"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(NEXT_CONFIG))
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append(kwargs)
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    with pytest.raises(ValueError, match="LlavaOnevisionForConditionalGeneration"):
        LlavaCriticJudge("lmms-lab/llava-critic-7b", revision="abc", device="cpu")
    assert len(calls) == 1 and calls[0]["revision"] == "abc"
    assert not any("safetensors" in p for p in calls[0]["allow_patterns"])


def test_hub_onevision_fetches_configs_then_safetensors(
    tiny_critic_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(tiny_critic_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    judge = LlavaCriticJudge("someone/tiny-critic-ov", revision="0123abc", dtype="float32", device="cpu")
    assert judge.model.config.model_type == "llava_onevision"
    assert [c[0] for c in calls] == ["someone/tiny-critic-ov"] * 2
    assert all(c[1]["revision"] == "0123abc" for c in calls)
    first, second = (c[1]["allow_patterns"] for c in calls)
    assert not any("safetensors" in p for p in first)
    assert "*.safetensors" in second and not any(p.endswith((".bin", ".pt", ".pth")) for p in second)


def test_the_critic_splits_its_batches_over_processes_and_gathers_them_in_order(tiny_critic_dir, monkeypatch):
    """Under 2 processes each scores its share of the batches (3 batches of 2, 2, 1 items: rank 0 gets
    batches 0 and 2, rank 1 batch 1), and gathered in batch order they are the replies of one process. The
    two ranks are played in this process, the gather (`posttrain.core.distributed.gather_batches`, tested
    under torchrun in test_launch) given both ranks' batches."""
    import posttrain.core.distributed as distributed

    judge = LlavaCriticJudge(str(tiny_critic_dir), dtype="float32", device="cpu")
    calls = []
    generate = judge.model.generate
    monkeypatch.setattr(
        judge.model, "generate", lambda **kw: calls.append(kw["input_ids"].shape[0]) or generate(**kw)
    )
    colours = ["red", "blue", "green", "white", "black"]
    imgs = [Image.new("RGB", (40 + 5 * i, 30), c) for i, c in enumerate(colours)]
    args = (imgs, [f"Q{i}?" for i in range(5)], [f"A {i}." for i in range(5)])
    single = judge.score(*args, batch_size=2, max_new_tokens=4)[1]
    assert calls == [2, 2, 1]
    shares = {}
    for rank in (0, 1):
        calls.clear()
        monkeypatch.setattr(distributed, "rank_and_size", lambda r=rank: (r, 2))
        monkeypatch.setattr(
            distributed, "gather_batches", lambda local, r=rank: shares.update({r: local}) or []
        )
        judge.score(*args, batch_size=2, max_new_tokens=4)
        assert calls == ([2, 1] if rank == 0 else [2])
    assert sorted(shares[0]) == [0, 2] and sorted(shares[1]) == [1]
    merged = {**shares[0], **shares[1]}
    assert [reply for k in sorted(merged) for reply in merged[k]] == single


def test_a_critic_batch_that_runs_out_of_memory_is_scored_again_in_halves(
    tiny_critic_dir, monkeypatch, capsys
):
    """A fake CUDA out-of-memory above 2 prompts: the batch of 5 runs again as 2, 2, 1 and the replies are a
    batch-2 run's (greedy: a reply does not depend on its batch), the halving said once."""
    import torch

    judge = LlavaCriticJudge(str(tiny_critic_dir), dtype="float32", device="cpu")
    colours = ["red", "blue", "green", "white", "black"]
    imgs = [Image.new("RGB", (40 + 5 * i, 30), c) for i, c in enumerate(colours)]
    args = (imgs, [f"Q{i}?" for i in range(5)], [f"A {i}." for i in range(5)])
    direct = judge.score(*args, batch_size=2, max_new_tokens=4)
    generate, calls = judge.model.generate, []

    def limited(**kw):
        calls.append(kw["input_ids"].shape[0])
        if calls[-1] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (fake)")
        return generate(**kw)

    monkeypatch.setattr(judge.model, "generate", limited)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    assert judge.score(*args, batch_size=5, max_new_tokens=4) == direct
    assert calls == [5, 2, 2, 1]
    assert capsys.readouterr().out.count("critic: out of GPU memory at 5 prompts; going on at 2 a batch") == 1
