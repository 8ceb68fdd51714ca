"""Conversation formats as data (posttrain.models.conversation): LLaVA-1.5's, and one derived from a chat
template (Qwen2.5-VL-7B-Instruct's, with a stand-in tokenizer carrying Qwen's special tokens)."""

from pathlib import Path

import pytest

from posttrain.core.errors import InputError
from posttrain.models.conversation import LLAVA, from_chat_template
from posttrain.models.family import LLAVA_15
from posttrain.models.loading import image_token_count
from posttrain.models.template import IGNORE_INDEX, encode_conversation, encode_prompt

QWEN_TEMPLATE = (Path(__file__).parent / "data" / "qwen2.5-vl-7b-instruct.jinja").read_text()
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]  # fmt: skip
TURNS = (
    ("What is the value of the red bar?", "The red bar has a value of 7."),
    ("And the blue bar?", "The blue bar has a value of 3."),
    ("What colour is the shortest bar?", "The shortest bar is blue."),
)


@pytest.fixture(scope="module")
def qwen_tokenizer():
    """Byte-level BPE on a few sentences plus Qwen's special tokens (eos <|im_end|>, no BOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=QWEN_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([" ".join(q + " " + a for q, a in TURNS) + " system user assistant"] * 5, trainer)
    out = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    out.chat_template = QWEN_TEMPLATE
    return out


def messages(turns):
    out = []
    for k, (q, a) in enumerate(turns):
        image = [{"type": "image"}] if k == 0 else []
        out.append({"role": "user", "content": [*image, {"type": "text", "text": q}]})
        out.append({"role": "assistant", "content": [{"type": "text", "text": a}]})
    return out


def supervised_spans(ids, labels):
    spans, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(label)
        elif current:
            spans.append(current)
            current = []
    return spans + ([current] if current else [])


def check_three_turns(tok, conversation, n, ends):
    ids, labels = encode_conversation(
        tok, TURNS[:2], *TURNS[2], n, supervise_history=True, conversation=conversation
    )
    assert len(ids) == len(labels)
    spans = [tok.decode(s, skip_special_tokens=False) for s in supervised_spans(ids, labels)]
    assert spans == [f"{conversation.answer_prefix}{a}{ends}" for _, a in TURNS]
    for k in range(3):
        prompt = encode_prompt(tok, TURNS[:k], TURNS[k][0], n, conversation)
        assert ids[: len(prompt)] == prompt
        assert labels[len(prompt)] != IGNORE_INDEX  # the answer of turn k starts right after its prompt
    return ids


def test_llava_family_carries_todays_format(tiny):
    _, processor = tiny
    assert LLAVA_15.conversation is LLAVA
    tok, n = processor.tokenizer, image_token_count(processor)
    ids = check_three_turns(tok, LLAVA, n, "</s>")
    assert ids == encode_conversation(tok, TURNS[:2], *TURNS[2], n, supervise_history=True)[0]
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id


def test_qwen_chat_template_conversation_renders_as_the_template(qwen_tokenizer):
    tok, n = qwen_tokenizer, 5
    conversation = from_chat_template(tok, "qwen2.5-vl-7b-instruct", "<|image_pad|>")
    assert conversation.end == "<|im_end|>" and conversation.separator == "\n"
    assert conversation.answer_prefix == "" and not conversation.tokenizer_adds_bos
    ids = check_three_turns(tok, conversation, n, "<|im_end|>")
    rendered = tok.apply_chat_template(messages(TURNS), tokenize=False)
    assert rendered.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    expanded = rendered.replace("<|image_pad|>", "<|image_pad|>" * n)
    assert tok.decode(ids, skip_special_tokens=False) == expanded
    assert ids == tok(expanded, add_special_tokens=False)["input_ids"]  # specials tokenize on their own
    prompt = encode_prompt(tok, TURNS[:2], TURNS[2][0], n, conversation)
    want = tok.apply_chat_template(messages(TURNS)[:-1], tokenize=False, add_generation_prompt=True)
    assert tok.decode(prompt, skip_special_tokens=False) == want.replace("<|image_pad|>", "<|image_pad|>" * n)


def test_unsplittable_templates_fail_naming_the_template(qwen_tokenizer):
    # a template that numbers its turns renders each user turn differently: no fixed pieces
    numbered = QWEN_TEMPLATE.replace(
        "<|im_start|>{{ message['role'] }}", "<|im_start|>{{ message['role'] }} {{ loop.index }}"
    )
    with pytest.raises(InputError, match="chat template of numbered-template"):
        from_chat_template(qwen_tokenizer, "numbered-template", "<|image_pad|>", numbered)
    with pytest.raises(InputError, match="image placeholder"):
        from_chat_template(qwen_tokenizer, "qwen", "<image>")
