"""dvc.yaml tells the truth: every stage depends on the code it runs, and the committed lock matches."""

import ast
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

SRC = ROOT / "src" / "posttrain"


def _imports(path: Path) -> set[str]:
    """posttrain modules a file imports anywhere (also inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("posttrain"):
            found.add(node.module)
            for alias in node.names:  # `from posttrain.evaluate import generation`
                if _path(f"{node.module}.{alias.name}").exists():
                    found.add(f"{node.module}.{alias.name}")
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("posttrain")}
    return found


def _path(module: str) -> Path:
    """The file of a posttrain module; a package is its __init__.py (it runs on any import below it)."""
    path = SRC.joinpath(*module.split(".")[1:])
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _closure(script: Path) -> set[str]:
    todo, seen = ["posttrain", *_imports(script)], set()
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        parts = mod.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # importing a module runs its packages
        todo += _imports(_path(mod))
    return {str(_path(m).relative_to(ROOT)) for m in seen}


def _stages():
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in spec.items():
        body = stage.get("do", stage)
        yield name, body


@pytest.mark.parametrize("name, body", list(_stages()), ids=[n for n, _ in _stages()])
def test_every_stage_depends_on_the_modules_it_imports(name, body):
    script = next(word for word in body["cmd"].split() if word.endswith(".py"))
    deps = set(body["deps"])
    assert script in deps
    missing = _closure(ROOT / script) - deps
    assert not missing, f"stage {name}: add {sorted(missing)} to its deps in dvc.yaml"


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_committed_lock_matches_code_and_params():
    """`dvc repro --allow-missing --dry` runs nothing when dvc.lock is in step with code, params and data."""
    dvc = Path(__import__("sys").executable).with_name("dvc")
    if not (ROOT / ".git").exists() or not (ROOT / "dvc.lock").exists():
        pytest.skip("not a checkout with a dvc.lock")
    proc = subprocess.run(
        [str(dvc), "repro", "--allow-missing", "--dry"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    stale = [line for line in proc.stdout.splitlines() if line.startswith("Running stage")]
    assert not stale, f"dvc.lock is stale; run `dvc repro` and commit dvc.lock and metrics/: {stale}"


def test_dpo_declares_all_of_evaluate():
    """The dpo stage evaluates its intermediate rounds with all of `evaluate`, so it depends on all of it."""
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert "evaluate" in spec["dpo"]["params"]
