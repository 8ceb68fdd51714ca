"""One launcher for every stage (`posttrain.launch`): `launch.processes` read when the stage runs; the
generation stages shard their prompts over the processes and give the same outputs as one process."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, make_adapter, run_stage

from posttrain.launch import SHARDED, command, params_path


def test_one_process_runs_the_script_itself_and_several_go_through_torchrun():
    assert command("stages/evaluate.py", ["--model", "base"], 1) == [
        sys.executable,
        "stages/evaluate.py",
        "--model",
        "base",
    ]
    several = command("stages/evaluate.py", ["--model", "base"], 2)
    assert several[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert several[5:] == ["stages/evaluate.py", "--model", "base"]
    assert command("stages/report.py", [], 4) == [sys.executable, "stages/report.py"]  # not sharded
    assert SHARDED == {"sft.py", "evaluate.py", "preferences.py"}


def test_the_params_file_is_the_stages_own():
    assert params_path(["--model", "base"]) == "params.yaml"
    assert params_path(["--params", "x.yaml", "--model", "base"]) == "x.yaml"
    assert params_path(["--params=y.yaml"]) == "y.yaml"


def test_no_stage_depends_on_launch_and_every_command_goes_through_the_launcher():
    """Changing launch.processes must rerun nothing: it is in no stage's params and no command's text."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        body = stage.get("do", stage)
        assert body["cmd"].startswith("python -m posttrain.launch stages/"), name
        assert "launch" not in body["cmd"].split("posttrain.launch", 1)[1], name
        for entry in body.get("params", []):
            keys = entry if isinstance(entry, str) else " ".join(str(v) for v in entry.values())
            assert "launch" not in str(keys), name


def launch(script: str, *args: str, cwd: Path) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "posttrain.launch", str(ROOT / "stages" / script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    if proc.returncode:
        pytest.fail(f"launch {script} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def project(tmp_path_factory, micro_params_file):
    root = tmp_path_factory.mktemp("launch")
    shutil.copy(micro_params_file, root / "params.yaml")
    run_stage("prepare.py", cwd=root)
    run_stage("base.py", cwd=root)
    make_adapter(root / "models" / "base", root / "models" / "sfte", alpha=16.0)
    return root


def set_processes(root: Path, n: int) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["launch"] = {"processes": n}
    (root / "params.yaml").write_text(yaml.safe_dump(params))


def outputs(root: Path) -> dict[str, bytes]:
    files = [*(root / "data" / "eval").rglob("*.json*"), *(root / "data" / "preferences").rglob("*.jsonl")]
    files += [root / "metrics" / "base.json", root / "metrics" / "preferences.json"]
    return {str(f.relative_to(root)): f.read_bytes() for f in files}


def test_two_processes_give_the_outputs_of_one(project):
    """Evaluation (greedy) and preference sampling (seeded per batch) under 2 gloo processes write the same
    bytes as one process: batch k goes to process k mod 2, results are gathered in order, one writes."""
    set_processes(project, 1)
    launch("evaluate.py", "--model", "base", cwd=project)
    launch("preferences.py", cwd=project)
    one = outputs(project)
    assert any("study_test" in k for k in one) and any("pairs" in k for k in one)
    for folder in ("data/eval", "data/preferences"):
        shutil.rmtree(project / folder)
    set_processes(project, 2)
    log = launch("evaluate.py", "--model", "base", cwd=project)
    log += launch("preferences.py", cwd=project)
    assert "generated" in log and " here" in log, "the work must have been split"
    assert outputs(project) == one


def sft_params(root: Path, processes: int) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["launch"] = {"processes": processes}
    params["sft"]["common"].update(max_steps=6, batch_size=8, save_steps=0, warmup_steps=0)
    params["sft"]["variants"]["sft1"]["dropout"] = 0.0  # dropout draws differ per process: the test's noise
    (root / "params.yaml").write_text(yaml.safe_dump(params))


def test_sft_in_two_processes_trains_the_adapter_of_one(project, tmp_path):
    """Data-parallel SFT (gloo, 2 processes of 4 rows) against one process of 8 rows, same 6 steps.

    Each step sees the same 8 conversations (the Trainer's sampler permutes once; process r takes every
    other micro-batch of 4 of that order) and the loss is divided by the supervised tokens of all 8, so the
    gradients agree up to float rounding (a sum over two processes; rows padded to their own process's
    longest). The weights do not agree to rounding: AdamW divides each gradient by its running size, so an
    entry whose gradient is near zero moves a full step in the direction rounding gives it (measured: up to
    30% of the largest lora_B entry). As models they agree: the test loss of the two adapters differs by
    less than 5% of what SFT moved it from the base (measured: 1.3%).
    """
    from posttrain.data import load_split
    from posttrain.models import load_model
    from posttrain.training import TeacherForcedCollator, TeacherForcedDataset, answer_loss

    losses = {}
    for n in (1, 2):
        sft_params(project, n)
        shutil.rmtree(project / "models" / "sft1", ignore_errors=True)
        log = launch("sft.py", "--variant", "sft1", cwd=project)
        assert "6 steps" in log
        models = tmp_path / f"models{n}"
        shutil.copytree(project / "models", models)
        for name in ("sft1", "base"):
            model, processor = load_model(name, models, "cpu")
            ds = TeacherForcedDataset(
                load_split(project / "data/prepared", "study_test"), project / "data/prepared", processor
            )
            batch = TeacherForcedCollator(processor.tokenizer.pad_token_id)([ds[i] for i in range(len(ds))])
            inputs = {k: v for k, v in batch.items() if k not in ("labels", "answer_start")}
            with torch.no_grad():
                losses[name if name == "base" else n] = answer_loss(model, inputs, batch["labels"])[0].item()
    moved = abs(losses["base"] - losses[1])
    assert moved > 0.01, losses
    assert abs(losses[2] - losses[1]) < 0.05 * moved, losses
