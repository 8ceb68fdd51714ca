"""Every stage after SFT holds the base as SFT trained on it (issue 10, item 8).

QLoRA adapters are trained against the nf4-quantized base; evaluating, sampling from or training DPO on them
over the bf16 base measures another model. `adapters.base_weights: unquantized` is the explicit opt-out.
The nf4 path itself needs CUDA: `bench/nf4.py` runs it on the GPU machine (the ensemble on the nf4 base
against its members, and the bf16-vs-nf4 logit gap of one adapter).
"""

import json

import pytest
import torch
import yaml
from conftest import ROOT, make_adapter

from posttrain.core.config import (
    BaseWeights,
    ParamsError,
    Quantization,
    downstream_quantization,
    load_params,
    parse_params,
)
from posttrain.models.loading import load_model

STUDY = ROOT / "configs" / "study.yaml"


def _study(**adapters) -> dict:
    """The study preset, pinned to a local parquet (its dataset revision is filled in by `posttrain pin`)."""
    data = yaml.safe_load(STUDY.read_text())
    data["prepare"]["lrv"]["local_parquet"] = "lrv_chart.parquet"
    data["adapters"] = {**data["adapters"], **adapters}
    return data


def test_the_study_holds_the_base_in_nf4_after_sft_unless_told_otherwise():
    study = parse_params(_study())
    assert study.sft.common.quantization is Quantization.NF4
    assert study.adapters.base_weights is BaseWeights.AS_TRAINED
    assert downstream_quantization(study) is Quantization.NF4
    assert downstream_quantization(parse_params(_study(base_weights="unquantized"))) is Quantization.NONE
    assert (
        downstream_quantization(load_params(ROOT / "params.yaml")) is Quantization.NONE
    )  # tiny: full precision


def test_a_bad_base_weights_value_is_named():
    with pytest.raises(
        ParamsError, match=r"adapters.base_weights: 'bf16' is not one of \['as_trained', 'unquantized'\]"
    ):
        parse_params(_study(base_weights="bf16"))


def test_an_nf4_trained_adapter_is_loaded_on_the_nf4_base(models):
    make_adapter(models / "base", models / "sft" / "sft1", alpha=16, base_quantization="nf4")
    if torch.cuda.is_available():
        pytest.skip("on CUDA the nf4 base loads; bench/nf4.py measures it")
    # On the CPU, asking for nf4 reaches bitsandbytes' requirement: it is what the load tries to do.
    with pytest.raises(RuntimeError, match="nf4.*needs a CUDA GPU"):
        load_model("sft1", models, "cpu", Quantization.NF4)
    model, _ = load_model("sft1", models, "cpu", Quantization.NONE)  # adapters.base_weights: unquantized
    assert next(model.parameters()).dtype == torch.float32


def test_an_adapter_trained_on_the_full_precision_base_is_not_put_on_nf4(models):
    make_adapter(models / "base", models / "sfte", alpha=16, base_quantization="none")
    with pytest.raises(ValueError, match=r"trained on the none base.*stale.*dvc repro ensemble"):
        load_model("sfte", models, "cpu", Quantization.NF4)


def test_an_adapter_without_the_record_says_to_rerun_its_stage(models):
    adapter = make_adapter(models / "base", models / "sft" / "sft2", alpha=16)
    prov = json.loads((adapter / "provenance.json").read_text())
    del prov["base_quantization"]
    (adapter / "provenance.json").write_text(json.dumps(prov))
    with pytest.raises(ValueError, match=r"base_quantization.*dvc repro sft@sft2"):
        load_model("sft2", models, "cpu", Quantization.NONE)


def test_every_stage_that_loads_adapters_reruns_when_the_base_weights_change():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name in ("preferences", "dpo", "evaluate", "evaluate_sft"):
        params = stages[name].get("do", stages[name])["params"]
        assert "adapters" in params and "sft.common.quantization" in params, name
    for name in ("base", "ensemble"):  # they do not load adapters onto a held base
        assert "adapters" not in stages[name]["params"], name


def _quantize_language_model(model) -> int:
    """Swap the language model's linear layers for bitsandbytes nf4 layers, as loading with the study's
    quantization config does (blocksize 64, double quantization, bf16 compute), on the CPU."""
    import bitsandbytes as bnb

    swapped = 0
    for name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if ".language_model." in f".{name}." and type(child) is torch.nn.Linear:
                layer = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    compute_dtype=torch.bfloat16,
                    compress_statistics=True,
                    quant_type="nf4",
                )
                layer.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4")
                setattr(parent, child_name, layer.to("cpu"))  # quantizes
                swapped += 1
    return swapped


def test_dequantized_nf4_layers_compute_what_the_nf4_layers_compute(tiny, prepared):
    """`dequantize_4bit_linears` keeps the values the nf4 layers multiply with: the logits of the model are
    those of its nf4 layers (bf16 on the CPU), far closer than those of the unquantized weights."""
    pytest.importorskip("bitsandbytes")
    import copy

    from posttrain.data.examples import load_split
    from posttrain.models.loading import dequantize_4bit_linears
    from posttrain.train.dataset import TeacherForcedCollator, TeacherForcedDataset

    model, processor = tiny
    full = copy.deepcopy(model).to(torch.bfloat16).eval()
    quantized = copy.deepcopy(full)
    n = _quantize_language_model(quantized)
    ds = TeacherForcedDataset(load_split(prepared, "study_train")[:4], prepared, processor)
    batch = TeacherForcedCollator(processor.tokenizer.pad_token_id)([ds[i] for i in range(len(ds))])
    batch = {k: v for k, v in batch.items() if k not in ("labels", "answer_start")}
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    with torch.no_grad():
        nf4 = quantized(**batch).logits.float()
        assert dequantize_4bit_linears(quantized) == n > 0
        assert not any("4bit" in type(m).__name__ for m in quantized.modules())
        dequantized = quantized(**batch).logits.float()
        unquantized = full(**batch).logits.float()
    gap = (dequantized - nf4).abs().mean().item()
    assert gap < 0.1 * (unquantized - nf4).abs().mean().item()


def test_a_merged_adapter_answers_as_the_adapter_does(models):
    """`load_model(..., merge=True)`: the adapter folded into the weights gives the unmerged model's logits
    (fp32 on the CPU), with no adapter layer left."""
    make_adapter(models / "base", models / "sft" / "sft1", alpha=16.0)
    unmerged, processor = load_model("sft1", models, "cpu", Quantization.NONE)
    merged, _ = load_model("sft1", models, "cpu", Quantization.NONE, merge=True)
    base, _ = load_model("base", models, "cpu", Quantization.NONE, merge=True)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    ids = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11]])
    with torch.no_grad():
        a = unmerged(input_ids=ids).logits
        b = merged(input_ids=ids).logits
        c = base(input_ids=ids).logits
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    assert (c - a).abs().max() > 1e-3, "the check can fail: the adapter moves the logits"


def test_by_default_the_adapter_stays_a_layer_as_it_trained(models):
    """`adapters.merge: false` (the default): evaluation and preference sampling decode the adapter as its own
    fp32 layer, as DPO trained it, not folded into (and rounded with) the base weights."""
    from conftest import ROOT

    from posttrain.core.config import load_params

    assert load_params(ROOT / "params.yaml").adapters.merge is False
    make_adapter(models / "base", models / "sft" / "sft1", alpha=16.0)
    model, _ = load_model("sft1", models, "cpu", Quantization.NONE)
    lora = {p.dtype for n, p in model.named_parameters() if "lora_" in n}
    assert lora == {torch.float32}
