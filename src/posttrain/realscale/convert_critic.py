"""Convert LLaVA-Critic from the original LLaVA-NeXT layout to transformers' LLaVA-OneVision format.

``lmms-lab/llava-critic-7b`` is released as LLaVA-NeXT saves it (``LlavaQwenForCausalLM``): a config.json
with ``"model_type": "llava_qwen"`` or ``"llava"``, the Qwen2 fields at top level and ``mm_*`` fields for the
vision side, a Qwen2 tokenizer without image tokens, and weights named

- ``model.embed_tokens.*``, ``model.layers.*``, ``model.norm.*`` -> ``model.language_model.*``
- ``lm_head.*`` -> ``lm_head.*``
- ``model.mm_projector.0.*`` / ``.2.*`` -> ``model.multi_modal_projector.linear_1.*`` / ``linear_2.*``
- ``model.vision_tower.vision_tower.vision_model.*`` -> ``model.vision_tower.*``
- ``model.image_newline`` -> ``model.image_newline``

(the same mapping as transformers' ``convert_llava_onevision_weights_to_hf.py``, written against the
module names of transformers 5; ``save_pretrained`` then writes them in transformers' serialized naming).
Buffers that transformers recomputes (``*.rotary_emb.inv_freq``, ``*.embeddings.position_ids``) are dropped;
any other weight that does not map onto the model, and any model weight left without a source, is an error
that lists the names: nothing is dropped silently.

The config follows the same script: the text config from the Qwen2 fields; the vision config of the SigLIP
tower named by ``mm_vision_tower`` (``google/siglip-so400m-patch14-384`` is known offline; a local folder
with a SigLIP config.json is read) with its LAST layer removed, as LLaVA-NeXT deletes it when it loads the
tower and reads the output of the remaining last layer (``vision_feature_layer=-1``, strategy ``"full"``:
SigLIP has no CLS token); the anyres pinpoints and ``vision_aspect_ratio`` from ``image_grid_pinpoints`` and
``image_aspect_ratio``. ``<image>`` and ``<video>`` are added to the tokenizer when missing (LLaVA-NeXT used
the placeholder id -200 instead) and become ``image_token_index`` / ``video_token_index``; the embedding is
enlarged (mean-initialised rows, padded to a multiple of 64) only if the new ids do not fit (Qwen2's
embedding has spare rows, so normally it is not).

The output folder holds the model (safetensors), tokenizer, generation config (``<|im_end|>`` among the eos
ids, so generation stops where the Qwen template ends a turn) and a `LlavaOnevisionProcessor` configuration
(SigLIP preprocessing at the tower's image size with the pinpoints, a chat template that renders exactly
`posttrain.evaluate.critic.qwen_render`). It is written to a temporary folder beside the destination and
renamed at the end, so a failed conversion leaves nothing at the destination. Only safetensors weights are
read; no remote code is run.

Command line (wired as ``python -m posttrain convert-critic SRC DST``): `main`.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from posttrain.core.io import atomic_dir
from posttrain.models.critic_checkpoint import is_transformers_onevision, load_onevision_processor

if TYPE_CHECKING:
    import torch
    from transformers import LlavaOnevisionConfig, SiglipVisionConfig

logger = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"

# (original prefix, transformers prefix); a name is renamed by the first prefix it starts with.
WEIGHT_RENAMES: tuple[tuple[str, str], ...] = (
    ("model.vision_tower.vision_tower.vision_model.", "model.vision_tower."),
    ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
    ("model.embed_tokens.", "model.language_model.embed_tokens."),
    ("model.layers.", "model.language_model.layers."),
    ("model.norm.", "model.language_model.norm."),
    ("lm_head.", "lm_head."),
)
EXACT_RENAMES = {"model.image_newline": "model.image_newline"}
# Buffers that transformers recomputes from the config; older checkpoints saved them.
DROPPED_SUFFIXES = (".rotary_emb.inv_freq", ".embeddings.position_ids")
_VISION_LAYER = re.compile(r"^model\.vision_tower\.vision_tower\.vision_model\.encoder\.layers\.(\d+)\.")
_OTHER_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# SigLIP so400m/14 at 384 px as released (27 layers, LLaVA-NeXT uses the first 26).
KNOWN_VISION_TOWERS: dict[str, dict[str, Any]] = {
    "google/siglip-so400m-patch14-384": {
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
        "image_size": 384,
        "patch_size": 14,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-6,
    },
}
_SIGLIP_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_channels",
    "image_size",
    "patch_size",
    "hidden_act",
    "layer_norm_eps",
    "attention_dropout",
)
_QWEN2_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "use_sliding_window",
    "sliding_window",
    "max_window_layers",
    "attention_dropout",
    "bos_token_id",
    "eos_token_id",
    "tie_word_embeddings",
)
_REQUIRED_TEXT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)
SIGLIP_MEAN_STD = [0.5, 0.5, 0.5]

# The Qwen template of LLaVA-Critic ("qwen_1_5" in LLaVA-NeXT): a default system turn, then each turn as
# <|im_start|>role\n + one "<image>\n" per image + text + <|im_end|>\n. With one image and one text it renders
# exactly `posttrain.evaluate.critic.qwen_render`.
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>\\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ content['text'] }}{% endgeneration %}"
    "{% else %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class ConversionError(ValueError):
    """The source checkpoint cannot be converted (the message says why and what to do)."""


# --------------------------------------------------------------------------------------------
# Names and config
# --------------------------------------------------------------------------------------------


def map_weight_name(name: str) -> str | None:
    """Return the transformers module name of an original LLaVA-NeXT weight, or None if it has none.

    Args:
        name: e.g. ``"model.mm_projector.0.weight"``.

    Returns:
        e.g. ``"model.multi_modal_projector.linear_1.weight"``; None for an unknown name.
    """
    if name in EXACT_RENAMES:
        return EXACT_RENAMES[name]
    for old, new in WEIGHT_RENAMES:
        if name.startswith(old):
            return new + name[len(old) :]
    return None


def parse_pinpoints(value: Any, tile: int) -> list[list[int]]:
    """Read LLaVA-NeXT's ``image_grid_pinpoints`` as a list of ``[height, width]`` in pixels.

    Args:
        value: A list of pairs in pixels, or LLaVA-NeXT's grid-range string such as
            ``"(1x1),...,(6x6)"`` (every grid from the first to the last, times the tile size).
        tile: The vision tower's image size.

    Returns:
        The pinpoints.

    Raises:
        ConversionError: The value is neither form.
    """
    if isinstance(value, str):
        grids = re.findall(r"\((\d+)x(\d+)\)", value)
        if not grids:
            raise ConversionError(f"image_grid_pinpoints {value!r} is not a '(1x1),...,(NxM)' range")
        (r0, c0), (r1, c1) = (tuple(map(int, g)) for g in (grids[0], grids[-1]))
        return [[r * tile, c * tile] for r in range(r0, r1 + 1) for c in range(c0, c1 + 1)]
    if (
        isinstance(value, (list, tuple))
        and value
        and all(
            isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(x, int) for x in p) for p in value
        )
    ):
        return [[int(p[0]), int(p[1])] for p in value]
    raise ConversionError(f"image_grid_pinpoints {value!r} is neither a list of [height, width] nor a range")


def _vision_tower_config(original: dict[str, Any], src: Path) -> tuple[str, dict[str, Any]]:
    """Name and fields of the released SigLIP tower (before LLaVA-NeXT drops its last layer)."""
    name = original.get("mm_vision_tower") or original.get("vision_tower")
    if not isinstance(name, str) or not name:
        raise ConversionError("config.json has no mm_vision_tower: cannot tell which vision tower was used")
    if name in KNOWN_VISION_TOWERS:
        return name, dict(KNOWN_VISION_TOWERS[name])
    for folder in (Path(name), src / name):
        config_file = folder / "config.json"
        if config_file.is_file():
            data = json.loads(config_file.read_text(encoding="utf-8"))
            if data.get("model_type") == "siglip":
                data = data.get("vision_config", {})
            if data.get("model_type") not in ("siglip_vision_model", None):
                raise ConversionError(f"{config_file} is a {data.get('model_type')!r} config, not SigLIP")
            return name, {k: data[k] for k in _SIGLIP_FIELDS if k in data}
    raise ConversionError(
        f"unknown vision tower {name!r}: known offline are {', '.join(KNOWN_VISION_TOWERS)}; for another "
        "SigLIP tower point mm_vision_tower at a local folder holding its config.json"
    )


def _text_config_fields(original: dict[str, Any]) -> dict[str, Any]:
    missing = [k for k in _REQUIRED_TEXT_FIELDS if k not in original]
    if missing:
        raise ConversionError(f"config.json lacks the Qwen2 fields {', '.join(missing)}")
    if original.get("rope_scaling"):
        raise ConversionError(f"rope_scaling {original['rope_scaling']!r} is not supported by this converter")
    fields = {k: original[k] for k in _QWEN2_FIELDS if k in original and original[k] is not None}
    fields["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": float(original.get("rope_theta", 10000.0)),
    }
    return fields


def _check_supported(original: dict[str, Any]) -> None:
    """Refuse configs whose LLaVA-NeXT options transformers' OneVision model does not implement."""
    problems = []
    model_type = original.get("model_type")
    if model_type not in ("llava_qwen", "llava"):
        problems.append(f'"model_type" is {json.dumps(model_type)}, not "llava_qwen" or "llava"')
    architectures = original.get("architectures") or []
    if architectures and not any("Qwen" in a for a in architectures):
        problems.append(f"architectures {architectures} is not a LLaVA-Qwen model")
    checks = {
        "mm_projector_type": ("mlp2x_gelu",),
        "mm_patch_merge_type": ("spatial_unpad",),
        "mm_vision_select_feature": ("patch",),
    }
    for key, allowed in checks.items():
        if original.get(key, allowed[0]) not in allowed:
            problems.append(f"{key} is {original[key]!r}, only {' / '.join(allowed)} is supported")
    aspect = original.get("image_aspect_ratio", "anyres_max_9")
    if not re.fullmatch(r"anyres_max_\d+", str(aspect)):
        problems.append(f"image_aspect_ratio is {aspect!r}, only anyres_max_<n> is supported")
    if original.get("mm_resampler_type"):
        problems.append(f"mm_resampler_type {original['mm_resampler_type']!r} is not supported")
    if problems:
        raise ConversionError("unsupported LLaVA-NeXT config: " + "; ".join(problems))


