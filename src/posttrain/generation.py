"""Batched, deterministic generation and teacher-forced scoring of sequences built by the shared template.

Callers build the ids with `posttrain.template.encode_conversation` (a turn after its history), so every
prompt here is one the training saw the same way.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, StaticCache

from posttrain.distributed import gather_batches, is_main, my_batches
from posttrain.template import IGNORE_INDEX, answer_start, pad_batch

# Wall time and token counts of every `generate` and `answer_nll` call in this process, for the stages' logs
# (`throughput`); never part of an output, which must not depend on timing.
_TOTALS: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))


def throughput() -> dict[str, dict[str, float]]:
    """What this process generated and scored so far, with rates.

    ``new_tokens`` counts each answer's tokens up to its EOS; ``computed_tokens`` the positions decoded for
    every row, a row that ended waiting for its batch's longest (what answers of max_new_tokens each cost).

    Returns:
        ``{"generate": {seconds, prompts, rows, prompt_tokens, new_tokens, computed_tokens, new_tokens_per_s,
        computed_tokens_per_s}, "score": {seconds, sequences, tokens, tokens_per_s}, "judge": {seconds,
        prompts, tokens, tokens_per_s}}`` (``judge``: `continuation_nll`, prompts and continuations computed),
        the parts that ran.
    """
    out = {}
    for kind, totals in _TOTALS.items():
        row = {k: round(v, 3) if k == "seconds" else int(v) for k, v in totals.items()}
        for counted in ("new_tokens", "computed_tokens") if kind == "generate" else ("tokens",):
            rate = totals[counted] / totals["seconds"] if totals["seconds"] else None
            row[f"{counted}_per_s"] = round(rate, 1) if rate is not None else None
        out[kind] = row
    return out


def _new_token_count(new_tokens: torch.Tensor, eos_token_id: int) -> int:
    """Tokens generated per row up to and including its first EOS (the rest is padding)."""
    is_eos = new_tokens == eos_token_id  # (R, N)
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, new_tokens.shape[1])
    return int(first.sum())


def _ended(new_tokens: torch.Tensor, eos_token_id: int) -> list[bool]:
    """Per row, whether it generated an EOS: False for an answer cut at max_new_tokens."""
    return (new_tokens == eos_token_id).any(1).tolist()  # (R,)


def _left_padded(prompts: list[list[int]], pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, T), of prompts left-padded so that they all end together."""
    input_ids = pad_batch(prompts, pad_token_id, "left").to(device)
    attention_mask = pad_batch([[1] * len(p) for p in prompts], 0, "left").to(device)
    return input_ids, attention_mask


