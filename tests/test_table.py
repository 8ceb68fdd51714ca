"""Studies as DVC experiments (`posttrain.experiments.table`): a family counts as beaten only when its whole
interval clears the chance line, and the table reads each experiment's own params and metrics from DVC."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

from posttrain.experiments.table import (
    STUDY_FAMILIES,
    changed_params,
    family_cells,
    family_row,
    format_markdown,
    read_runs,
)


def test_a_family_is_beaten_only_when_its_interval_clears_the_chance_line():
    metrics = {"relaxed_acc": 30.0, "negative_acc": 0.0, "retain_relaxed_acc": 20.0, "bleu": 50.0}
    cells = {  # family: (accuracy, interval low, chance)
        "bar_shortest": (39.0, 27.0, 19.6),  # beaten
        "bar_value": (25.0, 15.0, 19.6),  # above chance, interval not: not beaten
        "line_trend": (90.0, 77.0, 50.0),  # beaten
        "pie_count": (37.5, 25.0, 37.5),
        "pie_smallest": (21.0, 20.8, 20.8),  # touching is not clearing
    }
    for f, (acc, low, chance) in cells.items():
        metrics.update({f"acc_{f}": acc, f"acc_{f}_ci_low": low, f"chance_{f}": chance})
    r = family_row(metrics)
    assert STUDY_FAMILIES == tuple(cells)
    assert r["beats_chance"] == 2 and r["relaxed_acc"] == 30.0 and r["critic"] is None
    assert r["families"]["bar_value"] == {"acc": 25.0, "ci_low": 15.0, "chance": 19.6}
    assert "bar_value 25 [15] /20" in family_cells(r["families"])
    del metrics["chance_pie_count"]  # a family without a chance line is never counted
    metrics["acc_pie_count_ci_low"] = 90.0
    r = family_row(metrics)
    assert r["beats_chance"] == 2 and "pie_count 38 [90] /—" in family_cells(r["families"])


def test_changed_params_are_the_dotted_keys_that_differ():
    base = {"sft": {"common": {"max_steps": 200, "lr": 0.005}}, "dpo": {"beta": 0.1}, "x": {}}
    exp = {"sft": {"common": {"max_steps": 800, "lr": 0.005}}, "dpo": {"beta": 0.1, "new": 1}, "x": {}}
    assert changed_params(exp, base) == {"dpo.new": 1, "sft.common.max_steps": 800}
    assert changed_params(base, base) == {}


# A stand-in of evaluate@<model>: the detailed metrics (DVC-cached) and the headline (git) of one model, and
# for sfte_dpo its adapter's provenance, from the params. sft1 beats bar_shortest's chance line only at 800
# steps; the held-out reward accuracy is 1000 × dpo.learning_rate.
STUB = """\
import json, os, sys, yaml
model = sys.argv[1]
p = yaml.safe_load(open("params.yaml"))
steps, lr = p["sft"]["common"]["max_steps"], p["dpo"]["learning_rate"]
d = {"relaxed_acc": steps / 10, "negative_acc": 0.0, "bleu": 50.0}
for f in ("bar_shortest", "bar_value", "line_trend", "pie_count", "pie_smallest"):
    d.update({f"acc_{f}": steps / 20, f"acc_{f}_ci_low": steps / 30, f"chance_{f}": 19.6})
os.makedirs("data/eval/metrics", exist_ok=True); os.makedirs("metrics", exist_ok=True)
os.makedirs(f"models/{model}", exist_ok=True)
json.dump(d, open(f"data/eval/metrics/{model}.json", "w"))
json.dump({k: d[k] for k in ("relaxed_acc", "negative_acc", "bleu")}, open(f"metrics/{model}.json", "w"))
rounds = [{"training": {"heldout": {"pairs": 48, "reward_accuracy": lr * 1000}}}]
json.dump({"rounds": rounds}, open(f"models/{model}/provenance.json", "w"))
"""
DVC_YAML = """\
stages:
  evaluate:
    foreach: [sft1, sft2, sfte_dpo]
    do:
      cmd: python stub.py ${item}
      deps: [stub.py]
      params: [sft.common.max_steps, dpo.learning_rate]
      outs:
        - data/eval/metrics/${item}.json
        - models/${item}
      metrics:
        - metrics/${item}.json:
            cache: false