def build_onevision_config(
    original: dict[str, Any],
    vision_fields: dict[str, Any],
    vision_layers: int,
    image_token_id: int,
    video_token_id: int,
) -> LlavaOnevisionConfig:
    """Build the `LlavaOnevisionConfig` of a converted checkpoint.

    Args:
        original: The original LLaVA-NeXT config.json.
        vision_fields: SigLIP config fields of the tower (``num_hidden_layers`` is replaced).
        vision_layers: Vision layers the model uses (the tower's layers minus the one LLaVA-NeXT drops).
        image_token_id: Id of ``<image>`` in the converted tokenizer.
        video_token_id: Id of ``<video>`` in the converted tokenizer.

    Returns:
        The config.
    """
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    vision: SiglipVisionConfig = SiglipVisionConfig(
        **{**vision_fields, "num_hidden_layers": vision_layers, "vision_use_head": False}
    )
    text = Qwen2Config(**_text_config_fields(original))
    return LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        video_token_index=video_token_id,
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=str(original.get("image_aspect_ratio", "anyres_max_9")),
        image_grid_pinpoints=parse_pinpoints(original.get("image_grid_pinpoints"), vision.image_size),
        tie_word_embeddings=bool(original.get("tie_word_embeddings", False)),
        architectures=["LlavaOnevisionForConditionalGeneration"],
    )


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


