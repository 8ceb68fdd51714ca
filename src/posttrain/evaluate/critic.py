"""Critic prompts and parsing, the LLaVA-Critic judge, and the reference critic for synthetic data.

LLaVA-Critic (Xiong et al. 2024, "LLaVA-Critic: Learning to Evaluate Multimodal Models") is a
LLaVA-OneVision model trained to judge responses, either pointwise (a 0-100 score with reasons) or
pairwise (which of two responses is better). Its prompts are kept verbatim below, including the
"answer answers" typo of the pointwise prompt: that is the text the critic was trained on.

`LlavaCriticJudge` runs a transformers-format checkpoint (`LlavaOnevisionForConditionalGeneration`);
a checkpoint in the original LLaVA-NeXT layout is refused before any weight is read (see
`is_transformers_onevision`). `reference_score` is a model-free rubric for the synthetic charts, whose
examples know their true answer and chart elements.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import re
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from posttrain.data.answers import names
from posttrain.data.declines import is_decline
from posttrain.data.examples import Example
from posttrain.evaluate.metrics import relaxed_match

if TYPE_CHECKING:
    import torch
    from PIL import Image

logger = logging.getLogger(__name__)

Verdict = Literal["first", "second", "tie"]
Winner = Literal["a", "b", "tie"]

POINTWISE = (
    "Given an image and a corresponding question, please serve as an unbiased and fair judge to evaluate the "
    "quality of answer answers provided by a Large Multimodal Model (LMM). Score the response out of 100 and "
    "explain your reasoning with specific details. Your task is provided as follows:\n"
    "Question: [{question}]\nThe LMM response: [{response}]\nASSISTANT:\n "
)
PAIRWISE = (
    "Given an image and a corresponding question, please serve as an unbiased and fair judge to evaluate the "
    "quality of the answers provided by a Large Multimodal Model (LMM). Determine which answer is better and "
    "explain your reasoning with specific details. Your task is provided as follows:\n"
    "Question: [{question}]\nThe first response: [{r1}]\nThe second response: [{r2}]\nASSISTANT:\n"
)
QWEN_TEMPLATE = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n<image>\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
)
IMAGE_TOKEN = "<image>"
_MEDIA_TOKENS = ("<image>", "<video>")


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------


def pointwise_prompt(question: str, response: str) -> str:
    """Return LLaVA-Critic's pointwise prompt (score out of 100) for one response."""
    return POINTWISE.format(question=question, response=response)


def pairwise_prompt(question: str, r1: str, r2: str) -> str:
    """Return LLaVA-Critic's pairwise prompt; `r1` is shown as the first response, `r2` as the second."""
    return PAIRWISE.format(question=question, r1=r1, r2=r2)


def qwen_render(prompt: str) -> str:
    """Wrap a critic prompt in the Qwen chat template, with one ``<image>`` before it, ready to generate."""
    return QWEN_TEMPLATE.format(prompt=prompt)


# --------------------------------------------------------------------------------------------
# Parsing critic outputs
# --------------------------------------------------------------------------------------------

_NUMBER = r"(\d+(?:\.\d+)?)"
# "out of 100", "/100", "/ 10": the scale a score is given on (100 before 10, so 100 is not read as 10)
_SCALE = r"\s*(?:/|out\s+of)\s*(100|10)(?![\d/]|\.\d)"
# An explicit score statement: "Final Score: 85", "score of 20 (out of 100)", "Score: 8/10", or a number
# given on a scale: "75/100", "7 out of 10", or given to the response: "I would give it an 85",
# "it scores 85", "I'd rate it 80 points". A bare number ("the bar is 35") is never a score; nor is a
# given or scored number that a noun follows ("give it 2 more tries", "scores 3 bars correctly"): that
# form needs a scale, "points" or the end of the sentence after the number.
_STATEMENT_END = r"(?=\s*(?:points?\b|[.,;:!?)\]]|$))"
_SCORE_STATEMENT = re.compile(
    rf"(?:\bscore\b\W{{0,3}}(?:is\s+|of\s+|=\s*)?\**\s*{_NUMBER}(?:{_SCALE})?)"
    rf"|(?:(?<![\w./]){_NUMBER}{_SCALE})"
    rf"|(?:\b(?:(?:give|gives|gave|giving|rate|rates|rated|rating)\s+(?:it|this|the\s+response|the\s+answer)"
    rf"|scores|scored|scoring)\s+(?:an?\s+)?{_NUMBER}(?:{_SCALE}|{_STATEMENT_END}))",
    re.IGNORECASE,
)


