"""Stand-ins for the real study's hub files, built offline: the checkpoints and an LRV Chart parquet.

No machine here reaches the Hugging Face hub, so the real-scale path (`base.model: hub`, `prepare.source:
lrv_chart`, `evaluate.critic.kind: llava_critic`) is exercised on local folders laid out as the hub ones:

- the LLaVA-1.5 and LLaVA-Critic architectures from the shipped configs (`configs/`), full size or shrunk,
  with random weights;
- the real image processors (CLIP at 336 px, OneVision anyres at 384 px) and chat templates;
- a stand-in tokenizer: byte-level BPE learned on the prompts, laid out over the real vocabulary size with
  every special token at its real id (`<image>` 32000 and `<pad>` 32001 for LLaVA-1.5; the Qwen2 specials
  151643-151647 for the critic). The ids the learned tokens leave free hold filler tokens that no text
  encodes to;
- an LRV Chart parquet in the dataset's schema (`id`, `image {bytes, path}`, `conversations`,
  `data_source`), with synthetic charts and their ground-truth answers as multi-turn conversations.

The stand-in LLaVA's output layer favours the learned tokens (`emphasise_learned_tokens`): random weights
would otherwise sample filler tokens almost always, and two samples of filler text tie under every judge,
leaving no preference pair to train DPO on. Its sentence ends are sampled at a set rate and its EOS row is
taught to follow them (`teach_eos`), so that samples end after a varying number of tokens, as a trained
model's do: a sample cut at max_new_tokens is never a pair, and one that ends at once is empty and ties with
its twin.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from posttrain.models.architectures import build_random
from posttrain.models.loading import llava_processor
from posttrain.models.template import IMAGE_TOKEN, encode_prompt

FILLER = "<standin_{}>"
FILLER_PATTERN = re.compile(r"<standin_\d+>")

# The real special tokens and their ids (llava-hf/llava-1.5-7b-hf; Qwen2 as in LLaVA-OneVision).
LLAVA_SPECIALS = {"<unk>": 0, "<s>": 1, "</s>": 2, IMAGE_TOKEN: 32000, "<pad>": 32001}
QWEN2_SPECIALS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    IMAGE_TOKEN: 151646,
    "<video>": 151647,
}


def standin_tokenizer(
    texts: list[str],
    specials: dict[str, int],
    *,
    eos: str,
    pad: str,
    bos: str | None = None,
    unk: str | None = None,
    learned: int = 1024,
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer learned on `texts`, with `specials` at the given (real) ids.

    Args:
        texts: the text the tokens are learned from.
        specials: special token -> id; the vocabulary spans ids 0..max(id).
        eos: the end-of-sequence token (one of `specials`).
        pad: the padding token.
        bos: the beginning-of-sequence token, which encoding prepends; None: none (Qwen2).
        unk: the unknown token, or None.
        learned: how many BPE tokens (byte alphabet included) to learn.

    Returns:
        The tokenizer. Learned tokens take the lowest ids the specials leave free; the remaining ids are
        filler tokens (`FILLER`) that no text encodes to.
    """
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=learned, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    state = json.loads(bpe.to_str())["model"]
    size = max(specials.values()) + 1
    reserved = set(specials.values())
    free = iter(i for i in range(size) if i not in reserved)
    vocab = {token: next(free) for token in sorted(state["vocab"], key=state["vocab"].get)}
    vocab.update(specials)
    vocab.update({FILLER.format(i): i for i in free})
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(specials))
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, specials[bos])]
        )
    extra = {"image_token": IMAGE_TOKEN}
    if "<video>" in specials:
        extra["video_token"] = "<video>"
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token=unk,
        extra_special_tokens=extra,
        padding_side="right",
    )


