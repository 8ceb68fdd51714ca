"""Real DVC on the micro config in a scratch git repo: a change reruns exactly what it affects, and the
results travel to a fresh clone through an S3 remote.

Slow (a few minutes): every stage runs as a subprocess, as `dvc repro` runs it.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, micro_params

from posttrain.core.config import load_params
from posttrain.core.layout import model_dir, pipeline_models
from posttrain.evaluate.evaluation import HEADLINE

pytestmark = pytest.mark.slow

ENV = {
    **os.environ,
    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    "PYTHONPATH": str(ROOT / "src"),
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@t",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@t",
}


def sh(*cmd: str, cwd: Path) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True)
    if proc.returncode:
        pytest.fail(
            f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return proc.stdout + proc.stderr


def ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("dvcrepo")
    for item in ("stages", "src", "dvc.yaml", ".gitignore"):
        src = ROOT / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, root / item)
    params = micro_params()
    params["sft"]["common"].update(max_steps=10, save_steps=0, batch_size=4)  # 10: one logged loss
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh("git", "init", "-q", cwd=root)
    sh(sys.executable, "-m", "dvc", "init", "-q", cwd=root)
    shutil.copy(ROOT / ".dvcignore", root / ".dvcignore")  # what the plot over dvclive/sft leaves out
    sh(sys.executable, "-m", "dvc", "config", "core.analytics", "false", cwd=root)
    sh("git", "add", "-A", cwd=root)
    sh("git", "commit", "-qm", "init", cwd=root)
    out = sh(sys.executable, "-m", "dvc", "repro", cwd=root)
    stages = {
        "prepare",
        "base",
        "sft@sft1",
        "sft@sft4",
        "ensemble",
        "evaluate@sfte",
        "evaluate_sft@sft1",
        "report",
    }
    assert stages <= ran(out)
    sh("git", "add", "-A", cwd=root)
    sh("git", "commit", "-qm", "repro", cwd=root)
    return root


@pytest.fixture()
def s3_url():
    """An S3-compatible server (moto) on 127.0.0.1 with an empty bucket ``results``; yields its URL."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=url, region_name="us-east-1", **S3_KEYS).create_bucket(Bucket="results")
    try:
        yield url
    finally:
        server.stop()


S3_KEYS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}


def test_a_clone_pulls_the_results_from_an_s3_remote_and_has_nothing_to_rerun(repo, s3_url, tmp_path):
    """README "Sharing results": push to an S3 remote, then a fresh clone pulls and reruns no stage."""
    env = {**ENV, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    env.pop("AWS_PROFILE", None)

    def dvc(*args: str, cwd: Path) -> str:
        proc = subprocess.run(
            [sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, capture_output=True, text=True
        )
        assert proc.returncode == 0, f"dvc {' '.join(args)}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        return proc.stdout + proc.stderr

    sh("git", "add", "-A", cwd=repo)  # whatever the module's tests left, committed with its dvc.lock
    sh("git", "commit", "-qm", "results", "--allow-empty", cwd=repo)
    assert "up to date" in dvc("status", cwd=repo)
    dvc("remote", "add", "-d", "storage", "s3://results/posttrain", cwd=repo)
    dvc("remote", "modify", "storage", "endpointurl", s3_url, cwd=repo)
    sh("git", "commit", "-qam", "remote", cwd=repo)
    assert "pushed" in dvc("push", cwd=repo)
    assert "in sync" in dvc("status", "--cloud", cwd=repo)

    clone = tmp_path / "clone"
    sh("git", "clone", "-q", str(repo), str(clone), cwd=tmp_path)
    assert not (clone / "models" / "sfte").exists() and not (clone / ".dvc" / "cache").exists()
    assert "fetched" in dvc("pull", cwd=clone)
    assert "Data and pipelines are up to date." in dvc("status", cwd=clone)
    out = dvc("repro", cwd=clone)
    assert ran(out) == set(), out
    for adapter in ("sft1", "sfte", "sfte_dpo"):
        name = model_dir(adapter) / "adapter_model.safetensors"
        assert (clone / name).read_bytes() == (repo / name).read_bytes()


def plots_json(repo: Path) -> dict:
    """`dvc plots show --json`: every plot's renders by name, and the errors."""
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", "plots", "show", "--json"],
        cwd=repo,
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def downstream_of(root: Path, stage: str) -> set[str]:
    """Every stage that (transitively) depends on `stage`, from the edges of `dvc dag --dot`."""
    out = sh(sys.executable, "-m", "dvc", "dag", "--dot", cwd=root)
    edges = re.findall(r'"([^"]+)"\s*->\s*"([^"]+)"', out)
    found, todo = set(), [stage]
    while todo:
        s = todo.pop()
        for a, b in edges:
            if a == s and b not in found:
                found.add(b)
                todo.append(b)
    return found


def test_changing_one_variant_reruns_only_what_it_affects(repo):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["sft"]["variants"]["sft2"]["alpha"] = 4.0
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    status = sh(sys.executable, "-m", "dvc", "status", cwd=repo)
    changed = set(re.findall(r"^([\w@.-]+):\s*$", status, flags=re.M))
    # ensemble and report list sft.variants (their members and rows): its change shows there too
    assert changed == {"sft@sft2", "ensemble", "report"}, status

    out = sh(sys.executable, "-m", "dvc", "repro", cwd=repo)
    expected = {"sft@sft2", "evaluate_sft@sft2", "ensemble", "report"} | downstream_of(repo, "ensemble")
    assert ran(out) == expected, out
    assert {"sft@sft1", "sft@sft3", "sft@sft4", "evaluate_sft@sft1", "evaluate@base"}.isdisjoint(ran(out))


def test_experiment_with_set_param_runs_and_is_listed(repo):
    """`dvc exp run -S` reruns what the key feeds and lists the experiment with its params and metrics (a
    report key: the variant-level granularity is the test above's, and an experiment's own rerun of SFT and
    everything after it would double that test's minutes)."""
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "alpha", cwd=repo)
    out = sh(sys.executable, "-m", "dvc", "exp", "run", "-n", "few", "-S", "report.examples=3", cwd=repo)
    assert ran(out) == {"report"}, out
    show = sh(sys.executable, "-m", "dvc", "exp", "show", "--md", cwd=repo)
    assert "few" in show and "report.examples" in show and "relaxed_acc" in show


def committed(repo: Path) -> None:
    """Run what is pending and commit it: the tests below start from a repo in step with its lock."""
    sh(sys.executable, "-m", "dvc", "repro", cwd=repo)
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "state", "--allow-empty", cwd=repo)


