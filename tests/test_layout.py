"""Where each model lives (posttrain.core.layout); dvc.yaml writes and evaluates every model there."""

from pathlib import Path

import yaml
from conftest import ROOT, micro_params

from posttrain.core.config import load_params, parse_params
from posttrain.core.layout import evaluating_stage, live_dir, model_dir, pipeline_models, producing_stage


def test_the_pipeline_models_are_base_the_variants_in_params_order_sfte_and_sfte_dpo():
    data = micro_params()
    data["sft"]["variants"] = {
        "zeta": {"alpha": 8.0, "dropout": 0.0},
        "alpha": {"alpha": 4.0, "dropout": 0.1},
    }
    assert pipeline_models(parse_params(data)) == ["base", "zeta", "alpha", "sfte", "sfte_dpo"]
    assert pipeline_models(load_params(ROOT / "params.yaml")) == [
        "base",
        "sft1",
        "sft2",
        "sft3",
        "sft4",
        "sfte",
        "sfte_dpo",
    ]


def test_variants_live_one_folder_down_and_the_other_models_at_the_top():
    assert model_dir("sft5") == Path("models/sft/sft5") and live_dir("sft5") == Path("dvclive/sft/sft5")
    assert model_dir("sfte_dpo", "/w/models") == Path("/w/models/sfte_dpo")
    assert live_dir("base", "/w/live") == Path("/w/live/base")
    assert [producing_stage(m) for m in ("base", "sft5", "sfte", "sfte_dpo")] == [
        "base",
        "sft@sft5",
        "ensemble",
        "dpo",
    ]
    assert evaluating_stage("sft5") == "evaluate_sft@sft5" and evaluating_stage("sfte") == "evaluate@sfte"


def test_dvc_yaml_writes_and_evaluates_every_model_where_the_layout_says(tmp_path):
    """dvc.yaml rendered with a params file holding a fifth variant: it is trained into its folder, evaluated
    into metrics/<name>.json, and the stages that take every variant depend on the folder it is in."""
    from posttrain.realscale.e2e import plan

    data = micro_params()
    data["sft"]["variants"]["sft5"] = {"alpha": 12.0, "dropout": 0.0}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    steps = {s.name: s for s in plan(tmp_path)}
    for name in pipeline_models(parse_params(data)):
        outputs = {p.relative_to(tmp_path) for p in steps[producing_stage(name)].outputs}
        assert model_dir(name) in outputs, name
        assert Path(f"metrics/{name}.json") in {
            p.relative_to(tmp_path) for p in steps[evaluating_stage(name)].outputs
        }
    assert "--members" not in steps["ensemble"].cmd and "--models" not in steps["report"].cmd
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    key = "${key}"  # the sft foreach's outputs are the layout's folders
    assert spec["sft"]["do"]["outs"] == [str(model_dir(key)), str(live_dir(key) / "plots")]
    assert "models/sft" in spec["ensemble"]["deps"] and "sft.variants" in spec["ensemble"]["params"]
    assert {"data/eval/metrics", "data/eval/study_test", "data/eval/pretrain_test", "dvclive/sft"} <= set(
        spec["report"]["deps"]
    )
    assert "sft.variants" in spec["report"]["params"]
