"""One chat template everywhere: training labels, generation prompts, loss, the processor's template."""

import torch
from PIL import Image

from posttrain.data import load_split
from posttrain.models import image_token_count
from posttrain.template import IGNORE_INDEX, IMAGE_TOKEN, encode_example, encode_prompt, prompt_text
from posttrain.training import TeacherForcedCollator, TeacherForcedDataset


def test_prompt_ids_equal_the_processor_path(tiny, prepared):
    _, processor = tiny
    e = load_split(prepared, "study_test")[0]
    n = image_token_count(processor)
    assert n == 49  # (84 / 12)² patches; the CLS feature is dropped by the "default" strategy
    out = processor(text=prompt_text(e.question), images=Image.open(prepared / e.image), return_tensors="pt")
    assert out["input_ids"][0].tolist() == encode_prompt(processor.tokenizer, e.question, n)


def test_processor_chat_template_renders_the_same_prompt(tiny):
    _, processor = tiny
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many bars?"}]}]
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == prompt_text("How many bars?") == f"USER: {IMAGE_TOKEN}\nHow many bars? ASSISTANT:"


def test_collated_labels_are_teacher_forced(tiny, prepared):
    """Decode one collated batch: labels keep exactly the answer + EOS; prompt, image and padding are -100."""
    _, processor = tiny
    tok = processor.tokenizer
    examples = load_split(prepared, "study_train")[:4]
    ds = TeacherForcedDataset(examples, prepared, processor)
    batch = TeacherForcedCollator(tok.pad_token_id)([ds[i] for i in range(4)])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["pixel_values"].shape == (4, 3, 84, 84)
    image_id = processor.image_token_id
    for i, e in enumerate(examples):
        ids, labels = batch["input_ids"][i], batch["labels"][i]
        kept = labels[labels != IGNORE_INDEX]
        assert tok.decode(kept, skip_special_tokens=False) == f" {e.answer}</s>"
        assert (labels[ids == image_id] == IGNORE_INDEX).all()
        assert ids[0] == tok.bos_token_id and (ids == tok.bos_token_id).sum() == 1  # one BOS, no double BOS
        n_real = int(batch["attention_mask"][i].sum())
        assert (labels[n_real:] == IGNORE_INDEX).all() and (ids[n_real:] == tok.pad_token_id).all()
        # the labelled positions are the ones that follow the prompt the generator starts from
        prompt = encode_prompt(tok, e.question, image_token_count(processor))
        assert ids[: len(prompt)].tolist() == prompt
        assert (labels[: len(prompt)] == IGNORE_INDEX).all() and (
            labels[len(prompt) : n_real] != IGNORE_INDEX
        ).all()


def test_model_loss_equals_mean_nll_of_answer_tokens(tiny, prepared):
    """The loss LLaVA computes from our labels is the mean NLL of answer tokens computed by hand."""
    from posttrain.generation import answer_nll
    from posttrain.training import load_pixels

    model, processor = tiny
    tok = processor.tokenizer
    e = load_split(prepared, "study_test")[0]
    n = image_token_count(processor)
    ids, labels = encode_example(tok, e.question, e.answer, n)
    pixels = load_pixels(processor, prepared, [e])[e.image_id]
    with torch.no_grad():
        loss = model(
            input_ids=torch.tensor([ids]), pixel_values=pixels[None], labels=torch.tensor([labels])
        ).loss
    sums, counts = answer_nll(model, tok, [pixels], [e.question], [e.answer], n, batch_size=1)
    assert counts[0] == sum(1 for x in labels if x != IGNORE_INDEX)
    assert abs(sums[0] / counts[0] - loss.item()) < 1e-4
