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

from posttrain.config import (
    BaseWeights,
    ParamsError,
    Quantization,
    downstream_quantization,
    load_params,
    parse_params,
)
from posttrain.models import load_model

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
    make_adapter(models / "base", models / "sft1", alpha=16, base_quantization="nf4")
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
    adapter = make_adapter(models / "base", models / "sft2", alpha=16)
    prov = json.loads((adapter / "provenance.json").read_text())
    del prov["base_quantization"]
    (adapter / "provenance.json").write_text(json.dumps(prov))
    with pytest.raises(ValueError, match=r"base_quantization.*dvc repro sft@sft2"):
        load_model("sft2", models, "cpu", Quantization.NONE)


def test_every_stage_that_loads_adapters_reruns_when_the_base_weights_change():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name in ("preferences", "dpo", "evaluate"):
        params = stages[name].get("do", stages[name])["params"]
        assert "adapters" in params and "sft.common.quantization" in params, name
    for name in ("base", "ensemble"):  # they do not load adapters onto a held base
        assert "adapters" not in stages[name]["params"], name