def _safetensors_files(src: Path) -> list[Path]:
    """The safetensors shards of `src` (from the index when there is one); refuses other formats."""
    index_files = sorted(src.glob("*.safetensors.index.json"))
    if index_files:
        files: set[Path] = set()
        for index in index_files:
            files.update(
                src / f for f in json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()
            )
        missing = sorted(str(f) for f in files if not f.is_file())
        if missing:
            raise ConversionError(f"shards named in the safetensors index are missing: {', '.join(missing)}")
        strays = sorted(p.name for p in src.glob("*.safetensors") if p not in files)
        if strays:
            logger.warning("ignoring safetensors files not named in the index: %s", ", ".join(strays))
        return sorted(files)
    files_found = sorted(src.glob("*.safetensors"))
    if files_found:
        return files_found
    others = sorted(p.name for p in src.iterdir() if p.suffix in _OTHER_WEIGHT_SUFFIXES)
    if others:
        raise ConversionError(
            f"{src} holds weights only as {', '.join(others)}: only safetensors weights are read "
            "(pickle-based files can run code when loaded). Convert them to safetensors first, in a trusted "
            "environment."
        )
    raise ConversionError(f"{src} holds no *.safetensors weights")


def _weight_shapes(files: Sequence[Path]) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """Name -> (file, shape) of every tensor, from the safetensors headers only."""
    from safetensors import safe_open

    shapes: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if name in shapes:
                    raise ConversionError(
                        f"tensor {name!r} is in both {shapes[name][0].name} and {file.name}"
                    )
                shapes[name] = (file, tuple(f.get_slice(name).get_shape()))
    return shapes


