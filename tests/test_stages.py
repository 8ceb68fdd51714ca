"""Each stage end to end on the micro config, run as DVC runs it (a subprocess in the project layout)."""

import json
import shutil

import pytest
from conftest import ROOT, run_stage

from posttrain.evaluation import CORE_METRICS


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
    metrics = json.loads((project / "metrics/base.json").read_text())
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

    run_stage("report.py", "--models", "base", cwd=project)
    report = (project / "metrics/report.md").read_text()
    assert "| base |" in report and "percentile bootstrap for means, Wilson for proportions" in report
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