def parse_score(text: str) -> float | None:
    """Read a 0-100 score out of a pointwise critic output, only where the critic states one.

    Accepted statements (any case): ``Final Score: 85`` (LLaVA-Critic's), ``Score: 85``, ``a score of 20
    out of 100``, ``75/100``, ``75 out of 100``, ``I would give it an 85``, ``it scores 85``; a 0-10 scale
    (``Score: 8/10``, ``7 out of 10``) is rescaled to 0-100. When the text holds several, the LAST one
    counts (the critic's conclusion follows its reasoning). A number that is not stated as a score ("the red
    bar is 35") is never read, so a reply cut off by ``max_new_tokens`` before its score is None, as is a
    stated score outside its scale.

    Args:
        text: The critic's generated text.

    Returns:
        The score as a float in [0, 100], or None when the text states none.
    """
    matches = list(_SCORE_STATEMENT.finditer(text))
    if not matches:
        return None
    groups = matches[-1].groups()  # (number, scale) of the alternative that matched, None elsewhere
    at = next(i for i in range(0, len(groups), 2) if groups[i] is not None)
    number, scale = groups[at], groups[at + 1]
    value = float(number)
    top = float(scale) if scale else 100.0
    if not 0 <= value <= top:
        return None
    return value * 100.0 / top


_BETTER = r"(?:better|superior|preferred|preferable|stronger)"
_VERDICT_PATTERNS: tuple[tuple[Verdict, re.Pattern[str]], ...] = (
    ("first", re.compile(r"\[\s*first\s*\]", re.IGNORECASE)),
    ("first", re.compile(rf"\bfirst\s+(?:response|answer|one)\s+is\s+(?:the\s+)?{_BETTER}", re.IGNORECASE)),
    ("first", re.compile(rf"\b(?:response|answer)\s+(?:1|one)\s+is\s+(?:the\s+)?{_BETTER}", re.IGNORECASE)),
    ("second", re.compile(r"\[\s*second\s*\]", re.IGNORECASE)),
    ("second", re.compile(rf"\bsecond\s+(?:response|answer|one)\s+is\s+(?:the\s+)?{_BETTER}", re.IGNORECASE)),
    ("second", re.compile(rf"\b(?:response|answer)\s+(?:2|two)\s+is\s+(?:the\s+)?{_BETTER}", re.IGNORECASE)),
    ("tie", re.compile(r"\bequally\b", re.IGNORECASE)),
    ("tie", re.compile(r"\btie\b", re.IGNORECASE)),
)


def parse_verdict(text: str) -> Verdict | None:
    """Read which response a pairwise critic output prefers.

    Decisive phrases: ``[first]`` / ``[second]``, "the first (or second) response / answer is better"
    (also "superior", "preferred", "preferable", "stronger", and "response 1 / 2 is better"), and
    "equally" or "tie" for a tie. When a text holds several (it discusses both responses), the one that
    starts EARLIEST in the text wins; LLaVA-Critic states its verdict first and then explains it. Case is
    ignored.

    Args:
        text: The critic's generated text.

    Returns:
        ``"first"``, ``"second"``, ``"tie"``, or None when no decisive phrase is found.
    """
    best: tuple[int, Verdict] | None = None
    for verdict, pattern in _VERDICT_PATTERNS:
        m = pattern.search(text)
        if m is not None and (best is None or m.start() < best[0]):
            best = (m.start(), verdict)
    return None if best is None else best[1]


def combine_orders(v_ab: Verdict | None, v_ba: Verdict | None) -> Winner | None:
    """Combine two pairwise verdicts, asked with A first and then with B first, into a winner.

    Asking both orders cancels the critic's position bias: A wins only if it is preferred in both,
    i.e. ``("first", "second")``; B wins on ``("second", "first")``; ``("tie", "tie")`` is a tie.
    Anything else (inconsistent, one tie, or unparsable) is None.

    Args:
        v_ab: Verdict with A shown as the first response.
        v_ba: Verdict with B shown as the first response.

    Returns:
        ``"a"``, ``"b"``, ``"tie"``, or None.
    """
    return {("first", "second"): "a", ("second", "first"): "b", ("tie", "tie"): "tie"}.get((v_ab, v_ba))


# --------------------------------------------------------------------------------------------
# Reference critic (synthetic data, no model)
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _rouge_l_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


