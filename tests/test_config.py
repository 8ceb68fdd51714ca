import dataclasses
import types
import typing
from pathlib import Path

import pytest
import yaml
from conftest import BILLION_LAUGHS

from posttrain.core.config import (
    MAX_BATCH,
    MAX_STEPS,
    MAX_YAML_VALUES,
    BatchSize,
    CriticKind,
    DataSource,
    ModelKind,
    Params,
    ParamsError,
    SftVariant,
    load_params,
    parse_params,
)

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
        (
            {"sft": {"common": {"batch_size": "auto"}}},
            "sft.common.effective_batch: null, but sft.common.batch_size: auto needs it; set it to the rows "
            "per optimizer step to keep (e.g. 16), or give sft.common.batch_size an integer",
        ),
        (
            {"dpo": {"batch_size": "auto", "effective_batch": 16, "gradient_accumulation": 4}},
            "dpo.gradient_accumulation: 4 with dpo.batch_size: auto, which derives it (effective_batch / the "
            "micro-batch that fits); set it to 1 and dpo.effective_batch to the rows per optimizer step",
        ),
        (
            {"dpo": {"batch_size": 4, "gradient_accumulation": 4, "effective_batch": 16}},
            "dpo.effective_batch: 16 is only read with batch_size: auto; set dpo.batch_size: auto (and "
            "gradient_accumulation: 1), or remove effective_batch (with an integer batch_size the effective "
            "batch is batch_size × gradient_accumulation = 4 × 4)",
        ),
        ({"sft": {"common": {"batch_size": "Auto"}}}, "sft.common.batch_size: expected an integer or 'auto'"),
        ({"dpo": {"batch_size": None}}, "dpo.batch_size: expected an integer or 'auto', got None"),
        ({"dpo": {"batch_size": "auto", "effective_batch": 0}}, "dpo.effective_batch: must be > 0, got 0"),
    ],
)
def test_impossible_values_name_key_and_fix(data, fragment):
    with pytest.raises(ParamsError, match=None) as e:
        parse_params(data)
    assert fragment in str(e.value)


def test_batch_size_auto_takes_the_effective_batch_and_leaves_the_accumulation_to_it():
    p = parse_params(
        {
            "sft": {"common": {"batch_size": "auto", "effective_batch": 12}},
            "dpo": {"batch_size": "auto", "effective_batch": 16, "gradient_accumulation": 1},
        }
    )
    assert p.sft.common.batch_size is BatchSize.AUTO and p.sft.common.effective_batch == 12
    assert p.dpo.batch_size is BatchSize.AUTO and p.dpo.effective_batch == 16
    assert parse_params({"dpo": {"batch_size": 8, "effective_batch": None}}).dpo.batch_size == 8
    # both sections' problems at once, each naming its own keys
    with pytest.raises(ParamsError) as e:
        parse_params(
            {
                "sft": {"common": {"batch_size": "auto", "gradient_accumulation": 2}},
                "dpo": {"batch_size": 16, "effective_batch": 16},
            }
        )
    assert [p.split(":")[0] for p in e.value.problems] == [
        "sft.common.effective_batch",
        "sft.common.gradient_accumulation",
        "dpo.effective_batch",
    ]


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
    with pytest.raises(ParamsError, match="line 1"):
        load_params(path)


def test_hub_base_in_a_local_folder_needs_no_revision(tmp_path):
    p = parse_params(
        {
            "base": {"model": "hub", "hub_id": str(tmp_path)},
            "prepare": {"source": "lrv_chart", "lrv": {"local_parquet": "x"}},
        }
    )
    assert p.base.hub_id == str(tmp_path) and p.base.revision == ""


def _nested(key: str, value) -> dict:
    """{"a": {"b": value}} for key "a.b"."""
    *parents, leaf = key.split(".")
    data = {leaf: value}
    for k in reversed(parents):
        data = {k: data}
    return data