def _vision_layer_count(names: Sequence[str]) -> int:
    indices = {int(m.group(1)) for n in names if (m := _VISION_LAYER.match(n))}
    if not indices:
        raise ConversionError(
            "no vision tower weights (model.vision_tower.vision_tower.vision_model.encoder.layers.*) found: "
            "the checkpoint must include its SigLIP tower"
        )
    if indices != set(range(max(indices) + 1)):
        raise ConversionError(f"vision tower layers are not contiguous: {sorted(indices)}")
    return max(indices) + 1


def plan_weights(
    names: Sequence[str], target: dict[str, tuple[int, ...]], shapes: dict[str, tuple[int, ...]]
) -> tuple[dict[str, str], list[str]]:
    """Map every source tensor onto the model, or fail listing what does not fit.

    Args:
        names: Source tensor names.
        target: The model's state-dict names and shapes.
        shapes: Source tensor shapes.

    Returns:
        ``(mapping, dropped)``: target name -> source name for every target tensor (``lm_head.weight`` may map
        to the input embedding when the checkpoint has no separate head), and the buffers dropped.

    Raises:
        ConversionError: Source tensors with no place in the model, model tensors with no source, or shape
            mismatches; every offending name is listed.
    """
    mapping: dict[str, str] = {}
    dropped, unmapped = [], []
    for name in names:
        if name.endswith(DROPPED_SUFFIXES):
            dropped.append(name)
            continue
        new = map_weight_name(name)
        if new is None or new not in target:
            unmapped.append(name if new is None else f"{name} (-> {new}, not in the model)")
            continue
        mapping[new] = name
    if (
        "lm_head.weight" in target
        and "lm_head.weight" not in mapping
        and "model.embed_tokens.weight" in names
    ):
        mapping["lm_head.weight"] = "model.embed_tokens.weight"  # tied head, as the reference script does
    missing = sorted(set(target) - set(mapping))
    mismatched = [
        f"{source} {shapes[source]} -> {new} {target[new]}"
        for new, source in sorted(mapping.items())
        if tuple(shapes[source]) != tuple(target[new])
    ]
    problems = []
    if unmapped:
        problems.append(f"{len(unmapped)} unmapped source weights: {', '.join(sorted(unmapped))}")
    if missing:
        problems.append(f"{len(missing)} model weights without a source: {', '.join(missing)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches: {', '.join(mismatched)}")
    if problems:
        raise ConversionError(
            "cannot map the checkpoint onto LlavaOnevisionForConditionalGeneration: " + "; ".join(problems)
        )
    return mapping, dropped


# --------------------------------------------------------------------------------------------
# Processor files
# --------------------------------------------------------------------------------------------


