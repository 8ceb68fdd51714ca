"""Converting a LLaVA-NeXT-layout critic: a tiny original-layout checkpoint is made by renaming the weights of
a tiny transformers OneVision model BACKWARDS; the converted model must give the same logits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from posttrain.evaluate.critic import pointwise_prompt, qwen_render
from posttrain.evaluate.llava_critic import LlavaCriticJudge
from posttrain.models.critic_checkpoint import is_transformers_onevision, load_onevision_processor
from posttrain.realscale import convert_critic as cc

IMAGE, PATCH = 32, 8
PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]
SPARE_ROWS = 14  # Qwen2's embedding has unused rows beyond the tokenizer; <image>/<video> fit there

# transformers module-name prefix -> LLaVA-NeXT prefix, written independently of the converter's table.
BACKWARDS = [
    ("model.language_model.", "model."),
    ("model.vision_tower.", "model.vision_tower.vision_tower.vision_model."),
    ("model.multi_modal_projector.linear_1.", "model.mm_projector.0."),
    ("model.multi_modal_projector.linear_2.", "model.mm_projector.2."),
    ("model.image_newline", "model.image_newline"),
    ("lm_head.", "lm_head."),
]


def to_original_name(name: str) -> str:
    for new, old in BACKWARDS:
        if name.startswith(new):
            return old + name[len(new) :]
    raise AssertionError(f"no original name for {name}")


def qwen_like_tokenizer():
    """Byte-level BPE with Qwen2's three specials and NO <image>/<video>, as lmms-lab releases it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=350,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([qwen_render(pointwise_prompt("What is the value?", "It is 42."))] * 5, trainer)
    return Qwen2TokenizerFast(
        tokenizer_object=bpe,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )


def reference_model(n_tokens: int, vocab_size: int, seed: int = 123):
    """The tiny transformers-format model the original checkpoint is made from."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )

    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE,
        patch_size=PATCH,
        vision_use_head=False,
    )
    text = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=False,
    )
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=n_tokens,  # the ids the converter gives <image> and <video>
        video_token_index=n_tokens + 1,
        image_grid_pinpoints=PINPOINTS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    torch.manual_seed(seed)
    return LlavaOnevisionForConditionalGeneration(config).eval()


def original_config(tokenizer, vocab_size: int, tower: Path) -> dict:
    return {
        "architectures": ["LlavaQwenForCausalLM"],
        "model_type": "llava_qwen",
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_scaling": None,
        "sliding_window": 4096,
        "use_sliding_window": False,
        "max_window_layers": 2,
        "tie_word_embeddings": False,
        "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        "eos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        "torch_dtype": "float32",
        "mm_vision_tower": str(tower),
        "mm_hidden_size": 32,
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_patch_merge_type": "spatial_unpad",
        "mm_newline_position": "grid",
        "mm_resampler_type": None,
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "mm_tunable_parts": "mm_vision_tower,mm_mlp_adapter,mm_language_model",
        "image_aspect_ratio": "anyres_max_9",
        "image_grid_pinpoints": "(1x1),...,(2x2)",  # LLaVA-NeXT's range form; = PINPOINTS at 32 px tiles
    }


def write_tower(folder: Path) -> Path:
    """The released SigLIP tower's config: 3 layers, of which LLaVA-NeXT keeps 2."""
    from transformers import SiglipVisionConfig

    SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=IMAGE,
        patch_size=PATCH,
    ).save_pretrained(folder)
    return folder