def learned_token_ids(tokenizer: PreTrainedTokenizerFast) -> list[int]:
    """Ids of the tokens text can encode to: neither filler nor special."""
    special = set(tokenizer.all_special_ids)
    return sorted(
        i for t, i in tokenizer.get_vocab().items() if not FILLER_PATTERN.fullmatch(t) and i not in special
    )


@torch.no_grad()
def emphasise_learned_tokens(model, ids: list[int], factor: float = 3.0) -> None:
    """Scale the output-layer rows of `ids` by `factor`, so random weights sample mostly those tokens.

    With hidden size d and init std s, a random logit has std s·√d (1.3 for LLaVA-1.5's 0.02·√4096); the
    ~31,000 filler rows then outweigh ~1,000 learned ones. ×3 leaves filler tokens a few percent of samples.
    """
    head = model.get_output_embeddings().weight  # (vocab, hidden)
    head[torch.tensor(ids, device=head.device)] *= factor


@torch.no_grad()
def lead_with_the_current_token(model, embed_factor: float = 50.0, layer_share: float = 0.3) -> float:
    """Scale the text tower so that its last hidden state is led by the current token's embedding.

    In a random pre-norm tower every layer adds an output of norm ~σ²·d^1.5 (σ the init std, d the hidden
    size) to an embedding of norm σ·√d: at 7B, 32 layers of ~105 on 1.3, and the last hidden state is a
    chaotic function of the whole context that no output row can steer (the taught EOS and sentence ends
    did not carry over from one sequence to the next). Here the input embeddings are ×`embed_factor` and
    each layer's output projections (attention ``o_proj``, MLP ``down_proj``) are scaled so that the 2L
    layer outputs together are about `layer_share` of the embedding's norm: the stand-in then samples
    nearly as a bigram model whose rows `teach_eos` can set, while the prompt and the image still move it.

    Returns:
        The output projections' scale.
    """
    text = model.config.text_config
    d, layers, std = text.hidden_size, text.num_hidden_layers, text.initializer_range
    scale = layer_share * embed_factor / (std * d * (2 * layers) ** 0.5)
    model.get_input_embeddings().weight.mul_(embed_factor)
    for name, weight in model.get_decoder().named_parameters():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            weight.mul_(scale)
    return scale


SENTENCE_END = re.compile(r"[.?!]\s*$")


def _end_mass(logits: torch.Tensor, ends: torch.Tensor, shift: torch.Tensor, temperature: float) -> float:
    """Mean probability, at `temperature`, of sampling one of `ends` with their logits raised by `shift`."""
    shifted = logits.clone()
    shifted[:, ends] += shift[:, None]
    return float((shifted / temperature).softmax(-1)[:, ends].sum(-1).mean())


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


