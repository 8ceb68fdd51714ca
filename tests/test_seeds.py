"""Conclusions across seeds: the table reads the committed result and each seed<k> DVC experiment."""

import json
import os
import subprocess

import pytest
import yaml

from posttrain.experiments.seeds import format_markdown, seed_results, seeds_table, verdict

ENV = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
       "GIT_COMMITTER_EMAIL": "t@t"}  # fmt: skip


def paired(delta: float, p_holm: float) -> dict:
    return {"delta": delta, "p": p_holm, "p_holm": p_holm, "ci": [delta - 1, delta + 1], "n": 100}


def compare(sft_bleu: dict, dpo_vs_sfte: dict) -> dict:
    return {
        "against": {
            "base": {"base": {"vs_baseline": {}}, "sft1": {"vs_baseline": {"bleu": sft_bleu}}},
            "sfte": {"sfte_dpo": {"vs_baseline": {"critic": dpo_vs_sfte}}},
        }
    }


def head(repo) -> str:
    return subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True
    ).stdout.strip()


def exp_ref(baseline: str, name: str) -> str:
    """How DVC stores a named experiment: refs/exps/<baseline[:2]>/<baseline[2:]>/<name>."""
    return f"refs/exps/{baseline[:2]}/{baseline[2:]}/{name}"


def commit(repo, seed: int, report: dict, ref: str | None = None, code="v1", lr=0.1) -> None:
    (repo / "params.yaml").write_text(yaml.safe_dump({"base": {"seed": seed}, "dpo": {"learning_rate": lr}}))
    lock = {"stages": {"sft": {"deps": [{"path": "src/posttrain/train/sft.py", "md5": code}]}}}
    (repo / "dvc.lock").write_text(yaml.safe_dump(lock))
    (repo / "metrics").mkdir(exist_ok=True)
    (repo / "metrics/report_compare.json").write_text(json.dumps(report))
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True, env=ENV)
    subprocess.run(["git", "commit", "--allow-empty", "-qm", f"seed {seed}"], cwd=repo, check=True, env=ENV)
    if ref:  # how DVC stores a named experiment: refs/exps/<2>/<38>/<name>
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout
        subprocess.run(["git", "update-ref", ref, sha.strip()], cwd=repo, check=True)
        subprocess.run(["git", "reset", "-q", "--hard", "HEAD~1"], cwd=repo, check=True)


def test_verdicts():
    assert verdict([paired(5, 0.001), paired(3, 0.01)]) == "all"
    assert verdict([paired(5, 0.001), paired(-3, 0.01)]) == "mixed"  # significant both times, opposite signs
    assert verdict([paired(5, 0.001), paired(1, 0.4)]) == "mixed"
    assert verdict([paired(1, 0.3), paired(-1, 0.4)]) == "none"


def test_the_table_holds_every_comparison_of_every_seed_and_flags_flips(tmp_path):
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    commit(tmp_path, 0, compare(paired(40, 0.0), paired(0.5, 0.6)))
    base = head(tmp_path)
    commit(tmp_path, 1, compare(paired(38, 0.0), paired(-2.0, 0.03)), ref=exp_ref(base, "seed1"))
    commit(tmp_path, 2, compare(paired(42, 0.0), paired(1.0, 0.5)), ref=exp_ref(base, "seed2"))
    commit(tmp_path, 7, {"models": {}}, ref=exp_ref(base, "other"))  # not a seed experiment: ignored
    results, _ = seed_results(tmp_path)
    assert list(results) == [0, 1, 2]
    rows = {(r["against"], r["model"], r["metric"]): r for r in seeds_table(results)}
    bleu = rows[("base", "sft1", "bleu")]
    assert bleu["deltas"] == {0: 40, 1: 38, 2: 42} and bleu["mean"] == 40 and bleu["sd"] == pytest.approx(2.0)
    assert bleu["significant"] == "all"
    assert rows[("sfte", "sfte_dpo", "critic")]["significant"] == "mixed"
    md = format_markdown(list(rows.values()), [0, 1, 2])
    assert "| sft1 | bleu | +40.0 | +38.0 | +42.0 | +40.0 ± 2.0 | all |" in md
    assert "## against sfte" in md


def test_the_table_takes_only_experiments_of_the_same_code_and_params(tmp_path):
    """A seed run with older code or other settings is another recipe's result: it never stands in."""
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    commit(tmp_path, 0, compare(paired(10, 0.0), paired(0.5, 0.6)), code="v1")
    old = head(tmp_path)
    commit(tmp_path, 1, compare(paired(-99, 0.0), paired(-9, 0.0)), ref=exp_ref(old, "seed1"), code="v1")
    commit(tmp_path, 0, compare(paired(40, 0.0), paired(0.5, 0.6)), code="v2")  # the code changed
    new = head(tmp_path)
    commit(
        tmp_path, 2, compare(paired(-99, 0.0), paired(-9, 0.0)), ref=exp_ref(new, "seed2"), code="v2", lr=0.2
    )
    commit(tmp_path, 1, compare(paired(38, 0.0), paired(-2.0, 0.03)), ref=exp_ref(new, "seed1"), code="v2")
    commit(tmp_path, 0, compare(paired(40, 0.0), paired(0.5, 0.6)), code="v2")  # a commit of the README, say
    results, stale = seed_results(tmp_path)
    assert list(results) == [0, 1], (
        "seed1 of the same recipe counts though DVC filed it under the last commit"
    )
    assert results[1]["base"]["sft1"]["vs_baseline"]["bleu"]["delta"] == 38
    assert sorted(stale) == sorted([f"seed1 of {old[:7]}", f"seed2 of {new[:7]}"])  # older code; other lr
