"""SFTe is the average of the SFT models: `cat` is exact, the study's `linear` is not (DESIGN trap 3)."""

import copy
import json

import pytest
import torch
from conftest import make_adapter
from peft import PeftModel

from posttrain.config import EnsembleMethod, EnsembleParams
from posttrain.ensembling import build_ensemble, combine, members_together
from posttrain.models import load_base


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
    from posttrain.data import load_split
    from posttrain.images import load_pixels
    from posttrain.models import image_token_count
    from posttrain.template import encode_prompt

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
