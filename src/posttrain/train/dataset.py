"""Teacher-forced rows (one sequence per conversation, the loss on every answer) and their batching."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from posttrain.data.examples import Example, group_conversations
from posttrain.models.images import load_pixels
from posttrain.models.loading import image_token_count
from posttrain.models.template import IGNORE_INDEX, answer_start, encode_conversation, pad_batch


class TeacherForcedDataset(torch.utils.data.Dataset):
    """One sequence per conversation: the image once, every turn, the loss on every answer.

    LLaVA-1.5's own SFT format (`posttrain.models.template.encode_conversation` with ``supervise_history``):
    labels are -100 on the image, the user turns and the template; each answer and its EOS are kept.
    """

    def __init__(self, examples: list[Example], data_dir: Path, processor):
        n_image_tokens = image_token_count(processor)
        self.conversations = group_conversations(examples)
        self.encoded = [
            encode_conversation(
                processor.tokenizer, c.turns[:-1], *c.turns[-1], n_image_tokens, supervise_history=True
            )
            for c in self.conversations
        ]
        self.images = [c.image for c in self.conversations]
        self.pixels = load_pixels(processor, data_dir, self.images)

    def __len__(self) -> int:
        return len(self.encoded)

    @property
    def turns(self) -> int:
        return sum(len(c.turns) for c in self.conversations)

    @property
    def tokens(self) -> int:
        return sum(len(ids) for ids, _ in self.encoded)

    def __getitem__(self, i: int) -> dict:
        ids, labels = self.encoded[i]
        return {"input_ids": ids, "labels": labels, "pixel_values": self.pixels[self.images[i]]}


@dataclass
class TeacherForcedCollator:
    """Right-pads a list of `TeacherForcedDataset` items into a batch."""

    pad_token_id: int

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        input_ids = pad_batch([it["input_ids"] for it in items], self.pad_token_id, "right")  # (B, T)
        labels = pad_batch([it["labels"] for it in items], IGNORE_INDEX, "right")  # (B, T)
        attention_mask = pad_batch([[1] * len(it["input_ids"]) for it in items], 0, "right")
        pixel_values = torch.stack([it["pixel_values"] for it in items])  # (B, 3, H, W)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "pixel_values": pixel_values,
            "answer_start": answer_start(labels),  # an int, found here on the CPU: no device sync per step
        }