def _generate_batch(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pixel_values: torch.Tensor,
    *,
    samples: int,
    max_new_tokens: int,
    cache: str,
    generate_kwargs: dict,
) -> torch.Tensor:
    """New tokens for a left-padded batch, `samples` continuations per prompt, the prompt computed once.

    The multimodal prompt (image tokens included) is the costly part: it runs once per prompt, into a KV cache
    whose rows are then repeated for the samples, and `model.generate` continues from there (its first step
    feeds the prompt's last token). The prompt runs on a cache of its own length (a static cache would make
    it attend over the whole preallocated length); the decoding steps then write in place into a static
    cache allocated once for the whole continuation, or grow a dynamic one by concatenation, which copies
    itself every step.

    Returns:
        (B·samples, max_new_tokens or fewer) new token ids; rows i·samples … i·samples + samples − 1 answer
        prompt i.
    """
    length = input_ids.shape[1]
    # positions as `generate` numbers them: left padding does not count
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
    prompt_kv = DynamicCache(config=model.config)  # the prompt attends over its own length, not the cache's
    model(
        input_ids=input_ids[:, :-1],
        attention_mask=attention_mask[:, :-1],
        position_ids=position_ids[:, :-1],
        pixel_values=pixel_values,
        past_key_values=prompt_kv,
        use_cache=True,
        logits_to_keep=1,
    )
    if cache == "static":
        kv = StaticCache(config=model.config, max_cache_len=length + max_new_tokens)
        for i, layer in enumerate(prompt_kv.layers):  # (B, heads, T-1, head_dim) each, repeated per sample
            kv.update(layer.keys.repeat_interleave(samples, 0), layer.values.repeat_interleave(samples, 0), i)
        del prompt_kv
    else:
        prompt_kv.batch_repeat_interleave(samples)
        kv = prompt_kv
    out = model.generate(
        input_ids=input_ids.repeat_interleave(samples, dim=0),
        attention_mask=attention_mask.repeat_interleave(samples, dim=0),
        past_key_values=kv,
        max_new_tokens=max_new_tokens,
        disable_compile=True,  # one graph per prompt length and process costs more than it saves here
        **generate_kwargs,
    )
    return out[:, length:]


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
    samples: int = 1,
    cache: str = "static",
    progress: str | None = None,
    with_ends: bool = False,
) -> list:
    """Answer each (image, prompt ids) with the model, batched with left padding.

    Greedy by default; with `do_sample` the sampling is seeded per batch, so the same inputs and seed give the
    same outputs. With `samples` > 1, each prompt is answered that many times from one computation of the
    prompt (`_generate_batch`).

    Args:
        model: a LLaVA model (PEFT-wrapped or not).
        tokenizer: its tokenizer (pad and EOS ids).
        pixels: (3, H, W) pixel values, one per prompt.
        prompts: token ids built by `posttrain.template`, image tokens included.
        batch_size: prompts per batch (the model runs batch_size · samples rows while decoding).
        max_new_tokens: the longest answer.
        do_sample: sample instead of greedy decoding.
        temperature: sampling temperature.
        top_p: nucleus sampling mass.
        seed: with `do_sample`, batch k is seeded with seed + its first prompt's index.
        samples: answers per prompt.
        cache: ``static`` (preallocated, written in place) or ``dynamic`` (transformers' default).
        progress: a label for progress lines, or None for none.
        with_ends: each answer as (text, ended), ended False where it was cut at `max_new_tokens` without an
            EOS.

    Returns:
        The decoded continuations, special tokens removed: one string per prompt, or with `samples` > 1 one
        tuple of `samples` strings per prompt (with `with_ends`, (text, ended) in place of each string).
    """
    device = next(model.parameters()).device
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    unset = {"temperature": None, "top_p": None}  # greedy: the model's sampling defaults must not warn
    sampling = {"temperature": temperature, "top_p": top_p} if do_sample else unset
    generate_kwargs = {
        "do_sample": do_sample,
        **sampling,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    outputs: dict[int, list] = {}  # batch index -> its answers
    n_batches = -(-len(prompts) // batch_size)
    mine = my_batches(n_batches)  # with several processes, batch k is computed by process k mod N
    for batch_index in mine:
        start = batch_index * batch_size
        batch = prompts[start : start + batch_size]
        input_ids, attention_mask = _left_padded(batch, tokenizer.pad_token_id, device)  # (B, T) each
        pixel_values = torch.stack(pixels[start : start + batch_size]).to(device, dtype)  # (B, 3, H, W)
        if do_sample:
            torch.manual_seed(seed + start)
        t0 = time.perf_counter()
        new_tokens = _generate_batch(
            model,
            input_ids,
            attention_mask,
            pixel_values,
            samples=samples,
            max_new_tokens=max_new_tokens,
            cache=cache,
            generate_kwargs=generate_kwargs,
        )
        texts = [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
        if with_ends:
            texts = list(zip(texts, _ended(new_tokens, tokenizer.eos_token_id)))
        totals = _TOTALS["generate"]
        totals["seconds"] += time.perf_counter() - t0
        totals["prompts"] += len(batch)
        totals["rows"] += len(batch) * samples
        totals["prompt_tokens"] += int(attention_mask.sum())
        totals["new_tokens"] += _new_token_count(new_tokens, tokenizer.eos_token_id)
        totals["computed_tokens"] += new_tokens.numel()  # (rows, positions the batch decoded)
        if samples == 1:
            outputs[batch_index] = texts
        else:
            outputs[batch_index] = [tuple(texts[i : i + samples]) for i in range(0, len(texts), samples)]
        done = sum(map(len, outputs.values()))
        if (
            progress
            and is_main()
            and (len(outputs) % max(len(mine) // 4, 1) == 0 or len(outputs) == len(mine))
        ):
            print(
                f"{progress}: generated {done}/{len(prompts)}" + ("" if len(mine) == n_batches else " here"),
                flush=True,
            )
    return gather_batches(outputs)


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
    results: dict[int, list[tuple[float, int]]] = {}  # batch index -> (nll sum, token count) per item
    for batch_index in my_batches(-(-len(sequences) // batch_size)):
        start = batch_index * batch_size
        t0 = time.perf_counter()
        pairs = sequences[start : start + batch_size]
        input_ids = pad_batch([p[0] for p in pairs], tokenizer.pad_token_id, "right").to(device)  # (B, T)
        labels = pad_batch([p[1] for p in pairs], IGNORE_INDEX, "right")
        first = answer_start(labels)  # the head runs from the first labelled next token on
        labels = labels.to(device)
        attention_mask = pad_batch([[1] * len(p[0]) for p in pairs], 0, "right").to(device)
        pixel_values = torch.stack(pixels[start : start + batch_size]).to(device, dtype)
        logits = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            logits_to_keep=labels.shape[1] - first,
        ).logits.float()  # (B, K, V): positions first .. T-1
        targets = F.pad(labels[:, first + 1 :], (0, 1), value=IGNORE_INDEX)  # (B, K): t predicts token t+1
        nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
        mask = targets != IGNORE_INDEX
        results[batch_index] = list(zip((nll * mask).sum(1).tolist(), mask.sum(1).tolist()))
        totals = _TOTALS["score"]
        totals["seconds"] += time.perf_counter() - t0
        totals["sequences"] += len(pairs)
        totals["tokens"] += int(attention_mask.sum())
    gathered = gather_batches(results)
    return [nll for nll, _ in gathered], [n for _, n in gathered]


@torch.no_grad()
def continuation_nll(
    model,
    tokenizer,
    pixels: list[torch.Tensor],
    prompts: list[list[int]],
    continuations: list[list[int]],
    *,
    batch_size: int,
) -> list[list[float]]:
    """Teacher-forced NLL of each of the same few `continuations` after every prompt, each prompt run once.

    What `answer_nll` gives for the sequences prompt + continuation (every continuation token labelled), at a
    fraction of the cost when the prompt is long and the continuations short (a self-judge's ~1,000-token
    pairwise prompt and its three verdict sentences): the prompts of a batch, left-padded, fill a KV cache
    once; each continuation then runs on that cache, which is cropped back to the prompts after it.

    Args:
        model: a LLaVA model (PEFT-wrapped or not), in eval mode.
        tokenizer: its tokenizer (the pad id).
        pixels: (3, H, W) pixel values, one per prompt.
        prompts: token ids ending where the continuations start (image tokens included).
        continuations: K token-id lists, each scored after every prompt.
        batch_size: prompts per batch.

    Returns:
        One list of K NLL sums (nats) per prompt.
    """
    device = next(model.parameters()).device
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    results: dict[int, list[list[float]]] = {}
    for batch_index in my_batches(-(-len(prompts) // batch_size)):
        start = batch_index * batch_size
        t0 = time.perf_counter()
        batch = prompts[start : start + batch_size]
        input_ids, attention_mask = _left_padded(batch, tokenizer.pad_token_id, device)  # (B, T) each
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # left padding does not count
        kv = DynamicCache(config=model.config)
        last = (
            model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                pixel_values=torch.stack(pixels[start : start + batch_size]).to(device, dtype),
                past_key_values=kv,
                use_cache=True,
                logits_to_keep=1,
            )
            .logits[:, -1]
            .float()
        )  # (B, V): predicts each continuation's first token
        first_logp = last.log_softmax(-1)
        rows = len(batch)
        sums = torch.zeros(rows, len(continuations), device=device)
        for k, ids in enumerate(continuations):
            cont = torch.tensor(ids, device=device).expand(rows, -1)  # (B, L)
            sums[:, k] = -first_logp[:, ids[0]]
            if len(ids) > 1:
                logits = model(
                    input_ids=cont[:, :-1],
                    attention_mask=torch.cat(
                        [attention_mask, attention_mask.new_ones(rows, len(ids) - 1)], 1
                    ),
                    position_ids=position_ids[:, -1:] + 1 + torch.arange(len(ids) - 1, device=device),
                    past_key_values=kv,
                    use_cache=True,
                ).logits.float()  # (B, L-1, V): position j predicts token j+1
                sums[:, k] += F.cross_entropy(logits.transpose(1, 2), cont[:, 1:], reduction="none").sum(1)
                kv.crop(-(len(ids) - 1))  # back to the prompts for the next continuation
        results[batch_index] = sums.tolist()
        totals = _TOTALS["judge"]
        totals["seconds"] += time.perf_counter() - t0
        totals["prompts"] += rows
        totals["tokens"] += int(attention_mask.sum()) + rows * sum(len(c) - 1 for c in continuations)
    return gather_batches(results)
