"""Each stage end to end on the micro config, run as DVC runs it (a subprocess in the project layout)."""

import json
import shutil
import time

import pytest
from conftest import BILLION_LAUGHS, ROOT, run_stage

from posttrain.core.config import load_params
from posttrain.core.layout import pipeline_models
from posttrain.evaluate.evaluation import HEADLINE
from posttrain.evaluate.metrics import CORE_METRICS


@pytest.fixture(scope="module")
def project(tmp_path_factory, micro_params_file):
    """A scratch project folder where the stages run with their default paths, like `dvc repro` does."""
    root = tmp_path_factory.mktemp("project")
    shutil.copy(micro_params_file, root / "params.yaml")
    run_stage("prepare.py", cwd=root)
    return root


def test_prepare_outputs(project):
    names = sorted(p.name for p in (project / "data/prepared").iterdir())
    assert names == [
        "images",
        "pretrain_test.jsonl",
        "pretrain_train.jsonl",
        "report.json",
        "study_test.jsonl",
        "study_train.jsonl",
    ]


def test_base_evaluate_report(project):
    out = run_stage("base.py", cwd=project)
    assert "12 steps" in out
    base = project / "models/base"
    assert {"config.json", "model.safetensors", "provenance.json", "tokenizer.json"} <= {
        p.name for p in base.iterdir()
    }
    prov = json.loads((base / "provenance.json").read_text())
    assert (
        prov["kind"] == "local"
        and prov["training"]["steps"] == 12
        and prov["params"]["train"]["max_steps"] == 12
    )
    assert not (project / "checkpoints/base").exists()
    assert (project / "dvclive/base/plots/metrics/loss.tsv").exists()

    run_stage("evaluate.py", "--model", "base", cwd=project)
    # the table's row: the headline metrics only, so `dvc metrics show --md` fits a terminal
    assert set(json.loads((project / "metrics/base.json").read_text())) == set(HEADLINE)
    metrics = json.loads((project / "data/eval/metrics/base.json").read_text())
    for prefix in ("", "retain_"):
        for m in CORE_METRICS:
            for suffix in ("", "_ci_low", "_ci_high"):
                assert f"{prefix}{m}{suffix}" in metrics
    families = {
        json.loads(line)["family"]
        for split in ("study_test", "pretrain_test")
        for line in (project / f"data/prepared/{split}.jsonl").read_text().splitlines()
    }
    assert {k for k in metrics if k.startswith("acc_") and not k.endswith(("_low", "_high"))} == {
        f"acc_{f}" for f in families
    }
    assert all(not isinstance(v, dict) for v in metrics.values()), "metrics must be flat for dvc metrics show"
    rows = [json.loads(x) for x in (project / "data/eval/study_test/base.jsonl").read_text().splitlines()]
    assert {"id", "prompt", "reference", "response", "critic_score", "image"} <= set(rows[0])

    # the report takes every model of params: the others' evaluations stand in as copies of the base's
    others = pipeline_models(load_params(project / "params.yaml"))[1:]
    for name in others:
        for folder, suffix in (("study_test", "jsonl"), ("pretrain_test", "jsonl"), ("metrics", "json")):
            shutil.copy(
                project / f"data/eval/{folder}/base.{suffix}", project / f"data/eval/{folder}/{name}.{suffix}"
            )
    run_stage("report.py", cwd=project)
    report = (project / "metrics/report.md").read_text()
    assert "| base |" in report and "percentile bootstrap for means, Wilson for proportions" in report
    assert all(f"| {name} |" in report for name in others)
    assert (project / "metrics/report.png").stat().st_size > 1000
    assert "<img src='data:image/png;base64," in (project / "metrics/examples.html").read_text()


def test_bad_params_fail_before_any_work(project, tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text((project / "params.yaml").read_text().replace("max_steps: 12", "max_steps: -1"))
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, str(ROOT / "stages/base.py"), "--params", str(bad), "--out", str(tmp_path / "m")],
        capture_output=True,
        text=True,
        cwd=project,
    )
    assert proc.returncode != 0 and "base.train.max_steps: must be > 0" in proc.stderr
    assert not (tmp_path / "m").exists()


# A stage run under runpy, reporting afterwards whether torch was imported: validation must come first.
RUN_REPORTING_TORCH = """
import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    print("torch imported:", "torch" in sys.modules)
"""

STAGE_ARGS = {
    "prepare.py": [],
    "base.py": [],
    "sft.py": ["--variant", "sft1"],
    "ensemble.py": [],
    "preferences.py": [],
    "dpo.py": [],
    "evaluate.py": ["--model", "base"],
    "report.py": [],
}


def run_failing(script: str, *args: str, cwd) -> tuple[str, str]:
    """Run a stage that must fail on its input: exit status 1, no traceback; return (stdout, stderr)."""
    import os
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", RUN_REPORTING_TORCH, str(ROOT / "stages" / script), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    return proc.stdout, proc.stderr


