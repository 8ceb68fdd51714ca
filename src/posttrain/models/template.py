r"""The one chat template: training, generation, loss and judging all build their sequences here.

LLaVA-1.5's conversation format, rendered the same way at both scales::

    USER: <image>\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>...

The image comes once, in the first user turn. `encode_conversation` builds every sequence a stage needs:
a whole conversation for SFT (loss on every answer), a turn asked after its history for generation (no
answer), and a turn's reference answer after its history for the test loss (loss on that answer only). Each
piece is tokenized on its own and the ids concatenated, so the prompt ids seen in training are exactly the
ids generation starts from (no BPE merge across the boundary), and the BOS comes from the tokenizer once, at
the start.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from posttrain.models.conversation import LLAVA, Conversation

IMAGE_TOKEN = LLAVA.image_token
IGNORE_INDEX = -100

# Jinja version of `conversation_text`, stored in the processor: `apply_chat_template` gives the same string.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %} "
    "{% else %}ASSISTANT: "
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}"
    "{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def user_text(question: str, first: bool) -> str:
    """A user turn ending where the model starts answering; the first turn carries the image placeholder."""
    return f"USER: {IMAGE_TOKEN}\n{question} ASSISTANT:" if first else f"USER: {question} ASSISTANT:"


def completion_text(answer: str) -> str:
    """The assistant's text as it follows ``ASSISTANT:`` (the EOS token is appended as an id)."""
    return f" {answer.strip()}"


def conversation_text(
    history: Sequence[tuple[str, str]], question: str, answer: str | None, eos: str = "</s>"
) -> str:
    """The text `encode_conversation` tokenizes (``<image>`` not yet expanded); `answer` None: a prompt."""
    text = ""
    for k, (q, a) in enumerate(history):
        text += user_text(q, first=k == 0) + completion_text(a) + eos
    text += user_text(question, first=not history)
    return text if answer is None else text + completion_text(answer) + eos


def encode_completion(tokenizer, answer: str, conversation: Conversation = LLAVA) -> list[int]:
    """Token ids of the answer followed by its end (LLaVA: the EOS id); no BOS (it was in the prompt)."""
    answer_ids = tokenizer(conversation.answer_text(answer), add_special_tokens=False)["input_ids"]
    return answer_ids + conversation.end_ids(tokenizer)


def encode_conversation(
    tokenizer,
    history: Sequence[tuple[str, str]],
    question: str,
    answer: str | None,
    n_image_tokens: int,
    *,
    supervise_history: bool = False,
    conversation: Conversation = LLAVA,
) -> tuple[list[int], list[int]]:
    """Teacher-forced (input_ids, labels) of a turn after its conversation's earlier turns.

    Every stage's sequences come from here:

    - SFT: ``history`` = the earlier turns, ``supervise_history=True``: one sequence per conversation with
      the loss on every answer and its EOS;
    - generation: ``answer=None``: the ids end with ``ASSISTANT:`` and the labels are all -100;
    - test loss, DPO completions: the loss on the last answer only, the history as context.

    BOS once at the start, ``n_image_tokens`` image tokens in place of ``<image>`` in the first user turn;
    labels are -100 on the image, the user turns and the template text.

    Args:
        tokenizer: the processor's tokenizer (its post-processor adds the BOS).
        history: earlier ``(question, answer)`` turns, oldest first.
        question: this turn's question.
        answer: this turn's answer, or None for a generation prompt.
        n_image_tokens: how many tokens ``<image>`` expands to (`posttrain.models.loading.image_token_count`).
        supervise_history: also keep the labels of the history's answers.
        conversation: the family's format (`posttrain.models.conversation`); LLaVA-1.5's by default.

    Returns:
        (input_ids, labels) of equal length.
    """
    ids: list[int] = []
    labels: list[int] = []
    turns: list[tuple[str, str | None]] = [*history, (question, answer)]
    for k, (q, a) in enumerate(turns):
        text = conversation.user_text(q, first=k == 0)
        if k == 0:
            image = conversation.image_token
            text = text.replace(image, image * n_image_tokens)
        prompt = tokenizer(text, add_special_tokens=k == 0 and conversation.tokenizer_adds_bos)["input_ids"]
        ids += prompt
        labels += [IGNORE_INDEX] * len(prompt)
        if a is None:
            break
        completion = encode_completion(tokenizer, a, conversation)
        ids += completion
        supervised = k == len(turns) - 1 or supervise_history
        labels += completion if supervised else [IGNORE_INDEX] * len(completion)
        if conversation.separator:
            between = tokenizer(conversation.separator, add_special_tokens=False)["input_ids"]
            ids += between
            labels += [IGNORE_INDEX] * len(between)
    return ids, labels


def encode_prompt(
    tokenizer,
    history: Sequence[tuple[str, str]],
    question: str,
    n_image_tokens: int,
    conversation: Conversation = LLAVA,
) -> list[int]:
    """Ids of a turn's generation prompt after its history (`encode_conversation` with no answer)."""
    return encode_conversation(tokenizer, history, question, None, n_image_tokens, conversation=conversation)[
        0
    ]


def pad_batch(sequences: list[list[int]], pad_value: int, side: str) -> torch.Tensor:
    """Pad lists of ids to one (B, T) tensor on the `left` (generation) or `right` (training)."""
    width = max(len(s) for s in sequences)
    out = torch.full((len(sequences), width), pad_value, dtype=torch.long)
    for i, s in enumerate(sequences):
        if side == "left":
            out[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        else:
            out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def answer_start(labels) -> int:
    """The first position whose next token carries loss in some row: logits before it are never needed.

    Call it on the CPU copy of the labels (a GPU tensor would make the host wait for the device).

    Args:
        labels: (B, T) tensor of token ids, `IGNORE_INDEX` where nothing is supervised.

    Returns:
        The smallest t such that some row has a label at t + 1 (position t predicts token t + 1); T − 1 when
        nothing is supervised.
    """
    supervised = (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero()  # (K, 1)
    return int(supervised[0, 0]) if len(supervised) else labels.shape[1] - 1
