"""Ablation grids across GPU groups (`posttrain.experiments.grid`): every combination once, one experiment per
group at a time, the groups at once, params checked before anything runs, and real DVC experiments that each
saw their own group's GPUs."""

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time

import pytest
import yaml
from conftest import ROOT

from posttrain.core.config import ParamsError
from posttrain.experiments.grid import (
    Experiment,
    check_experiments,
    dvc_command,
    experiment_names,
    gpu_groups,
    parse_settings,
    run_grid,
)


def test_every_combination_of_the_values_in_order():
    grid = parse_settings(["dpo.beta=0.05,0.1", "dpo.learning_rate=1e-5, 2e-5"])
    assert grid == [
        {"dpo.beta": "0.05", "dpo.learning_rate": "1e-5"},
        {"dpo.beta": "0.05", "dpo.learning_rate": "2e-5"},
        {"dpo.beta": "0.1", "dpo.learning_rate": "1e-5"},
        {"dpo.beta": "0.1", "dpo.learning_rate": "2e-5"},
    ]
    with pytest.raises(ParamsError) as e:
        parse_settings(["dpo.beta", "dpo.epochs=1,,2", "x=1", "x=2"])
    text = str(e.value)
    assert "-S dpo.beta: expected KEY=VALUE" in text
    assert "-S dpo.epochs=1,,2: an empty value" in text
    assert "-S x: given twice" in text


def test_names_are_short_unique_and_valid_refs():
    grid = parse_settings(["sft.variants.sft1.alpha=4,8", "sft.variants.sft2.alpha=16", "dpo.beta=0.1"])
    names = experiment_names("abl", grid)
    assert names == [
        "abl-sft.variants.sft1.alpha4-sft.variants.sft2.alpha16-beta0.1",
        "abl-sft.variants.sft1.alpha8-sft.variants.sft2.alpha16-beta0.1",
    ]
    assert experiment_names("g", [{"evaluate.critic.model": "a/b c"}]) == ["g-modela_b_c"]


def test_gpu_groups_are_disjoint():
    assert gpu_groups(None) == [""]
    assert gpu_groups(["0,1", "2, 3"]) == ["0,1", "2,3"]
    with pytest.raises(ParamsError) as e:
        gpu_groups(["0,1", "1,2", "a"])
    assert "GPU 1 is also in --gpus 0,1" in str(e.value) and "--gpus a: expected GPU indices" in str(e.value)


def test_params_are_checked_before_anything_runs(tmp_path):
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    good = Experiment("ok", {"sft.variants.sft1.alpha": "8", "dpo.beta": "0.2"})
    check_experiments(params, [good])
    bad = [
        good,
        Experiment("typo", {"sft.variants.sft9.alpha": "8"}),
        Experiment("range", {"sft.variants.sft1.dropout": "1.5"}),
    ]
    with pytest.raises(ParamsError) as e:
        check_experiments(params, bad)
    text = str(e.value)
    assert "-S sft.variants.sft9.alpha" in text and "no key 'sft9' under sft.variants" in text
    assert "sft1, sft2, sft3, sft4" in text, "the message lists the keys there are"
    assert "range: " in text and "sft.variants.sft1.dropout" in text
    assert "ok:" not in text


def test_launch_processes_follows_the_group_unless_set():
    e = Experiment("g-beta0.2", {"dpo.beta": "0.2"})
    cmd = dvc_command(e, 2)
    assert cmd[1:] == ["-m", "dvc", "--wait-for-lock", "exp", "run", "--temp", "-n", "g-beta0.2"] + [
        "-S",
        "dpo.beta=0.2",
        "-S",
        "launch.processes=2",
    ]
    assert "launch.processes=2" not in dvc_command(Experiment("x", {"launch.processes": "1"}), 2)
    assert "launch.processes=1" not in " ".join(dvc_command(e, None))


def test_each_group_runs_one_experiment_at_a_time_and_the_groups_at_once(capsys):
    spans, lock = [], threading.Lock()

    def fake(e: Experiment, group: str):
        t0 = time.perf_counter()
        time.sleep(0.2)
        with lock:
            spans.append((group, e.name, t0, time.perf_counter()))
        return (3 if e.name == "e2" else 0), None

    experiments = [Experiment(f"e{i}", {"k": str(i)}) for i in range(5)]
    outcomes = run_grid(experiments, ["0,1", "2,3"], fake)
    assert [o.name for o in outcomes] == [e.name for e in experiments]
    assert sorted(name for _, name, _, _ in spans) == [f"e{i}" for i in range(5)], "each once"
    assert [o.returncode for o in outcomes] == [0, 0, 3, 0, 0], "a failure does not stop the others"
    for group in ("0,1", "2,3"):
        mine = sorted((s, t) for g, _, s, t in spans if g == group)
        assert all(t1 <= s2 for (_, t1), (s2, _) in zip(mine, mine[1:])), "one at a time per group"
    a = [(s, t) for g, _, s, t in spans if g == "0,1"]
    b = [(s, t) for g, _, s, t in spans if g == "2,3"]
    assert a and b and any(s1 < t2 and s2 < t1 for s1, t1 in a for s2, t2 in b), "the groups overlap"
    failed = next(o for o in outcomes if o.name == "e2")
    assert f"[grid] e2 on GPUs {failed.gpus}: FAILED (exit 3)" in capsys.readouterr().out