def _numeric_keys(cls=Params, prefix: str = "") -> list[tuple[str, type]]:
    """Every int and float key of the params (``int | None``, ``int | BatchSize`` too), variants through
    sft.variants.sft1."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], f"{prefix}{f.name}"
        if typing.get_origin(tp) is types.UnionType:
            tp = typing.get_args(tp)[0]
        if dataclasses.is_dataclass(tp):
            out += _numeric_keys(tp, f"{key}.")
        elif typing.get_origin(tp) is dict:
            out += _numeric_keys(SftVariant, f"{key}.sft1.")
        elif tp in (int, float):
            out.append((key, tp))
    return out


@pytest.mark.parametrize("key, tp", _numeric_keys())
def test_every_number_is_range_checked(key, tp):
    """No count, size, seed, rate or fraction of params.yaml may be negative: each says so by name."""
    with pytest.raises(ParamsError) as e:
        parse_params(_nested(key, tp(-1)))
    assert any(p.startswith(f"{key}: ") and "-1" in p for p in e.value.problems), e.value.problems


@pytest.mark.parametrize("key, tp", [(k, t) for k, t in _numeric_keys() if t is float])
@pytest.mark.parametrize("text", [".inf", "-.inf", ".nan"])
def test_non_finite_floats_are_rejected(tmp_path, key, tp, text):
    """YAML reads .inf and .nan as floats; a NaN learning rate would train into NaN weights."""
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(_nested(key, 0.5)).replace("0.5", text))
    with pytest.raises(ParamsError) as e:
        load_params(path)
    assert any(p.startswith(f"{key}: ") and "finite" in p for p in e.value.problems), e.value.problems


@pytest.mark.parametrize(
    "key, value, fragment",
    [
        ("base.seed", -1, "base.seed: must be >= 0"),
        ("base.seed", 2**32, "base.seed: must be < 4294967296"),
        ("base.tiny.patch_size", 0, "base.tiny.patch_size: must be > 0"),
        ("base.tiny.vision_heads", 0, "base.tiny.vision_heads: must be > 0"),
        ("base.tiny.text_heads", 0, "base.tiny.text_heads: must be > 0"),
        ("base.tiny.vision_layers", -1, "base.tiny.vision_layers: must be > 0"),
        ("base.tiny.text_layers", 0, "base.tiny.text_layers: must be > 0"),
        ("base.tiny.vision_hidden", 65, "base.tiny.vision_hidden: 65 is not a multiple of base.tiny.vision"),
        ("base.tiny.text_heads", 3, "base.tiny.text_hidden: 128 is not a multiple of base.tiny.text_heads 3"),
        ("base.tiny.text_hidden", 132, "head size 132/4 = 33 is odd"),
        ("base.tiny.vocab_size", 100, "base.tiny.vocab_size: must be >= 261"),
        ("evaluate.critic.batch_size", 0, "evaluate.critic.batch_size: must be > 0"),
        ("evaluate.critic.max_new_tokens", 0, "evaluate.critic.max_new_tokens: must be > 0"),
        ("evaluate.seed", -3, "evaluate.seed: must be >= 0"),
        ("report.seed", -3, "report.seed: must be >= 0"),
        ("prepare.lrv.test_images", 0, "prepare.lrv.test_images: must be > 0"),
        ("sft.common.weight_decay", -0.1, "sft.common.weight_decay: must be >= 0"),
        ("dpo.epochs", 0, "dpo.epochs: must be > 0"),
    ],
)
def test_sizes_counts_and_seeds_are_range_checked(key, value, fragment):
    with pytest.raises(ParamsError) as e:  # never a ZeroDivisionError from the validator itself
        parse_params(_nested(key, value))
    assert fragment in str(e.value)


def test_type_and_range_problems_are_reported_together():
    data = {
        "base": {"seed": "zero", "tiny": {"patch_size": 0, "vision_heads": 0}},
        "dpo": {"beta": -1.0},
        "evaluate": {"resamples": 0, "critic": "none"},
    }
    with pytest.raises(ParamsError) as e:
        parse_params(data, "p.yaml")
    problems = e.value.problems
    assert len(problems) == 6, problems
    for key in (
        "base.seed",
        "base.tiny.patch_size",
        "base.tiny.vision_heads",
        "dpo.beta",
        "evaluate.resamples",
        "evaluate.critic",
    ):
        assert sum(p.startswith(f"{key}: ") for p in problems) == 1, (key, problems)


def test_duplicate_keys_are_rejected_with_their_lines(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(
        "dpo:\n"
        "  learning_rate: 0.0001\n"
        "  beta: 0.1\n"
        "  learning_rate: 0.01\n"
        "base:\n"
        "  seed: 1\n"
        "dpo:\n"
        "  beta: 0.2\n"
    )
    with pytest.raises(ParamsError) as e:
        load_params(path)
    assert e.value.problems == [
        "dpo.learning_rate: given twice (lines 2 and 4); YAML would silently keep the last, delete one",
        "dpo: given twice (lines 1 and 7); YAML would silently keep the last, delete one",
    ]


@pytest.mark.parametrize("text", ["", "\n", "# every line a comment\n"])
def test_an_empty_params_file_is_rejected(tmp_path, text):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ParamsError, match="empty"):
        load_params(path)


def test_a_yaml_syntax_error_is_a_params_error_naming_the_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("base:\n  seed: 0\n  threads: [2\ndpo:\n  beta: 0.1\n")
    with pytest.raises(ParamsError) as e:
        load_params(path)
    (problem,) = e.value.problems
    assert problem.startswith("line ") and "not valid YAML" in problem


def test_a_missing_params_file_is_a_params_error(tmp_path):
    with pytest.raises(ParamsError, match="does not exist"):
        load_params(tmp_path / "parms.yaml")


@pytest.mark.parametrize(
    "key, value, hint, wrong_hint",
    [
        ("dpo.beta", "2e-3", "YAML 1.1 reads 2e-3 as a string: write 0.002 or 2.0e-3", None),
        ("dpo.beta", "high", None, "2e-3"),
        ("dpo.beta", "0.1", "remove the quotes", "2e-3"),
        ("dpo.batch_size", "1e3", "write 1000", None),
        ("dpo.batch_size", 16.0, "write 16", None),
        ("dpo.batch_size", "many", "expected an integer or 'auto', got 'many'", "write"),
        ("base.revision", 1234567, "quote it", None),
        ("base.revision", None, "write '' for none", "quote it"),
        ("base.revision", ["a"], None, "quote it"),
        ("sft.common.target_modules", "q_proj", "write [q_proj]", None),
    ],
)
def test_each_hint_fits_its_error(key, value, hint, wrong_hint):
    with pytest.raises(ParamsError) as e:
        parse_params(_nested(key, value))
    (problem,) = [p for p in e.value.problems if p.startswith(f"{key}: ")]
    if hint:
        assert hint in problem
    if wrong_hint:
        assert wrong_hint not in problem


@pytest.mark.parametrize(
    "key", ["base.train.max_steps", "sft.common.max_steps", "sft.common.save_steps", "dpo.warmup_steps"]
)
def test_absurd_step_counts_are_refused(key):
    """A step count of 1e23 would start a run that never ends: each is bounded by MAX_STEPS."""
    with pytest.raises(ParamsError) as e:
        parse_params(_nested(key, 10**23))
    (problem,) = e.value.problems
    assert problem == (
        f"{key}: must be <= {MAX_STEPS} (MAX_STEPS of posttrain.core.config: far more steps than any run of "
        f"this pipeline takes), got 100000000000000000000000; give a step count up to {MAX_STEPS}"
    )
    assert parse_params(_nested(key, MAX_STEPS))


@pytest.mark.parametrize(
    "key",
    [
        "base.train.batch_size",
        "sft.common.batch_size",
        "dpo.batch_size",
        "preferences.batch_size",
        "evaluate.batch_size",
        "evaluate.critic.batch_size",
    ],
)
def test_absurd_batch_sizes_are_refused(key):
    with pytest.raises(ParamsError) as e:
        parse_params(_nested(key, 10**11))
    (problem,) = e.value.problems
    assert problem == (
        f"{key}: must be <= {MAX_BATCH} (MAX_BATCH of posttrain.core.config: more rows than any batch of "
        f"this pipeline holds), got 100000000000; give a batch size up to {MAX_BATCH}"
        + (" or auto" if key not in ("base.train.batch_size", "evaluate.critic.batch_size") else "")
    )
    assert parse_params(_nested(key, MAX_BATCH))


def test_an_absurd_effective_batch_is_refused():
    with pytest.raises(ParamsError) as e:
        parse_params({"sft": {"common": {"batch_size": "auto", "effective_batch": 10**11}}})
    assert e.value.problems == [
        f"sft.common.effective_batch: must be <= {MAX_BATCH} (MAX_BATCH of posttrain.core.config: more rows "
        f"than any batch of this pipeline holds), got 100000000000; give a batch size up to {MAX_BATCH}"
    ]


def test_the_report_baseline_must_be_an_evaluated_model():
    with pytest.raises(ParamsError) as e:
        parse_params({"report": {"baseline": "nosuchmodel"}})
    assert e.value.problems == [
        "report.baseline: 'nosuchmodel' is not a model the pipeline evaluates (base, sft1, sft2, sft3, sft4, "
        "sfte, sfte_dpo); pick one of them"
    ]
    variants = {"sft": {"variants": {"lo": {"alpha": 8.0}}}}
    assert parse_params({**variants, "report": {"baseline": "lo"}}).report.baseline == "lo"
    with pytest.raises(ParamsError, match=r"report.baseline: 'sft1' .* \(base, lo, sfte, sfte_dpo\)"):
        parse_params({**variants, "report": {"baseline": "sft1"}})


def test_a_yaml_alias_bomb_is_refused_at_load_in_a_short_message(tmp_path):
    """Nine aliases of nine aliases ... expand to 9**6 mappings: refused before anything walks the tree."""
    path = tmp_path / "params.yaml"
    path.write_text(BILLION_LAUGHS)
    with pytest.raises(ParamsError) as e:
        load_params(path)
    assert e.value.problems == [
        f"aliases (*name) expand the file to more than {MAX_YAML_VALUES} values (MAX_YAML_VALUES of "
        "posttrain.core.config; params.yaml has a few hundred); write the values out instead of repeating "
        "aliases"
    ]


def test_a_recursive_yaml_alias_is_refused(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("base: {seed: 1}\nloop: &loop [1, *loop]\n")
    with pytest.raises(ParamsError) as e:
        load_params(path)
    assert e.value.problems == [
        "line 2: the alias *loop refers to the collection that holds it (an endless value); write the "
        "values out"
    ]


def test_a_few_aliases_and_merge_keys_still_load(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(
        "sft:\n  variants:\n    sft1: &v {alpha: 16.0, dropout: 0.05}\n    sft2: {<<: *v, alpha: 8.0}\n"
    )
    variants = load_params(path).sft.variants
    assert variants["sft1"] == SftVariant(16.0, 0.05) and variants["sft2"] == SftVariant(8.0, 0.05)


def test_a_long_value_is_quoted_short():
    with pytest.raises(ParamsError) as e:
        parse_params({"base": {"seed": "x" * 100_000}, "report": {"baseline": "y" * 100_000}})
    assert all(len(p) < 300 for p in e.value.problems), [len(p) for p in e.value.problems]
    assert e.value.problems[0].startswith("base.seed: expected an integer, got 'xxxx")
    assert "… (100002 characters)" in e.value.problems[0]
