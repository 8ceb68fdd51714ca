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
leaving no preference pair to train DPO on. Its EOS row is taught to follow sentence ends (`teach_eos`), so
that samples end after a varying number of tokens, as a trained model's do: a sample cut at max_new_tokens
is never a pair, and one that ends at once is empty and ties with its twin.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import CLIPImageProcessorPil, LlavaProcessor, PreTrainedTokenizerFast

from posttrain.models.architectures import build_random
from posttrain.models.template import CHAT_TEMPLATE, IMAGE_TOKEN

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


SENTENCE_END = re.compile(r"[.?!]\s*$")


@torch.no_grad()
def teach_eos(
    model, tokenizer: PreTrainedTokenizerFast, prompt_end: list[int], *, seed: int = 0, length: int = 512
) -> dict[str, float]:
    """Set the output layer's EOS row so that the model ends its answers after sentence-final tokens.

    A random EOS row gives each context a fixed random EOS logit of std s·√d·factor: EOS is then either
    almost certain or almost impossible, and where the prompts' shared last token (``ASSISTANT:``) happens
    to be of the first kind every sample is empty (an H100 smoke run found 66% of prompts with two
    identical samples). Instead, one forward pass over `length` random learned tokens, a sixth of them
    sentence ends (learned tokens whose text ends in ``.``, ``?`` or ``!``), gives the final hidden states
    after an end (mean direction u) and after any other token (v). The EOS row is the direction u − v with
    the prompt end's own hidden state projected out, scaled so that after an end EOS is as likely as every
    other token together (median over the ends; temperature 1).

    Args:
        model: a LLaVA whose learned rows are already emphasised (`emphasise_learned_tokens`).
        tokenizer: its stand-in tokenizer.
        prompt_end: the ids a generation prompt ends with (e.g. those of ``ASSISTANT:``).
        seed: draws the token sequence.
        length: tokens in the sequence.

    Returns:
        EOS's mean probability (temperature 1) after an end, after other tokens, and at the prompt end.
    """
    learned = learned_token_ids(tokenizer)
    ends = [i for i in learned if SENTENCE_END.search(tokenizer.decode([i]))]
    if not ends:
        raise ValueError("the stand-in tokenizer learned no sentence-final token (text ending in . ? !)")
    end_set = set(ends)
    others = [i for i in learned if i not in end_set]
    g = torch.Generator().manual_seed(seed)
    is_end = torch.rand(length, generator=g) < 1 / 6
    body = [
        (ends if e else others)[int(torch.randint(len(ends if e else others), (1,), generator=g))]
        for e in is_end.tolist()
    ]
    ids = [tokenizer.bos_token_id, *body, *prompt_end] if tokenizer.bos_token_id is not None else body
    head = model.get_output_embeddings().weight
    was_training = model.training
    model.eval()
    hidden = model.get_decoder()(input_ids=torch.tensor([ids], device=head.device)).last_hidden_state[0]
    model.train(was_training)
    hidden = hidden.float()
    offset = len(ids) - len(body) - len(prompt_end)
    at_end = torch.zeros(len(ids), dtype=torch.bool, device=hidden.device)
    at_end[offset : offset + length] = is_end.to(hidden.device)
    at_other = torch.zeros_like(at_end)
    at_other[offset : offset + length] = ~is_end.to(hidden.device)
    unit = torch.nn.functional.normalize(hidden, dim=-1)
    w = unit[at_end].mean(0) - unit[at_other].mean(0)
    last = unit[-1]
    w = w - (w @ last) * last  # no EOS right after the prompt
    logits = hidden[at_end] @ head.float().T
    logits[:, tokenizer.eos_token_id] = -float("inf")
    target = logits.logsumexp(-1).median()  # EOS as likely as all other tokens together
    w = w * (target / (hidden[at_end] @ w).median())
    head[tokenizer.eos_token_id] = w.to(head.dtype)
    logits = hidden @ head.float().T
    p_eos = logits.softmax(-1)[:, tokenizer.eos_token_id]
    return {
        "p_eos_after_end": round(float(p_eos[at_end].mean()), 3),
        "p_eos_after_other": round(float(p_eos[at_other].mean()), 3),
        "p_eos_at_prompt_end": round(float(p_eos[-1]), 3),
    }


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
        texts: prompts and answers the stand-in tokenizer learns from.
        device: where the random weights are built (a GPU builds a 7B model in seconds).
        dtype: their dtype; None: bfloat16 on CUDA, float32 elsewhere.
        seed: the initialisation seed.

    Returns:
        The folder.
    """
    folder = Path(folder)
    tokenizer = standin_tokenizer(texts, LLAVA_SPECIALS, bos="<s>", eos="</s>", pad="<pad>", unk="<unk>")
    vision = config.vision_config
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": vision.image_size},
        crop_size={"height": vision.image_size, "width": vision.image_size},
        do_convert_rgb=True,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,  # CLIP's CLS, dropped by the "default" strategy
        chat_template=CHAT_TEMPLATE,
    )
    model = build_random(config, dtype=dtype, device=device, seed=seed)
    emphasise_learned_tokens(model, learned_token_ids(tokenizer))
    eos = teach_eos(model, tokenizer, tokenizer.encode(" ASSISTANT:", add_special_tokens=False))
    print(f"stand-in EOS: {eos}", flush=True)
    generation = model.generation_config
    generation.bos_token_id = tokenizer.bos_token_id
    generation.eos_token_id = tokenizer.eos_token_id
    generation.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
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

    Args:
        folder: the output folder.
        config: a `LlavaOnevisionConfig` (`load_config("llava-critic-7b")`, maybe shrunk).
        texts: text the stand-in Qwen2 tokenizer learns from (the critic prompts).
        device: where the random weights are built (a GPU builds a 7B model in seconds).
        dtype: their dtype; None: bfloat16 on CUDA, float32 elsewhere.
        seed: the initialisation seed.

    Returns:
        The folder.
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