@pytest.mark.parametrize("script", sorted(STAGE_ARGS))
def test_every_stage_reports_bad_params_alone_before_loading_torch(script, micro_params_file, tmp_path):
    import yaml

    data = yaml.safe_load(micro_params_file.read_text())
    data["base"]["seed"] = -1
    data["dpo"]["beta"] = "high"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    out, err = run_failing(script, *STAGE_ARGS[script], cwd=tmp_path)
    assert "params.yaml: 2 problem(s)" in err
    assert "base.seed: must be >= 0, got -1" in err and "dpo.beta: expected a number, got 'high'" in err
    assert "torch imported: False" in out


def test_a_yaml_syntax_error_is_reported_alone(micro_params_file, tmp_path):
    (tmp_path / "params.yaml").write_text(micro_params_file.read_text().replace("dpo:", "dpo: [", 1))
    _, err = run_failing("prepare.py", cwd=tmp_path)
    assert "not valid YAML" in err and "line " in err


def test_an_unknown_variant_is_reported_before_loading_torch(micro_params_file, tmp_path):
    shutil.copy(micro_params_file, tmp_path / "params.yaml")
    out, err = run_failing("sft.py", "--variant", "sft9", cwd=tmp_path)
    assert "--variant sft9: not a key of sft.variants (sft1, sft2, sft3, sft4)" in err
    assert "torch imported: False" in out


def test_a_bad_data_file_is_reported_alone(micro_params_file, tmp_path):
    """An LRV parquet without the expected columns: the data error's message, not a traceback."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    pq.write_table(pa.table({"id": ["a", "b"]}), tmp_path / "lrv.parquet")
    data = yaml.safe_load(micro_params_file.read_text())
    data["base"].update(model="hub", hub_id=str(tmp_path))  # a local folder needs no revision
    data["prepare"].update(source="lrv_chart")
    data["prepare"]["lrv"]["local_parquet"] = str(tmp_path / "lrv.parquet")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    _, err = run_failing("prepare.py", cwd=tmp_path)
    assert "lrv.parquet: missing columns" in err
    assert not (tmp_path / "data" / "prepared").exists()


@pytest.mark.parametrize("script", ["prepare.py", "sft.py"])
def test_a_yaml_alias_bomb_is_reported_alone_at_once(script, tmp_path):
    """Aliases of aliases (billion laughs): a short message in a moment, not minutes of expanded values."""
    (tmp_path / "params.yaml").write_text(BILLION_LAUGHS)
    t0 = time.perf_counter()
    out, err = run_failing(script, *STAGE_ARGS[script], cwd=tmp_path)
    assert time.perf_counter() - t0 < 30
    assert "aliases (*name) expand the file to more than" in err and len(err) < 1000
    assert "torch imported: False" in out


def test_a_hub_base_leaves_its_declared_curve_folder_empty_not_missing(micro_params_file, tmp_path):
    """dvc.yaml declares dvclive/base/plots as the base stage's output; a hub base trains nothing here, and
    without the folder `dvc repro` of the study preset failed at once ("output does not exist")."""
    import yaml
    from transformers import LlavaConfig

    data = yaml.safe_load(micro_params_file.read_text())
    LlavaConfig().save_pretrained(
        tmp_path / "hub"
    )  # a local folder needs no revision; its config, no weights
    data["base"].update(model="hub", hub_id=str(tmp_path / "hub"))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    stale = tmp_path / "dvclive" / "base" / "plots" / "metrics" / "loss.tsv"
    stale.parent.mkdir(parents=True)
    stale.write_text("step\tloss\n1\t9.0\n")  # an earlier tiny run's curve: not the hub base's
    run_stage("base.py", cwd=tmp_path)
    plots = tmp_path / "dvclive" / "base" / "plots"
    assert plots.is_dir() and not any(plots.iterdir())
    prov = json.loads((tmp_path / "models" / "base" / "provenance.json").read_text())
    assert prov["kind"] == "hub" and prov["family"] == "llava-1.5"


def test_a_hub_base_of_a_family_posttrain_does_not_describe_fails_naming_the_families(
    micro_params_file, tmp_path
):
    """base.hub_id at a Qwen2.5-VL checkpoint (its config.json: model_type qwen2_5_vl): the base stage fails
    from the config alone, naming the model_type and the families there are, and records nothing; before,
    it recorded the base and the SFT stage failed later, inside `LlavaForConditionalGeneration`'s loading."""
    import yaml
    from transformers import Qwen2_5_VLConfig

    data = yaml.safe_load(micro_params_file.read_text())
    Qwen2_5_VLConfig().save_pretrained(tmp_path / "hub")
    data["base"].update(model="hub", hub_id=str(tmp_path / "hub"))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    _, err = run_failing("base.py", cwd=tmp_path)
    assert "model_type 'qwen2_5_vl', which no model family of posttrain describes" in err
    assert "llava-1.5 (model_type 'llava')" in err
    assert not (tmp_path / "models" / "base").exists()
