"""`python -m posttrain`: help that reads as plain text, and input errors printed as messages alone."""

import re
import subprocess
import sys

import pytest

from posttrain.compare import _OPTIONAL_FIELDS, REQUIRED_FIELDS
from posttrain.config import ParamsError
from posttrain.runtime import exit_status


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
