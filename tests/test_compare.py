from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain.__main__ import main
from posttrain.evaluate.metrics import holm_adjust
from posttrain.report.compare import CompareError, compare, format_markdown, format_p, load_responses

REFS = [
    "The highest bar is 2019 with 45 units.",
    "Sales fell by 12% between March and April.",
    "There is no line for Germany in this chart.",
    "The total is 1,234 across all regions.",
    "Blue represents the revenue of the northern division.",
    "The chart shows a steady increase over five years.",
]
SHORT = ["45", "12%", None, "1,234", "Blue", None]


def _rows(responses: list[str], **extra_per_row) -> list[dict]:
    rows = []
    for i, (ref, resp) in enumerate(zip(REFS, responses, strict=True)):
        row = {"id": f"q{i}", "prompt": f"question {i}", "reference": ref, "response": resp}
        row["image"] = f"{i}.png"
        for key, values in extra_per_row.items():
            row[key] = values[i]
        rows.append(row)
    return rows


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


WEAK = [
    "45",
    "It fell by 10 percent.",
    "Germany is at the top.",
    "1234",
    "red",
    "The chart shows an increase.",
]


@pytest.fixture
def files(tmp_path):
    """base = weak responses, perfect = the references, clone = a copy of base."""
    base = _write(tmp_path / "base.jsonl", _rows(WEAK))
    perfect = _write(tmp_path / "perfect.jsonl", _rows(REFS))
    clone = _write(tmp_path / "clone.jsonl", _rows(WEAK))
    return base, perfect, clone


def _run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------ CLI in process


def test_cli_json_structure(files, tmp_path, capsys):
    base, perfect, clone = files
    out_json = tmp_path / "out" / "cmp.json"
    code, out, err = _run(
        ["compare", "--baseline", "base", "--json", str(out_json), "--resamples", "200"]
        + [str(base), str(perfect), str(clone)],
        capsys,
    )
    assert code == 0, err
    result = json.loads(out_json.read_text())
    assert set(result) == {"models"}
    assert list(result["models"]) == ["base", "perfect", "clone"]
    for name, entry in result["models"].items():
        assert set(entry) == {"n", "metrics", "vs_baseline"}
        assert entry["n"] == 6
        assert list(entry["metrics"]) == ["bleu", "rouge_l"]  # no critic, short_answer, negative fields
        for m in entry["metrics"].values():
            assert set(m) == {"mean", "ci", "n"} and m["n"] == 6
            assert len(m["ci"]) == 2
            assert m["ci"][0] <= m["mean"] + 1e-9 and m["mean"] <= m["ci"][1] + 1e-9
        if name == "base":
            assert entry["vs_baseline"] == {}
        else:
            assert list(entry["vs_baseline"]) == ["bleu", "rouge_l"]
            for d in entry["vs_baseline"].values():
                assert set(d) == {"delta", "ci", "p", "p_holm", "n"} and d["n"] == 6
                assert len(d["ci"]) == 2
                assert 0 <= d["p"] <= 1
    # markdown: both tables
    assert "| model | n | bleu | rouge_l |" in out
    assert "vs base" in out
    assert "| perfect |" in out


def test_identical_models_have_zero_delta(files, tmp_path, capsys):
    base, _, clone = files
    out_json = tmp_path / "cmp.json"
    code, _, err = _run(
        ["compare", "--baseline", "base", "--json", str(out_json), str(base), str(clone)], capsys
    )
    assert code == 0, err
    vs = json.loads(out_json.read_text())["models"]["clone"]["vs_baseline"]
    for d in vs.values():
        assert d["delta"] == 0.0
        assert d["ci"] == [0.0, 0.0]
        assert d["p"] == 1.0


def test_responses_equal_to_references_score_100(files, tmp_path, capsys):
    base, perfect, _ = files
    out_json = tmp_path / "cmp.json"
    code, _, err = _run(
        ["compare", "--baseline", "base", "--json", str(out_json), str(base), str(perfect)], capsys
    )
    assert code == 0, err
    metrics = json.loads(out_json.read_text())["models"]["perfect"]["metrics"]
    assert metrics["bleu"]["mean"] == pytest.approx(100.0)
    assert metrics["rouge_l"]["mean"] == pytest.approx(100.0)
    assert metrics["bleu"]["ci"] == [pytest.approx(100.0), pytest.approx(100.0)]