def write_original(
    folder: Path, tensors: dict[str, torch.Tensor], config: dict, tokenizer, shards: int = 1
) -> Path:
    """Write an original-layout checkpoint: config.json, tokenizer, safetensors shard(s) (+ index)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(folder)
    names = sorted(tensors)
    if shards == 1:
        save_file({n: tensors[n].contiguous().clone() for n in names}, str(folder / "model.safetensors"))
        return folder
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i::shards]
        save_file({n: tensors[n].contiguous().clone() for n in part}, str(folder / file))
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


class Tiny:
    """A tiny original-layout checkpoint and the transformers model it was made from."""

    def __init__(self, root: Path, spare_rows: int = SPARE_ROWS):
        self.tokenizer = qwen_like_tokenizer()
        n = len(self.tokenizer)
        self.vocab_size = n + spare_rows
        self.model = reference_model(n, self.vocab_size)
        self.tower = write_tower(root / "siglip-tiny")
        self.config = original_config(self.tokenizer, self.vocab_size, self.tower)
        self.tensors = {to_original_name(k): v for k, v in self.model.state_dict().items()}
        # old checkpoints also saved a RoPE buffer, which the converter drops
        self.tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)

    def write(self, folder: Path, tensors: dict | None = None, shards: int = 1) -> Path:
        return write_original(
            folder, self.tensors if tensors is None else tensors, self.config, self.tokenizer, shards
        )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    return Tiny(tmp_path_factory.mktemp("tiny_src"))


@pytest.fixture(scope="module")
def source(tiny: Tiny, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tiny.write(tmp_path_factory.mktemp("orig") / "llava-critic-tiny", shards=2)
    generation = {"eos_token_id": tiny.config["eos_token_id"], "repetition_penalty": 1.05}
    (folder / "generation_config.json").write_text(json.dumps(generation))
    return folder


@pytest.fixture(scope="module")
def converted(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("converted") / "critic-hf"
    assert cc.main([str(source), str(dst)]) == 0  # the command-line entry point
    return dst


def leftovers(dst: Path) -> list[str]:
    return [p.name for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.")]


# --------------------------------------------------------------------------------------------
# Names and config pieces
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("original", "new"),
    [
        ("model.embed_tokens.weight", "model.language_model.embed_tokens.weight"),
        ("model.layers.27.self_attn.q_proj.bias", "model.language_model.layers.27.self_attn.q_proj.bias"),
        ("model.norm.weight", "model.language_model.norm.weight"),
        ("lm_head.weight", "lm_head.weight"),
        ("model.mm_projector.0.weight", "model.multi_modal_projector.linear_1.weight"),
        ("model.mm_projector.2.bias", "model.multi_modal_projector.linear_2.bias"),
        (
            "model.vision_tower.vision_tower.vision_model.encoder.layers.25.mlp.fc1.weight",
            "model.vision_tower.encoder.layers.25.mlp.fc1.weight",
        ),
        ("model.image_newline", "model.image_newline"),
        ("model.mm_projector.1.weight", None),  # GELU has no weights
        ("model.vision_resampler.pool.weight", None),
    ],
)
def test_map_weight_name(original: str, new: str | None) -> None:
    assert cc.map_weight_name(original) == new


def test_parse_pinpoints() -> None:
    full = cc.parse_pinpoints("(1x1),...,(6x6)", 384)
    assert len(full) == 36 and full[0] == [384, 384] and full[1] == [384, 768] and full[-1] == [2304, 2304]
    from posttrain.models.architectures import ONEVISION_PINPOINTS

    assert full == ONEVISION_PINPOINTS
    assert cc.parse_pinpoints([[384, 768], (768, 384)], 384) == [[384, 768], [768, 384]]
    with pytest.raises(cc.ConversionError):
        cc.parse_pinpoints("anyres", 384)


def test_chat_template_renders_qwen_template(converted: Path) -> None:
    processor = load_onevision_processor(converted)
    prompt = pointwise_prompt("What is the value?", "It is 42.")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == qwen_render(prompt)


# --------------------------------------------------------------------------------------------
# The conversion is exact
# --------------------------------------------------------------------------------------------


def test_converted_logits_equal_reference(tiny: Tiny, converted: Path) -> None:
    from transformers import LlavaOnevisionForConditionalGeneration

    assert is_transformers_onevision(converted)
    assert sorted(p.name for p in converted.glob("*.safetensors")) and not list(converted.glob("*.bin"))
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(
        converted, use_safetensors=True, local_files_only=True
    ).eval()
    ref = tiny.model
    assert model.config.image_token_id == ref.config.image_token_id == len(tiny.tokenizer)
    assert model.config.video_token_id == ref.config.video_token_id
    assert model.config.image_grid_pinpoints == PINPOINTS
    assert model.config.vision_config.num_hidden_layers == 2  # tower's 3 minus the dropped last one
    assert model.config.text_config.vocab_size == tiny.vocab_size  # fitted in the spare rows: no resize

    processor = load_onevision_processor(converted)
    assert processor.image_token_id == ref.config.image_token_id
    assert processor.num_image_tokens == (IMAGE // PATCH) ** 2
    images = [Image.new("RGB", (50, 30), "red"), Image.new("RGB", (20, 70), "blue")]
    for i in range(2):  # some texture, so that every weight of the tower matters
        images[i].paste((0, 255, 0), (0, 0, 10, 10))
    texts = [qwen_render(pointwise_prompt("What is the value?", "It is 42.")), qwen_render("Is it blue?")]
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
    n_image = int((inputs["input_ids"] == processor.image_token_id).sum())
    assert n_image > 2 * (IMAGE // PATCH) ** 2  # anyres tiles and newline tokens are in use
    with torch.no_grad():
        expected = ref(**inputs).logits
        got = model(**inputs).logits
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)

    # the whole state dict round-trips, not only what this prompt touched
    ref_state, state = ref.state_dict(), model.state_dict()
    assert set(ref_state) == set(state)
    assert all(torch.equal(ref_state[k], state[k]) for k in ref_state)


def test_converted_folder_files(tiny: Tiny, converted: Path) -> None:
    from transformers import GenerationConfig

    generation = GenerationConfig.from_pretrained(converted)
    im_end = tiny.tokenizer.convert_tokens_to_ids("<|im_end|>")
    eos = generation.eos_token_id
    assert im_end in (eos if isinstance(eos, list) else [eos])
    assert tiny.config["eos_token_id"] in (eos if isinstance(eos, list) else [eos])
    assert generation.repetition_penalty == 1.05  # the source's generation settings are kept

    processor_config = json.loads((converted / "processor_config.json").read_text())
    assert processor_config["processor_class"] == "LlavaOnevisionProcessor"
    assert processor_config["image_processor"]["image_mean"] == [0.5, 0.5, 0.5]  # SigLIP normalisation
    assert processor_config["image_processor"]["size"] == {"height": IMAGE, "width": IMAGE}
    assert processor_config["image_processor"]["image_grid_pinpoints"] == PINPOINTS
    assert processor_config["video_processor"]["video_processor_type"] == "LlavaOnevisionVideoProcessor"

    record = json.loads((converted / "conversion.json").read_text())
    assert record["tokens_added"] == ["<image>", "<video>"]
    assert record["dropped_buffers"] == ["model.layers.0.self_attn.rotary_emb.inv_freq"]
    assert not record["embedding_resized"] and not record["lm_head_from_embedding"]
    assert leftovers(converted) == []


def test_judge_loads_converted(converted: Path) -> None:
    judge = LlavaCriticJudge(converted, dtype="float32", device="cpu")
    scores, raw = judge.score([Image.new("RGB", (40, 40), "red")], ["Q?"], ["A."], max_new_tokens=3)
    assert len(scores) == len(raw) == 1


def test_resize_when_tokens_do_not_fit(tmp_path: Path) -> None:
    tiny = Tiny(tmp_path, spare_rows=0)
    tensors = {k: v for k, v in tiny.tensors.items() if k != "lm_head.weight"}  # head tied to the embedding
    src = tiny.write(tmp_path / "src", tensors)
    dst = cc.convert_critic(src, tmp_path / "dst")
    record = json.loads((dst / "conversion.json").read_text())
    assert record["embedding_resized"] and record["lm_head_from_embedding"]
    from transformers import LlavaOnevisionForConditionalGeneration

    model = LlavaOnevisionForConditionalGeneration.from_pretrained(dst, use_safetensors=True)
    vocab = model.config.text_config.vocab_size
    assert vocab % 64 == 0 and vocab >= len(tiny.tokenizer) + 2
    embed = tiny.tensors["model.embed_tokens.weight"]
    assert torch.equal(model.get_input_embeddings().weight[: tiny.vocab_size], embed)
    assert torch.equal(model.lm_head.weight[: tiny.vocab_size], embed)  # copied, not tied
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()


# --------------------------------------------------------------------------------------------
# Refusals, with nothing left at the destination
# --------------------------------------------------------------------------------------------


def test_unmapped_keys_fail_with_their_names(tiny: Tiny, tmp_path: Path, capsys) -> None:
    tensors = dict(tiny.tensors)
    tensors["model.vision_resampler.pool.weight"] = torch.zeros(2)
    tensors["model.mm_projector.1.weight"] = torch.zeros(2)
    src = tiny.write(tmp_path / "src", tensors)
    dst = tmp_path / "out" / "critic"
    with pytest.raises(cc.ConversionError) as err:
        cc.convert_critic(src, dst)
    msg = str(err.value)
    assert "2 unmapped source weights" in msg
    assert "model.vision_resampler.pool.weight" in msg and "model.mm_projector.1.weight" in msg
    assert not dst.exists() and not (dst.parent.exists() and leftovers(dst))
    # the command line reports the same, with exit status 2
    assert cc.main([str(src), str(dst)]) == 2
    assert "model.vision_resampler.pool.weight" in capsys.readouterr().err
    assert not dst.exists()


def test_missing_and_misshapen_weights_fail(tiny: Tiny, tmp_path: Path) -> None:
    tensors = dict(tiny.tensors)
    del tensors["model.norm.weight"]
    tensors["model.mm_projector.2.bias"] = torch.zeros(7)
    src = tiny.write(tmp_path / "src", tensors)
    with pytest.raises(cc.ConversionError) as err:
        cc.convert_critic(src, tmp_path / "dst")
    msg = str(err.value)
    assert "model.language_model.norm.weight" in msg and "without a source" in msg
    assert "model.mm_projector.2.bias (7,)" in msg and "shape mismatch" in msg
    assert not (tmp_path / "dst").exists()


def test_bin_only_folder_refused(tiny: Tiny, tmp_path: Path) -> None:
    src = tmp_path / "bin-only"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(tiny.config))
    (src / "pytorch_model.bin").write_bytes(b"pickle bytes that must never be read")
    with pytest.raises(cc.ConversionError, match=r"pytorch_model\.bin.*only safetensors.*[Cc]onvert"):
        cc.convert_critic(src, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()


def test_failure_while_writing_leaves_nothing(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(cc, "write_processor", boom)
    dst = tmp_path / "dst"
    with pytest.raises(RuntimeError, match="disk full"):
        cc.convert_critic(source, dst)
    assert not dst.exists() and leftovers(dst) == []


def test_existing_destination_and_bad_sources(
    source: Path, converted: Path, tiny: Tiny, tmp_path: Path
) -> None:
    with pytest.raises(FileExistsError):
        cc.convert_critic(source, converted)
    with pytest.raises(cc.ConversionError, match="already a transformers-format"):
        cc.convert_critic(converted, tmp_path / "again")
    with pytest.raises(cc.ConversionError, match="inside the source"):
        cc.convert_critic(source, source / "sub")

    bad = tmp_path / "bad"
    shutil.copytree(source, bad)
    config = dict(tiny.config, mm_projector_type="linear", image_aspect_ratio="pad")
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(cc.ConversionError, match="mm_projector_type.*image_aspect_ratio"):
        cc.convert_critic(bad, tmp_path / "dst")

    (bad / "config.json").write_text(json.dumps(dict(tiny.config, mm_vision_tower="openai/clip-vit-large")))
    with pytest.raises(cc.ConversionError, match="unknown vision tower"):
        cc.convert_critic(bad, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()


# --------------------------------------------------------------------------------------------
# Full size, without any data: the 7B layout maps onto the shipped architecture
# --------------------------------------------------------------------------------------------

LMMS_LAB_7B_CONFIG = {  # the fields of lmms-lab's LLaVA-OneVision-7B / LLaVA-Critic-7B config.json
    "architectures": ["LlavaQwenForCausalLM"],
    "model_type": "llava",
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "image_aspect_ratio": "anyres_max_9",
    "image_grid_pinpoints": [[a, b] for a in range(384, 2305, 384) for b in range(384, 2305, 384)],
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "max_position_embeddings": 32768,
    "max_window_layers": 28,
    "mm_hidden_size": 1152,
    "mm_newline_position": "grid",
    "mm_patch_merge_type": "spatial_unpad",
    "mm_projector_type": "mlp2x_gelu",
    "mm_resampler_type": None,
    "mm_spatial_pool_mode": "bilinear",
    "mm_tunable_parts": "mm_vision_tower,mm_mlp_adapter,mm_language_model",
    "mm_use_im_patch_token": False,
    "mm_use_im_start_end": False,
    "mm_vision_select_feature": "patch",
    "mm_vision_select_layer": -2,
    "mm_vision_tower": "google/siglip-so400m-patch14-384",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "sliding_window": 131072,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_sliding_window": False,
    "vocab_size": 152064,
}


def test_full_size_layout_maps_onto_shipped_architecture(tmp_path: Path) -> None:
    from transformers import LlavaOnevisionForConditionalGeneration

    from posttrain.models.architectures import load_config

    cc._check_supported(LMMS_LAB_7B_CONFIG)
    name, tower = cc._vision_tower_config(LMMS_LAB_7B_CONFIG, tmp_path)
    config = cc.build_onevision_config(
        LMMS_LAB_7B_CONFIG, tower, tower["num_hidden_layers"] - 1, 151646, 151647
    )
    shipped = load_config("llava-critic-7b")
    got, want = config.to_dict(), shipped.to_dict()
    for d in (got, want):
        d.pop("dtype", None)
        d.pop("transformers_version", None)
        d.pop("_name_or_path", None)
        d["text_config"].pop("vocab_size")  # lmms-lab keeps Qwen2's 152064 rows; llava-hf padded to 152128
        d["text_config"].pop("pad_token_id", None)
    assert got == want

    with torch.device("meta"):
        model = LlavaOnevisionForConditionalGeneration(config)
    target = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    shapes = {to_original_name(k): s for k, s in target.items()}
    mapping, dropped = cc.plan_weights(list(shapes), target, shapes)
    assert len(mapping) == len(target) and not dropped
    assert cc._vision_layer_count(list(shapes)) == 26
    assert "model.vision_tower.vision_tower.vision_model.encoder.layers.25.mlp.fc2.weight" in shapes
    assert shapes["model.embed_tokens.weight"] == (152064, 3584)
