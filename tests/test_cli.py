"""`python -m posttrain`: help that reads as plain text, and input errors printed as messages alone."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain.core.config import ParamsError
from posttrain.core.runtime import exit_status
from posttrain.report.compare import _OPTIONAL_FIELDS, REQUIRED_FIELDS


def _help(*command: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "posttrain", *command, "--help"], capture_output=True, text=True, check=True
    )
    return proc.stdout


@pytest.mark.parametrize("command", [(), ("compare",), ("pin",)])
def test_help_reads_as_plain_text(command):
    text = _help(*command)
    assert "``" not in text and ":class:" not in text and "`posttrain." not in text


def test_compare_help_lists_the_fields_of_its_rows():
    text = _help("compare")
    for name in REQUIRED_FIELDS + tuple(name for name, _, _ in _OPTIONAL_FIELDS):
        assert re.search(rf"\b{name}\b", text), name


def test_an_input_error_is_its_message_alone_with_status_1(capsys):
    def bad():
        raise ParamsError(["dpo.beta: must be > 0, got -1"], "params.yaml")

    assert exit_status(bad) == 1
    assert capsys.readouterr().err == "error: params.yaml: 1 problem(s):\n  - dpo.beta: must be > 0, got -1\n"
    assert exit_status(lambda: None) == 0 and exit_status(lambda: 3) == 3


def test_a_bug_keeps_its_traceback():
    def bug():
        raise KeyError("not the user's to fix")

    with pytest.raises(KeyError):
        exit_status(bug)


QUIET = """
import sys
from pathlib import Path

import posttrain.models.loading  # before setup, as the e2e runner and the benchmarks import it
import posttrain.train.trainer
from posttrain.core.runtime import setup

setup(1)
from transformers import AutoProcessor

AutoProcessor.from_pretrained(sys.argv[1])
model, _, _ = posttrain.models.loading.load_base(sys.argv[1])
model.is_gradient_checkpointing  # what TRL's DPO reads each step
for on in (False, True):
    posttrain.train.trainer.training_arguments(
        sys.argv[2], max_steps=1, batch_size=1, learning_rate=1e-3, warmup_steps=0, weight_decay=0.0, seed=0,
        save_steps=0, gradient_checkpointing=on,
    )
print("done")
"""


def test_loading_and_training_setup_print_no_library_noise(base_dir, tmp_path):
    """No "CLIPImageProcessor requires torchvision" line, no gradient_checkpointing FutureWarning."""
    proc = subprocess.run(
        [sys.executable, "-c", QUIET, str(base_dir), str(tmp_path / "out")], capture_output=True, text=True
    )
    assert proc.returncode == 0 and proc.stdout == "done\n", proc.stderr
    assert proc.stderr == ""


def test_the_output_of_dvc_plots_show_is_not_committed():
    """`dvc plots show` writes dvc_plots/index.html in the project: a rendering, not a source."""
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        pytest.skip("not a git checkout")
    proc = subprocess.run(["git", "check-ignore", "-q", "dvc_plots/index.html"], cwd=root)
    assert proc.returncode == 0