def test_missing_critic_scores_leave_the_critic_in(tmp_path, capsys):
    scores = [80, 70, 60, 50, 40, 30]
    a = _write(tmp_path / "a.jsonl", _rows(WEAK, critic_score=scores))
    b = _write(tmp_path / "b.jsonl", _rows(REFS, critic_score=[90] * 6))
    out_json = tmp_path / "cmp.json"
    assert main(["compare", "--baseline", "a", "--json", str(out_json), str(a), str(b)]) == 0
    result = json.loads(out_json.read_text())
    assert list(result["models"]["a"]["metrics"]) == ["bleu", "rouge_l", "critic"]
    assert result["models"]["a"]["metrics"]["critic"]["mean"] == pytest.approx(55.0)
    assert result["models"]["b"]["vs_baseline"]["critic"]["delta"] == pytest.approx(35.0)

    # one unparsable reply (null) and one row without the field: b's mean uses its 4 scored rows, the
    # paired test the 4 rows scored for both: a's [80, 70, 60, 30] -> mean 60, delta 90 - 60 = 30
    rows = _rows(REFS, critic_score=[90] * 6)
    rows[3]["critic_score"] = None
    del rows[4]["critic_score"]
    _write(b, rows)
    assert main(["compare", "--baseline", "a", "--json", str(out_json), str(a), str(b)]) == 0
    result = json.loads(out_json.read_text())
    critic_a, critic_b = (result["models"][m]["metrics"]["critic"] for m in "ab")
    assert critic_a["mean"] == pytest.approx(55.0) and critic_a["n"] == 6
    assert critic_b["mean"] == pytest.approx(90.0) and critic_b["n"] == 4
    paired = result["models"]["b"]["vs_baseline"]["critic"]
    assert paired["delta"] == pytest.approx(30.0) and paired["n"] == 4
    assert "n=4" in capsys.readouterr().out  # n is shown where it is below the split's size

    # a model with no score at all has no critic mean: the metric is left out for every model
    _write(b, _rows(REFS, critic_score=[None] * 6))
    assert main(["compare", "--baseline", "a", "--json", str(out_json), str(a), str(b)]) == 0
    result = json.loads(out_json.read_text())
    for entry in result["models"].values():
        assert "critic" not in entry["metrics"]
    capsys.readouterr()


def test_relaxed_and_negative_metrics(tmp_path):
    """Relaxed accuracy on the 4 rows with a short answer (45, 12%, 1,234, Blue).

    WEAK: "45" ok; "It fell by 10 percent." -> 10 vs 12 is 17% off, wrong; "1234" ok; "red" wrong -> 50.
    PERFECT (whole reference sentences): "The highest bar is 2019 with 45 units." -> first number 2019,
    wrong; "Sales fell by 12% ..." -> 12 ok; "The total is 1,234 ..." -> 1234 ok; "Blue represents ..."
    is not "Blue" as text, wrong -> 50. With `extracted` answers ("45", "12", "1234", "blue") -> 100.
    Negative rows q2 and q5: base declined q2 only -> 50; perfect declined both -> 100.
    """
    neg = [False, False, True, False, False, True]
    base = _rows(WEAK, short_answer=SHORT, negative=neg, declined=[False, False, True, False, False, False])
    perfect = _rows(REFS, short_answer=SHORT, negative=neg, declined=[False, False, True, False, False, True])
    result = compare({"base": base, "perfect": perfect}, "base", n_resamples=200, seed=0)
    m = result["models"]
    assert list(m["base"]["metrics"]) == ["bleu", "rouge_l", "relaxed_acc", "negative_acc"]
    assert m["base"]["metrics"]["relaxed_acc"]["mean"] == pytest.approx(50.0)
    assert m["perfect"]["metrics"]["relaxed_acc"]["mean"] == pytest.approx(50.0)
    assert m["base"]["metrics"]["negative_acc"]["mean"] == pytest.approx(50.0)
    assert m["perfect"]["metrics"]["negative_acc"]["mean"] == pytest.approx(100.0)
    assert m["perfect"]["vs_baseline"]["relaxed_acc"]["delta"] == pytest.approx(0.0)
    assert m["perfect"]["vs_baseline"]["negative_acc"]["delta"] == pytest.approx(50.0)

    extracted = ["45", "12", None, "1234", "blue", None]
    perfect_x = _rows(REFS, short_answer=SHORT, extracted=extracted)
    base_x = _rows(WEAK, short_answer=SHORT, extracted=[None] * 6)  # nothing extracted: all wrong
    result = compare({"base": base_x, "perfect": perfect_x}, "base", n_resamples=50)
    assert result["models"]["perfect"]["metrics"]["relaxed_acc"]["mean"] == pytest.approx(100.0)
    assert result["models"]["base"]["metrics"]["relaxed_acc"]["mean"] == pytest.approx(0.0)
    assert "negative_acc" not in result["models"]["base"]["metrics"]


def test_compare_pairs_rows_by_id_not_order():
    base = _rows(WEAK)
    perfect = list(reversed(_rows(REFS)))
    result = compare({"base": base, "perfect": perfect}, "base", n_resamples=50)
    assert result["models"]["perfect"]["metrics"]["bleu"]["mean"] == pytest.approx(100.0)
    same = compare({"base": base, "shuffled": list(reversed(_rows(WEAK)))}, "base", n_resamples=50)
    assert same["models"]["shuffled"]["vs_baseline"]["bleu"]["delta"] == 0.0


