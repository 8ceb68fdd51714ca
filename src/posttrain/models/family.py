"""What differs between VLM families, as data: one `Family` a family, chosen by the config's ``model_type``.

Every stage asks `family_of(config)` (or `posttrain.models.loading.base_family` for the base a stage starts
from) instead of naming LLaVA's classes and module paths: which transformers class holds the model, where
its language model sits (so LoRA, 4-bit quantization and Liger's kernels touch the language model and not
the vision tower), and the memory coefficients measured on it.

A ``model_type`` that no family describes fails when the config is read, before any weight loads or GPU time
is spent, naming the families there are (`UnknownFamilyError`).

Described so far: LLaVA-1.5 (``llava``). Its conversation format (`posttrain.models.template`) and image
preparation (`posttrain.models.images`, padded to a square) are still the only ones. Other families
(Qwen2.5-VL, LLaVA-OneVision, SmolVLM) need more than a description: a conversation template from their
processor's chat template, a variable number of image tokens and the extra inputs of their forward pass
(issue 30); until every stage handles those, they are not listed here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from operator import attrgetter

from posttrain.core.errors import InputError
from posttrain.models.conversation import LLAVA, Conversation


@dataclass(frozen=True)
class Family:
    """One VLM family: what the stages need to know of it beyond its config.

    Attributes:
        name: as the docs and messages say it (``llava-1.5``).
        model_types: the config.json ``model_type`` values it covers.
        model_class: the transformers class of the conditional-generation model.
        language_model: the language model's module path inside that model (``model.language_model``); LoRA
            targets, 4-bit layers and Liger's kernels are looked for there only.
        vision_modules: module paths of the vision side (tower, projector), kept in bf16 under nf4.
        liger: the `liger_kernel.transformers` function that patches its language model, or None.
        conversation: its conversation format (`posttrain.models.conversation`).
        activation_bytes: bytes of saved activations per token, decoder layer and hidden unit of a
            training step, by (gradient checkpointing, liger) (`posttrain.models.memory.estimate_training`).
    """

    name: str
    model_types: tuple[str, ...]
    model_class: str
    language_model: str
    vision_modules: tuple[str, ...]
    liger: str | None
    conversation: Conversation = LLAVA
    activation_bytes: dict[tuple[bool, bool], float] = field(default_factory=dict)

    def lora_regex(self, target_modules: tuple[str, ...]) -> str:
        """PEFT `target_modules` regex: the named layers of the language model only.

        The vision tower's attention layers share the names (``q_proj`` ...), so matching by name alone
        would also adapt them.
        """
        names = "|".join(re.escape(m) for m in target_modules)
        inner = re.escape(self.language_model.rsplit(".", 1)[-1])
        return rf"(.*\.)?{inner}\..*\.({names})"

    def in_language_model(self, module_name: str) -> bool:
        """Whether a module of the (unwrapped) model belongs to the language model."""
        return module_name.startswith(self.language_model + ".")

    def language_model_of(self, model):
        """The language model module of a loaded `model_class` model."""
        return attrgetter(self.language_model)(model)

    def transformers_class(self) -> type:
        import transformers

        return getattr(transformers, self.model_class)


LLAVA_15 = Family(
    name="llava-1.5",
    model_types=("llava",),
    model_class="LlavaForConditionalGeneration",
    language_model="model.language_model",
    vision_modules=("model.vision_tower", "model.multi_modal_projector"),
    liger="apply_liger_kernel_to_llama",
    conversation=LLAVA,
    # calibrated on llava-1.5-7b (sequence 705, LoRA r=16 on every linear layer of the language model, bf16
    # autocast) on one H100 (bench/results/h100.json and h100_baseline.json)
    activation_bytes={
        (False, False): 61.0,  # bf16 batch 8: 59.9 GB (h100_baseline.json)
        (False, True): 52.0,  # bf16 batch 8 -> 12: 53.0 -> 72.2 GB; nf4 8 -> 12: 43.4 -> 62.6 GB (h100.json)
        (True, False): 6.0,  # bf16 batch 16 with checkpointing: 23.3 GB (h100_baseline.json)
        (True, True): 6.0,  # 23.2 GB (h100.json)
    },
)

FAMILIES: tuple[Family, ...] = (LLAVA_15,)


class UnknownFamilyError(InputError, ValueError):
    """A base model whose config.json ``model_type`` no family describes."""


def family_of(config) -> Family:
    """The family of a model config (a transformers config, or a config.json read as a dict).

    Raises:
        UnknownFamilyError: naming the model_type and the families there are.
    """
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    known = "; ".join(f"{f.name} (model_type {', '.join(map(repr, f.model_types))})" for f in FAMILIES)
    raise UnknownFamilyError(
        f"the base model's config.json has model_type {model_type!r}, which no model family of posttrain "
        f"describes; the families are: {known}. Point base.hub_id at a checkpoint of one of them "
        "(posttrain.models.family lists what a family needs)"
    )