@functools.lru_cache(maxsize=32)
def _color_regex(colors: tuple[str, ...]) -> re.Pattern[str] | None:
    """Match any colour name as whole words; longer names first so "dark blue" is not read as "blue"."""
    names = sorted({c.strip().lower() for c in colors if c.strip()}, key=lambda c: (-len(c), c))
    if not names:
        return None
    alternatives = "|".join(r"\s+".join(map(re.escape, name.split())) for name in names)
    return re.compile(rf"\b(?:{alternatives})\b", re.IGNORECASE)


def invented_colors(response: str, elements: Iterable[str], colors: Iterable[str]) -> list[str]:
    """Return the colour names of `colors` mentioned in `response` that are not among `elements`."""
    regex = _color_regex(tuple(colors))
    if regex is None:
        return []
    present = {e.strip().lower() for e in elements}
    found = (" ".join(m.group(0).lower().split()) for m in regex.finditer(response))
    return sorted({c for c in found if c not in present})


def reference_score(example: Example, response: str, extracted: str | None, colors: Iterable[str]) -> float:
    """Score a response to a synthetic example on a 0-100 rubric, knowing the true answer.

    The response must be about what was asked: where the question names a colour (`Example.asked_colour`),
    a decline or a correct answer must name it too.

    Negative example (the question asks about an element that is not in the chart): 100 if the response
    declines (`posttrain.data.declines.is_decline`) naming the asked element, else 0.

    Otherwise 0 if the response declines; else the sum of

    - 60 x correct: `posttrain.evaluate.metrics.relaxed_match` of `extracted` against ``example.short_answer``
      (0 when either is None, or when the response does not name the asked element);
    - 20 x no invented elements: the response names no colour of `colors` that is not in
      ``example.elements`` (granted when ``example.elements`` is empty: nothing is known to check against);
    - 20 x ROUGE-L recall of the response against ``example.answer`` (`rouge_score`, stemming on; 0..1).

    Args:
        example: The example answered.
        response: The model's full response.
        extracted: The short answer already extracted from `response` (None if extraction failed).
        colors: Every colour name the charts can use.

    Returns:
        The score in [0, 100].
    """
    declines = is_decline(response)
    asked = example.asked_colour(tuple(colors))
    on_topic = asked is None or names(response, asked)
    if example.negative:
        return 100.0 if declines and on_topic else 0.0
    if declines:
        return 0.0
    correct = (
        on_topic
        and extracted is not None
        and example.short_answer is not None
        and relaxed_match(extracted, example.short_answer)
    )
    faithful = not example.elements or not invented_colors(response, example.elements, colors)
    recall = _rouge_l_scorer().score(example.answer, response)["rougeL"].recall
    return 60.0 * float(correct) + 20.0 * float(faithful) + 20.0 * recall


# --------------------------------------------------------------------------------------------
# Checkpoint layout
# --------------------------------------------------------------------------------------------

# Weight-name prefixes of the original LLaVA-NeXT / LLaVA-OneVision training code (LlavaQwenForCausalLM).
_LEGACY_WEIGHT_PREFIXES = ("model.mm_projector", "model.vision_tower.vision_tower", "model.vision_resampler")
_LEGACY_MODEL_TYPES = ("llava", "llava_qwen", "llava_llama", "llava_mistral", "llava_mixtral")
_CONVERSION_HINT = (
    "It looks like the original LLaVA-NeXT layout (as lmms-lab/llava-critic-* is released). Convert it to "
    "transformers' LlavaOnevisionForConditionalGeneration format first (e.g. with transformers' "
    "models/llava_onevision/convert_llava_onevision_weights_to_hf.py, or use an already converted "
    "checkpoint), and point the critic at the converted folder."
)


