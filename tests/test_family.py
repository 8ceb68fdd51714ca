"""Model families as data (posttrain.models.family): chosen by the config's model_type, LoRA on the language
model only, unknown families refused before anything loads."""

import re

import pytest
import torch

from posttrain.models.architectures import load_config, meta_model, model_class
from posttrain.models.family import FAMILIES, LLAVA_15, UnknownFamilyError, family_of

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_llava_configs_are_llava_15_and_other_model_types_are_refused_by_name():
    from transformers import Qwen2_5_VLConfig

    assert family_of(load_config("llava-1.5-7b")) is LLAVA_15
    assert family_of({"model_type": "llava"}) is LLAVA_15  # a config.json read as a dict
    with pytest.raises(UnknownFamilyError) as e:
        family_of(Qwen2_5_VLConfig())
    assert "model_type 'qwen2_5_vl'" in str(e.value)
    assert all(f.name in str(e.value) for f in FAMILIES)
    with pytest.raises(UnknownFamilyError):
        family_of({})  # no model_type at all


def test_the_lora_regex_is_the_one_the_committed_adapters_record():
    """Adapters record PEFT's target_modules: LLaVA-1.5's regex must stay the string it was, or every adapter
    of the default pipeline changes."""
    assert LLAVA_15.lora_regex(("q_proj", "v_proj")) == r"(.*\.)?language_model\..*\.(q_proj|v_proj)"


def test_the_lora_regex_selects_every_named_language_model_linear_and_no_vision_one():
    """llava-1.5-7b on the meta device: the seven linears of each of the 32 decoder layers; CLIP's q/k/v_proj
    and the projector stay out. The 4-bit accounting (`in_language_model`) covers the same layers."""
    model = meta_model(load_config("llava-1.5-7b"))
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    pattern = re.compile(LLAVA_15.lora_regex(LINEAR))
    chosen = [n for n in linear if pattern.fullmatch(n)]
    assert len(chosen) == 7 * 32
    assert all(LLAVA_15.in_language_model(n) for n in chosen)
    assert any(n.startswith("model.vision_tower.") and n.endswith("q_proj") for n in linear)
    assert not any(n.startswith(LLAVA_15.vision_modules) for n in chosen)
    assert [n for n in linear if LLAVA_15.in_language_model(n)] == chosen  # lm_head sits outside


def test_the_family_names_the_class_and_the_language_model_it_holds():
    config = load_config("llava-1.5-7b")
    model = meta_model(config)
    assert model_class(config) is LLAVA_15.transformers_class()
    assert LLAVA_15.language_model_of(model) is model.model.language_model
    assert set(LLAVA_15.activation_bytes) == {(c, liger) for c in (False, True) for liger in (False, True)}


def test_nf4_keeps_the_family_vision_side_in_bf16(monkeypatch):
    """The bitsandbytes skip list comes from the family: the vision tower and projector, and lm_head."""
    from posttrain.core.config import Quantization
    from posttrain.models import loading

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    config = loading.quantization_config(Quantization.NF4, LLAVA_15)
    assert config.llm_int8_skip_modules == ["model.vision_tower", "model.multi_modal_projector", "lm_head"]
