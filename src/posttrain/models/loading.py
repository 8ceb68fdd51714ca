"""Building, saving and loading the models: the tiny LLaVA of the embedded default, and the hub models.

The tiny model is the real `LlavaForConditionalGeneration` (CLIP vision tower + Llama language model) at a
few hundred thousand parameters, with a byte-level BPE tokenizer trained locally, so every stage runs the
same transformers/PEFT code at both scales.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoProcessor,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from posttrain.core.config import Quantization, TinyParams
from posttrain.core.errors import MissingInputError
from posttrain.core.layout import model_dir, producing_stage
from posttrain.models.family import Family, family_of
from posttrain.models.template import CHAT_TEMPLATE, IMAGE_TOKEN

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN]
PROVENANCE = "provenance.json"


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts`; BOS is added by its post-processor.

    `<image>` is a special token so that it never merges with text.
    """
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="right",
    )


def build_tiny_llava(tokenizer: PreTrainedTokenizerFast, arch: TinyParams, seed: int):
    """A randomly initialised tiny `LlavaForConditionalGeneration` and its `LlavaProcessor`.

    Returns:
        (model, processor). The image gives (image_size/patch_size)² patch tokens; with
        ``vision_feature_select_strategy="default"`` the CLS feature is dropped, so the processor is told
        about one additional token (CLS) to expand ``<image>`` to exactly that many tokens.
    """
    vision = CLIPVisionConfig(
        hidden_size=arch.vision_hidden,
        intermediate_size=4 * arch.vision_hidden,
        num_hidden_layers=arch.vision_layers,
        num_attention_heads=arch.vision_heads,
        image_size=arch.image_size,
        patch_size=arch.patch_size,
        projection_dim=arch.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=arch.text_hidden,
        intermediate_size=arch.text_intermediate,
        num_hidden_layers=arch.text_layers,
        num_attention_heads=arch.text_heads,
        num_key_value_heads=arch.text_heads,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,  # the last layer: -2 would waste half of a 2-layer tower
        projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model, llava_processor(tokenizer, arch.image_size, arch.patch_size)


def llava_processor(tokenizer: PreTrainedTokenizerFast, image_size: int, patch_size: int) -> LlavaProcessor:
    """LLaVA-1.5's processor over `tokenizer`: CLIP's resize and centre crop to `image_size`, one
    ``<image>`` token a patch (the "default" strategy drops CLIP's CLS), and the chat template.

    The tiny base and the real-scale stand-in share it, so both expand images exactly as llava-1.5 does.
    """
    # the PIL backend by name: in transformers 5 `CLIPImageProcessor` is the torchvision one, which falls back
    # to this class (with a warning in every process) when torchvision is not installed
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS, dropped by the "default" strategy
        chat_template=CHAT_TEMPLATE,
    )


