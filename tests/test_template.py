"""One chat template everywhere: training labels, generation prompts, loss, the processor's template."""

import torch
from PIL import Image

from posttrain.data.examples import group_conversations, load_split
from posttrain.models.images import load_pixels
from posttrain.models.loading import image_token_count
from posttrain.models.template import (
    IGNORE_INDEX,
    IMAGE_TOKEN,
    conversation_text,
    encode_completion,
    encode_conversation,
    encode_prompt,
)
from posttrain.train.dataset import TeacherForcedCollator, TeacherForcedDataset

THREE_TURNS = (
    ("What is the value of the red bar?", "The red bar has a value of 7."),
    ("And the blue bar?", "The blue bar has a value of 3."),
    ("What colour is the shortest bar?", "The shortest bar is blue."),
)


def test_prompt_ids_equal_the_processor_path(tiny, prepared):
    """Our ids for a turn after its history are what LlavaProcessor makes of the same text and image."""
    _, processor = tiny
    n = image_token_count(processor)
    assert n == 49  # (84 / 12)² patches; the CLS feature is dropped by the "default" strategy
    e = load_split(prepared, "study_test")[0]
    image = Image.open(prepared / e.image)
    for history, question in (((), e.question), (THREE_TURNS[:2], THREE_TURNS[2][0])):
        text = conversation_text(history, question, None)
        out = processor(text=text, images=image, return_tensors="pt")
        assert out["input_ids"][0].tolist() == encode_prompt(processor.tokenizer, history, question, n)


def test_processor_chat_template_renders_the_same_conversation(tiny):
    _, processor = tiny
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many bars?"}]}]
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == conversation_text((), "How many bars?", None)
    assert rendered == f"USER: {IMAGE_TOKEN}\nHow many bars? ASSISTANT:"
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": THREE_TURNS[0][0]}]},
        {"role": "assistant", "content": [{"type": "text", "text": THREE_TURNS[0][1]}]},
        {"role": "user", "content": [{"type": "text", "text": THREE_TURNS[1][0]}]},
        {"role": "assistant", "content": [{"type": "text", "text": THREE_TURNS[1][1]}]},
    ]
    rendered = processor.apply_chat_template(messages, tokenize=False)
    assert (
        rendered
        == conversation_text(THREE_TURNS[:1], *THREE_TURNS[1])
        == (
            f"USER: {IMAGE_TOKEN}\n{THREE_TURNS[0][0]} ASSISTANT: {THREE_TURNS[0][1]}</s>"
            f"USER: {THREE_TURNS[1][0]} ASSISTANT: {THREE_TURNS[1][1]}</s>"
        )
    )


def test_three_turn_conversation_supervises_exactly_its_three_answers(tiny):
    """Decode the labels of one SFT sequence: the three answers, each with its EOS, and nothing else."""
    _, processor = tiny
    tok, n = processor.tokenizer, image_token_count(processor)
    ids, labels = encode_conversation(tok, THREE_TURNS[:2], *THREE_TURNS[2], n, supervise_history=True)
    assert len(ids) == len(labels)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert ids.count(processor.image_token_id) == n  # the image once, for the whole conversation
    spans, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(label)
        elif current:
            spans.append(current)
            current = []
    spans.append(current)
    assert [tok.decode(s, skip_special_tokens=False) for s in spans] == [f" {a}</s>" for _, a in THREE_TURNS]
    # the user turns, the template and the image are never supervised
    assert all(lab == IGNORE_INDEX for t, lab in zip(ids, labels) if t == processor.image_token_id)
    # without supervise_history only the last answer carries the loss (the test loss, DPO completions)
    _, last_only = encode_conversation(tok, THREE_TURNS[:2], *THREE_TURNS[2], n)
    assert tok.decode([x for x in last_only if x != IGNORE_INDEX]) == f" {THREE_TURNS[2][1]}</s>"


def test_prompt_of_turn_three_ends_with_turns_one_and_two(tiny):
    _, processor = tiny
    tok, n = processor.tokenizer, image_token_count(processor)
    prompt = encode_prompt(tok, THREE_TURNS[:2], THREE_TURNS[2][0], n)
    text = tok.decode(prompt, skip_special_tokens=False).replace(IMAGE_TOKEN * n, IMAGE_TOKEN)
    (q1, a1), (q2, a2), (q3, _) = THREE_TURNS
    assert text.endswith(f"{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>USER: {q3} ASSISTANT:")
    # the SFT sequence starts with exactly the ids generation starts from, at every turn
    ids, _ = encode_conversation(tok, THREE_TURNS[:2], *THREE_TURNS[2], n, supervise_history=True)
    for k in range(3):
        turn_prompt = encode_prompt(tok, THREE_TURNS[:k], THREE_TURNS[k][0], n)
        assert ids[: len(turn_prompt)] == turn_prompt


def test_collated_batch_holds_one_sequence_per_conversation(tiny, prepared):
    """Decode one collated SFT batch: each row is a whole conversation, every answer supervised."""
    _, processor = tiny
    tok = processor.tokenizer
    examples = load_split(prepared, "study_train")
    conversations = group_conversations(examples)
    assert len(conversations) < len(examples)  # several turns per chart
    ds = TeacherForcedDataset(examples, prepared, processor)
    assert len(ds) == len(conversations) and ds.turns == len(examples)
    multi = [i for i, c in enumerate(ds.conversations) if len(c.turns) > 1][:4]
    batch = TeacherForcedCollator(tok.pad_token_id)([ds[i] for i in multi])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["pixel_values"].shape == (len(multi), 3, 84, 84)
    for row, i in enumerate(multi):
        ids, labels = batch["input_ids"][row], batch["labels"][row]
        answers = tok.decode(labels[labels != IGNORE_INDEX], skip_special_tokens=False)
        assert answers == "".join(f" {a}</s>" for _, a in ds.conversations[i].turns)
        assert (labels[ids == processor.image_token_id] == IGNORE_INDEX).all()
        assert ids[0] == tok.bos_token_id and (ids == tok.bos_token_id).sum() == 1  # no double BOS
        n_real = int(batch["attention_mask"][row].sum())
        assert (labels[n_real:] == IGNORE_INDEX).all() and (ids[n_real:] == tok.pad_token_id).all()


def test_model_loss_equals_mean_nll_of_answer_tokens(tiny, prepared):
    """The loss LLaVA computes from our labels is the mean NLL of the answer tokens computed by hand."""
    from posttrain.evaluate.generation import answer_nll

    model, processor = tiny
    tok = processor.tokenizer
    e = next(x for x in load_split(prepared, "study_test") if x.history)
    n = image_token_count(processor)
    ids, labels = encode_conversation(tok, e.history, e.question, e.answer, n)
    pixels = load_pixels(processor, prepared, [e.image])[e.image]
    with torch.no_grad():
        loss = model(
            input_ids=torch.tensor([ids]), pixel_values=pixels[None], labels=torch.tensor([labels])
        ).loss
    sums, counts = answer_nll(model, tok, [pixels], [(ids, labels)], batch_size=1)
    assert counts[0] == sum(1 for x in labels if x != IGNORE_INDEX) == len(encode_completion(tok, e.answer))
    assert abs(sums[0] / counts[0] - loss.item()) < 1e-4
