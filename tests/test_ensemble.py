"""SFTe is the average of the SFT models: `cat` is exact, the study's `linear` is not (DESIGN trap 3)."""

import copy
import json

import pytest
import torch
from conftest import make_adapter
from peft import PeftModel

from posttrain.core.config import EnsembleMethod, EnsembleParams
from posttrain.models.loading import load_base
from posttrain.train.ensemble import average_delta_error, build_ensemble, combine, members_together


@pytest.fixture(scope="module")
def members(base_dir):
    root = base_dir.parent
    return {
        f"sft{i + 1}": make_adapter(base_dir, root / f"sft{i + 1}", alpha=a, seed=i)
        for i, a in enumerate((16, 8, 16, 8))
    }


def merged_weights(base_dir, adapter):
    model, _, _ = load_base(base_dir)
    return PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().state_dict()


def deltas(base_dir, state):
    base = load_base(base_dir)[0].state_dict()
    return {k: state[k] - base[k] for k in base if not torch.equal(state[k], base[k])}


def relative_error(a: dict, b: dict) -> float:
    num = sum(((a[k] - b[k]) ** 2).sum() for k in b)
    return float(torch.sqrt(num / sum((b[k] ** 2).sum() for k in b)))


@pytest.fixture(scope="module")
def mean_delta(base_dir, members):
    per_member = [deltas(base_dir, merged_weights(base_dir, d)) for d in members.values()]
    assert per_member[0] and all(not any("vision_tower" in k for k in d) for d in per_member)
    return {k: sum(d[k] for d in per_member) / len(per_member) for k in per_member[0]}


def ensemble_delta(base_dir, members, method, **kw):
    model, _, _ = load_base(base_dir)
    peft = combine(model, members, EnsembleParams(method=method, **kw))
    assert list(peft.peft_config) == ["ensemble"]
    return deltas(base_dir, peft.merge_and_unload().state_dict())


def test_cat_is_the_exact_average_of_the_models(base_dir, members, mean_delta):
    assert relative_error(ensemble_delta(base_dir, members, EnsembleMethod.CAT), mean_delta) < 1e-5


def test_svd_at_full_rank_is_exact(base_dir, members, mean_delta):
    assert relative_error(ensemble_delta(base_dir, members, EnsembleMethod.SVD), mean_delta) < 1e-4


def test_linear_is_not_the_average_model(base_dir, members, mean_delta):
    assert relative_error(ensemble_delta(base_dir, members, EnsembleMethod.LINEAR), mean_delta) > 0.1


def test_cat_logits_equal_the_averaged_merged_model(base_dir, members, mean_delta, prepared):
    from posttrain.data.examples import load_split
    from posttrain.models.images import load_pixels
    from posttrain.models.loading import image_token_count
    from posttrain.models.template import encode_prompt

    out = base_dir.parent / "sfte"
    summary = build_ensemble(base_dir, members, EnsembleParams(), out)
    assert summary["exact_average"] and summary["rank"] == 64
    model, processor, _ = load_base(base_dir)
    ensemble = PeftModel.from_pretrained(model, str(out)).eval()
    assert list(ensemble.peft_config) == ["default"]  # reloads as the only adapter
    averaged, _, _ = load_base(base_dir)
    state = averaged.state_dict()
    averaged.load_state_dict({k: v + mean_delta[k] if k in mean_delta else v for k, v in state.items()})
    e = load_split(prepared, "study_test")[0]
    ids = torch.tensor(
        [encode_prompt(processor.tokenizer, e.history, e.question, image_token_count(processor))]
    )
    pixels = load_pixels(processor, prepared, [e.image])[e.image][None]
    together = members_together(load_base(base_dir)[0], members)  # the check bench/nf4.py runs on nf4
    single = PeftModel.from_pretrained(load_base(base_dir)[0], str(members["sft1"])).eval()
    with torch.no_grad():
        a = ensemble(input_ids=ids, pixel_values=pixels).logits
        b = averaged.eval()(input_ids=ids, pixel_values=pixels).logits
        c = together(input_ids=ids, pixel_values=pixels).logits
        one = single(input_ids=ids, pixel_values=pixels).logits
        a2 = ensemble(input_ids=ids, pixel_values=pixels).logits
    assert torch.allclose(a, b, atol=1e-4)
    assert torch.allclose(a, c, atol=1e-4)
    assert (a - one).abs().max() > 100 * (a - c).abs().max(), "the members differ: the check can fail"
    assert torch.equal(a, a2), "dropout must be off at evaluation"
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["base_quantization"] == "none"  # the members' base, for the stages after SFT


