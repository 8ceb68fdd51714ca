"""A kill never costs a result (issue 11, items 1–4): real SIGKILLs of base, SFT and DPO, then reruns.

- a killed `base` resumes every tensor and ends where an uninterrupted run ends, curves included;
- a checkpoint left by a run with other params is not resumed;
- DPO checkpoints and resumes, and the temporary folder of the killed run is cleaned;
- outputs hold no timings: the same run writes the same bytes;
- a loss that becomes non-finite stops the run with an error, and nothing is saved.
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
from conftest import (
    ROOT,
    kill_after_first_checkpoint,
    make_adapter,
    micro_params,
    run_stage,
    write_params,
)

from posttrain.core.io import atomic_dir
from posttrain.data.examples import load_split
from posttrain.train.checkpoints import claim_checkpoints

pytestmark = pytest.mark.slow


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def prepared_project(tmp_path_factory, prepared):
    """Micro params with a base that trains long enough to be killed mid-way, and the prepared data."""
    root = tmp_path_factory.mktemp("resume")
    params = micro_params()
    params["base"]["train"].update(max_steps=20, save_steps=5)
    params["sft"]["common"].update(max_steps=20, save_steps=5, batch_size=4)
    params["dpo"].update(batch_size=1, epochs=2.0, save_steps=2)
    write_params(root / "params.yaml", params)
    shutil.copytree(prepared, root / "data/prepared")
    return root


@pytest.fixture(scope="module")
def sfte(base_dir):
    return make_adapter(base_dir, base_dir.parent / "resume_sfte", alpha=16, rank=8, seed=5)


@pytest.fixture(scope="module")
def pairs(prepared):
    train = load_split(prepared, "study_train")[:8]
    return [
        {
            "image": e.image,
            "prompt": e.question,
            "history": [list(t) for t in e.history],
            "chosen": e.answer,
            "rejected": "I do not know.",
        }
        for e in train
    ]


def project_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_killed_base_resumes_every_tensor_and_ends_as_an_uninterrupted_run(prepared_project, tmp_path):
    whole = project_copy(prepared_project, tmp_path / "whole")
    run_stage("base.py", cwd=whole)

    killed = project_copy(prepared_project, tmp_path / "killed")
    step = kill_after_first_checkpoint(killed, "base.py", checkpoints=killed / "checkpoints/base")
    assert 0 < step < 20
    assert not (killed / "models/base").exists(), "a killed run leaves no model for DVC to cache"
    shutil.rmtree(killed / "dvclive/base")  # as `dvc repro` does: it deletes a stage's outputs before its run
    out = run_stage("base.py", cwd=killed)
    assert f"resuming from checkpoints/base/checkpoint-{step}" in out
    assert "resumed 64 weight tensors" in out
    # same weights, same provenance (no timings in it), same curves: the kill cost nothing
    assert files_of(killed / "models/base") == files_of(whole / "models/base")
    assert files_of(killed / "dvclive/base") == files_of(whole / "dvclive/base")
    loss = (killed / "dvclive/base/plots/metrics/loss.tsv").read_text().splitlines()
    steps = [int(line.split("\t")[0]) for line in loss[1:]]
    assert steps == [5, 10, 15, 20], "logged at global steps (a divisor of save_steps), no restart at 0"
    assert not list((killed / "dvclive/base/plots").rglob("*runtime*")), "timings stay out of outputs"
    timing = json.loads((killed / "logs/base.json").read_text())
    assert timing["resumed_from"].endswith(f"checkpoint-{step}") and timing["train_seconds"] > 0
    assert not (killed / "checkpoints/base").exists()


def test_a_checkpoint_from_other_params_is_not_resumed(prepared_project, tmp_path):
    project = project_copy(prepared_project, tmp_path / "p")
    run_stage("base.py", cwd=project)
    ckpts = project / "checkpoints/sft2"
    step = kill_after_first_checkpoint(project, "sft.py", "--variant", "sft2", checkpoints=ckpts)
    assert step < 20
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["sft"]["variants"]["sft2"]["alpha"] = 4.0
    write_params(project / "params.yaml", params)
    out = run_stage("sft.py", "--variant", "sft2", cwd=project)
    assert "left by a run with other inputs (its params changed); starting over" in out
    assert "resuming from" not in out
    prov = json.loads((project / "models/sft/sft2/provenance.json").read_text())
    assert prov["params"]["variant"]["alpha"] == 4.0 and prov["training"]["steps"] == 20


def test_claim_names_what_changed_and_keeps_a_matching_checkpoint(tmp_path, capsys):
    ckpts = tmp_path / "ck"
    claim_checkpoints(ckpts, {"params": {"lr": 1}, "data": "a"})
    (ckpts / "checkpoint-5").mkdir()
    claim_checkpoints(ckpts, {"params": {"lr": 1}, "data": "a"})
    assert (ckpts / "checkpoint-5").exists()
    claim_checkpoints(ckpts, {"params": {"lr": 1}, "data": "b"})
    assert not (ckpts / "checkpoint-5").exists()
    assert "its data changed" in capsys.readouterr().out
    (ckpts / "checkpoint-7").mkdir()
    (ckpts / "fingerprint.json").unlink()  # left by a version that wrote none
    claim_checkpoints(ckpts, {"params": {"lr": 1}, "data": "b"})
    assert not (ckpts / "checkpoint-7").exists()


def test_killed_dpo_resumes_and_its_temporary_folder_is_cleaned(
    prepared_project, base_dir, sfte, pairs, tmp_path
):
    def dpo_project(name: str) -> Path:
        project = project_copy(prepared_project, tmp_path / name)
        shutil.copytree(base_dir, project / "models/base")
        shutil.copytree(sfte, project / "models/sfte")
        (project / "data/preferences").mkdir(parents=True)
        rows = "".join(json.dumps(r) + "\n" for r in pairs)
        (project / "data/preferences/pairs.jsonl").write_text(rows)
        (project / "metrics").mkdir()
        (project / "metrics/preferences.json").write_text(json.dumps({"pairs_kept": len(pairs)}))
        return project

    whole = dpo_project("whole")
    run_stage("dpo.py", cwd=whole)
    killed = dpo_project("killed")
    step = kill_after_first_checkpoint(killed, "dpo.py", checkpoints=killed / "checkpoints/sfte_dpo/round1")
    assert list((killed / "models").glob(".sfte_dpo.tmp-*")), "SIGKILL leaves the temporary folder"
    out = run_stage("dpo.py", cwd=killed)
    assert f"resuming from checkpoints/sfte_dpo/round1/checkpoint-{step}" in out
    assert "left by a killed run" in out
    assert not list((killed / "models").glob(".sfte_dpo.tmp-*"))
    assert not (killed / "checkpoints/sfte_dpo").exists()
    assert files_of(killed / "models/sfte_dpo") == files_of(whole / "models/sfte_dpo")
    assert files_of(killed / "dvclive/sfte_dpo") == files_of(whole / "dvclive/sfte_dpo")


def test_a_diverging_loss_stops_the_run_and_saves_nothing(prepared_project, tmp_path):
    project = project_copy(prepared_project, tmp_path / "p")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["base"]["train"].update(learning_rate=1.0e30, max_steps=20)
    write_params(project / "params.yaml", params)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "stages/base.py")],
        cwd=project,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    assert re.search(r"the training (loss|grad_norm) became (nan|inf) at step \d+", proc.stderr), proc.stderr
    assert "lower the learning rate" in proc.stderr
    assert not (project / "models/base").exists()


def test_atomic_dir_removes_what_a_killed_run_left(tmp_path):
    (tmp_path / ".out.tmp-abc").mkdir()
    (tmp_path / ".out.old-123").mkdir()
    (tmp_path / ".other.tmp-x").mkdir()
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "f").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-x", "out"]