def count_params(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def image_token_count(processor) -> int:
    """How many tokens ``<image>`` expands to, asked of the processor itself with a blank image."""
    size = processor.image_processor.crop_size["height"]
    out = processor(text=IMAGE_TOKEN, images=Image.new("RGB", (size, size)), return_tensors="pt")
    return int((out["input_ids"] == processor.image_token_id).sum())


def write_provenance(folder: Path, **fields) -> None:
    """Write the artifact's provenance (resolved params, what produced it) beside its weights."""
    (folder / PROVENANCE).write_text(json.dumps(fields, indent=2, sort_keys=True, default=str) + "\n")


def read_provenance(folder: str | Path, stage: str) -> dict:
    path = Path(folder) / PROVENANCE
    if not path.exists():
        raise MissingInputError(
            f"{path} is missing: {folder} was not produced by this pipeline. Run `dvc repro {stage}`."
        )
    return json.loads(path.read_text())


def base_source(folder: str | Path) -> tuple[str, str | None]:
    """(folder or hub id, revision) the `base` stage recorded: where the weights are read from."""
    prov = read_provenance(folder, "base")
    if prov["kind"] == "local":
        return str(folder), None
    return prov["hub_id"], prov["revision"] or None


def base_config(folder: str | Path):
    """The base model's config, without its weights; its family checked (`posttrain.models.family`).

    Raises:
        UnknownFamilyError: its model_type is no family's, before anything else loads.
    """
    from transformers import AutoConfig

    source, revision = base_source(folder)
    config = AutoConfig.from_pretrained(source, revision=revision)
    family_of(config)
    return config


def base_family(folder: str | Path) -> Family:
    """The family of the base model that the `base` stage recorded in `folder` (its config, no weights)."""
    return family_of(base_config(folder))


def base_config_and_processor(folder: str | Path):
    """The base model's config and processor, without its weights (for estimates before loading)."""
    source, revision = base_source(folder)
    return base_config(folder), AutoProcessor.from_pretrained(source, revision=revision)


def load_base(
    folder: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32, quantization_config=None
):
    """Load the base model and processor that the `base` stage recorded in `folder`.

    The tiny model is stored in the folder itself; a hub model is recorded by id and pinned revision.
    With a bitsandbytes `quantization_config` the weights are quantized as they load (CUDA only).
    """
    prov = read_provenance(folder, "base")
    source, revision = base_source(folder)
    family = base_family(folder)
    if device == "cuda" and quantization_config is not None:
        # each process of a data-parallel stage on its own GPU (`posttrain.core.distributed.init` made it the
        # current one): TRL's QLoRA-under-DDP recipe, device_map={"": local rank}
        device = f"cuda:{torch.cuda.current_device()}"
    model = family.transformers_class().from_pretrained(
        source,
        revision=revision,
        dtype=dtype,
        use_safetensors=True,
        quantization_config=quantization_config,
        **({"device_map": {"": device}} if quantization_config is not None else {}),
    )
    if quantization_config is None:
        model = model.to(device)
    processor = AutoProcessor.from_pretrained(source, revision=revision)
    model.eval()
    return model, processor, prov


def base_fingerprint(folder: str | Path) -> str:
    """Identity of a base model: hub id@revision, or the SHA-256 of the local weights.

    Adapters record it; the ensemble refuses members trained on different bases.
    """
    import hashlib

    prov = read_provenance(folder, "base")
    if prov["kind"] != "local":
        return f"{prov['hub_id']}@{prov['revision']}"
    h = hashlib.sha256()
    for f in sorted(Path(folder).glob("*.safetensors")):
        h.update(f.read_bytes())
    return f"sha256:{h.hexdigest()}"


def quantization_config(quantization: Quantization, family: Family):
    """Bitsandbytes settings for QLoRA nf4 of a `family` model, or None; nf4 without CUDA is an error before
    anything loads.
    """
    if quantization is Quantization.NONE:
        return None
    if not torch.cuda.is_available():
        raise RuntimeError(
            "the base is to be held in nf4 (sft.common.quantization: nf4), which needs a CUDA GPU "
            "(bitsandbytes 4-bit); none is visible. Use sft.common.quantization: none on this machine."
        )
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
        # skip lists match full module names: the vision tower and projector stay in bf16
        llm_int8_skip_modules=[*family.vision_modules, "lm_head"],
    )


ADAPTER_WEIGHTS = "adapter_model.safetensors"


def check_adapters(base_dir: str | Path, adapters: dict[str, Path]) -> None:
    """Refuse adapters that are unsafe to load or were trained on another base than `base_dir`.

    An adapter's weights must be safetensors: for a folder holding only ``adapter_model.bin``, PEFT would
    ``torch.load`` a pickle, which can run code. The base fingerprint its provenance records must be
    `base_fingerprint(base_dir)`: an adapter on another base measures nothing. Every adapter is checked and
    every problem reported at once.

    Args:
        base_dir: the `base` stage's folder, the model the adapters are to be loaded onto.
        adapters: model name (``sft1``, ``sfte``, ...) -> adapter folder; the name gives the stage to rerun.

    Raises:
        ValueError: naming each folder at fault and the `dvc repro` stage that rewrites it.
    """
    fingerprint = base_fingerprint(base_dir)
    problems = []
    for name, folder in adapters.items():
        stage = producing_stage(name)
        if not (Path(folder) / ADAPTER_WEIGHTS).is_file():
            held = sorted(f.name for f in Path(folder).glob("adapter_model.*")) or ["no adapter weights"]
            problems.append(
                f"{folder} holds {', '.join(held)}, not {ADAPTER_WEIGHTS}: only safetensors adapters are "
                f"loaded (a pickled .bin can run code when loaded); rerun `dvc repro {stage}`"
            )
            continue
        recorded = read_provenance(folder, stage).get("base_fingerprint")
        if recorded != fingerprint:
            problems.append(
                f"{folder} was trained on another base model ({recorded}) than {base_dir} ({fingerprint}); "
                f"rerun `dvc repro {stage}`"
            )
    if problems:
        raise ValueError("\n".join(problems))


