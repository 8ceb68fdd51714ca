from __future__ import annotations

import json

import pytest
import torch

from posttrain.models import architectures as arch


def test_shipped_configs_load() -> None:
    assert set(arch.NAMES) <= set(arch.available())
    llava = arch.load_config("llava-1.5-7b")
    assert type(llava).__name__ == "LlavaConfig"
    assert llava.vision_config.image_size == 336 and llava.vision_config.patch_size == 14
    assert llava.vision_config.hidden_act == "quick_gelu" and llava.vision_config.projection_dim == 768
    assert llava.text_config.vocab_size == 32064 and llava.text_config.num_hidden_layers == 32
    assert llava.text_config.rope_parameters["rope_theta"] == 10000.0
    assert llava.image_token_id == 32000 and llava.pad_token_id == 32001 and llava.image_seq_length == 576
    assert (llava.vision_feature_layer, llava.vision_feature_select_strategy) == (-2, "default")

    critic = arch.load_config("llava-critic-7b")
    assert type(critic).__name__ == "LlavaOnevisionConfig"
    v, t = critic.vision_config, critic.text_config
    assert (v.hidden_size, v.intermediate_size, v.num_attention_heads, v.image_size, v.patch_size) == (
        1152,
        4304,
        16,
        384,
        14,
    )
    assert v.num_hidden_layers == 26 and not v.vision_use_head  # so400m's 27 minus the layer LLaVA-NeXT drops
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads) == (
        3584,
        28,
        28,
        4,
    )
    assert (t.intermediate_size, t.vocab_size, t.max_position_embeddings) == (18944, 152128, 32768)
    assert (
        t.rope_parameters["rope_theta"] == 1000000.0 and t.rms_norm_eps == 1e-6 and not t.tie_word_embeddings
    )
    assert (critic.image_token_id, critic.video_token_id) == (151646, 151647)
    assert critic.vision_aspect_ratio == "anyres_max_9" and critic.vision_feature_select_strategy == "full"
    assert len(critic.image_grid_pinpoints) == 36 and critic.image_grid_pinpoints[-1] == [2304, 2304]
    assert {tuple(p) for p in critic.image_grid_pinpoints} == {
        (a, b) for a in range(384, 2305, 384) for b in range(384, 2305, 384)
    }


def test_unknown_name_lists_available() -> None:
    with pytest.raises(ValueError, match="llava-1.5-7b.*llava-critic-7b"):
        arch.load_config("llava-13b")


@pytest.mark.parametrize("name", arch.NAMES)
def test_shipped_file_is_what_transformers_writes(name: str, tmp_path) -> None:
    shipped = json.loads((arch.CONFIG_DIR / name / "config.json").read_text())
    arch.write_reference_configs(tmp_path)
    rebuilt = json.loads((tmp_path / name / "config.json").read_text())
    shipped.pop("transformers_version")
    rebuilt.pop("transformers_version")
    assert shipped == rebuilt


def test_param_counts() -> None:
    n = arch.param_count(arch.load_config("llava-1.5-7b"))
    assert 7.060e9 < n < 7.066e9  # llava-hf/llava-1.5-7b-hf: 7.06B
    assert n == 7_063_427_072
    m = arch.param_count(arch.load_config("llava-critic-7b"))
    assert 8.02e9 < m < 8.04e9  # llava-hf/llava-onevision-qwen2-7b-ov-hf: 8.03B


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k in ("text_config", "vision_config"):
            out.update(_flatten(v, f"{k}."))
        else:
            out[prefix + k] = v
    return out