def test_compare_in_memory_errors():
    with pytest.raises(CompareError, match="baseline 'nope'.*base, other"):
        compare({"base": _rows(WEAK), "other": _rows(WEAK)}, "nope")
    with pytest.raises(CompareError, match="other.*'q5'"):
        compare({"base": _rows(WEAK), "other": _rows(WEAK)[:5]}, "base")


def test_format_markdown_from_result():
    result = compare({"base": _rows(WEAK), "perfect": _rows(REFS)}, "base", n_resamples=50)
    md = format_markdown(result)
    lines = md.splitlines()
    assert lines[0] == "| model | n | bleu | rouge_l |"
    assert lines[2].startswith("| base | 6 | ")
    assert "vs base" in lines
    row = next(line for line in lines if line.startswith("| perfect |") and "(p" in line)
    assert row.count("(p=") + row.count("(p<") == 2


def test_p_values_below_the_bootstrap_resolution_read_as_a_bound():
    assert format_p(0.0) == "p<0.001" and format_p(0.0004) == "p<0.001"
    assert format_p(0.042) == "p=0.042" and format_p(None) == "p=n/a"


# ------------------------------------------------------------------ errors


def test_mismatched_ids(files, tmp_path, capsys):
    base, _, _ = files
    rows = _rows(REFS)
    rows[1]["id"] = "zz-extra"
    other = _write(tmp_path / "other.jsonl", rows)
    code, out, err = _run(["compare", "--baseline", "base", str(base), str(other)], capsys)
    assert code == 1
    assert "other.jsonl" in err and "base.jsonl" in err
    assert "'q1'" in err and "'zz-extra'" in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_duplicate_ids(files, tmp_path, capsys):
    base, _, _ = files
    rows = _rows(REFS)
    rows[4]["id"] = "q2"
    dup = _write(tmp_path / "dup.jsonl", rows)
    code, _, err = _run(["compare", "--baseline", "base", str(base), str(dup)], capsys)
    assert code == 1
    assert "duplicate id 'q2'" in err and "dup.jsonl" in err and "line 3" in err and "line 5" in err


def test_unknown_baseline(files, capsys):
    base, perfect, _ = files
    code, _, err = _run(["compare", "--baseline", "gpt", str(base), str(perfect)], capsys)
    assert code == 1
    assert "'gpt'" in err and "base" in err and "perfect" in err


def test_missing_field(files, tmp_path, capsys):
    base, _, _ = files
    rows = _rows(REFS)
    del rows[2]["response"]
    bad = _write(tmp_path / "bad.jsonl", rows)
    code, _, err = _run(["compare", "--baseline", "base", str(base), str(bad)], capsys)
    assert code == 1
    assert "bad.jsonl:3" in err and "'response'" in err


def test_bad_optional_field_type(files, tmp_path, capsys):
    base, _, _ = files
    rows = _rows(REFS, critic_score=[1, 2, "high", 4, 5, 6])
    bad = _write(tmp_path / "bad.jsonl", rows)
    code, _, err = _run(["compare", "--baseline", "base", str(base), str(bad)], capsys)
    assert code == 1
    assert "bad.jsonl:3" in err and "'critic_score'" in err


@pytest.mark.parametrize("score", ["150", "-0.5", "NaN", "Infinity", "-Infinity", "1e999"])
def test_a_critic_score_outside_0_100_or_not_finite_is_named(files, tmp_path, capsys, score):
    """Python's json reads NaN and Infinity literals (and 1e999 as inf): each would poison the critic mean."""
    base, _, _ = files
    lines = [json.dumps(r) for r in _rows(REFS, critic_score=[10, 20, 30, 40, 50, 60])]
    lines[3] = lines[3].replace('"critic_score": 40', f'"critic_score": {score}')
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n", encoding="utf-8")
    code, _, err = _run(["compare", "--baseline", "base", str(base), str(bad)], capsys)
    assert code == 1
    assert "bad.jsonl:4" in err and "'critic_score'" in err and "0-100" in err
    with pytest.raises(CompareError, match=r"bad.jsonl:4: field 'critic_score'"):
        load_responses(bad)


def test_check_rows_names_the_row_with_a_non_finite_critic_score():
    rows = _rows(REFS, critic_score=[10, 20, 30, 40, float("nan"), 60])
    with pytest.raises(CompareError, match=r"other: row 5: field 'critic_score' must be .*0-100.*nan"):
        compare({"base": _rows(REFS), "other": rows}, "base")
    rows[4]["critic_score"] = 100.5
    with pytest.raises(CompareError, match=r"other: row 5: field 'critic_score'"):
        compare({"base": _rows(REFS), "other": rows}, "base")
    rows[4]["critic_score"] = 100  # the ends of the scale are scores
    rows[0]["critic_score"] = 0
    assert compare({"base": _rows(REFS), "other": rows}, "base", n_resamples=10)["models"]["other"]["n"] == 6