def trained_quantization(adapter: str | Path, stage: str) -> Quantization:
    """How the base weights were held while the adapter in `adapter` was trained (its provenance says)."""
    prov = read_provenance(adapter, stage)
    if "base_quantization" not in prov:
        raise ValueError(
            f"{adapter}/{PROVENANCE} does not say how the base was held while it trained "
            f"(base_quantization); it predates this version: rerun `dvc repro {stage}`"
        )
    return Quantization(prov["base_quantization"])


def adapter_layer_bytes(adapter: str | Path) -> float:
    """Bytes the adapter in `adapter` takes as an fp32 layer of its own (`load_model` with merge off), read
    from its safetensors header: nothing is loaded.
    """
    from safetensors import safe_open

    with safe_open(str(Path(adapter) / "adapter_model.safetensors"), framework="pt") as f:
        return 4.0 * sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def check_base_quantization(adapter: str | Path, stage: str, quantization: Quantization) -> None:
    """Refuse to put an adapter trained on the unquantized base onto an nf4 one: that is no study's setting.

    The reverse (nf4-trained adapter on the unquantized base) is `adapters.base_weights: unquantized`.
    """
    trained = trained_quantization(adapter, stage)
    if quantization is Quantization.NF4 and trained is not Quantization.NF4:
        raise ValueError(
            f"{adapter} was trained on the {trained.value} base, but the base is to be loaded in nf4 "
            f"(sft.common.quantization: nf4 with adapters.base_weights: as_trained): the adapter is stale; "
            f"rerun `dvc repro {stage}`"
        )


def dequantize_4bit_linears(model) -> int:
    """Replace each bitsandbytes 4-bit linear layer of `model` by a plain linear layer holding its weight
    dequantized once, in the layer's compute dtype: the values the 4-bit layer's forward multiplies with,
    without dequantizing them again at every call. In place.

    Returns:
        How many layers were replaced.
    """
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    replaced = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if not isinstance(child, bnb.nn.Linear4bit):
                continue
            dtype = child.compute_dtype or torch.bfloat16
            weight = dequantize_4bit(child.weight.data, child.weight.quant_state).to(dtype)  # (out, in)
            linear = torch.nn.Linear(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                device=weight.device,
                dtype=dtype,
            )
            linear.weight = torch.nn.Parameter(weight, requires_grad=False)
            if child.bias is not None:
                linear.bias = torch.nn.Parameter(child.bias.data.to(dtype), requires_grad=False)
            setattr(parent, child_name, linear)
            replaced += 1
    return replaced


def load_model(
    name: str,
    models_dir: Path,
    device: str = "cpu",
    quantization: Quantization = Quantization.NONE,
    merge: bool = False,
):
    """Load a pipeline model by name: ``base``, or an adapter stage's output applied to the base.

    Args:
        name: ``base``, an SFT variant or ``sfte``/``sfte_dpo`` (`posttrain.core.layout.model_dir`).
        models_dir: the folder of the pipeline's models (``models/``).
        device: ``cpu`` or ``cuda``.
        quantization: how the base weights are held (`posttrain.core.config.downstream_quantization`): nf4 is
            the base as QLoRA trained on it; none is full precision on the CPU and bf16 on CUDA.
        merge: the adapter merged into the base's weights, which rounds weight plus update to the base's
            dtype once (bf16 on CUDA: of the size of a DPO update, so it can erase what DPO trained); else
            the adapter stays a layer of its own, in fp32, as it trained. With nf4 the base's weights are
            dequantized once either way (`dequantize_4bit_linears`): the values trained on, held in bf16,
            so decoding runs no 4-bit kernel (on an H200 the 4-bit base with its adapter decoded ~4×
            slower, bound by kernel launches).

    Returns:
        (model, processor), the model in eval mode (dropout off).
    """
    adapter = model_dir(name, models_dir)
    if name != "base":
        check_adapters(models_dir / "base", {name: adapter})
        check_base_quantization(adapter, producing_stage(name), quantization)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model, processor, _ = load_base(
        models_dir / "base",
        device=device,
        dtype=dtype,
        quantization_config=quantization_config(quantization, base_family(models_dir / "base")),
    )
    if quantization is Quantization.NF4:
        n = dequantize_4bit_linears(model)
        print(f"{name}: {n} nf4 layers dequantized to bf16 once (the weights trained on)", flush=True)
    if name == "base":
        return model, processor
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, str(adapter))
    if quantization is Quantization.NONE:
        model = model.to(device)  # an nf4 base is already placed by its device_map
    if merge:
        model = model.merge_and_unload()
    model.eval()
    return model, processor
