from pathlib import Path

import pytest
import yaml

from posttrain.config import CriticKind, DataSource, ModelKind, ParamsError, load_params, parse_params

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_params_validate():
    p = load_params(ROOT / "params.yaml")
    assert p.base.model is ModelKind.TINY and p.prepare.source is DataSource.SYNTHETIC
    assert p.evaluate.critic.kind is CriticKind.REFERENCE


def test_defaults_equal_shipped_file():
    """The dataclass defaults document the embedded default: they must not drift from params.yaml."""
    assert parse_params({}) == load_params(ROOT / "params.yaml")


def test_every_problem_reported_at_once():
    data = {
        "base": {"seed": "zero", "bogus": 1, "train": {"learning_rate": "2e-3"}},
        "prepare": {"source": "lrv"},
        "evaluat": {},
    }
    with pytest.raises(ParamsError) as e:
        parse_params(data, "p.yaml")
    msg = str(e.value)
    assert "p.yaml: 5 problem(s)" in msg
    assert "base.seed: expected an integer, got 'zero'" in msg
    assert "base.bogus: unknown key" in msg
    assert "base.train.learning_rate: expected a number, got '2e-3'" in msg
    assert "prepare.source: 'lrv' is not one of ['synthetic', 'lrv_chart']" in msg
    assert "evaluat: unknown key" in msg


@pytest.mark.parametrize(
    "data, fragment",
    [
        (
            {
                "base": {"model": "tiny"},
                "prepare": {"source": "lrv_chart", "lrv": {"local_parquet": "x.parquet"}},
            },
            "base.model: 'tiny' trains from scratch",
        ),
        ({"base": {"model": "hub"}}, "base.revision: empty"),
        ({"base": {"tiny": {"image_size": 80}}}, "not a multiple of base.tiny.patch_size"),
        ({"prepare": {"synthetic": {"study_test_images": 5000}}}, "prepare.synthetic.study_test_images"),
        ({"prepare": {"synthetic": {"negative_fraction": 1.5}}}, "negative_fraction: 1.5 is not in [0, 1]"),
        (
            {"prepare": {"source": "lrv_chart"}, "base": {"model": "hub", "revision": "abc"}},
            "prepare.lrv.revision",
        ),
        ({"evaluate": {"critic": {"kind": "llava_critic"}}}, "evaluate.critic.model: empty"),
        ({"base": {"train": {"max_steps": 0}}}, "base.train.max_steps: must be > 0"),
        ({"base": {"threads": True}}, "base.threads: expected an integer"),
        ({"sft": {"common": {"gradient_accumulation": 0}}}, "sft.common.gradient_accumulation: must be > 0"),
        ({"dpo": {"gradient_accumulation": -1}}, "dpo.gradient_accumulation: must be > 0"),
        ({"sft": {"common": {"liger": "yes"}}}, "sft.common.liger: expected"),
        ({"dpo": {"loss_type": "robust"}}, "dpo.loss_type: 'robust' with dpo.label_smoothing 0 is plain DPO"),
        ({"dpo": {"label_smoothing": 0.7}}, "dpo.label_smoothing: 0.7 is not in [0, 0.5)"),
        ({"dpo": {"loss_type": "robusto", "label_smoothing": 0.1}}, "dpo.loss_type: 'robusto' is not one of"),
    ],
)
def test_impossible_values_name_key_and_fix(data, fragment):
    with pytest.raises(ParamsError, match=None) as e:
        parse_params(data)
    assert fragment in str(e.value)


def test_real_combination_is_accepted(tmp_path):
    data = {
        "base": {"model": "hub", "revision": "0123abc"},
        "prepare": {"source": "lrv_chart", "lrv": {"revision": "feedbeef"}},
    }
    p = parse_params(data)
    assert p.base.model is ModelKind.HUB and not p.prepare.source.has_pretrain_pool


def test_load_params_reads_yaml_as_data(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"base": {"seed": 3}}))
    assert load_params(path).base.seed == 3
    path.write_text("base: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(yaml.YAMLError):
        load_params(path)


def test_hub_base_in_a_local_folder_needs_no_revision(tmp_path):
    p = parse_params(
        {
            "base": {"model": "hub", "hub_id": str(tmp_path)},
            "prepare": {"source": "lrv_chart", "lrv": {"local_parquet": "x"}},
        }
    )
    assert p.base.hub_id == str(tmp_path) and p.base.revision == ""
