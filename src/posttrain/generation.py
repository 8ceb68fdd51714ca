"""Batched, deterministic generation and teacher-forced scoring of sequences built by the shared template.

Callers build the ids with `posttrain.template.encode_conversation` (a turn after its history), so every
prompt here is one the training saw the same way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from posttrain.template import IGNORE_INDEX, pad_batch


@torch.no_grad()
def generate(
    model,
    tokenizer,
    pixels: list[torch.Tensor],
    prompts: list[list[int]],
    *,
    batch_size: int,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    progress: str | None = None,
) -> list[str]:
    """Answer each (image, prompt ids) with the model, batched with left padding.

    Greedy by default; with `do_sample` the sampling is seeded per batch, so the same inputs and seed give the
    same outputs. Returns the decoded continuations, special tokens removed.
    """
    device = next(model.parameters()).device
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    outputs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        input_ids = pad_batch(batch, tokenizer.pad_token_id, "left").to(device)  # (B, T)
        attention_mask = pad_batch([[1] * len(p) for p in batch], 0, "left").to(device)
        pixel_values = torch.stack(pixels[start : start + batch_size]).to(device, dtype)  # (B, 3, H, W)
        if do_sample:
            torch.manual_seed(seed + start)
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            **(
                {"temperature": temperature, "top_p": top_p}
                if do_sample
                else {"temperature": None, "top_p": None}
            ),
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        new_tokens = out[:, input_ids.shape[1] :]
        outputs.extend(t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
        n_batches = -(-len(prompts) // batch_size)
        batch_index = start // batch_size
        if progress and (batch_index % max(n_batches // 4, 1) == 0 or batch_index == n_batches - 1):
            print(f"{progress}: generated {len(outputs)}/{len(prompts)}", flush=True)
    return outputs


@torch.no_grad()
def answer_nll(
    model,
    tokenizer,
    pixels: list[torch.Tensor],
    sequences: list[tuple[list[int], list[int]]],
    *,
    batch_size: int,
) -> tuple[list[float], list[int]]:
    """Teacher-forced negative log-likelihood of the labelled tokens of each (input_ids, labels) sequence.

    Returns:
        (nll_sums, token_counts), one entry per item; the per-token loss is their ratio.
    """
    device = next(model.parameters()).device
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    sums: list[float] = []
    counts: list[int] = []
    for start in range(0, len(sequences), batch_size):
        pairs = sequences[start : start + batch_size]
        input_ids = pad_batch([p[0] for p in pairs], tokenizer.pad_token_id, "right").to(device)  # (B, T)
        labels = pad_batch([p[1] for p in pairs], IGNORE_INDEX, "right").to(device)
        attention_mask = pad_batch([[1] * len(p[0]) for p in pairs], 0, "right").to(device)
        pixel_values = torch.stack(pixels[start : start + batch_size]).to(device, dtype)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values).logits
        # position t predicts token t+1
        logits, targets = logits[:, :-1].float(), labels[:, 1:]  # (B, T-1, V), (B, T-1)
        nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
        mask = targets != IGNORE_INDEX
        sums.extend((nll * mask).sum(1).tolist())
        counts.extend(mask.sum(1).tolist())
    return sums, counts
