"""The real LLaVA classes shrunk: building, training, saving and reloading the tiny model."""

import torch

from posttrain.data.examples import load_split
from posttrain.models.loading import count_params, load_base, write_provenance
from posttrain.train.dataset import TeacherForcedCollator, TeacherForcedDataset
from posttrain.train.trainer import run_trainer, training_arguments


def test_tiny_model_is_small_and_complete(tiny):
    model, processor = tiny
    assert 0.3e6 < count_params(model) < 2e6
    assert model.config.vision_feature_layer == -1
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_index


def test_training_steps_change_the_weights_and_save_reloads_bit_identical(tiny, prepared, tmp_path):
    import copy

    model, processor = tiny
    model = copy.deepcopy(model).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ds = TeacherForcedDataset(load_split(prepared, "pretrain_train")[:16], prepared, processor)
    args = training_arguments(
        tmp_path / "ck",
        max_steps=3,
        batch_size=4,
        learning_rate=1e-3,
        warmup_steps=0,
        weight_decay=0.0,
        seed=0,
        save_steps=0,
    )
    summary = run_trainer(model, args, ds, TeacherForcedCollator(processor.tokenizer.pad_token_id), [])
    assert summary["steps"] == 3
    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any("vision_tower" in k for k in changed) and any("language_model" in k for k in changed)
    assert any("multi_modal_projector" in k for k in changed)

    out = tmp_path / "base"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    write_provenance(out, kind="local")
    reloaded, _, prov = load_base(out)
    assert prov["kind"] == "local"
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, after[k]), k


def test_a_quantized_base_loads_on_the_processes_own_gpu(base_dir, monkeypatch):
    """QLoRA under DDP (TRL's recipe): each process puts its nf4 base on its own GPU, the current device that
    `posttrain.core.distributed.init` set from LOCAL_RANK, not on whatever "cuda" would resolve to."""
    import posttrain.models.loading as models

    seen = {}

    def from_pretrained(source, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(models.LlavaForConditionalGeneration, "from_pretrained", from_pretrained)
    try:
        load_base(base_dir, device="cuda", quantization_config=object())
    except RuntimeError as e:
        assert str(e) == "stop here"
    assert seen["device_map"] == {"": "cuda:3"}
