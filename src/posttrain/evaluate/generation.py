"""Batched, deterministic generation and teacher-forced scoring of sequences built by the shared template.

Callers build the ids with `posttrain.models.template.encode_conversation` (a turn after its history), so
every prompt here is one the training saw the same way.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, StaticCache, StaticLayer
from transformers.generation.logits_process import (
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from posttrain.core.distributed import gather_batches, is_main, my_batches
from posttrain.core.errors import InputError
from posttrain.models.template import IGNORE_INDEX, answer_start, pad_batch

# transformers' default top-k, which its sampling applies unless the generation config sets another: the
# stages' sampling keeps it, so that it draws from the distribution `model.generate(do_sample=True)` would
DEFAULT_TOP_K = 50

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


_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x · c) mod 2³² for int64 `x` in [0, 2³²) and a constant `c` < 2³², with no int64 overflow."""
    low = (x & 0xFFFF) * c
    high = ((x >> 16) * c) & 0xFFFF
    return (low + (high << 16)) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser, elementwise on int64 values in [0, 2³²): every input bit flips about
    half of the output bits.
    """
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def row_keys(seed: int, prompt_indices: list[int], samples: int) -> torch.Tensor:
    """One 32-bit key per decoded row: a hash of (seed, the prompt's index in the whole list, the sample).

    Rows are ordered as `_generate_batch` decodes them: prompt by prompt, its `samples` rows together.
    """
    prompt = torch.tensor(prompt_indices, dtype=torch.int64).repeat_interleave(samples)  # (R,)
    sample = torch.arange(samples, dtype=torch.int64).repeat(len(prompt_indices))  # (R,)
    key = _mix32(torch.full_like(prompt, seed & _MASK32))
    key = _mix32(key ^ prompt)
    return _mix32(key ^ _mix32(sample + 0x9E3779B9))


def gumbel_noise(keys: torch.Tensor, step: int, vocab: int) -> torch.Tensor:
    """(R, vocab) float32 Gumbel(0, 1) noise, a pure function of (row key, step, token id).

    Counter-based, like Philox: the noise of a row does not depend on which rows share its batch, on the
    device, or on what was drawn before, so a sample is the same at any batch size and in any process.
    """
    device = keys.device
    token = _mix32(torch.arange(vocab, dtype=torch.int64, device=device))  # (V,)
    at_step = _mix32(keys.to(device) ^ _mix32(torch.full_like(keys, step & _MASK32, device=device)))  # (R,)
    bits = _mix32(at_step[:, None] ^ token[None, :])  # (R, V) in [0, 2³²)
    uniform = ((bits >> 8).to(torch.float32) + 0.5) * 2.0**-24  # (R, V) in (0, 1), 24 random bits each
    return -torch.log(-torch.log(uniform))


class SeededSampling(LogitsProcessor):
    """Sampling as greedy decoding of Gumbel-perturbed scores (the Gumbel-max trick), seeded per row.

    argmax(log p + G) with G ~ Gumbel(0, 1) i.i.d. is a draw from p; the warpers (temperature, top-k, top-p,
    in transformers' order) shape p first, and a token they remove (−inf) is never drawn. The noise of row r
    at step t is `gumbel_noise(keys[r], t)`: each answer depends on its own prompt, sample and seed only.
    """

    def __init__(
        self, keys: torch.Tensor, prompt_length: int, *, temperature: float, top_p: float, top_k: int
    ):
        self.keys = keys
        self.prompt_length = prompt_length
        self.warpers = LogitsProcessorList()
        if temperature != 1.0:
            self.warpers.append(TemperatureLogitsWarper(temperature))
        if top_k:
            self.warpers.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = self.warpers(input_ids, scores)  # (R, V)
        step = input_ids.shape[1] - self.prompt_length
        return scores + gumbel_noise(self.keys, step, scores.shape[1]).to(scores.device)


class GenerationMemoryError(InputError, RuntimeError):
    """Raised when not even one prompt's generation fits the GPU."""


class Halving:
    """Runs ranges of items in chunks of at most `size`, halving `size` for good when CUDA runs out of memory.

    For work whose results do not depend on the items beside them (seeded sampling, greedy decoding): a chunk
    that ran out of memory is run again in halves, with the same results, and so are the chunks after it.
    The first halving of each size is printed.
    """

    def __init__(self, size: int, label: str, unit: str = "prompts"):
        self.size, self.label, self.unit = size, label, unit

    def run(self, start: int, stop: int, work, one: str = "one item") -> list:
        """`work(a, b)` (the results of items a … b − 1) over start … stop − 1, chunk by chunk.

        Raises:
            GenerationMemoryError: a chunk of one item ran out of memory; `one` describes such an item.
        """
        out: list = []
        while len(out) < stop - start:
            at = start + len(out)
            try:
                out += work(at, min(at + self.size, stop))
                continue
            except torch.OutOfMemoryError:
                pass  # out of the handler first: its traceback holds the chunk's tensors
            if self.size == 1:
                raise GenerationMemoryError(
                    f"{self.label}: not even {one} fits this GPU's free memory; free the GPU (another "
                    "process may hold it), lower max_new_tokens, or use a larger GPU"
                )
            tried = min(self.size, stop - at)
            self.size = max(tried // 2, 1)
            torch.cuda.empty_cache()
            print(
                f"{self.label}: out of GPU memory at {tried} {self.unit}; going on at {self.size} a batch "
                "(the results stay the same: none depends on the others in its batch)",
                flush=True,
            )
        return out


def _left_padded(prompts: list[list[int]], pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, T), of prompts left-padded so that they all end together."""
    input_ids = pad_batch(prompts, pad_token_id, "left").to(device)
    attention_mask = pad_batch([[1] * len(p) for p in prompts], 0, "left").to(device)
    return input_ids, attention_mask


class _IntoSampleRows(DynamicLayer):
    """The prompt's cache layer: it writes each prompt's keys and values straight into the rows of its
    `samples` continuations in a static cache layer (`target`, B·samples rows) and keeps none itself.

    The prompt attends over its own keys only (the static layer would make it attend over the whole
    preallocated length), and no second cache of the prompt ever exists: before, a cache of the prompt
    (B rows) was copied into the static one and freed layer by layer, and the freed blocks, half the size of
    the static layer's, could not take its allocations (`bench/results/generation_memory_h100.json`: 8 GB
    reserved above the peak at 64 prompts × 2; issue 33's out-of-memory with 11 GiB reserved but
    unallocated).
    """

    def __init__(self, target, samples: int):
        super().__init__()
        self.target, self.samples = target, samples

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write (B, heads, T, head_dim) keys and values into every sample's rows; return them to attend."""
        target, samples = self.target, self.samples
        if type(target) is not StaticLayer:  # e.g. a sliding window: the layer's own update, rows repeated
            target.update(
                key_states.repeat_interleave(samples, 0), value_states.repeat_interleave(samples, 0)
            )
            return key_states, value_states
        b, heads, length, _ = key_states.shape
        if not target.is_initialized:  # its (B·samples, heads, max_cache_len, head_dim) tensors, zeros
            target.lazy_initialization(
                key_states[:1].expand(b * samples, -1, -1, -1),
                value_states[:1].expand(b * samples, -1, -1, -1),
            )
        start = int(target.cumulative_length)
        for cached, new in ((target.keys, key_states), (target.values, value_states)):
            rows = cached.view(b, samples, heads, *cached.shape[2:])  # row i·samples + s is (i, s)
            rows[:, :, :, start : start + length] = new.unsqueeze(1)  # the same prompt in every sample's row
        target.cumulative_length.add_(length)
        return key_states, value_states


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

    The multimodal prompt (image tokens included) is the costly part: it runs once per prompt, and
    `model.generate` continues from its KV cache (its first step feeds the prompt's last token). With the
    static cache, allocated once for the whole continuation and written in place while decoding, the prompt
    writes its keys and values straight into the rows of its samples (`_IntoSampleRows`), attending over its
    own length only; with the dynamic one (grown by concatenation, which copies it every step), the prompt's
    cache rows are repeated for the samples.

    Returns:
        (B·samples, max_new_tokens or fewer) new token ids; rows i·samples … i·samples + samples − 1 answer
        prompt i.
    """
    length = input_ids.shape[1]
    # positions as `generate` numbers them: left padding does not count
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
    if cache == "static":
        kv = StaticCache(config=model.config, max_cache_len=length + max_new_tokens)
        prompt_kv = Cache(layers=[_IntoSampleRows(layer, samples) for layer in kv.layers])
    else:
        kv = prompt_kv = DynamicCache(config=model.config)
    model(
        input_ids=input_ids[:, :-1],
        attention_mask=attention_mask[:, :-1],
        position_ids=position_ids[:, :-1],
        pixel_values=pixel_values,
        past_key_values=prompt_kv,  # attended over the prompt's own length, not the static cache's
        use_cache=True,
        logits_to_keep=1,
    )
    if cache != "static":
        prompt_kv.batch_repeat_interleave(samples)
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

    Greedy by default. With `do_sample`, each answer is drawn with noise keyed by (seed, its prompt's index in
    `prompts`, its sample) (`SeededSampling`): the same inputs and seed give the same answers at any batch
    size and number of processes. With `samples` > 1, each prompt is answered that many times from one
    computation of the prompt (`_generate_batch`).

    When CUDA runs out of memory, the batch is decoded again in halves, and so are the batches after it; the
    new size is printed. The answers stay the same (up to the float rounding of kernels at another batch
    shape), since no answer depends on the rows beside it.

    Args:
        model: a LLaVA model (PEFT-wrapped or not).
        tokenizer: its tokenizer (pad and EOS ids).
        pixels: (3, H, W) pixel values, one per prompt.
        prompts: token ids built by `posttrain.models.template`, image tokens included.
        batch_size: prompts per batch (the model runs batch_size · samples rows while decoding).
        max_new_tokens: the longest answer.
        do_sample: sample instead of greedy decoding.
        temperature: sampling temperature.
        top_p: nucleus sampling mass.
        seed: with `do_sample`, the seed of every answer's noise.
        samples: answers per prompt.
        cache: ``static`` (preallocated, written in place) or ``dynamic`` (transformers' default).
        progress: a label for progress lines, or None for none.
        with_ends: each answer as (text, ended), ended False where it was cut at `max_new_tokens` without an
            EOS.

    Returns:
        The decoded continuations, special tokens removed: one string per prompt, or with `samples` > 1 one
        tuple of `samples` strings per prompt (with `with_ends`, (text, ended) in place of each string).

    Raises:
        GenerationMemoryError: not even one prompt fits the GPU.
    """
    if not isinstance(batch_size, int):
        raise TypeError(f"batch_size {batch_size!r}: resolve 'auto' with `generation_batch` before loading")
    device = next(model.parameters()).device
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    base_kwargs = {
        "do_sample": False,  # sampling is `SeededSampling`'s greedy pick of perturbed scores
        "temperature": None,  # the model's sampling defaults must not warn
        "top_p": None,
        "top_k": None,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    config_top_k = getattr(getattr(model, "generation_config", None), "top_k", None)
    top_k = DEFAULT_TOP_K if config_top_k is None else config_top_k

    def answer(start: int, stop: int) -> list:
        """The answers of prompts start … stop − 1, decoded as one batch (`samples` rows a prompt)."""
        batch = prompts[start:stop]
        input_ids, attention_mask = _left_padded(batch, tokenizer.pad_token_id, device)  # (B, T) each
        pixel_values = torch.stack(pixels[start:stop]).to(device, dtype)  # (B, 3, H, W)
        kwargs = dict(base_kwargs)
        if do_sample:
            keys = row_keys(seed, list(range(start, stop)), samples).to(device)  # (B·samples,)
            sampler = SeededSampling(
                keys, input_ids.shape[1], temperature=temperature, top_p=top_p, top_k=top_k
            )
            kwargs["logits_processor"] = LogitsProcessorList([sampler])
        t0 = time.perf_counter()
        new_tokens = _generate_batch(
            model,
            input_ids,
            attention_mask,
            pixel_values,
            samples=samples,
            max_new_tokens=max_new_tokens,
            cache=cache,
            generate_kwargs=kwargs,
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
            return texts
        return [tuple(texts[i : i + samples]) for i in range(0, len(texts), samples)]

    outputs: dict[int, list] = {}  # batch index -> its answers
    n_batches = -(-len(prompts) // batch_size)
    mine = my_batches(n_batches)  # with several processes, batch k is computed by process k mod N
    chunks = Halving(batch_size, progress or "generation", f"prompts × {samples} sample(s)")
    for batch_index in mine:
        start = batch_index * batch_size
        stop = min(start + batch_size, len(prompts))
        answers = chunks.run(
            start,
            stop,
            answer,
            f"one prompt ({samples} sample(s) of up to {max_new_tokens} new tokens after "
            f"{max(map(len, prompts[start:stop]))} prompt tokens)",
        )
        outputs[batch_index] = answers
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

    A batch that runs out of GPU memory is scored again in halves (`Halving`), and so are those after it.

    Returns:
        (nll_sums, token_counts), one entry per item; the per-token loss is their ratio.
    """
    device = next(model.parameters()).device
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    results: dict[int, list[tuple[float, int]]] = {}  # batch index -> (nll sum, token count) per item

    def score(start: int, stop: int) -> list[tuple[float, int]]:
        t0 = time.perf_counter()
        pairs = sequences[start:stop]
        input_ids = pad_batch([p[0] for p in pairs], tokenizer.pad_token_id, "right").to(device)  # (B, T)
        labels = pad_batch([p[1] for p in pairs], IGNORE_INDEX, "right")
        first = answer_start(labels)  # the head runs from the first labelled next token on
        labels = labels.to(device)
        attention_mask = pad_batch([[1] * len(p[0]) for p in pairs], 0, "right").to(device)
        pixel_values = torch.stack(pixels[start:stop]).to(device, dtype)
        logits = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            logits_to_keep=labels.shape[1] - first,
        ).logits.float()  # (B, K, V): positions first .. T-1
        targets = F.pad(labels[:, first + 1 :], (0, 1), value=IGNORE_INDEX)  # (B, K): t predicts token t+1
        nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
        mask = targets != IGNORE_INDEX
        totals = _TOTALS["score"]
        totals["seconds"] += time.perf_counter() - t0
        totals["sequences"] += len(pairs)
        totals["tokens"] += int(attention_mask.sum())
        return list(zip((nll * mask).sum(1).tolist(), mask.sum(1).tolist()))

    chunks = Halving(batch_size, "scoring", "sequences")  # a sequence's loss does not depend on its batch
    for batch_index in my_batches(-(-len(sequences) // batch_size)):
        start = batch_index * batch_size
        stop = min(start + batch_size, len(sequences))
        results[batch_index] = chunks.run(start, stop, score, "one sequence")
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
    A batch that runs out of GPU memory is scored again in halves (`Halving`), and so are those after it.

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

    def judge(start: int, stop: int) -> list[list[float]]:
        t0 = time.perf_counter()
        batch = prompts[start:stop]
        input_ids, attention_mask = _left_padded(batch, tokenizer.pad_token_id, device)  # (B, T) each
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # left padding does not count
        kv = DynamicCache(config=model.config)
        last = (
            model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                pixel_values=torch.stack(pixels[start:stop]).to(device, dtype),
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
        totals = _TOTALS["judge"]
        totals["seconds"] += time.perf_counter() - t0
        totals["prompts"] += rows
        totals["tokens"] += int(attention_mask.sum()) + rows * sum(len(c) - 1 for c in continuations)
        return sums.tolist()

    chunks = Halving(batch_size, "judge", "prompts")  # a prompt's scores do not depend on its batch
    for batch_index in my_batches(-(-len(prompts) // batch_size)):
        start = batch_index * batch_size
        stop = min(start + batch_size, len(prompts))
        results[batch_index] = chunks.run(start, stop, judge, "one prompt")
    return gather_batches(results)


class ContextTooShortError(InputError, ValueError):
    """Raised before loading when a prompt and its max_new_tokens exceed the model's positions."""


def check_context(section: str, phases: list, config) -> None:
    """Refuse a decoding phase whose longest prompt and new tokens exceed the language model's positions
    (its text config's ``max_position_embeddings``), naming ``<section>.max_new_tokens`` and the most that
    fit.

    Raises:
        ContextTooShortError: the prompt and `new_tokens` of some phase do not fit.
    """
    positions = getattr(config.get_text_config(), "max_position_embeddings", None)
    for phase in phases:
        if positions is None or not phase.new_tokens or phase.prompt_tokens + phase.new_tokens <= positions:
            continue
        fix = (
            f"set {section}.max_new_tokens to at most {positions - phase.prompt_tokens}"
            if phase.prompt_tokens < positions
            else "the prompts alone fill them: use shorter conversations or a model with more positions"
        )
        raise ContextTooShortError(
            f"{section}.max_new_tokens: {phase.new_tokens}, but the base model reads at most {positions} "
            f"positions (max_position_embeddings) and the longest prompt takes {phase.prompt_tokens}; {fix}"
        )


def generation_batch(
    section: str, batch_size, phases: list, *, config, adapter_bytes: float, prompts: int
) -> int:
    """A generating stage's batch_size resolved before its model loads, and said in one line.

    First the phases must fit the model's context (`check_context`). ``auto`` takes the largest batch whose
    every phase fits the GPU (`posttrain.models.memory.choose_generation_batch`); an integer runs as given,
    with a warning where the estimate says it cannot fit. On the CPU an integer is returned unchanged and
    unsaid.

    Args:
        section: the params section (``preferences`` or ``evaluate``), for the line.
        batch_size: its batch_size: prompts a batch, or ``BatchSize.AUTO``.
        phases: `posttrain.models.memory.Phase` of each kind of batch the stage runs.
        config: the base model's config (its shapes; no weight is read).
        adapter_bytes: the adapter held as a layer of its own
            (`posttrain.models.loading.adapter_layer_bytes`), or 0.
        prompts: how many prompts the stage answers.
    """
    from posttrain.core.distributed import rank_and_size
    from posttrain.models.memory import choose_generation_batch, gpu_capacity, inference_weight_bytes

    check_context(section, phases, config)
    capacity = gpu_capacity()
    if capacity is None and isinstance(batch_size, int):
        return batch_size
    batch, line = choose_generation_batch(
        section,
        batch_size,
        phases,
        config=config,
        weights=inference_weight_bytes(config, adapter_bytes),
        prompts=prompts,
        capacity=capacity,
        processes=rank_and_size()[1],
    )
    if is_main():
        print(line, flush=True)
    return batch
