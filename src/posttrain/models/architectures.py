"""The real architectures, offline: shipped configs, shrunk copies for tests, random-weight builds.

``configs/<name>/config.json`` holds the exact transformers config of each full-size model the project
uses (weights are never shipped). `reference_config` rebuilds each one in code from its published numbers,
`write_reference_configs` regenerates the files, and a test checks that the two agree.

- ``llava-1.5-7b``: `LlavaConfig` of ``llava-hf/llava-1.5-7b-hf`` (CLIP ViT-L/14 at 336 px + Llama-2-7B /
  Vicuna-7B, vocab 32064).
- ``llava-critic-7b``: `LlavaOnevisionConfig` of ``llava-hf/llava-onevision-qwen2-7b-ov-hf``, the
  architecture of LLaVA-Critic-7B (SigLIP so400m at 384 px with its last layer dropped + Qwen2-7B).

`param_count` builds a model on the meta device (no memory) to count parameters for FLOP estimates;
`build_random` instantiates one with random weights for benchmarks; `shrink` makes a few-layer, narrow copy
of a config that keeps every other field (image size, patch size, token ids, feature layer, ...), so tests
run the real code paths on CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel

CONFIG_DIR = Path(__file__).resolve().parents[3] / "configs"
NAMES = ("llava-1.5-7b", "llava-critic-7b")

# SigLIP so400m tiles of 384 px: every (rows, cols) grid from 1x1 to 6x6, in pixels, rows major.
ONEVISION_PINPOINTS = [[a, b] for a in range(384, 2305, 384) for b in range(384, 2305, 384)]

# What `shrink` changes unless told otherwise: 2 layers (llava-1.5 reads the vision tower's second-to-last
# layer), hidden 64 with 4 heads. Image size, patch size and vocabulary are kept.
SHRINK_DEFAULTS: dict[str, Any] = {
    "text_num_hidden_layers": 2,
    "text_hidden_size": 64,
    "text_intermediate_size": 128,
    "text_num_attention_heads": 4,
    "vision_num_hidden_layers": 2,
    "vision_hidden_size": 64,
    "vision_intermediate_size": 128,
    "vision_num_attention_heads": 4,
}


def available() -> list[str]:
    """Names of the shipped architecture configs (folders of ``configs/`` holding a config.json)."""
    if not CONFIG_DIR.is_dir():
        return []
    return sorted(p.name for p in CONFIG_DIR.iterdir() if (p / "config.json").is_file())


def load_config(name: str) -> PretrainedConfig:
    """Load a shipped architecture config, e.g. ``"llava-1.5-7b"`` or ``"llava-critic-7b"``.

    Args:
        name: Folder name under ``configs/``.

    Returns:
        The `LlavaConfig` / `LlavaOnevisionConfig` read from ``configs/<name>/config.json``.

    Raises:
        ValueError: No such config; the message lists the available names.
    """
    from transformers import AutoConfig

    folder = CONFIG_DIR / name
    if not (folder / "config.json").is_file():
        raise ValueError(
            f"no architecture config {name!r} in {CONFIG_DIR}; available: {', '.join(available()) or 'none'}"
        )
    return AutoConfig.from_pretrained(str(folder), local_files_only=True)


def reference_config(name: str) -> PretrainedConfig:
    """Build a shipped architecture config in code, from the published numbers of the model.

    Args:
        name: ``"llava-1.5-7b"`` or ``"llava-critic-7b"``.

    Returns:
        The config, equal to `load_config` of the same name (the shipped file is written from this).
    """
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaOnevisionConfig,
        Qwen2Config,
        SiglipVisionConfig,
    )

    if name == "llava-1.5-7b":
        vision = CLIPVisionConfig(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=336,
            patch_size=14,
            projection_dim=768,
            hidden_act="quick_gelu",
            vocab_size=32000,
        )
        text = LlamaConfig(
            vocab_size=32064,
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            tie_word_embeddings=False,
        )
        return LlavaConfig(
            vision_config=vision,
            text_config=text,
            image_token_index=32000,
            pad_token_id=32001,
            projector_hidden_act="gelu",
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            image_seq_length=576,
            tie_word_embeddings=False,
            architectures=["LlavaForConditionalGeneration"],
            dtype="float16",
        )
    if name == "llava-critic-7b":
        # 26 layers: LLaVA-NeXT deletes the last of SigLIP so400m's 27 layers and reads the output of the
        # remaining last one, which is what transformers' conversion script (and llava-hf) encode as 26 layers
        # with vision_feature_layer -1.
        vision = SiglipVisionConfig(
            hidden_size=1152,
            intermediate_size=4304,
            num_hidden_layers=26,
            num_attention_heads=16,
            image_size=384,
            patch_size=14,
            vision_use_head=False,
        )
        text = Qwen2Config(
            vocab_size=152128,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            max_position_embeddings=32768,
            max_window_layers=28,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            use_sliding_window=False,
            tie_word_embeddings=False,
            bos_token_id=151643,
            eos_token_id=151645,
        )
        return LlavaOnevisionConfig(
            vision_config=vision,
            text_config=text,
            image_token_index=151646,
            video_token_index=151647,
            projector_hidden_act="gelu",
            multimodal_projector_bias=True,
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
            vision_aspect_ratio="anyres_max_9",
            image_grid_pinpoints=[list(p) for p in ONEVISION_PINPOINTS],
            tie_word_embeddings=False,
            architectures=["LlavaOnevisionForConditionalGeneration"],
            dtype="float16",
        )
    raise ValueError(f"no reference config {name!r}; known: {', '.join(NAMES)}")


def write_reference_configs(root: str | Path = CONFIG_DIR) -> list[Path]:
    """(Re)write ``<root>/<name>/config.json`` for every name in `NAMES` with ``save_pretrained``.

    Args:
        root: Folder to write into (default: the shipped ``configs/``).

    Returns:
        The config files written.
    """
    written = []
    for name in NAMES:
        folder = Path(root) / name
        reference_config(name).save_pretrained(folder)
        written.append(folder / "config.json")
    return written


def _sub_fields(config: PretrainedConfig, key: str) -> dict[str, Any]:
    return getattr(config, key).to_dict()


def shrink(config: PretrainedConfig, **overrides: Any) -> PretrainedConfig:
    """Return a smaller copy of a LLaVA-style config for tests, keeping every field not overridden.

    By default (`SHRINK_DEFAULTS`) the text and vision towers get 2 layers, hidden size 64, intermediate
    size 128 and 4 heads; image size, patch size, vocabulary, token ids, feature layer and pinpoints are
    kept. Dependent fields follow unless overridden: the text ``num_key_value_heads`` keeps the grouped-query
    ratio, ``head_dim`` becomes hidden / heads, ``layer_types`` is cut to the new layer count.

    Args:
        config: A `LlavaConfig` or `LlavaOnevisionConfig` (anything with ``text_config`` and
            ``vision_config``).
        **overrides: ``text_<field>=...`` and ``vision_<field>=...`` set fields of the text / vision
            sub-config; any other name (or a name that is itself a top-level field, such as
            ``vision_feature_layer``) sets a top-level field.

    Returns:
        A new config of the same class.

    Raises:
        ValueError: An override names no field of the config.
    """
    top = config.to_dict()
    text = _sub_fields(config, "text_config")
    vision = _sub_fields(config, "vision_config")
    old_text = dict(text)
    for key, value in {**SHRINK_DEFAULTS, **overrides}.items():
        if key in top and key not in ("text_config", "vision_config"):
            top[key] = value
        elif key.startswith("text_") and key[5:] in text:
            text[key[5:]] = value
        elif key.startswith("vision_") and key[7:] in vision:
            vision[key[7:]] = value
        else:
            raise ValueError(f"shrink: {key!r} is not a field of {type(config).__name__} or its sub-configs")

    heads, old_heads = text.get("num_attention_heads"), old_text.get("num_attention_heads")
    if "num_key_value_heads" not in overrides and text.get("num_key_value_heads") and heads != old_heads:
        group = max(1, old_heads // old_text["num_key_value_heads"])
        kv = max(1, heads // group)
        while heads % kv:
            kv -= 1
        text["num_key_value_heads"] = kv
    if "text_head_dim" not in overrides and text.get("head_dim") is not None:
        text["head_dim"] = text["hidden_size"] // heads
    layer_types = text.get("layer_types")
    n = text["num_hidden_layers"]
    if "text_layer_types" not in overrides and isinstance(layer_types, list) and len(layer_types) != n:
        text["layer_types"] = (layer_types + [layer_types[-1]] * n)[:n]
    top["text_config"] = text
    top["vision_config"] = vision
    return type(config).from_dict(top)


def model_class(config: PretrainedConfig) -> type[PreTrainedModel]:
    """The transformers class for a config: its base family's (`posttrain.models.family`), or the critic's
    `LlavaOnevisionForConditionalGeneration`.

    Raises:
        UnknownFamilyError: a model_type that is neither.
    """
    from transformers import LlavaOnevisionForConditionalGeneration

    from posttrain.models.family import family_of

    if config.model_type == "llava_onevision":  # LLaVA-Critic, the judge
        return LlavaOnevisionForConditionalGeneration
    return family_of(config).transformers_class()


def build_random(
    config: PretrainedConfig,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> PreTrainedModel:
    """Instantiate the model of `config` with random weights, directly on `device`, in eval mode.

    The weights are created on `device` (no CPU copy first, so a 7B model builds quickly on a GPU) and are
    deterministic for a given seed and device type (`torch.manual_seed` seeds CPU and CUDA).

    Args:
        config: A `LlavaConfig` or `LlavaOnevisionConfig`.
        dtype: Parameter dtype; None means bfloat16 on CUDA and float32 elsewhere.
        device: Where to build it.
        seed: Seed for the initialisation.

    Returns:
        The model.
    """
    import torch

    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(seed)
    with torch.device(device):
        model = model_class(config)._from_config(config, dtype=dtype)
    return model.eval()


def meta_model(config: PretrainedConfig):
    """The model of `config` on the meta device: its modules and shapes, no memory allocated."""
    import torch

    with torch.device("meta"):
        return model_class(config)(config)


def param_count(config: PretrainedConfig) -> int:
    """Number of parameters of the model of `config` (tied weights once), built on the meta device."""
    return sum(p.numel() for p in meta_model(config).parameters())


def image_tokens_per_tile(config: PretrainedConfig) -> int:
    """Image features one vision tile gives the language model (576 for llava-1.5, 729 for OneVision).

    ``(image_size // patch_size) ** 2`` patches; the ``"default"`` strategy drops the CLS token, which these
    towers prepend (CLIP) or lack (SigLIP), so the count is the patch count either way. OneVision's anyres
    adds further tiles and newline tokens per image (see the processor).
    """
    vision = config.vision_config
    return (vision.image_size // vision.patch_size) ** 2
