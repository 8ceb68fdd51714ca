"""Adapter folders are checked before anything loads them (issue 11, item 7).

Every place that puts an adapter on the base (`load_model` for evaluate and preferences, the ensemble's
members, DPO's start adapter) refuses a folder whose weights are a pickle (`adapter_model.bin`: PEFT would
torch.load it) and an adapter trained on another base than `models/base`, naming the folder and the stage
to rerun.
"""

import re

import pytest
import torch
from conftest import make_adapter
from safetensors.torch import load_file

from posttrain.core.config import EnsembleParams, load_params
from posttrain.models.loading import load_model
from posttrain.train.dpo import run_rounds
from posttrain.train.ensemble import build_ensemble


def pickled(adapter):
    """The adapter with its weights saved as a pickle (`adapter_model.bin`), as older PEFT saved them."""
    torch.save(load_file(adapter / "adapter_model.safetensors"), adapter / "adapter_model.bin")
    (adapter / "adapter_model.safetensors").unlink()
    return adapter


def no_pickle(adapter, stage: str) -> str:
    folder = re.escape(str(adapter))
    return rf"{folder} holds adapter_model.bin, not adapter_model.safetensors.*dvc repro {stage}"


def another_base(adapter, stage: str) -> str:
    return rf"{re.escape(str(adapter))} was trained on another base model \(sha256:other\).*dvc repro {stage}"


def test_evaluate_refuses_a_pickled_adapter(models):
    adapter = pickled(make_adapter(models / "base", models / "sft" / "sft1", alpha=16))
    with pytest.raises(ValueError, match=no_pickle(adapter, "sft@sft1")):
        load_model("sft1", models)


def test_evaluate_refuses_an_adapter_trained_on_another_base(models):
    adapter = make_adapter(models / "base", models / "sfte", alpha=16, fingerprint="sha256:other")
    with pytest.raises(ValueError, match=another_base(adapter, "ensemble")):
        load_model("sfte", models)
    make_adapter(models / "base", models / "sft" / "sft2", alpha=16)  # the same base: loads
    model, _ = load_model("sft2", models)
    assert not model.training


def test_the_ensemble_refuses_a_pickled_member(models, tmp_path):
    good = make_adapter(models / "base", models / "sft" / "sft1", alpha=16)
    bad = pickled(make_adapter(models / "base", models / "sft" / "sft2", alpha=16, seed=1))
    with pytest.raises(ValueError, match=no_pickle(bad, "sft@sft2")):
        build_ensemble(models / "base", {"sft1": good, "sft2": bad}, EnsembleParams(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("spoil", ["pickle", "another base"])
def test_dpo_refuses_a_start_adapter_it_cannot_trust(models, prepared, micro_params_file, tmp_path, spoil):
    """Checked before the first step: no pairs are needed to be refused."""
    if spoil == "pickle":
        sfte = pickled(make_adapter(models / "base", models / "sfte", alpha=16))
        expected = no_pickle(sfte, "ensemble")
    else:
        sfte = make_adapter(models / "base", models / "sfte", alpha=16, fingerprint="sha256:other")
        expected = another_base(sfte, "ensemble")
    params = load_params(micro_params_file)
    out = tmp_path / "sfte_dpo"
    with pytest.raises(ValueError, match=expected):
        run_rounds(models / "base", sfte, [], {}, prepared, params, 0, out, tmp_path / "ck", None)
    assert not out.exists()
