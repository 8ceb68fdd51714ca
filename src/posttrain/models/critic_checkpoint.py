"""How a critic checkpoint is laid out and loaded: the layout check, the fetch, and the processor.

LLaVA-Critic is run from a transformers-format checkpoint (`LlavaOnevisionForConditionalGeneration`); a
checkpoint in the original LLaVA-NeXT layout is refused before any weight is read
(`is_transformers_onevision`, `resolve_checkpoint`). `load_onevision_processor` loads its processor, also
without torchvision.
"""

from __future__ import annotations

import functools
import json
import logging
import struct
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


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


def resolve_checkpoint(model: str | Path, revision: str | None) -> Path:
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
