"""Conclusions across seeds: the table reads the committed result and each seed<k> DVC experiment."""

import json
import os
import subprocess

import pytest
import yaml

from posttrain.seeds import format_markdown, seed_results, seeds_table, verdict

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


def commit(repo, seed: int, report: dict, ref: str | None = None) -> None:
    (repo / "params.yaml").write_text(yaml.safe_dump({"base": {"seed": seed}}))
    (repo / "metrics").mkdir(exist_ok=True)
    (repo / "metrics/report_compare.json").write_text(json.dumps(report))
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True, env=ENV)
    subprocess.run(["git", "commit", "-qm", f"seed {seed}"], cwd=repo, check=True, env=ENV)
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
    commit(tmp_path, 1, compare(paired(38, 0.0), paired(-2.0, 0.03)), ref="refs/exps/ab/cdef/seed1")
    commit(tmp_path, 2, compare(paired(42, 0.0), paired(1.0, 0.5)), ref="refs/exps/12/3456/seed2")
    commit(tmp_path, 7, {"models": {}}, ref="refs/exps/98/7654/other")  # not a seed experiment: ignored
    results = seed_results(tmp_path)
    assert list(results) == [0, 1, 2]
    rows = {(r["against"], r["model"], r["metric"]): r for r in seeds_table(results)}
    bleu = rows[("base", "sft1", "bleu")]
    assert bleu["deltas"] == {0: 40, 1: 38, 2: 42} and bleu["mean"] == 40 and bleu["sd"] == pytest.approx(2.0)
    assert bleu["significant"] == "all"
    assert rows[("sfte", "sfte_dpo", "critic")]["significant"] == "mixed"
    md = format_markdown(list(rows.values()), [0, 1, 2])
    assert "| sft1 | bleu | +40.0 | +38.0 | +42.0 | +40.0 ± 2.0 | all |" in md
    assert "## against sfte" in md