STAGE = (
    "sleep 1 && python -c \"import json, os, yaml; p = yaml.safe_load(open('params.yaml')); "
    "json.dump({'gpus': os.environ.get('CUDA_VISIBLE_DEVICES', ''), 'processes': p['launch']['processes'], "
    "'examples': p['report']['examples']}, open('seen.json', 'w'))\""
)


@pytest.mark.slow
def test_a_grid_of_real_dvc_experiments_on_two_gpu_groups(tmp_path):
    """Four `dvc exp run --temp` experiments, two at a time: each stage saw its own group in
    CUDA_VISIBLE_DEVICES and launch.processes = the group's size, and DVC recorded all four."""
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(ROOT / "params.yaml", repo / "params.yaml")
    (repo / "dvc.yaml").write_text(
        yaml.safe_dump(
            {
                "stages": {
                    "probe": {
                        "cmd": STAGE,
                        "params": ["report.examples"],
                        "metrics": [{"seen.json": {"cache": False}}],
                    }
                }
            }
        )
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}

    def sh(*cmd):
        return subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, check=True).stdout

    sh("git", "init", "-q")
    sh("git", "config", "user.email", "t@t")
    sh("git", "config", "user.name", "t")
    sh(sys.executable, "-m", "dvc", "init", "-q")
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "init")
    grid = [sys.executable, "-m", "posttrain", "grid", "-S", "report.examples=1,2,3,4", "--name", "ex"]
    proc = subprocess.run(
        [*grid, "--gpus", "0,1", "--gpus", "2"], cwd=repo, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ran_on = dict(re.findall(r"\[grid\] (ex-examples\d) on GPUs ([\d,]+): done", proc.stdout))
    assert sorted(ran_on) == [f"ex-examples{i}" for i in (1, 2, 3, 4)], proc.stdout
    assert set(ran_on.values()) == {"0,1", "2"}, "both groups took experiments"
    shown = json.loads(sh(sys.executable, "-m", "dvc", "exp", "show", "--json"))
    seen = {
        rev["name"]: rev["data"]["metrics"]["seen.json"]["data"]
        for entry in shown
        for exp in entry.get("experiments") or []
        for rev in exp["revs"]
    }
    assert sorted(seen) == sorted(ran_on)
    for name, s in seen.items():
        assert s["gpus"] == ran_on[name], (name, s)
        assert s["processes"] == len(ran_on[name].split(",")), (name, s)
        assert s["examples"] == int(name.removeprefix("ex-examples"))
    assert (repo / "logs" / "grid" / "ex-examples1.log").exists()
    assert sh("git", "status", "--porcelain", "--untracked-files=no") == "", "the workspace is untouched"
    # a bad value stops the grid before any experiment starts
    bad = subprocess.run(
        [sys.executable, "-m", "posttrain", "grid", "-S", "report.examples=-1,2", "--name", "bad"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1 and "report.examples" in bad.stdout + bad.stderr
    assert "Traceback" not in bad.stderr and "[grid]" not in bad.stdout


def test_targets_follow_the_overrides_and_reach_the_dry_run(tmp_path, capsys):
    """--target evaluate_sft@sft1: each experiment reproduces that stage and what it depends on only."""
    from posttrain.experiments.grid import main

    cmd = dvc_command(Experiment("c", {"sft.common.max_steps": "800"}), None, ["evaluate_sft@sft1"])
    assert cmd[-3:] == ["-S", "sft.common.max_steps=800", "evaluate_sft@sft1"]
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    argv = ["-S", "sft.common.max_steps=400,800", "--name", "cal", "--params", str(params), "--dry-run"]
    assert main([*argv, "--target", "evaluate_sft@sft1", "--target", "evaluate_sft@sft2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        f"dvc --wait-for-lock exp run --temp -n cal-max_steps{s} -S sft.common.max_steps={s} "
        "evaluate_sft@sft1 evaluate_sft@sft2"
        for s in (400, 800)
    ]