def test_forced_rerun_of_a_stage_leaves_the_lock_unchanged(repo):
    """Same code and params, same output hashes: no timings or other run-to-run noise in any output."""
    committed(repo)
    for stage in ("base", "sft@sft1", "dpo"):
        out = sh(sys.executable, "-m", "dvc", "repro", "--force", "--single-item", stage, cwd=repo)
        assert ran(out) == {stage}, out
        diff = subprocess.run(["git", "diff", "--stat"], cwd=repo, capture_output=True, text=True).stdout
        assert not diff, f"dvc repro --force {stage} changed tracked files:\n{diff}"


def test_a_typo_costs_no_result(repo):
    """A typo fails the stage before any work, with the message alone; fixing it reruns nothing."""
    committed(repo)
    good = (repo / "params.yaml").read_text()
    params = yaml.safe_load(good)
    params["sft"]["variants"]["sft2"]["alpah"] = params["sft"]["variants"]["sft2"].pop("alpha")
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", "repro"], cwd=repo, env=ENV, capture_output=True, text=True
    )
    assert proc.returncode != 0
    assert "sft.variants.sft2.alpah: unknown key" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    (repo / "params.yaml").write_text(good)
    out = sh(sys.executable, "-m", "dvc", "repro", cwd=repo)
    assert ran(out) == set(), f"every output (the curves too) comes back from DVC's cache:\n{out}"
    status = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True)
    assert not status.stdout.strip(), status.stdout


def test_the_metrics_table_is_one_row_per_model_and_fits_a_terminal(repo):
    out = sh(sys.executable, "-m", "dvc", "metrics", "show", "--md", cwd=repo)
    rows = [line for line in out.splitlines() if line.startswith("|")]
    columns = [c.strip() for c in rows[0].strip("|").split("|")]
    assert len(columns) <= 10, columns
    assert columns[0] == "Path" and "relaxed_acc" in columns and "retain_relaxed_acc" in columns
    paths = [r.strip("|").split("|")[0].strip() for r in rows[2:]]
    models = pipeline_models(load_params(repo / "params.yaml"))
    assert sorted(paths) == sorted(f"metrics/{m}.json" for m in models), "no preferences or report rows"


def test_dvc_plots_are_the_curves_of_every_variant(repo, tmp_path):
    sh(sys.executable, "-m", "dvc", "plots", "show", "-o", str(tmp_path / "plots"), cwd=repo)
    page = (tmp_path / "plots" / "index.html").read_text()
    for plot in ("base_loss", "dpo"):
        assert f"vegaEmbed('#{plot}'" in page
    shown = plots_json(repo)
    assert not shown.get("errors"), shown["errors"]
    plots = {name for name, renders in shown["data"].items() if renders}
    variants = load_params(repo / "params.yaml").sft.variants
    # the folder dvclive/sft: each variant's files, every metric of it its own plot
    assert {f"dvclive/sft/{v}/plots/metrics/loss.tsv" for v in variants} <= plots
    assert not {p for p in plots if p.startswith(("dvclive/base", "dvclive/sfte_dpo"))}, "outs, not plots"
    assert (repo / "metrics/curves.png").stat().st_size > 1000
    assert "![curves](curves.png)" in (repo / "metrics/report.md").read_text()


def test_a_variant_added_by_set_param_is_trained_ensembled_evaluated_and_reported(repo):
    """`dvc exp run -S '+sft.variants.sft5=...'` (``+``: a key params.yaml does not have): dvc.yaml names no
    variant, so sft5 is trained, combined into sfte, evaluated and reported with nothing else changed.
    Last in the module: the workspace keeps the experiment's params."""
    committed(repo)
    variant = "+sft.variants.sft5={alpha: 12.0, dropout: 0.0}"
    out = sh(sys.executable, "-m", "dvc", "exp", "run", "-n", "sft5", "-S", variant, cwd=repo)
    assert {"sft@sft5", "ensemble", "evaluate_sft@sft5", "report"} <= ran(out), out
    assert {"prepare", "base", "sft@sft1", "evaluate_sft@sft1", "evaluate@base"}.isdisjoint(ran(out)), out
    assert (repo / "models/sft/sft5/adapter_model.safetensors").is_file()
    ensemble = json.loads((repo / "models/sfte/provenance.json").read_text())["ensemble"]
    assert ensemble["members"] == ["sft1", "sft2", "sft3", "sft4", "sft5"] and ensemble["exact_average"]
    assert set(json.loads((repo / "metrics/sft5.json").read_text())) == set(HEADLINE)
    assert "| sft5 |" in (repo / "metrics/report.md").read_text()
    curves = plots_json(repo)
    assert curves["data"].get("dvclive/sft/sft5/plots/metrics/loss.tsv") and not curves.get("errors")