"""


@pytest.mark.slow
def test_the_table_reads_each_experiment_s_own_params_and_metrics(tmp_path):
    """Two `dvc exp run --temp` experiments with stage targets: the first changes sft1 only (sft2 and
    sfte_dpo are not rerun: shown as the baseline's), the second sfte_dpo only; every row's families and
    held-out figure come from that experiment's own files in the DVC cache."""
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(ROOT / "params.yaml", repo / "params.yaml")
    (repo / "stub.py").write_text(STUB)
    (repo / "dvc.yaml").write_text(DVC_YAML)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t"}
    env.update(GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])  # the stub's python

    def sh(*cmd):
        proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    sh("git", "init", "-q")
    sh(sys.executable, "-m", "dvc", "init", "-q")
    sh(sys.executable, "-m", "dvc", "config", "core.analytics", "false")
    sh(sys.executable, "-m", "dvc", "repro")
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "baseline")
    dvc_exp = [sys.executable, "-m", "dvc", "exp", "run", "--temp", "-q"]
    sh(*dvc_exp, "-n", "steps800", "-S", "sft.common.max_steps=800", "evaluate@sft1")
    sh(*dvc_exp, "-n", "lr3e-4", "-S", "dpo.learning_rate=0.0003", "evaluate@sfte_dpo")

    runs = read_runs(repo)
    assert [r["name"] for r in runs] == ["HEAD", "steps800", "lr3e-4"]
    head, steps, lr = runs
    assert head["params"] == {} and head["baseline"] is None
    assert set(head["models"]) == {"sft1", "sft2", "sfte_dpo"}, "the models evaluated there, no others"
    assert head["models"]["sft1"]["families"]["bar_shortest"] == {
        "acc": 10.0,
        "ci_low": 200 / 30,
        "chance": 19.6,
    }
    assert head["models"]["sft1"]["beats_chance"] == 0 and head["models"]["sfte_dpo"]["dpo_heldout"] == {
        "pairs": 48,
        "reward_accuracy": pytest.approx(0.2),
    }

    assert steps["params"] == {"sft.common.max_steps": 800} and steps["baseline"] == head["rev"]
    sft1 = steps["models"]["sft1"]
    assert not sft1["as_baseline"] and sft1["beats_chance"] == 5 and sft1["relaxed_acc"] == 80.0
    assert sft1["families"]["pie_count"] == {"acc": 40.0, "ci_low": 800 / 30, "chance": 19.6}
    assert steps["models"]["sft2"]["as_baseline"] and steps["models"]["sfte_dpo"]["as_baseline"]

    assert lr["params"] == {"dpo.learning_rate": 0.0003}
    assert lr["models"]["sft1"]["as_baseline"] and not lr["models"]["sfte_dpo"]["as_baseline"]
    assert lr["models"]["sfte_dpo"]["dpo_heldout"]["reward_accuracy"] == pytest.approx(0.3)

    md = format_markdown(runs)
    assert "| steps800 | `sft.common.max_steps=800` | sft1 | **40** [27] |" in md
    assert "| steps800 | `sft.common.max_steps=800` | sft2 | as baseline |" in md
    assert "| chance line |  |  | 19.6 | 19.6 | 19.6 | 19.6 | 19.6 |" in md

    # the command: named experiments only, one model, the files written
    out = sh(
        sys.executable, "-m", "posttrain", "table", "steps800", "--model", "sft1",
        "--md", "study.md", "--json", "study.json",
    )  # fmt: skip
    assert "steps800 (of " in out and "sft.common.max_steps=800" in out and "beats 5/5" in out
    assert "lr3e-4" not in out and "sft2" not in out
    saved = json.loads((repo / "study.json").read_text())
    assert [r["name"] for r in saved["runs"]] == ["HEAD", "steps800"] and (repo / "study.md").exists()
    bad = subprocess.run(
        [sys.executable, "-m", "posttrain", "table", "nope"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1 and "no DVC experiment named nope" in bad.stdout

    # without the DVC cache (a fresh clone before `dvc pull`): the headline from git, no families
    shutil.rmtree(repo / ".dvc" / "cache")
    sft1 = read_runs(repo, models=["sft1", "sfte_dpo"])[0]["models"]
    assert sft1["sft1"]["detailed"] is False and sft1["sft1"]["relaxed_acc"] == 20.0
    assert sft1["sft1"]["families"]["bar_shortest"]["acc"] is None and sft1["sfte_dpo"]["dpo_heldout"] is None