def _safetensors_names(path: Path) -> list[str]:
    """Read the tensor names from a safetensors file header, without reading any tensor data."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    return [k for k in header if k != "__metadata__"]


def _weight_names(folder: Path) -> list[str]:
    """Tensor names of a checkpoint folder: from the safetensors index, else from the file headers."""
    names: list[str] = []
    for index in sorted(folder.glob("*.safetensors.index.json")):
        names.extend(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}))
    if not names:
        for file in sorted(folder.glob("*.safetensors")):
            names.extend(_safetensors_names(file))
    return names


def _layout_problems(folder: str | Path) -> list[str]:
    """Why `folder` is not a transformers-format LLaVA-OneVision checkpoint (empty list: it is one)."""
    folder = Path(folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        return [f"no config.json in {folder}"]
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        return [f"{config_file} is not valid JSON ({e.msg})"]
    problems = []
    model_type = config.get("model_type")
    if model_type != "llava_onevision":
        problems.append(f'config.json has "model_type": {json.dumps(model_type)}, not "llava_onevision"')
    for key in ("vision_config", "text_config"):
        if not isinstance(config.get(key), dict):
            problems.append(f"config.json has no {key}")
    if "mm_vision_tower" in config or "mm_projector_type" in config:
        problems.append("config.json has LLaVA-NeXT keys (mm_vision_tower / mm_projector_type)")
    legacy = [n for n in _weight_names(folder) if n.startswith(_LEGACY_WEIGHT_PREFIXES)]
    if legacy:
        problems.append(f"weights use LLaVA-NeXT names (e.g. {legacy[0]!r})")
    return problems


def is_transformers_onevision(folder: str | Path) -> bool:
    """Whether `folder` holds a transformers-format `LlavaOnevisionForConditionalGeneration` checkpoint.

    Reads only config.json and the safetensors index / headers (no tensor data). The original LLaVA-NeXT
    layout (``"model_type": "llava_qwen"`` or ``"llava"``, no ``vision_config``, ``mm_vision_tower`` keys,
    or weights named ``model.mm_projector.*`` / ``model.vision_tower.vision_tower.*``) is not.

    Args:
        folder: A local checkpoint folder.

    Returns:
        True if the folder can be loaded with `LlavaOnevisionForConditionalGeneration.from_pretrained`.
    """
    return not _layout_problems(folder)


def _require_onevision(folder: Path, name: str) -> None:
    problems = _layout_problems(folder)
    if problems:
        raise ValueError(
            f"{name} is not a transformers-format LLaVA-OneVision checkpoint: {'; '.join(problems)}. "
            f"{_CONVERSION_HINT}"
        )


_CONFIG_PATTERNS = ["*.json", "*.jinja", "*.txt", "*.model"]


def _resolve_checkpoint(model: str | Path, revision: str | None) -> Path:
    """Return a local folder with the checkpoint, checking its layout BEFORE any weight is fetched or read.

    A local folder is checked as is. A Hub id is fetched in two steps: configs and tokenizer files, then
    (only if the layout check passes) the ``*.safetensors`` weights; other weight formats are never fetched.
    """
    path = Path(model)
    if path.is_dir():
        _require_onevision(path, str(path))
        return path
    if path.exists() or str(model).startswith((".", "/")):
        raise FileNotFoundError(f"critic checkpoint {model} is not a folder")
    from huggingface_hub import snapshot_download

    if not revision:
        logger.warning(
            "critic %s is loaded without a pinned revision; results may not be reproducible", model
        )
    folder = Path(snapshot_download(repo_id=str(model), revision=revision, allow_patterns=_CONFIG_PATTERNS))
    _require_onevision(folder, f"{model}@{revision}")
    folder = Path(
        snapshot_download(
            repo_id=str(model), revision=revision, allow_patterns=[*_CONFIG_PATTERNS, "*.safetensors"]
        )
    )
    _require_onevision(folder, f"{model}@{revision}")  # now also checks the weight names
    return folder


# --------------------------------------------------------------------------------------------
# Processor (works without torchvision)
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _image_only_processor_class() -> type:
    """Return a `LlavaOnevisionProcessor` subclass without the video processor.

    `AutoProcessor` builds LLaVA-OneVision's video processor too, which needs torchvision even when no
    video is ever passed. Without torchvision this subclass loads the same files (image processor,
    tokenizer, processor_config.json) and processes images and text exactly like the original.
    """
    from transformers import LlavaOnevisionProcessor
    from transformers.processing_utils import ProcessorMixin

    class LlavaOnevisionImageOnlyProcessor(LlavaOnevisionProcessor):
        def __init__(
            self,
            image_processor=None,
            tokenizer=None,
            num_image_tokens=None,
            vision_feature_select_strategy=None,
            chat_template=None,
            image_token="<image>",
            vision_aspect_ratio="anyres_max_9",
        ):
            self.num_image_tokens = num_image_tokens
            self.vision_feature_select_strategy = vision_feature_select_strategy
            self.image_token = getattr(tokenizer, "image_token", None) or image_token
            self.image_token_id = getattr(
                tokenizer, "image_token_id", None
            ) or tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token = None
            self.video_token_id = None
            self.vision_aspect_ratio = vision_aspect_ratio
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return LlavaOnevisionImageOnlyProcessor


def load_onevision_processor(folder: str | Path) -> Any:
    """Load a LLaVA-OneVision processor: `AutoProcessor`, or the image-only variant without torchvision."""
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(folder)
    except ImportError as e:  # the video processor needs torchvision
        logger.info("AutoProcessor failed (%s); using the image-only LLaVA-OneVision processor", e)
        processor = _image_only_processor_class().from_pretrained(folder)
    if getattr(processor, "num_image_tokens", None) is None or not hasattr(processor, "image_processor"):
        raise ValueError(f"{folder}: the processor is not a LLaVA-OneVision processor (no num_image_tokens)")
    return processor


# --------------------------------------------------------------------------------------------
# The judge
# --------------------------------------------------------------------------------------------


def _clean(text: str) -> str:
    """Remove media placeholders from user text so the prompt holds exactly one ``<image>``."""
    for token in _MEDIA_TOKENS:
        text = text.replace(token, "")
    return text


def _check_lengths(**lists: Sequence) -> int:
    lengths = {name: len(v) for name, v in lists.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"inputs must have the same length, got {lengths}")
    return next(iter(lengths.values()))


class LlavaCriticJudge:
    """LLaVA-Critic as a pointwise scorer and a pairwise judge (greedy, batched, left-padded).

    Args:
        model: A local checkpoint folder or a Hub model id, in transformers LLaVA-OneVision format.
        revision: Pinned Hub revision (ignored for a local folder).
        dtype: ``"auto"`` (bfloat16 on CUDA, float32 on CPU), a dtype name such as ``"float32"``, or a
            `torch.dtype`.
        device: ``"cuda"``, ``"cpu"``, ...; None picks CUDA when available.

    Raises:
        ValueError: The checkpoint is in the LLaVA-NeXT layout (needs conversion; raised before any weight
            is fetched or read) or has no safetensors weights.
    """

    def __init__(
        self,
        model: str | Path,
        revision: str | None = None,
        dtype: str | torch.dtype = "auto",
        device: str | None = None,
    ):
        import torch
        from transformers import LlavaOnevisionForConditionalGeneration

        folder = _resolve_checkpoint(model, revision)
        if not any(folder.glob("*.safetensors")):
            raise ValueError(
                f"{model}: no *.safetensors weights found; only safetensors checkpoints are loaded"
            )
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype == "auto":
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        elif isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        self.dtype = dtype
        self.processor = load_onevision_processor(folder)
        self.processor.tokenizer.padding_side = "left"
        self.model = LlavaOnevisionForConditionalGeneration.from_pretrained(
            folder, use_safetensors=True, dtype=dtype, local_files_only=True
        )
        self.model.to(self.device).eval()
        model_image_token = self.model.config.image_token_id
        if self.processor.image_token_id != model_image_token:
            raise ValueError(
                f"{model}: processor image token id {self.processor.image_token_id} != model config "
                f"image_token_id {model_image_token}"
            )
        tokenizer = self.processor.tokenizer
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._pad_token_id = pad_id

    def _generation_config(self, max_new_tokens: int):
        config = copy.deepcopy(self.model.generation_config)
        config.do_sample = False
        config.num_beams = 1
        config.temperature = None
        config.top_p = None
        config.top_k = None
        config.max_new_tokens = max_new_tokens
        config.pad_token_id = self._pad_token_id
        return config

    def generate(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[str],
        batch_size: int = 8,
        max_new_tokens: int = 512,
    ) -> list[str]:
        """Generate the critic's reply to each (image, prompt); prompts are rendered with `qwen_render`.

        Under several processes (`posttrain.launch`) batch k is generated by process k mod N and the replies
        are gathered in order on every process: greedy decoding of the same batches, so the replies are
        those of one process. A batch that runs out of GPU memory is generated again in halves
        (`posttrain.evaluate.generation.Halving`), and so are the batches after it.

        Args:
            images: One image per prompt (converted to RGB).
            prompts: Critic prompts (without template), e.g. from `pointwise_prompt`.
            batch_size: Prompts per forward batch.
            max_new_tokens: Generation budget per reply.

        Returns:
            The decoded replies (special tokens removed, stripped), in input order.
        """
        import torch

        from posttrain.core.distributed import gather_batches, my_batches
        from posttrain.evaluate.generation import Halving

        _check_lengths(images=images, prompts=prompts)
        config = self._generation_config(max_new_tokens)
        texts = [qwen_render(p) for p in prompts]
        replies: dict[int, list[str]] = {}  # batch index -> its replies

        def reply(start: int, stop: int) -> list[str]:
            batch_images = [im if im.mode == "RGB" else im.convert("RGB") for im in images[start:stop]]
            inputs = self.processor(
                images=batch_images, text=texts[start:stop], return_tensors="pt", padding=True
            )
            inputs = inputs.to(self.device)
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
            with torch.inference_mode():
                out = self.model.generate(**inputs, generation_config=config)
            new_tokens = out[:, inputs["input_ids"].shape[1] :]
            decoded = self.processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            return [text.strip() for text in decoded]

        chunks = Halving(batch_size, "critic")  # greedy: a reply does not depend on its batch
        for batch_index in my_batches(-(-len(texts) // batch_size)):
            start = batch_index * batch_size
            stop = min(start + batch_size, len(texts))
            replies[batch_index] = chunks.run(
                start, stop, reply, f"one prompt (up to {max_new_tokens} new tokens)"
            )
        return gather_batches(replies)

    def score(
        self,
        images: Sequence[Image.Image],
        questions: Sequence[str],
        responses: Sequence[str],
        batch_size: int = 8,
        max_new_tokens: int = 512,
    ) -> tuple[list[float | None], list[str]]:
        """Score each response out of 100 with the pointwise prompt.

        Args:
            images: The image of each item.
            questions: The question of each item.
            responses: The response to judge for each item.
            batch_size: Items per forward batch.
            max_new_tokens: Generation budget per judgement.

        Returns:
            ``(scores, raw_texts)``: the `parse_score` of each reply (None when unparsable) and the replies.
        """
        _check_lengths(images=images, questions=questions, responses=responses)
        prompts = [pointwise_prompt(_clean(q), _clean(r)) for q, r in zip(questions, responses, strict=True)]
        raw = self.generate(images, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens)
        scores = [parse_score(text) for text in raw]
        n_bad = sum(s is None for s in scores)
        if n_bad:
            logger.warning("critic: %d of %d pointwise replies had no parsable score", n_bad, len(scores))
        return scores, raw

    def judge_pairs_raw(
        self,
        images: Sequence[Image.Image],
        questions: Sequence[str],
        r1s: Sequence[str],
        r2s: Sequence[str],
        batch_size: int = 8,
        max_new_tokens: int = 512,
    ) -> tuple[list[Winner | None], list[tuple[str, str]]]:
        """Like `judge_pairs`, also returning each pair's two replies (A first, B first)."""
        n = _check_lengths(images=images, questions=questions, r1s=r1s, r2s=r2s)
        prompts = []
        for q, a, b in zip(questions, r1s, r2s, strict=True):
            q, a, b = _clean(q), _clean(a), _clean(b)
            prompts += [pairwise_prompt(q, a, b), pairwise_prompt(q, b, a)]
        doubled = [im for im in images for _ in range(2)]
        raw = self.generate(doubled, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens)
        pairs = [(raw[2 * i], raw[2 * i + 1]) for i in range(n)]
        winners = [combine_orders(parse_verdict(ab), parse_verdict(ba)) for ab, ba in pairs]
        n_bad = sum(w is None for w in winners)
        if n_bad:
            logger.warning("critic: %d of %d pairs had no consistent verdict", n_bad, n)
        return winners, pairs

    def judge_pairs(
        self,
        images: Sequence[Image.Image],
        questions: Sequence[str],
        r1s: Sequence[str],
        r2s: Sequence[str],
        batch_size: int = 8,
        max_new_tokens: int = 512,
    ) -> list[Winner | None]:
        """Judge which of two responses is better, asking in both orders to cancel position bias.

        Args:
            images: The image of each pair.
            questions: The question of each pair.
            r1s: Response A of each pair.
            r2s: Response B of each pair.
            batch_size: Prompts per forward batch (each pair is two prompts).
            max_new_tokens: Generation budget per judgement.

        Returns:
            Per pair ``"a"``, ``"b"``, ``"tie"`` (see `combine_orders`), or None when the two orders disagree
            or a reply is unparsable.
        """
        return self.judge_pairs_raw(images, questions, r1s, r2s, batch_size, max_new_tokens)[0]
