"""bench/calibrate.py: a family counts as beaten only when its whole interval lies above its chance line."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _calibrate():
    spec = importlib.util.spec_from_file_location("calibrate", ROOT / "bench" / "calibrate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_family_is_beaten_only_when_its_interval_clears_the_chance_line():
    cal = _calibrate()
    metrics = {"relaxed_acc": 30.0, "negative_acc": 0.0, "retain_relaxed_acc": 20.0, "critic": 40.0}
    cells = {  # family: (accuracy, interval low, chance)
        "bar_shortest": (39.0, 27.0, 19.6),  # beaten
        "bar_value": (25.0, 15.0, 19.6),  # above chance, interval not: not beaten
        "line_trend": (90.0, 77.0, 50.0),  # beaten
        "pie_count": (37.5, 25.0, 37.5),
        "pie_smallest": (21.0, 20.8, 20.8),  # touching is not clearing
    }
    for f, (acc, low, chance) in cells.items():
        metrics.update({f"acc_{f}": acc, f"acc_{f}_ci_low": low, f"chance_{f}": chance})
    r = cal.row("x", {"sft.common.max_steps": "800"}, metrics, {"sft": 100.0})
    assert r["beats_chance"] == 2
    assert r["families"]["bar_value"] == {"acc": 25.0, "ci_low": 15.0, "chance": 19.6}
    assert "beats 2/5" in cal.line(r) and "bar_value 25 [15] /20" in cal.line(r)
    del metrics["chance_pie_count"]  # a family without a chance line is never counted
    metrics["acc_pie_count_ci_low"] = 90.0
    r = cal.row("x", {}, metrics, {"sft": 1.0})
    assert r["beats_chance"] == 2 and "pie_count 38 [90] /—" in cal.line(r)


def _ablation():
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location(
        "pretrain_ablation", ROOT / "bench" / "pretrain_ablation.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pretrain_ablation_reads_a_finished_workspace_into_one_row(tmp_path):
    """bench/pretrain_ablation.py --collect: the setting, the base's training log and every evaluated model,
    each with its families beaten counted as calibrate counts them."""
    import json

    ab = _ablation()
    (tmp_path / "eval" / "metrics").mkdir(parents=True), (tmp_path / "logs").mkdir()
    (tmp_path / "setting.json").write_text(json.dumps({"name": "captions", "overrides": {"a.b": "true"}}))
    (tmp_path / "logs" / "base.json").write_text(json.dumps({"train_seconds": 185.0, "final_loss": 0.19}))
    fams = ("bar_shortest", "bar_value", "line_trend", "pie_count", "pie_smallest")
    for model, low in (
        ("base", 0.0),
        ("sft1", 30.0),
    ):  # sft1 clears every chance line of 20 but line_trend's 50
        metrics = {
            "relaxed_acc": 1.0,
            "negative_acc": 2.0,
            "retain_relaxed_acc": 3.0,
            "retain_negative_acc": 4.0,
        }
        for f in fams:
            chance = 50.0 if f == "line_trend" else 20.0
            metrics.update({f"acc_{f}": low + 10, f"acc_{f}_ci_low": low, f"chance_{f}": chance})
        (tmp_path / "eval" / "metrics" / f"{model}.json").write_text(json.dumps(metrics))
    r = ab.collect(tmp_path)
    assert r["name"] == "captions" and r["base_train_seconds"] == 185.0 and r["base_final_loss"] == 0.19
    assert set(r["models"]) == {"base", "sft1"}
    assert r["models"]["base"]["beats_chance"] == 0 and r["models"]["sft1"]["beats_chance"] == 4
    assert r["models"]["sft1"]["retain_negative_acc"] == 4.0
    assert "sft1" in ab.line(r) and "beats 4/5" in ab.line(r)


def test_pretrain_ablation_reads_an_experiment_through_dvc_api(monkeypatch):
    """--rev NAME=REV: every model evaluated in that experiment, read at that revision; others left out."""
    import json

    import dvc.api

    ab = _ablation()
    metrics = {"acc_bar_shortest": 40.0, "acc_bar_shortest_ci_low": 30.0, "chance_bar_shortest": 19.6}
    asked = []

    def read(path, rev):
        asked.append((path, rev))
        if path == "params.yaml":  # the experiment's variants name the models to read
            return "sft:\n  variants: {sft1: {alpha: 16}, sft2: {alpha: 8}}\n"
        if path.endswith(("/base.json", "/sft1.json")):
            return json.dumps(metrics)
        raise FileNotFoundError(path)

    monkeypatch.setattr(dvc.api, "read", read)
    r = ab.collect_rev("seed1", "abc123")
    assert set(r["models"]) == {"base", "sft1"} and r["rev"] == "abc123"
    assert r["models"]["sft1"]["beats_chance"] == 1 and r["base_train_seconds"] is None
    assert ("data/eval/metrics/sft1.json", "abc123") in asked and "seed1: abc123" in ab.line(r)