def _without(x: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """`x` with its component along the unit vector `direction` removed."""
    return x - (x @ direction) * direction


@torch.no_grad()
def teach_eos(
    model,
    tokenizer: PreTrainedTokenizerFast,
    questions: list[str],
    *,
    seed: int = 0,
    answer_tokens: int = 24,
    end_mass: float = 0.1,
    temperature: float = 0.7,
) -> dict[str, float]:
    """Make the model end its answers after sentence-final tokens, which it samples at a set rate.

    A random EOS row gives each context a fixed random EOS logit of std s·√d·factor: EOS is then either
    almost certain or almost impossible, and where the prompts' shared last token (``ASSISTANT:``) happens
    to be of the first kind every sample is empty (an H100 smoke run found 66% of prompts with two
    identical samples). And a 7B-wide random tower samples a few byte tokens over and over: 96 H100
    samples of 24 tokens held no sentence end at all, so none stopped and no preference pair formed.

    So the output layer is set from the hidden states of contexts like the generation's: each of
    `questions` as a generation prompt (the real template, the image tokens, random pixels) followed by
    `answer_tokens` random learned tokens, a sixth of them sentence ends (learned tokens whose text ends in
    ``.``, ``?`` or ``!``). (Random hidden states differ more between sequences than within one: the common
    direction of one long sequence did not carry over to prompts.)

    1. The sentence ends' rows gain the answers' common hidden direction, so that after other tokens the
       model samples an end with probability `end_mass` at `temperature`: a raise shared by the contexts
       (scaling the rows instead made an end certain in some contexts and impossible in others).
    2. The EOS row is the mean direction after an end minus that after other tokens, scaled so that after
       an end EOS is as likely as every other token together (median over the ends; temperature 1).

    Both have the prompt ends' mean hidden direction projected out: answers neither open with an end nor
    are empty. Each step then ends an answer with probability about `end_mass` × ½.

    Args:
        model: a LLaVA whose learned rows are already emphasised (`emphasise_learned_tokens`).
        tokenizer: its stand-in tokenizer.
        questions: the prompts' questions (any text; the template wraps it).
        seed: draws the pixels and the answers' tokens.
        answer_tokens: random tokens after each prompt.
        end_mass: the probability of sampling a sentence end after another token.
        temperature: the sampling temperature `end_mass` holds at (preferences.temperature).

    Returns:
        The end rows' raise (median context, logits); at `temperature`, the probability of sampling an end
        after other tokens and at the prompt end; EOS's mean probability (temperature 1) after an end,
        after other tokens, and at the prompt end.
    """
    learned = learned_token_ids(tokenizer)
    ends = [i for i in learned if SENTENCE_END.search(tokenizer.decode([i]))]
    if not ends:
        raise ValueError("the stand-in tokenizer learned no sentence-final token (text ending in . ? !)")
    end_set = set(ends)
    others = [i for i in learned if i not in end_set]
    vision = model.config.vision_config
    n_image = (vision.image_size // vision.patch_size) ** 2
    g = torch.Generator().manual_seed(seed)
    rows, kinds = [], []  # kinds: 0 prompt, 1 prompt end, 2 after an end, 3 after another token
    for q in questions:
        prompt = encode_prompt(tokenizer, [], q, n_image)
        is_end = (torch.rand(answer_tokens, generator=g) < 1 / 6).tolist()
        answer = [
            (ends if e else others)[int(torch.randint(len(ends if e else others), (1,), generator=g))]
            for e in is_end
        ]
        rows.append(prompt + answer)
        kinds.append([0] * (len(prompt) - 1) + [1] + [2 if e else 3 for e in is_end])
    width = max(map(len, rows))
    head = model.get_output_embeddings().weight
    device = head.device
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    kind = torch.tensor([k + [-1] * (width - len(k)) for k in kinds], device=device)
    size = vision.image_size
    pixels = torch.randn(len(rows), 3, size, size, generator=g).to(device=device, dtype=head.dtype)
    was_training = model.training
    model.eval()
    hidden = model.model(input_ids=ids, pixel_values=pixels, attention_mask=mask).last_hidden_state
    model.train(was_training)
    hidden = hidden.float()[kind >= 1]
    kind = kind[kind >= 1]
    at_start, at_end, at_other = kind == 1, kind == 2, kind == 3
    unit = _unit(hidden)
    start = _unit(unit[at_start].mean(0))

    end_ids = torch.tensor(ends, device=device)
    common = _unit(_without(unit[at_other].mean(0), start))
    along = hidden[at_other] @ common  # each context's share of the common direction
    logits = hidden[at_other] @ head.float().T
    logits[:, tokenizer.eos_token_id] = -float("inf")
    unit_along = along / along.median()
    shift = min(
        torch.linspace(0, 40, 161).tolist(),  # the median context's raise, in logits
        key=lambda c: abs(_end_mass(logits, end_ids, c * unit_along, temperature) - end_mass),
    )
    head[end_ids] += (shift / float(along.median())) * common.to(head.dtype)

    w = _without(unit[at_end].mean(0) - unit[at_other].mean(0), start)
    logits = hidden[at_end] @ head.float().T
    logits[:, tokenizer.eos_token_id] = -float("inf")
    target = logits.logsumexp(-1).median()  # EOS as likely as all other tokens together
    w = w * (target / (hidden[at_end] @ w).median())
    head[tokenizer.eos_token_id] = w.to(head.dtype)

    logits = hidden @ head.float().T
    p_eos = logits.softmax(-1)[:, tokenizer.eos_token_id]
    p_end = (logits / temperature).softmax(-1)[:, end_ids].sum(-1)
    return {
        "end_shift": round(shift, 2),
        "p_end_after_other": round(float(p_end[at_other].mean()), 3),
        "p_end_at_prompt_end": round(float(p_end[at_start].mean()), 3),
        "p_eos_after_end": round(float(p_eos[at_end].mean()), 3),
        "p_eos_after_other": round(float(p_eos[at_other].mean()), 3),
        "p_eos_at_prompt_end": round(float(p_eos[at_start].mean()), 3),
    }


def build_llava(
    config, texts: list[str], *, device: str = "cpu", dtype: torch.dtype | None = None, seed: int = 0
) -> tuple[Any, PreTrainedTokenizerFast, dict[str, float]]:
    """The stand-in LLaVA in memory: random weights of `config`, its tokenizer, what `teach_eos` measured.

    The tokenizer is learned on `texts`; the tower is led by the current token
    (`lead_with_the_current_token`), the learned rows are emphasised and the EOS is taught on the first 16 of
    `texts` as questions (`teach_eos`).
    """
    tokenizer = standin_tokenizer(texts, LLAVA_SPECIALS, bos="<s>", eos="</s>", pad="<pad>", unk="<unk>")
    model = build_random(config, dtype=dtype, device=device, seed=seed)
    lead_with_the_current_token(model)
    emphasise_learned_tokens(model, learned_token_ids(tokenizer))
    eos = teach_eos(model, tokenizer, [t.replace(IMAGE_TOKEN, "")[:200] for t in texts[:16]], seed=seed)
    generation = model.generation_config
    generation.bos_token_id = tokenizer.bos_token_id
    generation.eos_token_id = tokenizer.eos_token_id
    generation.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, eos


def write_llava(
    folder: str | Path,
    config,
    texts: list[str],
    *,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    seed: int = 0,
) -> Path:
    """Write a stand-in `llava-hf/llava-1.5-7b-hf` folder: random weights of `config`, processor, template.

    Args:
        folder: the output folder (hub layout: config, safetensors, tokenizer, processor files).
        config: a `LlavaConfig` (`posttrain.models.architectures.load_config("llava-1.5-7b")`, maybe shrunk).
        texts: prompts and answers the stand-in tokenizer learns from (`build_llava`).
        device: where the random weights are built (a GPU builds a 7B model in seconds).
        dtype: their dtype; None: bfloat16 on CUDA, float32 elsewhere.
        seed: the initialisation seed.

    Returns:
        The folder.
    """
    strategy = config.vision_feature_select_strategy
    if strategy != "default":  # what `llava_processor` expands images for
        raise ValueError(f"a LLaVA-1.5 config selects image features by 'default', not {strategy!r}")
    folder = Path(folder)
    model, tokenizer, eos = build_llava(config, texts, device=device, dtype=dtype, seed=seed)
    print(f"stand-in EOS: {eos}", flush=True)
    vision = config.vision_config
    model.save_pretrained(folder)
    llava_processor(tokenizer, vision.image_size, vision.patch_size).save_pretrained(folder)
    return folder


def write_critic(
    folder: str | Path,
    config,
    texts: list[str],
    *,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    seed: int = 0,
) -> Path:
    """Write a stand-in LLaVA-Critic folder in transformers' OneVision format (what `convert-critic` writes).

    The arguments are `write_llava`'s, with `config` a `LlavaOnevisionConfig`
    (`load_config("llava-critic-7b")`, maybe shrunk) and `texts` what the stand-in Qwen2 tokenizer learns
    from (the critic prompts).
    """
    from posttrain.realscale.convert_critic import write_processor

    folder = Path(folder)
    tokenizer = standin_tokenizer(texts, QWEN2_SPECIALS, eos="<|im_end|>", pad="<|endoftext|>")
    model = build_random(config, dtype=dtype, device=device, seed=seed)
    generation = model.generation_config
    generation.eos_token_id = tokenizer.eos_token_id
    generation.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    write_processor(folder, tokenizer, config)
    return folder


# LRV Chart declines in many wordings; the stand-in rewrites the synthetic "There is no {colour} bar in the
# chart." into these, so the real path's negative labelling is exercised on them.
LRV_DECLINES = (
    "The data for the {colour} {element} is not available.",
    "No information is given about a {colour} {element}.",
    "The chart does not feature a {colour} {element}.",
    "There isn't a {colour} {element} in the chart.",
    "The value of the {colour} {element} is not provided in the chart.",
    "I don't see a {colour} {element} in this chart.",
)


def lrv_decline(answer: str, k: int) -> str:
    """The `k`-th LRV wording (cyclic) of a synthetic "There is no {colour} {element} in the chart."."""
    m = re.fullmatch(r"There is no (\w+) (\w+) in the chart\.", answer)
    if m is None:
        return answer
    return LRV_DECLINES[k % len(LRV_DECLINES)].format(colour=m.group(1), element=m.group(2))


def write_lrv_parquet(path: str | Path, images: int, size: int, seed: int = 0, duplicates: int = 3) -> Path:
    """Write LRV Chart-schema rows of synthetic charts: conversations, follow-ups, LRV declines, duplicates.

    Each of the `images` charts of the synthetic study pool is drawn at `size` px (PNG bytes) with its
    questions as one multi-turn conversation, some turns follow-ups that need the turn before ("And the
    blue bar?"), negatives declined in LRV's wordings (`LRV_DECLINES`); the first human turn carries
    ``<image>``, as in LRV. Then, as hub data does, `duplicates` rows repeat an earlier chart under a new id
    (its bytes re-encoded, so only the pixels match) and one row repeats an earlier id.
    """
    import io
    import tempfile

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from posttrain.data.charts import generate_pool
    from posttrain.data.examples import group_conversations

    rows: list[dict[str, Any]] = []
    n_declines = 0
    with tempfile.TemporaryDirectory() as tmp:
        examples = generate_pool("study", images, size, 3, 0.35, seed, Path(tmp), followup_fraction=0.6)
        for c in group_conversations(examples):
            turns: list[dict[str, str]] = []
            for q, a in c.turns:
                if a.startswith("There is no "):
                    a, n_declines = lrv_decline(a, n_declines), n_declines + 1
                turns.append({"from": "human", "value": (f"{IMAGE_TOKEN}\n" if not turns else "") + q})
                turns.append({"from": "gpt", "value": a})
            png = (Path(tmp) / Path(c.image).name).read_bytes()
            rows.append(
                {
                    "id": c.id,
                    "image": {"bytes": png, "path": f"{c.id}.png"},
                    "conversations": turns,
                    "data_source": "lrv_chart",
                }
            )
    for k in range(min(duplicates, len(rows) // 2)):
        source = rows[2 * k]
        with Image.open(io.BytesIO(source["image"]["bytes"])) as im:
            buf = io.BytesIO()
            im.save(buf, format="PNG", compress_level=1)  # other bytes, same pixels
        rows.append(
            {
                "id": f"{source['id']}-copy",
                "image": {"bytes": buf.getvalue(), "path": f"{source['id']}-copy.png"},
                "conversations": source["conversations"][:2],
                "data_source": "lrv_chart",
            }
        )
    if len(rows) > 1:
        rows.append({**rows[1], "conversations": rows[1]["conversations"][:2]})  # a repeated id
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path
