r"""The one chat template: training, generation, loss and judging all build prompts here.

LLaVA-1.5's conversation format (``USER: <image>\\n{question} ASSISTANT: {answer}</s>``), rendered the same
way at both scales. Prompt and completion are tokenized separately and concatenated, so the prompt tokens
seen in training are exactly the tokens generation starts from (no BPE merge across the boundary), and the
BOS comes from the tokenizer once, in the prompt.
"""

from __future__ import annotations

import torch

IMAGE_TOKEN = "<image>"
IGNORE_INDEX = -100

# Jinja version of `prompt_text`, stored in the processor so `apply_chat_template` gives the same string.
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


def prompt_text(question: str) -> str:
    """The user turn with its image placeholder, ending where the model starts answering."""
    return f"USER: {IMAGE_TOKEN}\n{question} ASSISTANT:"


def completion_text(answer: str) -> str:
    """The assistant's text as it follows the prompt (the EOS token is appended as an id)."""
    return f" {answer.strip()}"


def encode_prompt(tokenizer, question: str, n_image_tokens: int) -> list[int]:
    """Token ids of the prompt: BOS, the template, and `n_image_tokens` image tokens in place of ``<image>``.

    This is what `LlavaProcessor` produces for the same text and one image (tested).
    """
    text = prompt_text(question).replace(IMAGE_TOKEN, IMAGE_TOKEN * n_image_tokens)
    return tokenizer(text, add_special_tokens=True)["input_ids"]


def encode_completion(tokenizer, answer: str) -> list[int]:
    """Token ids of the answer followed by EOS; no BOS (it was in the prompt)."""
    return tokenizer(completion_text(answer), add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id
    ]


def encode_example(tokenizer, question: str, answer: str, n_image_tokens: int) -> tuple[list[int], list[int]]:
    """Teacher-forced (input_ids, labels): prompt + answer, labels -100 on the prompt and image tokens."""
    prompt = encode_prompt(tokenizer, question, n_image_tokens)
    completion = encode_completion(tokenizer, answer)
    return prompt + completion, [IGNORE_INDEX] * len(prompt) + completion


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