def test_invalid_json_and_missing_file(files, tmp_path, capsys):
    base, _, _ = files
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "q0"}\n{not json\n', encoding="utf-8")
    code, _, err = _run(["compare", "--baseline", "base", str(base), str(bad)], capsys)
    assert code == 1 and "bad.jsonl" in err
    code, _, err = _run(["compare", "--baseline", "base", str(base), str(tmp_path / "missing.jsonl")], capsys)
    assert code == 1 and "missing.jsonl" in err


def test_an_empty_file_is_refused_naming_it(files, tmp_path, capsys):
    """Two empty files would compare n = 0 rows: a table of nothing, exit 0."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    (tmp_path / "other.jsonl").write_text("", encoding="utf-8")
    code, out, err = _run(
        ["compare", "--baseline", "empty", str(empty), str(tmp_path / "other.jsonl")], capsys
    )
    assert code == 1 and out == ""
    assert err == (
        f"error: {empty}: no rows; write one JSON object per line (a model's responses, one per prompt), "
        "or leave the file out\n"
    )
    with pytest.raises(CompareError, match="other: no rows"):
        compare({"base": _rows(WEAK), "other": []}, "base")


def test_load_responses_skips_blank_lines(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(_rows(REFS)[0]) + "\n\n" + json.dumps(_rows(REFS)[1]) + "\n", encoding="utf-8")
    assert [r["id"] for r in load_responses(path)] == ["q0", "q1"]


def test_usage_error_exit_code(capsys):
    assert main(["compare"]) == 2
    assert main([]) == 2
    capsys.readouterr()


# ------------------------------------------------------------------ subprocess


def test_cli_subprocess(files, tmp_path):
    base, perfect, _ = files
    out_json = tmp_path / "cmp.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "posttrain",
            "compare",
            "--baseline",
            "base",
            "--json",
            str(out_json),
            "--resamples",
            "100",
            "--seed",
            "3",
            str(base),
            str(perfect),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "vs base" in proc.stdout
    result = json.loads(out_json.read_text())
    assert set(result["models"]) == {"base", "perfect"}

    proc = subprocess.run(
        [sys.executable, "-m", "posttrain", "compare", "--baseline", "nope", str(base), str(perfect)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


def test_holm_adjusted_p_values_decide_the_significance_sentences():
    """A raw p below 0.05 among many tests is not called significant when Holm's adjustment lifts it."""
    from posttrain.report.compare import compare
    from posttrain.report.report import significance_summary

    result = compare(
        {"a": _rows(WEAK, critic_score=[50] * 6), "b": _rows(REFS, critic_score=[50] * 6)}, "a", 200, 0
    )
    entry = result["models"]["b"]["vs_baseline"]
    raw = [entry[m]["p"] for m in entry]
    assert [entry[m]["p_holm"] for m in entry] == pytest.approx(holm_adjust(raw))
    fake = {
        "models": {
            "a": {"vs_baseline": {}},
            "b": {
                "vs_baseline": {
                    "bleu": {"delta": 3.0, "p": 0.03, "p_holm": 0.06},
                    "critic": {"delta": 9.0, "p": 0.001, "p_holm": 0.002},
                }
            },
        }
    }
    summary = significance_summary(fake, "a")
    assert "significant: critic (+9.00, Holm p=0.002); not significant: bleu." in summary


def test_deltas_only_leaves_the_means_table_out():
    """The report shows each split's means once; its paired sections print only the deltas."""
    result = compare({"a": _rows(WEAK), "b": _rows(REFS)}, "a", 100, 0)
    full, deltas = format_markdown(result), format_markdown(result, deltas_only=True)
    assert "| model | n | bleu | rouge_l |" in full and "| model | n |" not in deltas
    assert deltas.startswith("| model | bleu | rouge_l |") and "| b | +" in deltas


def test_relaxed_accuracy_uses_the_evaluations_verdict_when_rows_carry_it():
    """The evaluation marks "The orange line is increasing." wrong for a cyan question although its
    extracted word matches: the report's paired tests must count it as the metrics files do."""
    from posttrain.report.compare import item_stats

    row = {
        "id": 1,
        "prompt": "Is the cyan line increasing?",
        "reference": "The cyan line is increasing.",
        "response": "The orange line is increasing.",
        "short_answer": "increasing",
        "extracted": "increasing",
    }
    assert item_stats([row], "relaxed_acc").value() == 100.0  # another tool's row: matched on the text
    assert item_stats([{**row, "correct": False}], "relaxed_acc").value() == 0.0