def test_members_trained_on_differently_held_bases_are_refused(base_dir, members, tmp_path):
    qlora = make_adapter(base_dir, tmp_path / "qlora", alpha=16, base_quantization="nf4")
    with pytest.raises(ValueError, match=r"different precisions .*'qlora': 'nf4'.*sft.common.quantization"):
        build_ensemble(base_dir, {**members, "qlora": qlora}, EnsembleParams(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_members_from_another_base_are_refused(base_dir, members, tmp_path):
    alien = make_adapter(base_dir, tmp_path / "alien", alpha=16, fingerprint="sha256:other")
    with pytest.raises(ValueError, match=r"alien was trained on another base model.*dvc repro sft@alien"):
        build_ensemble(base_dir, {**members, "alien": alien}, EnsembleParams(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_linear_with_unequal_ranks_is_refused(base_dir, members, tmp_path):
    small = make_adapter(base_dir, tmp_path / "small", alpha=8, rank=8)
    with pytest.raises(ValueError, match="needs equal ranks"):
        build_ensemble(
            base_dir,
            {"sft1": members["sft1"], "small": small},
            EnsembleParams(method=EnsembleMethod.LINEAR),
            tmp_path / "out",
        )
    # cat handles unequal ranks exactly
    summary = build_ensemble(
        base_dir, {"sft1": members["sft1"], "small": small}, EnsembleParams(), tmp_path / "o2"
    )
    assert summary["rank"] == 24 and copy.deepcopy(summary)["exact_average"]


def test_average_delta_error_is_the_largest_layers_relative_frobenius_error(tmp_path):
    """Two one-layer adapters, rank 1, by hand: member 1 ΔW = 2·[1,0]ᵀ[1,0] (alpha 2, r 1), member 2 ΔW = 0
    (B = 0); their average has a single entry 1 at (0, 0), norm 1. A combined adapter with scaling 1 and
    ΔW = [[1, 0], [0, 0.5]] is off by 0.5 at (1, 1): relative error 0.5; an exact one gives 0."""
    from safetensors.torch import save_file

    def adapter(name, b, a, alpha):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps({"r": a.shape[0], "lora_alpha": alpha}))
        key = "base_model.model.layer"
        save_file(
            {f"{key}.lora_A.weight": a, f"{key}.lora_B.weight": b}, str(folder / "adapter_model.safetensors")
        )
        return folder

    e = torch.tensor([[1.0, 0.0]])
    m1 = adapter("m1", e.T.clone(), e.clone(), 2.0)
    m2 = adapter("m2", torch.zeros(2, 1), e.clone(), 2.0)
    exact = adapter("exact", e.T.clone(), e.clone(), 1.0)
    off = adapter("off", torch.eye(2), torch.tensor([[1.0, 0.0], [0.0, 0.5]]), 2.0)
    assert average_delta_error(exact, [m1, m2]) < 1e-12
    assert abs(average_delta_error(off, [m1, m2]) - 0.5) < 1e-12


def test_the_ensemble_is_built_in_fp32_on_a_gpu_and_its_error_is_measured(
    base_dir, members, tmp_path, monkeypatch
):
    """On a GPU the stage loaded the base in bf16 and PEFT built the combined adapter in bf16 (relative error
    ~2e-3), while the provenance said exact_average. Here the GPU's choice is made on the CPU: whatever dtype
    the stage asks for, the saved adapter must be fp32 and the measured error at fp32 rounding."""
    from types import SimpleNamespace

    from safetensors.torch import load_file

    import posttrain.train.ensemble as ensembling

    asked = []

    def load_on_cpu(folder, device="cpu", dtype=torch.float32, **kw):
        asked.append(dtype)
        return load_base(folder, device="cpu", dtype=dtype, **kw)

    class GpuTorch:  # torch as the ensembling module sees it on a GPU machine (only there)
        cuda = SimpleNamespace(is_available=lambda: True)

        def __getattr__(self, name):
            return getattr(torch, name)

    monkeypatch.setattr(ensembling, "torch", GpuTorch())
    monkeypatch.setattr(ensembling, "load_base", load_on_cpu)
    summary = build_ensemble(base_dir, members, EnsembleParams(), tmp_path / "sfte")
    assert asked == [torch.float32]
    assert {t.dtype for t in load_file(str(tmp_path / "sfte" / "adapter_model.safetensors")).values()} == {
        torch.float32
    }
    assert summary["exact_average"] and summary["max_relative_delta_error"] < 1e-6
    # the measurement is real: the same members combined by `linear` are far from their average
    monkeypatch.undo()
    linear = build_ensemble(base_dir, members, EnsembleParams(method=EnsembleMethod.LINEAR), tmp_path / "lin")
    assert not linear["exact_average"] and linear["max_relative_delta_error"] > 0.1