@pytest.mark.parametrize("name", arch.NAMES)
def test_shrink_keeps_other_fields(name: str) -> None:
    config = arch.load_config(name)
    small = arch.shrink(config, text_num_hidden_layers=1)
    before, after = _flatten(config.to_dict()), _flatten(small.to_dict())
    changed = {k for k in before if before[k] != after.get(k)}
    allowed = {
        "text_config.num_hidden_layers",
        "text_config.hidden_size",
        "text_config.intermediate_size",
        "text_config.num_attention_heads",
        "text_config.num_key_value_heads",
        "text_config.head_dim",
        "text_config.layer_types",
        "vision_config.num_hidden_layers",
        "vision_config.hidden_size",
        "vision_config.intermediate_size",
        "vision_config.num_attention_heads",
    }
    assert changed <= allowed and set(after) == set(before)
    assert small.text_config.num_hidden_layers == 1 and small.vision_config.num_hidden_layers == 2
    assert small.text_config.vocab_size == config.text_config.vocab_size
    assert small.vision_config.image_size == config.vision_config.image_size
    assert config.text_config.num_hidden_layers > 2  # the original is untouched
    if name == "llava-critic-7b":
        assert small.text_config.num_key_value_heads == 1  # 28:4 grouping -> 4 heads : 1 kv head
        assert small.text_config.layer_types == ["full_attention"]
    # a top-level field whose name starts with vision_ stays top-level; unknown names fail
    assert arch.shrink(config, vision_feature_layer=-1).vision_feature_layer == -1
    with pytest.raises(ValueError, match="not a field"):
        arch.shrink(config, text_num_layers=1)


def test_shrunk_llava_forward_576_image_tokens() -> None:
    config = arch.shrink(arch.load_config("llava-1.5-7b"))
    assert (336 / 14) ** 2 == 576 == arch.image_tokens_per_tile(config) == config.image_seq_length
    model = arch.build_random(config, dtype=torch.float32, device="cpu")
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    text = torch.tensor([[1, 5, 6, 7]])
    image = torch.full((1, 576), config.image_token_id)
    input_ids = torch.cat([text[:, :2], image, text[:, 2:]], dim=1)
    pixel_values = torch.randn(1, 3, 336, 336)
    with torch.no_grad():
        logits = model(input_ids=input_ids, pixel_values=pixel_values).logits
    assert logits.shape == (1, 580, 32064) and torch.isfinite(logits).all()
    short = torch.cat([text[:, :2], image[:, 1:], text[:, 2:]], dim=1)
    with pytest.raises(ValueError, match="[Ii]mage features and image tokens do not match"):
        model(input_ids=short, pixel_values=pixel_values)  # one image token short: 576 are needed

    # same seed, same weights; another seed, other weights
    again = arch.build_random(config, dtype=torch.float32, device="cpu")
    other = arch.build_random(config, dtype=torch.float32, device="cpu", seed=1)
    w = "model.multi_modal_projector.linear_1.weight"
    assert torch.equal(model.state_dict()[w], again.state_dict()[w])
    assert not torch.equal(model.state_dict()[w], other.state_dict()[w])
    assert arch.param_count(config) == sum(p.numel() for p in model.parameters())


def test_shrunk_critic_forward() -> None:
    from PIL import Image
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    config = arch.shrink(arch.load_config("llava-critic-7b"))
    assert arch.image_tokens_per_tile(config) == (384 // 14) ** 2 == 729
    model = arch.build_random(config, dtype=torch.float32, device="cpu")
    processor = LlavaOnevisionImageProcessorPil(
        size={"height": 384, "width": 384},
        image_grid_pinpoints=config.image_grid_pinpoints,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    pixels = processor(images=[Image.new("RGB", (384, 384), "red")], return_tensors="pt")
    assert tuple(pixels["pixel_values"].shape) == (1, 2, 3, 384, 384)  # base tile + one 384x384 anyres tile
    n_image = 729 + 729 + 27  # base + the tile's 27x27 features + one newline per row
    input_ids = torch.cat(
        [torch.tensor([[1, 2]]), torch.full((1, n_image), config.image_token_id), torch.tensor([[3]])], dim=1
    )
    with torch.no_grad():
        logits = model(
            input_ids=input_ids,
            pixel_values=pixels["pixel_values"],
            image_sizes=pixels["image_sizes"],
            logits_to_keep=1,
        ).logits
    assert logits.shape == (1, 1, 152128) and torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="[Ii]mage features and image tokens do not match"):
        short = torch.cat([input_ids[:, :2], input_ids[:, 3:]], dim=1)  # one image token fewer
        model(input_ids=short, pixel_values=pixels["pixel_values"], image_sizes=pixels["image_sizes"])


def test_build_random_dtype() -> None:
    model = arch.build_random(arch.shrink(arch.load_config("llava-critic-7b")), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not model.training