def write_processor(folder: Path, tokenizer: Any, config: LlavaOnevisionConfig) -> None:
    """Write tokenizer, processor_config.json (image + video processor) and chat_template.jinja.

    Written as files rather than through `LlavaOnevisionProcessor.save_pretrained`, which needs torchvision
    for its video processor; the files are the ones that method writes (transformers 5 layout).
    """
    from transformers.image_utils import PILImageResampling
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    vision = config.vision_config
    size = {"height": vision.image_size, "width": vision.image_size}
    image_processor = LlavaOnevisionImageProcessorPil(
        size=size,
        image_grid_pinpoints=config.image_grid_pinpoints,
        image_mean=SIGLIP_MEAN_STD,
        image_std=SIGLIP_MEAN_STD,
        resample=PILImageResampling.BICUBIC,
        do_pad=True,
        do_convert_rgb=True,
    )
    video_processor = {
        "video_processor_type": "LlavaOnevisionVideoProcessor",
        "size": size,
        "resample": int(PILImageResampling.BICUBIC),
        "image_mean": SIGLIP_MEAN_STD,
        "image_std": SIGLIP_MEAN_STD,
        "rescale_factor": 1 / 255,
        "do_resize": True,
        "do_rescale": True,
        "do_normalize": True,
        "do_convert_rgb": True,
        "do_sample_frames": False,
        "default_to_square": False,
    }
    processor_config = {
        "image_processor": image_processor.to_dict(),
        "video_processor": video_processor,
        "image_token": IMAGE_TOKEN,
        "video_token": VIDEO_TOKEN,
        "num_image_tokens": (vision.image_size // vision.patch_size) ** 2,
        "vision_feature_select_strategy": config.vision_feature_select_strategy,
        "vision_aspect_ratio": config.vision_aspect_ratio,
        "processor_class": "LlavaOnevisionProcessor",
    }
    tokenizer.save_pretrained(folder)
    (folder / "processor_config.json").write_text(
        json.dumps(processor_config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")


def _add_media_tokens(tokenizer: Any) -> list[str]:
    from transformers import AddedToken

    vocab = tokenizer.get_vocab()
    added = [t for t in (IMAGE_TOKEN, VIDEO_TOKEN) if t not in vocab]
    if added:
        tokenizer.add_tokens(
            [AddedToken(t, special=True, normalized=False) for t in added], special_tokens=True
        )
    return added


def _generation_config(src: Path, config: LlavaOnevisionConfig, tokenizer: Any) -> Any:
    """The source generation config (or one from the model config), with <|im_end|> as an eos id."""
    from transformers import GenerationConfig

    if (src / "generation_config.json").is_file():
        generation = GenerationConfig.from_pretrained(str(src), local_files_only=True)
    else:
        generation = GenerationConfig(
            bos_token_id=config.text_config.bos_token_id, eos_token_id=config.text_config.eos_token_id
        )
    eos = generation.eos_token_id
    eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    im_end = tokenizer.get_vocab().get("<|im_end|>")
    if im_end is not None and im_end not in eos_ids:
        eos_ids.insert(0, im_end)
    if eos_ids:
        generation.eos_token_id = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    if generation.pad_token_id is None and tokenizer.pad_token_id is not None:
        generation.pad_token_id = tokenizer.pad_token_id
    return generation


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------


def convert_critic(
    src: str | Path,
    dst: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert a LLaVA-Critic / LLaVA-OneVision checkpoint from the LLaVA-NeXT layout to transformers format.

    Args:
        src: Local folder of the original checkpoint (config.json, safetensors shards, Qwen2 tokenizer).
        dst: Folder to create. It is written beside itself under a temporary name and renamed at the end.
        dtype: Cast the weights to this dtype (name or `torch.dtype`); None keeps the stored dtypes.
        overwrite: Replace an existing `dst` (only once the conversion has succeeded).

    Returns:
        `dst`, which `posttrain.models.critic_checkpoint.is_transformers_onevision` accepts and
        `LlavaCriticJudge` loads.

    Raises:
        ConversionError: The source is not a convertible LLaVA-NeXT checkpoint (not safetensors, unsupported
            options, unmapped or missing weights, ...); nothing is written then.
        FileExistsError: `dst` exists and `overwrite` is False.
    """
    import torch
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from transformers import AutoTokenizer, LlavaOnevisionForConditionalGeneration

    src, dst = Path(src).resolve(), Path(dst).resolve()
    if not src.is_dir():
        raise ConversionError(f"{src} is not a folder")
    if dst == src or src in dst.parents:
        raise ConversionError(f"the destination {dst} must not be inside the source {src}")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists (pass overwrite=True / --overwrite to replace it)")
    if is_transformers_onevision(src):
        raise ConversionError(f"{src} is already a transformers-format LLaVA-OneVision checkpoint")
    config_file = src / "config.json"
    if not config_file.is_file():
        raise ConversionError(f"no config.json in {src}")
    original = json.loads(config_file.read_text(encoding="utf-8"))
    _check_supported(original)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)

    # Everything that can fail on the source is checked before any tensor is read or anything is written.
    files = _safetensors_files(src)
    shapes_by_name = _weight_shapes(files)
    names = list(shapes_by_name)
    tower_name, tower = _vision_tower_config(original, src)
    vision_layers = _vision_layer_count(names)
    used = tower["num_hidden_layers"] - 1
    if vision_layers != used:
        raise ConversionError(
            f"the checkpoint has {vision_layers} vision layers, but LLaVA-NeXT uses {used} of {tower_name} "
            "(all but the last): this is not the layout this converter knows"
        )
    if "mm_hidden_size" in original and original["mm_hidden_size"] != tower["hidden_size"]:
        raise ConversionError(
            f"mm_hidden_size {original['mm_hidden_size']} != hidden size {tower['hidden_size']} of "
            f"{tower_name}"
        )
    tokenizer = AutoTokenizer.from_pretrained(str(src), local_files_only=True, trust_remote_code=False)
    added = _add_media_tokens(tokenizer)
    image_id, video_id = tokenizer.convert_tokens_to_ids([IMAGE_TOKEN, VIDEO_TOKEN])
    config = build_onevision_config(original, tower, vision_layers, image_id, video_id)

    with init_empty_weights():
        model = LlavaOnevisionForConditionalGeneration(config)
    target = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    mapping, dropped = plan_weights(names, target, {k: v[1] for k, v in shapes_by_name.items()})

    handles = {file: safe_open(str(file), framework="pt", device="cpu") for file in files}
    state: dict[str, torch.Tensor] = {}
    loaded: dict[str, torch.Tensor] = {}
    for new, source in mapping.items():
        if source not in loaded:
            tensor = handles[shapes_by_name[source][0]].get_tensor(source)
            loaded[source] = tensor if dtype is None else tensor.to(dtype)
        state[new] = loaded[source]
    if mapping.get("lm_head.weight", "lm_head.weight") != "lm_head.weight" and not config.tie_word_embeddings:
        state["lm_head.weight"] = state["lm_head.weight"].clone()  # an untied head needs its own storage
    del loaded, handles
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    del state
    model.config.dtype = model.model.language_model.embed_tokens.weight.dtype

    vocab = model.config.text_config.vocab_size
    resized = len(tokenizer) > vocab
    if resized:
        torch.manual_seed(0)
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64, mean_resizing=True)
        logger.info("embedding resized from %d to %d rows", vocab, model.config.text_config.vocab_size)
    model.generation_config = _generation_config(src, model.config, tokenizer)
    model.eval()

    record = {
        "source": str(src),
        "source_model_type": original.get("model_type"),
        "vision_tower": tower_name,
        "vision_layers": vision_layers,
        "tensors": len(mapping),
        "dropped_buffers": sorted(dropped),
        "tokens_added": added,
        "image_token_id": image_id,
        "video_token_id": video_id,
        "embedding_resized": resized,
        "lm_head_from_embedding": mapping.get("lm_head.weight") == "model.embed_tokens.weight",
    }
    with atomic_dir(dst) as tmp:
        model.save_pretrained(tmp, max_shard_size="5GB")
        write_processor(tmp, tokenizer, model.config)
        (tmp / "conversion.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        if not is_transformers_onevision(tmp):
            raise ConversionError(f"the converted folder {tmp} does not pass is_transformers_onevision")
        processor = load_onevision_processor(tmp)
        if processor.image_token_id != model.config.image_token_id:
            raise ConversionError(
                f"processor image token id {processor.image_token_id} != config {model.config.image_token_id}"
            )
    logger.info("converted %s -> %s (%d tensors)", src, dst, len(mapping))
    return dst


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m posttrain convert-critic SRC DST``: convert a LLaVA-NeXT-layout critic checkpoint.

    Args:
        argv: Arguments after ``convert-critic``; None reads ``sys.argv[1:]``.

    Returns:
        0 on success, 2 when the source cannot be converted or the destination exists (one message on
        stderr).
    """
    parser = argparse.ArgumentParser(
        prog="python -m posttrain convert-critic",
        description="Convert lmms-lab/llava-critic-* (LLaVA-NeXT layout, safetensors) to transformers' "
        "LlavaOnevisionForConditionalGeneration format.",
    )
    parser.add_argument("src", type=Path, metavar="SRC", help="local folder of the original checkpoint")
    parser.add_argument("dst", type=Path, metavar="DST", help="folder to create (written atomically)")
    parser.add_argument(
        "--dtype", choices=["bfloat16", "float16", "float32"], help="cast the weights (default: keep)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse has printed usage and the error already
        return int(e.code or 0)
    try:
        out = convert_critic(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite)
    except (ConversionError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"converted {args.src} -> {out}")
    return 0
